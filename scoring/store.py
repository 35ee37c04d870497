"""The model store: trained artifacts kept under a URI, and this node's verified copies.

One interface for every backend: a URI names a folder, and its scheme picks the
filesystem. ``file://`` (or a plain path) and what ``pyarrow.fs.FileSystem.from_uri``
resolves (``s3://``, ``gs://``, ``abfs://``, ``hdfs://``) are built in; any other
scheme goes through fsspec when it is installed (with the scheme's package, e.g.
``adlfs``). Credentials and endpoints come from the storage client's own
environment variables (``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``,
``AWS_REGION``, ``AWS_ENDPOINT_URL``, ``GOOGLE_APPLICATION_CREDENTIALS``, ...) on
each node, never from a project setting; `display_uri` is the only form of a URI
that logs and status output show.

Layout of a store::

    <store>/<version>/model.npz, model.json          the artifact (see scoring.persistence)
    <store>/<version>/model_card.md, model_card.json, score_distribution.png, rejects.csv

The registry keeps ``<store>/<version>`` as the artifact's URI with its sha256.
A loader on a node reads an artifact from a remote store once into that node's
cache, ``<data_dir>/cache/models/<sha256>/``: content-addressed, so a copy is
valid for every version and store URI with those bytes, and nothing there needs
invalidating. The sha256 is checked when a copy is made and again at every load;
a damaged copy is fetched again. An artifact on a ``file://`` store is read in
place (no copy), its sha256 checked the same way.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit, urlunsplit

from configs.errors import IntegrityError, InvalidInputError, ModelUnavailableError

# scoring.persistence (and with it numba) is imported where a model is read, so that
# the jobs' I/O helpers here import fast and before the numba cache is configured.

logger = logging.getLogger(__name__)

_SCHEME = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
# How a storage client words a refusal of the credentials (pyarrow raises a plain
# OSError carrying the AWS error name, e.g. "AWS Error ACCESS_DENIED").
_DENIED = re.compile(r"ACCESS_DENIED|AccessDenied|INVALID_ACCESS_KEY_ID|InvalidAccessKeyId|"
                     r"SIGNATURE_DOES_NOT_MATCH|SignatureDoesNotMatch|EXPIRED_TOKEN|ExpiredToken|"
                     r"Forbidden|\b403\b|PermissionDenied|AuthorizationFailure")
_CREDENTIALS_HINT = ("check the storage credentials in this node's environment "
                     "(AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, GOOGLE_APPLICATION_CREDENTIALS, ...)")


# ------------------------------------------------------------------ URIs


def is_remote(uri: str | os.PathLike[str]) -> bool:
    """True for a URI whose scheme is not ``file``; a plain path is local."""
    match = _SCHEME.match(str(uri))
    return bool(match) and match.group(1).lower() != "file"


def local_path(uri: str | os.PathLike[str]) -> Path:
    """The absolute local path of a plain path or a ``file://`` URI."""
    text = str(uri)
    if text.lower().startswith("file://"):
        return Path(unquote(urlsplit(text).path))
    return Path(text).expanduser().resolve()


def normalize_uri(uri: str | os.PathLike[str]) -> str:
    """A plain path as an absolute ``file://`` URI; a URI without a trailing slash."""
    text = str(uri)
    if not _SCHEME.match(text):
        return local_path(text).as_uri()
    parts = urlsplit(text)
    path = parts.path.rstrip("/")
    return urlunsplit(parts._replace(path=path)) if path else text


def display_uri(uri: str | os.PathLike[str]) -> str:
    """The URI as logs and status show it: without user information, query or fragment."""
    text = str(uri)
    if not _SCHEME.match(text):
        return text
    parts = urlsplit(text)
    host = parts.netloc.rsplit("@", 1)[-1]
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


def join_uri(uri: str, *names: str) -> str:
    """``uri`` with ``names`` appended to its path, its query kept (the store's options)."""
    if not _SCHEME.match(uri):
        return str(Path(uri).joinpath(*names))
    parts = urlsplit(uri)
    path = "/".join([parts.path.rstrip("/"), *names])
    return urlunsplit(parts._replace(path=path))


def filesystem_for(uri: str | os.PathLike[str]) -> tuple[Any, str]:
    """(pyarrow filesystem, path within it) for a plain path or a URI.

    pyarrow's own filesystems first (options in the query, e.g. ``?region=``); a
    scheme pyarrow does not know goes through fsspec, the query as its options.
    Raises InvalidInputError naming the scheme when neither resolves it.
    """
    import pyarrow as pa
    import pyarrow.fs as pafs

    text = str(uri)
    if not _SCHEME.match(text):
        return pafs.LocalFileSystem(), str(local_path(text))
    try:
        return pafs.FileSystem.from_uri(text)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
        pyarrow_error = exc
    scheme = _SCHEME.match(text).group(1)
    try:
        import fsspec
        from fsspec.core import url_to_fs
    except ImportError:
        raise InvalidInputError(
            f"{display_uri(text)}: pyarrow has no filesystem for {scheme}:// ({pyarrow_error}) "
            "and fsspec is not installed") from None
    # fsspec takes a filesystem's options as keyword arguments, not in the URL.
    parts = urlsplit(text)
    options = dict(parse_qsl(parts.query))
    try:
        fs, path = url_to_fs(urlunsplit(parts._replace(query="", fragment="")), **options)
    except (ImportError, ValueError, TypeError) as exc:
        known = ", ".join(sorted(fsspec.available_protocols()))
        raise InvalidInputError(
            f"{display_uri(text)}: no filesystem for {scheme}:// ({exc}); pyarrow's and fsspec's "
            f"known schemes: s3, gs, abfs, hdfs, file, {known}") from None
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), path


def storage_error(exc: OSError, uri: str | os.PathLike[str], role: str = "") -> OSError:
    """``exc`` as FileNotFoundError, PermissionError or OSError whose message names the
    URI (display form, after ``role``: "input", "output", ...) and what to check; the
    original stays the cause."""
    where = (f"{role}: " if role else "") + display_uri(uri)
    if isinstance(exc, FileNotFoundError):
        error: OSError = FileNotFoundError(f"{where} does not exist")
    elif isinstance(exc, PermissionError) or _DENIED.search(str(exc)):
        error = PermissionError(f"{where}: access denied ({_first_line(exc)}); {_CREDENTIALS_HINT}")
    else:
        error = OSError(f"{where}: {_first_line(exc)}")
    error.storage_uri = display_uri(uri)  # marks an error that names its URI already
    error.__cause__ = exc
    return error


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def read_bytes(fs: Any, path: str) -> bytes:
    with fs.open_input_stream(path) as stream:
        return stream.read()


def write_bytes(fs: Any, path: str, data: bytes) -> None:
    """Writes a whole file: on a local filesystem through a temporary name and a rename,
    so a reader never sees half a file; an object store's put is whole already."""
    import pyarrow.fs as pafs

    parent = str(PurePosixPath(path).parent)
    if isinstance(fs, pafs.LocalFileSystem):
        fs.create_dir(parent, recursive=True)
        tmp = f"{parent}/.{PurePosixPath(path).name}.{os.getpid()}.tmp"
        with fs.open_output_stream(tmp) as out:
            out.write(data)
        fs.move(tmp, path)
        return
    with fs.open_output_stream(path) as out:
        out.write(data)


# ------------------------------------------------------------- the store


class ArtifactStore:
    """A model store named by a URI (`Settings.model_store`): artifacts go in with
    `put`, and `load_model_from_store` reads one back on any node."""

    def __init__(self, uri: str | os.PathLike[str]):
        self.uri = normalize_uri(uri)

    def __repr__(self) -> str:
        return f"ArtifactStore({display_uri(self.uri)!r})"

    def artifact_uri(self, version: str) -> str:
        return join_uri(self.uri, version)

    def put(self, local_dir: Path, version: str) -> str:
        """Copies every file of ``local_dir`` to ``<store>/<version>/``; returns that URI.

        ``model.json`` goes last, so a reader that finds it finds the arrays too
        (a reader checks the sha256 anyway). Raises OSError naming the URI.
        """
        from scoring.persistence import METADATA_FILE

        target = self.artifact_uri(version)
        files = sorted((p for p in local_dir.iterdir() if p.is_file()), key=lambda p: p.name == METADATA_FILE)
        try:
            fs, base = filesystem_for(target)
            for file in files:
                write_bytes(fs, f"{base}/{file.name}", file.read_bytes())
        except OSError as exc:
            raise storage_error(exc, target, "model store") from exc
        logger.info("model %s stored at %s (%d files)", version, display_uri(target), len(files))
        return target


def fetch_artifact(uri: str, sha256: str, cache_dir: Path) -> Path:
    """A local folder holding the artifact's files, whose sha256 is ``sha256``.

    A ``file://`` artifact is its own folder (checked by the loader). A remote one
    is copied once into ``cache_dir/<sha256>/`` and checked before it is kept.
    Raises IntegrityError when the stored files do not have the registered sha256,
    ModelUnavailableError when they are missing or cannot be read (naming the URI).
    """
    from scoring.persistence import ARTIFACT_FILES, artifact_sha256

    if not _SHA256.match(sha256 or ""):
        raise IntegrityError(f"model artifact {display_uri(uri)}: registered sha256 {sha256!r} "
                             "is not 64 lowercase hex digits")
    if not is_remote(uri):
        return local_path(uri)
    final = cache_dir / sha256
    if final.is_dir():
        if _holds_artifact(final, sha256):
            return final
        logger.warning("the cached copy of %s in %s is damaged: fetching it again", display_uri(uri), final)
        shutil.rmtree(final, ignore_errors=True)
    cache_dir.mkdir(parents=True, exist_ok=True)
    incoming = Path(tempfile.mkdtemp(prefix=".incoming-", dir=cache_dir))
    try:
        name = ""
        try:
            fs, base = filesystem_for(uri)
            for name in ARTIFACT_FILES:
                (incoming / name).write_bytes(read_bytes(fs, f"{base}/{name}"))
        except FileNotFoundError as exc:
            raise ModelUnavailableError(
                f"model artifact {display_uri(uri)}: {name or 'the folder'} is missing from the model store") from exc
        except OSError as exc:
            raise ModelUnavailableError(str(storage_error(exc, uri, "model artifact"))) from exc
        actual = artifact_sha256(incoming)
        if actual != sha256:
            raise IntegrityError(
                f"model artifact {display_uri(uri)}: sha256 is {actual}, expected {sha256}; "
                "the stored files were changed or replaced after the model was registered")
        try:
            os.rename(incoming, final)
        except OSError:
            if not final.is_dir():  # else another process on this node cached it first
                raise
        logger.info("cached model artifact %s in %s", display_uri(uri), final)
    finally:
        shutil.rmtree(incoming, ignore_errors=True)
    return final


def _holds_artifact(directory: Path, sha256: str) -> bool:
    from scoring.persistence import ARTIFACT_FILES, artifact_sha256

    try:
        return all((directory / n).is_file() for n in ARTIFACT_FILES) and artifact_sha256(directory) == sha256
    except OSError:
        return False


def load_model_from_store(uri: str, *, sha256: str, feature_set_version: str | None,
                          cache_dir: Path) -> Any:
    """The compiled forest of the artifact at ``uri``, through this node's cache, its
    sha256 and feature-set version verified (see `fetch_artifact` for the errors)."""
    from scoring.persistence import load_model

    directory = fetch_artifact(uri, sha256, cache_dir)
    return load_model(directory, expected_sha256=sha256, expected_feature_set_version=feature_set_version)
