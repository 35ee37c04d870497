"""What the training and backfill jobs share: logging, paths, Ray start-up,
validation of history with a rejects file, and the exit code of bad input.

Jobs run the same way from a shell (`python -m jobs.train ...`) and through
`ray job submit --working-dir . -- python -m jobs.train ...`; in the second case
the working directory is a temporary copy of the tree, so every path a job
touches is made absolute first and servers are found through the settings'
data directory, never the working directory.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from configs.errors import InvalidInputError
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


def read_valid_history(path: Path) -> tuple[Any, pd.DataFrame]:
    """Reads ``path`` with Ray Data and validates every row once.

    Returns (dataset of valid, normalised rows; rejected rows as a pandas frame
    with their original values and a ``reason``). Raises InvalidInputError
    naming the missing columns, FileNotFoundError when ``path`` does not exist.
    """
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


def check_input(path: Path) -> None:
    """Fails fast, before any Ray work, on a missing input or missing columns."""
    if not path.exists():
        raise FileNotFoundError(f"input: {path} does not exist")
    check_columns(_header(path), str(path))


def _files(path: Path) -> list[Path]:
    return sorted(p for p in (path.rglob("*") if path.is_dir() else [path])
                  if p.is_file() and not p.name.startswith((".", "_")))


def input_columns(path: Path) -> list[str]:
    """Column names of the input (its first file), read without Ray."""
    return _header(path)


def _header(path: Path) -> list[str]:
    """Column names of the first file under ``path``, read locally (no Ray job needed)."""
    import pyarrow.parquet as pq

    files = _files(path)
    if not files:
        raise InvalidInputError(f"input: {path} holds no CSV or Parquet file")
    first = files[0]
    if first.suffix.lower() in (".parquet", ".pq"):
        return list(pq.read_schema(first).names)
    with open(first, newline="") as fh:
        line = fh.readline()
    return [c.strip().strip('"') for c in line.rstrip("\r\n").split(",")] if line else []


def read_history(path: Path) -> Any:
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

    from features.pipeline import read_history as pipeline_read_history

    files = _files(path)
    suffixes = {p.suffix.lower() for p in files}
    if files and suffixes <= {".csv"}:
        read = _parse_csv_files
    elif files and suffixes <= {".parquet", ".pq"}:
        read = _read_parquet_files
    else:
        return pipeline_read_history(path)  # refuses a mix, with the suffixes found
    paths = ray.data.from_items([{"path": str(p)} for p in files], override_num_blocks=len(files))
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


def _parse_csv_files(batch: Any) -> Any:
    """Yields the rows of each file in ``batch`` (Arrow tables), malformed lines included."""
    for file in batch["path"].to_pylist():
        yield from _in_blocks(parse_csv(Path(file)))


def _read_parquet_files(batch: Any) -> Any:
    """Yields the rows of each Parquet file in ``batch`` (Arrow tables)."""
    import pyarrow.parquet as pq

    for file in batch["path"].to_pylist():
        yield from _in_blocks(pq.read_table(file))


def parse_csv(file: Path) -> Any:
    """One CSV file as an Arrow table: the required and id columns as text, the
    others typed by Arrow, and, last, one row per malformed line (wrong number
    of fields) with its reason in `MALFORMED_COLUMN`, its text in `LINE_COLUMN`
    and nulls elsewhere."""
    import pyarrow as pa
    import pyarrow.csv as pa_csv

    malformed: list[tuple[str, str]] = []

    def keep(row: Any) -> str:
        malformed.append((
            f"csv: line {row.number} of {file.name} has {row.actual_columns} fields, "
            f"expected {row.expected_columns}",
            row.text,
        ))
        return "skip"

    text = {c: pa.string() for c in (*REQUIRED_COLUMNS, "transaction_id", "scenario")}
    table = pa_csv.read_csv(
        file,
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


def write_rejects(rejects: pd.DataFrame, path: Path) -> Path | None:
    """Writes rejected rows (original values plus ``reason``) as CSV; None when there are none.

    An existing file from an earlier run is replaced, so the file always
    describes the last run.
    """
    if path.exists():
        path.unlink()
    if rejects.empty:
        return None
    path.parent.mkdir(parents=True, exist_ok=True)
    columns = [c for c in rejects.columns if c != REASON_COLUMN] + [REASON_COLUMN]
    rejects[columns].to_csv(path, index=False)
    logger.warning("%d rejected rows written to %s", len(rejects), path)
    return path


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
