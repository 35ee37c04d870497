"""What the training and backfill jobs share: logging, inputs and outputs by
URI, Ray start-up, validation of history with a rejects file, and the exit code
of bad input.

Jobs run the same way from a shell (`python -m jobs.train ...`) and through
`ray job submit --working-dir . -- python -m jobs.train ...`; in the second case
the working directory is a temporary copy of the tree, so every path a job
touches is made absolute first and servers are found through the settings'
data directory, never the working directory.

Every input and output is a local path or a URI (`s3://bucket/history/`,
`gs://...`, `abfs://...`, `hdfs://...`; see `scoring.store.filesystem_for`). A
job lists its input on the driver (to fail fast, exit 2, on a missing object or
a refused credential, naming the URI) and reads the files in its Ray tasks,
each on its own node with that node's storage credentials; Ray Data's writers
write the output from their tasks the same way.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Iterable
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import pandas as pd

from configs.errors import FraudScoringError, InvalidInputError
from configs.settings import Settings

logger = logging.getLogger(__name__)

# The exit code of input the job refuses (missing columns, unreadable file, bad flags).
EXIT_BAD_INPUT = 2
REASON_COLUMN = "reason"
# Columns a history must have; the rest (transaction_id, is_fraud, scenario, ...) are optional.
REQUIRED_COLUMNS = ("user_id", "amount", "merchant", "country", "timestamp")
# Set by `ray job submit` in the driver's environment: the job's runtime_env is already in force.
_JOB_CONFIG_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"


def configure_logging(level: str = "INFO") -> None:
    """Log lines on stderr, so that stdout carries only the job's JSON result."""
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr, force=True)
    for noisy in ("alembic", "numba", "matplotlib", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def absolute(path: str | os.PathLike[str]) -> Path:
    """``path`` made absolute against the directory the job was started in."""
    return Path(path).expanduser().resolve()


def location(where: str | os.PathLike[str]) -> str:
    """An input or output as the jobs handle it: a remote URI without a trailing
    slash; a plain path or a file:// URI as an absolute local path."""
    from scoring.store import is_remote, local_path, normalize_uri

    return normalize_uri(where) if is_remote(where) else str(local_path(where))


def unwrap(exc: BaseException) -> BaseException:
    """The exception a Ray task raised, rather than Ray's wrappers around it (whose
    text is a traceback): a RayTaskError's `cause`, and the cause of Ray Data's
    UserCodeException when it still has one (in the process that raised it)."""
    seen: set[int] = set()
    while id(exc) not in seen:
        seen.add(id(exc))
        cause = getattr(exc, "cause", None)
        if not isinstance(cause, BaseException) and type(exc).__module__.startswith("ray."):
            cause = exc.__cause__
        if not isinstance(cause, BaseException):
            break
        exc = cause
    return exc


def init_ray(settings: Settings) -> None:
    """``ray.init()`` with no address: it joins RAY_ADDRESS or the submitting job's
    cluster when there is one, else starts a local Ray.

    Outside `ray job submit`, workers get FRAUD_DATA_DIR through the runtime
    environment so they read the same settings as the driver (inside a job the
    job's own runtime_env is in force and must not be overridden). For a local
    cluster shared with Serve, start it with an explicit logical CPU count
    (`ray start --head --num-cpus 4`): the jobs ask for fractions of a CPU and
    never starve the serving replicas.
    """
    import ray

    if ray.is_initialized():
        return
    kwargs: dict[str, Any] = {"log_to_driver": True}
    if _JOB_CONFIG_ENV not in os.environ:
        env = {"FRAUD_DATA_DIR": str(settings.data_dir)}
        if os.environ.get("NUMBA_CACHE_DIR"):
            env["NUMBA_CACHE_DIR"] = os.environ["NUMBA_CACHE_DIR"]
        kwargs["runtime_env"] = {"env_vars": env}
    ray.init(**kwargs)
    logger.info("Ray resources: %s", ray.cluster_resources())


def check_columns(columns: Iterable[str], source: str) -> None:
    """Raises InvalidInputError naming every required column ``source`` lacks."""
    present = set(columns)
    missing = [c for c in REQUIRED_COLUMNS if c not in present]
    if missing:
        raise InvalidInputError(
            f"{source}: missing columns: {', '.join(missing)} "
            f"(required: {', '.join(REQUIRED_COLUMNS)}; found: {', '.join(sorted(present)) or 'none'})"
        )


# ----------------------------------------------------------- Ray Data helpers

# Logical CPUs asked by each task of the jobs' own steps: small, so that a job
# shares a cluster with Serve replicas without starving them (nor being starved).
TASK_CPUS = 0.5
_RAW_COLUMN = "__raw"


def read_valid_history(path: str | os.PathLike[str]) -> tuple[Any, pd.DataFrame]:
    """Reads ``path`` (a local path or a URI) with Ray Data and validates every row once.

    Returns (dataset of valid, normalised rows; rejected rows as a pandas frame
    with their original values and a ``reason``). Raises InvalidInputError
    naming the missing columns, FileNotFoundError when ``path`` does not exist,
    PermissionError when the storage refuses it.
    """
    path = location(path)
    check_input(path)
    ds = read_history(path)
    # One validation pass, materialised once, then split into valid rows and rejects.
    checked = ds.map_batches(_validate_batch, batch_format="pyarrow", num_cpus=TASK_CPUS).materialize()
    valid = checked.map_batches(_valid_rows, batch_format="pyarrow", num_cpus=TASK_CPUS)
    reject_frames = [
        b for b in checked.map_batches(_rejected_rows, batch_format="pyarrow", num_cpus=TASK_CPUS)
        .iter_batches(batch_format="pandas", batch_size=None)
        if len(b)
    ]
    rejects = _unpack_rejects(reject_frames)
    return valid, rejects


def check_input(path: str | os.PathLike[str]) -> None:
    """Fails fast, before any Ray work, on a missing or refused input or missing columns."""
    from scoring.store import display_uri

    path = location(path)
    check_columns(_header(path), display_uri(path))


def _files(path: str) -> list[str]:
    """The files of the input (itself, or every file under the folder or prefix, but
    names starting with "." or "_"), as paths of its filesystem, sorted."""
    import pyarrow.fs as pafs

    from scoring.store import display_uri, filesystem_for, storage_error

    fs, base = filesystem_for(path)
    try:
        info = fs.get_file_info(base)
        if info.type == pafs.FileType.NotFound:
            raise FileNotFoundError(f"input: {display_uri(path)} does not exist")
        if info.type != pafs.FileType.Directory:
            return [base]
        found = fs.get_file_info(pafs.FileSelector(base, recursive=True))
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise storage_error(exc, path, "input") from exc
    return sorted(i.path for i in found
                  if i.type == pafs.FileType.File and not i.base_name.startswith((".", "_")))


def _suffix(file: str) -> str:
    return PurePosixPath(file).suffix.lower()


def input_columns(path: str | os.PathLike[str]) -> list[str]:
    """Column names of the input (its first file), read without Ray."""
    return _header(location(path))


def _header(path: str) -> list[str]:
    """Column names of the first file under ``path``, read by this process (no Ray job needed)."""
    import pyarrow.parquet as pq

    from scoring.store import display_uri, filesystem_for, storage_error

    files = _files(path)
    if not files:
        raise InvalidInputError(f"input: {display_uri(path)} holds no CSV or Parquet file")
    first = files[0]
    fs, _ = filesystem_for(path)
    try:
        if _suffix(first) in (".parquet", ".pq"):
            with fs.open_input_file(first) as fh:
                return list(pq.read_schema(fh).names)
        with fs.open_input_stream(first) as fh:
            line = _first_line(fh)
    except OSError as exc:
        raise storage_error(exc, path, "input") from exc
    return [c.strip().strip('"') for c in line.rstrip("\r\n").split(",")] if line else []


def _first_line(stream: Any, limit: int = 1 << 20) -> str:
    """The first line of a byte stream (up to ``limit`` bytes), decoded."""
    data = b""
    while b"\n" not in data and len(data) < limit:
        chunk = stream.read(65536)
        if not chunk:
            break
        data += chunk
    return data.split(b"\n", 1)[0].decode("utf-8", errors="replace")


def read_history(path: str | os.PathLike[str]) -> Any:
    """`features.pipeline.read_history`, except that the jobs read files themselves.

    Two things the plain Ray Data CSV reader would get wrong for a job that
    must account for every row: Arrow infers a column's type from the first
    rows of a file, so one bad value further down ("abc" as an amount) would
    stop the whole read; and a line with the wrong number of fields stops it
    too. Here the required columns are read as text, so a bad value reaches
    validation and becomes a reject with its reason, and a malformed line is
    kept as a row of its own (`MALFORMED_COLUMN`) that validation rejects with
    its line number. Parquet files are read with pyarrow too: Ray Data's
    reader made one block of a one-file history, so validation ran on one
    core, and its file-listing task alone took 2-10 s here. One read task per
    file; a file's rows go on in blocks of at most `_READ_BLOCK_ROWS`.
    """
    import ray

    from scoring.store import display_uri

    path = location(path)
    files = _files(path)
    suffixes = {_suffix(p) for p in files}
    if files and suffixes <= {".csv"}:
        read = _parse_csv_files
    elif files and suffixes <= {".parquet", ".pq"}:
        read = _read_parquet_files
    else:
        raise InvalidInputError(f"input: {display_uri(path)} must hold only .csv or only .parquet files, "
                                f"found {sorted(suffixes)}")
    # Each task resolves the filesystem from the input's URI itself, with its own
    # node's credentials: none travel with the task.
    # The readers are generators: Ray Data passes a generator's own error (a missing
    # or refused object, naming its URI) to the driver as itself. A plain function's
    # error would arrive wrapped in a UserCodeException that lost its cause on the way.
    paths = ray.data.from_items([{"root": path, "path": p} for p in files], override_num_blocks=len(files))
    return paths.map_batches(read, batch_size=1, batch_format="pyarrow", num_cpus=TASK_CPUS)


# Set on a row that stands for a malformed CSV line: the reason (with the line
# number) and the line's text, which the rejects file shows as ``line``.
MALFORMED_COLUMN = "__malformed"
LINE_COLUMN = "__line"
# Rows per block read: a large file goes on in parts, validated on every core.
_READ_BLOCK_ROWS = 200_000


def _in_blocks(table: Any) -> Any:
    for start in range(0, max(table.num_rows, 1), _READ_BLOCK_ROWS):
        yield table.slice(start, _READ_BLOCK_ROWS)


def _input_files(batch: Any) -> Any:
    """(filesystem, URI, path) of each file in a batch of ``{"root", "path"}`` rows."""
    from scoring.store import filesystem_for, join_uri

    for root, file in zip(batch["root"].to_pylist(), batch["path"].to_pylist(), strict=True):
        fs, base = filesystem_for(root)
        uri = root if file == base else join_uri(root, file[len(base):].lstrip("/"))
        yield fs, uri, file


def _parse_csv_files(batch: Any) -> Any:
    """Yields the rows of each file in ``batch`` (Arrow tables), malformed lines included."""
    from scoring.store import storage_error

    for fs, uri, file in _input_files(batch):
        try:
            table = parse_csv(file, fs)
        except OSError as exc:
            raise storage_error(exc, uri, "input") from exc
        yield from _in_blocks(table)


def _read_parquet_files(batch: Any) -> Any:
    """Yields the rows of each Parquet file in ``batch`` (Arrow tables)."""
    import pyarrow.parquet as pq

    from scoring.store import storage_error

    for fs, uri, file in _input_files(batch):
        try:
            table = pq.read_table(file, filesystem=fs)
        except OSError as exc:
            raise storage_error(exc, uri, "input") from exc
        yield from _in_blocks(table)


def parse_csv(file: str | os.PathLike[str], filesystem: Any = None) -> Any:
    """One CSV file (a path of ``filesystem``, default the local one) as an Arrow
    table: the required and id columns as text, the others typed by Arrow, and,
    last, one row per malformed line (wrong number of fields) with its reason in
    `MALFORMED_COLUMN`, its text in `LINE_COLUMN` and nulls elsewhere."""
    import pyarrow as pa
    import pyarrow.csv as pa_csv
    import pyarrow.fs as pafs

    fs = filesystem or pafs.LocalFileSystem()
    name = PurePosixPath(str(file)).name
    malformed: list[tuple[str, str]] = []

    def keep(row: Any) -> str:
        malformed.append((
            f"csv: line {row.number} of {name} has {row.actual_columns} fields, "
            f"expected {row.expected_columns}",
            row.text,
        ))
        return "skip"

    text = {c: pa.string() for c in (*REQUIRED_COLUMNS, "transaction_id", "scenario")}
    with fs.open_input_stream(str(file)) as stream:
        table = pa_csv.read_csv(
            stream,
            # single-threaded: only then does Arrow know the line number of a bad line
            read_options=pa_csv.ReadOptions(use_threads=False),
            parse_options=pa_csv.ParseOptions(invalid_row_handler=keep),
            convert_options=pa_csv.ConvertOptions(column_types=text, strings_can_be_null=False),
        )
    empty = pa.array([""] * table.num_rows, type=pa.string())
    table = table.append_column(MALFORMED_COLUMN, empty).append_column(LINE_COLUMN, empty)
    if not malformed:
        return table
    extra = {MALFORMED_COLUMN: [reason for reason, _ in malformed],
             LINE_COLUMN: [line for _, line in malformed]}
    columns = [pa.array(extra[f.name], type=f.type) if f.name in extra else pa.nulls(len(malformed), f.type)
               for f in table.schema]
    return pa.concat_tables([table, pa.Table.from_arrays(columns, schema=table.schema)])


def features_dataset(valid: Any) -> Any:
    """The point-in-time features of a validated dataset, with the `features` pipeline."""
    from features.pipeline import compute_features_dataset

    return compute_features_dataset(valid)


def _validate_batch(batch: Any) -> Any:
    """Valid rows normalised; each reject (a malformed CSV line included) as nulls
    plus its ``reason`` and the JSON of its original values. Arrow keeps the
    valid rows' column types (nullable, never upcast)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from features.schema import validate_frame

    reasons: list[str] = []
    raw: list[str] = []
    if MALFORMED_COLUMN in batch.column_names:
        bad = pc.not_equal(pc.fill_null(batch[MALFORMED_COLUMN], ""), "")
        lines = batch.filter(bad)
        reasons += lines[MALFORMED_COLUMN].to_pylist()
        raw += [json.dumps({"line": text}) for text in lines[LINE_COLUMN].to_pylist()]
        batch = batch.filter(pc.invert(bad)).drop_columns([MALFORMED_COLUMN, LINE_COLUMN])
    valid, rejects = validate_frame(batch.to_pandas())
    reasons += rejects[REASON_COLUMN].astype(str).tolist()
    raw += [json.dumps(rec, default=str) for rec in
            rejects.drop(columns=[REASON_COLUMN]).to_dict(orient="records")]
    valid[REASON_COLUMN] = ""
    valid[_RAW_COLUMN] = ""
    table = pa.Table.from_pandas(valid, preserve_index=False)
    if not reasons:
        return table
    n = len(reasons)
    extra = {REASON_COLUMN: reasons, _RAW_COLUMN: raw}
    columns = [pa.array(extra[f.name], type=f.type) if f.name in extra else pa.nulls(n, type=f.type)
               for f in table.schema]
    return pa.concat_tables([table, pa.Table.from_arrays(columns, schema=table.schema)])


def _valid_rows(batch: Any) -> Any:
    import pyarrow.compute as pc

    return batch.filter(pc.equal(batch[REASON_COLUMN], "")).drop_columns([REASON_COLUMN, _RAW_COLUMN])


def _rejected_rows(batch: Any) -> Any:
    import pyarrow.compute as pc

    return batch.filter(pc.not_equal(batch[REASON_COLUMN], "")).select([REASON_COLUMN, _RAW_COLUMN])


def _unpack_rejects(frames: list[pd.DataFrame]) -> pd.DataFrame:
    if not frames:
        return pd.DataFrame({REASON_COLUMN: pd.Series([], dtype=str)})
    both = pd.concat(frames, ignore_index=True)
    original = pd.DataFrame([json.loads(r) for r in both[_RAW_COLUMN]])
    original[REASON_COLUMN] = both[REASON_COLUMN].to_numpy()
    return original


def write_rejects(rejects: pd.DataFrame, path: str | os.PathLike[str]) -> str | None:
    """Writes rejected rows (original values plus ``reason``) as CSV to ``path`` (a
    local path or a URI); returns where, or None when there are none.

    An existing file from an earlier run is replaced (or removed when there are
    no rejects now), so the file always describes the last run.
    """
    import pyarrow.fs as pafs

    from scoring.store import display_uri, filesystem_for, storage_error, write_bytes

    path = location(path)
    fs, target = filesystem_for(path)
    try:
        if rejects.empty:
            if fs.get_file_info(target).type == pafs.FileType.File:
                fs.delete_file(target)
            return None
        columns = [c for c in rejects.columns if c != REASON_COLUMN] + [REASON_COLUMN]
        write_bytes(fs, target, rejects[columns].to_csv(index=False).encode())
    except OSError as exc:
        raise storage_error(exc, path, "rejects") from exc
    logger.warning("%d rejected rows written to %s", len(rejects), display_uri(path))
    return path


def failure(exc: BaseException, job: str) -> int:
    """The exit code of a job that raised ``exc`` (unwrapped from Ray's wrappers), reported
    without a traceback: 2 for input the job refuses (InvalidInputError, a missing object,
    a storage that refuses the credentials), 1 for the project's other errors and other
    storage errors. Anything else is re-raised: a bug deserves its traceback."""
    cause = unwrap(exc)
    message = str(cause)
    if getattr(cause, "storage_uri", None):  # ours, naming its URI; Ray Data appends retry advice
        message = message.splitlines()[0]
    if isinstance(cause, (InvalidInputError, FileNotFoundError, PermissionError)):
        return bad_input(message)
    if isinstance(cause, (FraudScoringError, OSError)):
        logger.error("%s failed: %s", job, message)
        print(f"error: {message}", file=sys.stderr)
        return 1
    raise exc


def bad_input(message: str) -> int:
    """Reports input the job refuses, without a traceback; returns the exit code."""
    logger.error("%s", message)
    print(f"error: {message}", file=sys.stderr)
    return EXIT_BAD_INPUT


def print_result(result: dict[str, Any]) -> None:
    """The job's result as one JSON document on stdout."""
    print(json.dumps(result, indent=2, sort_keys=True, default=_jsonable), flush=True)


def _jsonable(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (Path, pd.Timestamp)):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
