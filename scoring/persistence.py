"""Safe persistence of a `CompiledForest`: arrays and JSON, never pickle.

A model directory holds two files:

- ``model.npz``: the arrays named in ``scoring.forest.ARRAY_FIELDS``, read back
  with ``allow_pickle=False``;
- ``model.json``: feature names, feature-set version, offset and threshold,
  max_samples, the scikit-learn parameters, the model version and created_at.

The artifact's sha256 covers both files: for each of ``model.npz`` then
``model.json`` the hash is fed the file name, a NUL byte, the file's size in
decimal ASCII, a NUL byte and the file's bytes (see :func:`artifact_sha256`).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import zipfile
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from configs.errors import IntegrityError, ModelUnavailableError, ModelVersionMismatchError
from scoring.forest import ARRAY_FIELDS, CompiledForest

logger = logging.getLogger(__name__)

ARRAYS_FILE = "model.npz"
METADATA_FILE = "model.json"
ARTIFACT_FILES = (ARRAYS_FILE, METADATA_FILE)
FORMAT_VERSION = 1


@dataclass(frozen=True)
class ModelArtifact:
    path: Path  # the model directory
    sha256: str


def artifact_sha256(directory: str | os.PathLike[str]) -> str:
    """The sha256 of a model directory's two files, as documented above."""
    digest = hashlib.sha256()
    for name in ARTIFACT_FILES:
        data = (Path(directory) / name).read_bytes()
        digest.update(name.encode() + b"\0" + str(len(data)).encode() + b"\0")
        digest.update(data)
    return digest.hexdigest()


def save_model(forest: CompiledForest, directory: str | os.PathLike[str]) -> ModelArtifact:
    """Writes ``model.npz`` and ``model.json`` into ``directory`` (created if missing).

    Each file is written to a temporary name and renamed, so a reader never sees
    half a file.
    """
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    np.savez(buffer, **{name: getattr(forest, name) for name in ARRAY_FIELDS})
    metadata = {
        "format_version": FORMAT_VERSION,
        "model_version": forest.model_version,
        "feature_names": list(forest.feature_names),
        "feature_set_version": forest.feature_set_version,
        "n_features": forest.n_features_in_,
        "n_estimators": forest.n_estimators,
        "max_samples": forest.max_samples_,
        "offset": forest.offset_,
        "threshold": forest.threshold_,
        "expected_value": forest.expected_value_,
        "sklearn_params": forest.params,
        "created_at": datetime.now(timezone.utc).isoformat(),
    }
    _write_atomic(path / ARRAYS_FILE, buffer.getvalue())
    _write_atomic(path / METADATA_FILE, (json.dumps(metadata, indent=2, sort_keys=True) + "\n").encode())
    sha = artifact_sha256(path)
    logger.info("saved model %r to %s (sha256 %s)", forest.model_version, path, sha)
    return ModelArtifact(path=path, sha256=sha)


def load_model(
    directory: str | os.PathLike[str],
    expected_sha256: str | None = None,
    expected_feature_set_version: str | None = None,
) -> CompiledForest:
    """Loads a model directory, refusing a hash or feature-set version mismatch.

    Raises IntegrityError (hash), ModelVersionMismatchError (feature-set version)
    or ModelUnavailableError (missing or unreadable files).
    """
    path = Path(directory)
    missing = [name for name in ARTIFACT_FILES if not (path / name).is_file()]
    if missing:
        raise ModelUnavailableError(f"model directory {path}: missing {', '.join(missing)}")
    if expected_sha256 is not None:
        actual = artifact_sha256(path)
        if actual != expected_sha256.lower():
            raise IntegrityError(
                f"model {path}: sha256 is {actual}, expected {expected_sha256}; "
                "the files were changed or replaced after the model was registered"
            )
    try:
        metadata = json.loads((path / METADATA_FILE).read_text())
        with np.load(path / ARRAYS_FILE, allow_pickle=False) as npz:
            arrays = {name: np.array(npz[name]) for name in ARRAY_FIELDS}
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as e:
        raise ModelUnavailableError(f"model {path}: cannot be read ({e})") from e
    found = metadata.get("feature_set_version")
    if expected_feature_set_version is not None and found != expected_feature_set_version:
        raise ModelVersionMismatchError(
            f"model {path}: feature-set version is {found!r} but the code expects "
            f"{expected_feature_set_version!r}; retrain or deploy matching code"
        )
    try:
        forest = CompiledForest(
            **arrays,
            n_features_in_=int(metadata["n_features"]),
            max_samples_=int(metadata["max_samples"]),
            offset_=float(metadata["offset"]),
            feature_names=tuple(metadata["feature_names"]),
            feature_set_version=str(found),
            model_version=str(metadata.get("model_version", "")),
            params=dict(metadata.get("sklearn_params", {})),
        )
    except (KeyError, TypeError, ValueError, IndexError) as e:
        raise ModelUnavailableError(f"model {path}: invalid content ({e})") from e
    return forest


def _write_atomic(target: Path, data: bytes) -> None:
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, target)
