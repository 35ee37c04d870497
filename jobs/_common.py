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
a refused credential, naming the URI), cuts it into blocks (a Parquet file, or
a range of lines of a CSV file: see `plan_blocks`) and reads and validates the
blocks in its Ray tasks, each on its own node with that node's storage
credentials; the output is written from where it is computed the same way.
"""

from __future__ import annotations

import io
import itertools
import json
import logging
import os
import re
import sys
from collections.abc import Iterable
from dataclasses import dataclass
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

    Outside `ray job submit`, workers read the same settings as the driver: a
    cluster this process joins gets FRAUD_DATA_DIR (and NUMBA_CACHE_DIR) through
    the runtime environment (inside a job the job's own runtime_env is in force
    and must not be overridden); a local Ray this process starts inherits them
    from its environment, with no runtime environment (the workers Ray starts
    in advance then serve the first tasks, where a runtime environment leaves
    them idle and starts others) and no dashboard (it lives as long as this
    job). For a local cluster shared with Serve, start it with an explicit
    logical CPU count (`ray start --head --num-cpus 4`): the jobs ask for
    fractions of a CPU and never starve the serving replicas.
    """
    import ray

    if ray.is_initialized():
        return
    kwargs: dict[str, Any] = {"log_to_driver": True}
    if _JOB_CONFIG_ENV not in os.environ:
        env = {"FRAUD_DATA_DIR": str(settings.data_dir)}
        if os.environ.get("NUMBA_CACHE_DIR"):
            env["NUMBA_CACHE_DIR"] = os.environ["NUMBA_CACHE_DIR"]
        if _starts_local_ray():
            os.environ.update(env)
            kwargs["include_dashboard"] = False
        else:
            kwargs["runtime_env"] = {"env_vars": env}
    ray.init(**kwargs)
    logger.info("Ray resources: %s", ray.cluster_resources())


def _starts_local_ray() -> bool:
    """Whether ``ray.init()`` would start a Ray of its own (no RAY_ADDRESS, no cluster
    started by `ray start` on this machine), asked as Ray decides it."""
    try:
        from ray._private.services import canonicalize_bootstrap_address
    except ImportError:  # another Ray: assume a cluster to join, as before
        return False
    try:
        return canonicalize_bootstrap_address(None) is None
    except (ConnectionError, ValueError):
        return False


def check_columns(columns: Iterable[str], source: str) -> None:
    """Raises InvalidInputError naming every required column ``source`` lacks."""
    present = set(columns)
    missing = [c for c in REQUIRED_COLUMNS if c not in present]
    if missing:
        raise InvalidInputError(
            f"{source}: missing columns: {', '.join(missing)} "
            f"(required: {', '.join(REQUIRED_COLUMNS)}; found: {', '.join(sorted(present)) or 'none'})"
        )


# ------------------------------------------------------------- reading in blocks

# Logical CPUs asked by each task of the jobs' own steps: small, so that a job
# shares a cluster with Serve replicas without starving them (nor being starved).
TASK_CPUS = 0.5
# Bytes of CSV per read task. A file is cut at line ends into blocks of about
# this size, each parsed and validated by its own task: one file is read on
# every core, and no task holds more than a few blocks' worth of rows.
CSV_BLOCK_BYTES = 4 << 20
_SCAN_BYTES = 64 << 10
# Rows of a Parquet file validated at a time.
PARQUET_SLICE_ROWS = 200_000
# Read as text whatever their values: a bad value ("abc" as an amount) must reach
# validation and become a reject with its reason, not stop the read.
TEXT_COLUMNS = (*REQUIRED_COLUMNS, "transaction_id", "scenario")
_RAW_COLUMN = "__raw"
_LINE_COLUMN = "__line"
_QUOTE, _COMMA = ord('"'), ord(",")
_ONE_LINE = " (each row of a CSV history must be one line)"


@dataclass(frozen=True)
class Block:
    """What one read task reads: a whole Parquet file, or the byte range
    [start, end) of a CSV file, which begins at the start of a line and ends
    after a line end (or at the end of the file)."""

    root: str  # the job's input (a path or a URI): the task resolves its filesystem from it
    file: str  # a path of that filesystem
    uri: str  # the file's URI, for messages
    start: int = 0
    end: int = -1  # -1: a whole Parquet file
    header: tuple[str, ...] = ()  # CSV: the file's column names, for the blocks after the first

    @property
    def is_csv(self) -> bool:
        return self.end >= 0


@dataclass
class ValidHistory:
    """An input read and validated: the valid rows as Arrow tables in Ray's object
    store (one per block), and the rejects with their original values and ``reason``."""

    valid: list[Any]
    rejects: pd.DataFrame


def plan_blocks(path: str | os.PathLike[str], block_bytes: int = CSV_BLOCK_BYTES) -> list[Block]:
    """The blocks of the input, in order: one per Parquet file; CSV files cut at
    line ends into blocks of about ``block_bytes``. Reads only each CSV file's
    header and a few bytes around each cut."""
    from scoring.store import display_uri, filesystem_for, join_uri, storage_error

    path = location(path)
    files = _files(path)
    suffixes = {_suffix(p) for p in files}
    if files and suffixes <= {".parquet", ".pq"}:
        csv = False
    elif files and suffixes <= {".csv"}:
        csv = True
    else:
        raise InvalidInputError(f"input: {display_uri(path)} must hold only .csv or only .parquet files, "
                                f"found {sorted(suffixes)}")
    fs, base = filesystem_for(path)
    blocks: list[Block] = []
    for file in files:
        uri = path if file == base else join_uri(path, file[len(base):].lstrip("/"))
        if not csv:
            blocks.append(Block(path, file, uri))
            continue
        try:
            with fs.open_input_file(file) as fh:
                size = fh.size()
                if size == 0:
                    raise InvalidInputError(f"input: {display_uri(uri)} is empty (a CSV file starts with "
                                            "its header line)")
                header = _csv_header(_read_at(fh, 0, min(size, 1 << 20)), display_uri(uri))
                cuts = _line_cuts(fh, size, block_bytes)
        except OSError as exc:
            raise storage_error(exc, uri, "input") from exc
        blocks += [Block(path, file, uri, start, end, header) for start, end in itertools.pairwise(cuts)]
    return blocks


def _read_at(fh: Any, offset: int, nbytes: int) -> bytes:
    fh.seek(offset)
    return fh.read(nbytes)


def _csv_header(head: bytes, uri: str) -> tuple[str, ...]:
    """The column names of the CSV file ``uri`` whose first bytes are ``head``, as Arrow reads them."""
    import pyarrow as pa
    import pyarrow.csv as pa_csv

    line = re.split(rb"\r\n|\r|\n", head, maxsplit=1)[0]
    if _opens_quote(line):
        raise InvalidInputError(f"csv: the header line of {uri} opens a quoted field that does not close "
                                f"on that line{_ONE_LINE}")
    try:
        return tuple(pa_csv.read_csv(io.BytesIO(line + b"\n"),
                                     read_options=pa_csv.ReadOptions(use_threads=False)).column_names)
    except pa.ArrowInvalid as exc:
        raise InvalidInputError(f"csv: the header line of {uri} cannot be read: {exc}") from exc


def _line_cuts(fh: Any, size: int, block_bytes: int) -> list[int]:
    """Offsets [0, ..., size] cutting a file of ``size`` bytes into about equal blocks,
    each cut just after a newline."""
    n = max(1, -(-size // max(block_bytes, 1)))
    cuts = [0]
    for k in range(1, n):
        cut = _next_line_start(fh, max(k * size // n, cuts[-1] + 1), size)
        if cut >= size:
            break
        cuts.append(cut)
    cuts.append(size)
    return cuts


def _next_line_start(fh: Any, offset: int, size: int) -> int:
    """The first offset at or after ``offset`` that follows a newline (``size`` if none)."""
    pos = offset - 1  # the byte before ``offset`` may be the newline itself
    while pos < size:
        window = _read_at(fh, pos, _SCAN_BYTES)
        found = window.find(b"\n")
        if found >= 0:
            return pos + found + 1
        if not window:
            break
        pos += len(window)
    return size


@dataclass
class ParsedBlock:
    """A CSV block parsed: its rows, its malformed lines (line number in the block,
    the reason after ``csv: line <n>``, the text) and its number of lines."""

    table: Any
    malformed: list[tuple[int, str, str]]
    lines: int


def parse_csv_block(data: bytes, name: str, column_names: tuple[str, ...] | None = None,
                    column_types: dict[str, Any] | None = None) -> ParsedBlock:
    """Parses whole lines of a CSV file: the first line is the header unless
    ``column_names`` are given. The `TEXT_COLUMNS` are read as text, the other
    columns typed by Arrow (or as ``column_types`` say).

    Each row of a CSV history is one line: a line that opens a quoted field and
    does not close it is malformed, and never joined to the next one, so a row
    reads the same whichever block it falls in. A malformed line (that, or a
    wrong number of fields) is reported with its line number counted from the
    block's first line, as an editor counts lines (empty lines included).
    """
    import pyarrow as pa

    types = {c: pa.string() for c in TEXT_COLUMNS} | dict(column_types or {})
    table, bad = _arrow_parse(data, column_names, types)
    header_rows = 0 if column_names else 1
    open_quotes: list[int] = []
    starts = stops = None
    if _QUOTE in data:
        # A row that spans lines consumed more than one line: the rows Arrow saw
        # and the non-empty lines disagree, or (at the end) the last line opens a quote.
        starts, stops = _line_bounds(data)
        filled = np.flatnonzero(stops > starts)
        last = data[starts[filled[-1]]:stops[filled[-1]]] if len(filled) else b""
        if table.num_rows + len(bad) + header_rows != len(filled) or _opens_quote(last):
            open_quotes = [int(i) for i in filled if _opens_quote(data[starts[i]:stops[i]])]
        if open_quotes and header_rows and open_quotes[0] == filled[0]:
            raise InvalidInputError(f"csv: the header line of {name} opens a quoted field that does not "
                                    f"close on that line{_ONE_LINE}")
        if open_quotes:
            dropped = set(open_quotes)
            kept = [data[starts[i]:stops[i]] for i in range(len(starts)) if i not in dropped]
            table, bad = _arrow_parse(b"\n".join(kept) + b"\n", column_names, types)
    malformed: list[tuple[int, str, str]] = []
    if bad or open_quotes:
        if starts is None:
            starts, stops = _line_bounds(data)
        dropped = set(open_quotes)
        # Arrow numbers the rows it saw (the header too), one per non-empty line kept.
        row_line = [i + 1 for i in range(len(starts)) if stops[i] > starts[i] and i not in dropped]
        malformed = [(row_line[number - 1], f" of {name} has {actual} fields, expected {expected}", text)
                     for number, actual, expected, text in bad]
        unclosed = f" of {name} opens a quoted field that does not close on that line{_ONE_LINE}"
        malformed += [(i + 1, unclosed, data[starts[i]:stops[i]].decode("utf-8", errors="replace"))
                      for i in open_quotes]
        malformed.sort()
    return ParsedBlock(table, malformed, _count_lines(data))


def _arrow_parse(data: bytes, column_names: tuple[str, ...] | None,
                 types: dict[str, Any]) -> tuple[Any, list[tuple[int, int, int, str]]]:
    """Arrow's CSV reader on ``data``, single-threaded (parallelism comes from the
    blocks; only then does Arrow number the rows), every malformed row kept aside."""
    import pyarrow.csv as pa_csv

    bad: list[tuple[int, int, int, str]] = []

    def keep(row: Any) -> str:
        bad.append((row.number, row.actual_columns, row.expected_columns, row.text))
        return "skip"

    table = pa_csv.read_csv(
        io.BytesIO(data),
        read_options=pa_csv.ReadOptions(use_threads=False, column_names=list(column_names or [])),
        parse_options=pa_csv.ParseOptions(invalid_row_handler=keep),
        convert_options=pa_csv.ConvertOptions(column_types=types, strings_can_be_null=False),
    )
    return table, bad


def _line_bounds(data: bytes) -> tuple[np.ndarray, np.ndarray]:
    """(start, stop) offsets of each line of ``data`` without its line end, which
    is ``\\n``, ``\\r\\n`` or ``\\r`` as for Arrow's CSV reader."""
    buf = np.frombuffer(data, dtype=np.uint8)
    newline = buf == 10
    cr = buf == 13
    # A "\r" ends a line unless a "\n" follows it (then the pair ends it, at the "\n").
    cr_ends = cr & ~np.append(newline[1:], False)
    ends = np.flatnonzero(newline | cr_ends)
    before_pair = np.zeros(len(ends), dtype=bool)
    at_newline = newline[ends] & (ends > 0)
    before_pair[at_newline] = cr[ends[at_newline] - 1]
    starts = np.concatenate(([0], ends + 1))
    stops = np.concatenate((ends - before_pair, [len(buf)]))
    if starts[-1] == len(buf):  # the data ends with a line end: no unfinished last line
        starts, stops = starts[:-1], stops[:-1]
    return starts, stops


def _count_lines(data: bytes) -> int:
    """Lines of ``data`` as `_line_bounds` counts them, without building them."""
    ends = data.count(b"\n") + data.count(b"\r") - data.count(b"\r\n")
    return ends + (1 if data and not data.endswith((b"\n", b"\r")) else 0)


def _opens_quote(line: bytes) -> bool:
    """Whether Arrow's CSV parser would still be inside a quoted field at the end
    of ``line``: a quote opens a field only at its start; ``""`` inside is a quote."""
    quoted, field_start = False, True
    i, n = 0, len(line)
    while i < n:
        c = line[i]
        if quoted:
            if c == _QUOTE:
                if i + 1 < n and line[i + 1] == _QUOTE:
                    i += 2
                    continue
                quoted = False
        elif c == _COMMA:
            field_start = True
            i += 1
            continue
        elif c == _QUOTE and field_start:
            quoted = True
        field_start = False
        i += 1
    return quoted


def read_block(block: Block, column_types: dict[str, Any] | None = None) -> tuple[Any, Any, dict[str, Any]]:
    """Reads and validates one block (in a Ray task): (the valid rows, normalised,
    as Arrow; the rejects as Arrow with their reason, raw values and line; facts
    the driver needs: the block's ``lines`` and the ``types`` Arrow inferred)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from scoring.store import filesystem_for, storage_error

    fs, _ = filesystem_for(block.root)
    try:
        if block.is_csv:
            with fs.open_input_file(block.file) as fh:
                data = _read_at(fh, block.start, block.end - block.start)
        else:
            table = pq.read_table(block.file, filesystem=fs)
    except OSError as exc:
        raise storage_error(exc, block.uri, "input") from exc
    if not block.is_csv:
        # Validated in slices: pandas holds one slice at a time, not a whole large file.
        parts = [_validate(table.slice(start, PARQUET_SLICE_ROWS), [])
                 for start in range(0, max(table.num_rows, 1), PARQUET_SLICE_ROWS)]
        valid = pa.concat_tables([v for v, _ in parts], promote_options="permissive")
        return valid, pa.concat_tables([r for _, r in parts]), {"lines": 0, "types": {}}
    parsed = parse_csv_block(data, PurePosixPath(block.file).name,
                             column_names=block.header if block.start else None, column_types=column_types)
    inferred = {f.name: f.type for f in parsed.table.schema if f.name not in TEXT_COLUMNS}
    valid, rejects = _validate(parsed.table, parsed.malformed)
    return valid, rejects, {"lines": parsed.lines, "types": inferred}


def _validate(table: Any, malformed: list[tuple[int, str, str]]) -> tuple[Any, Any]:
    """(valid rows normalised, as Arrow; rejects as Arrow: reason, original values as
    JSON, and for a malformed line its number in the block (0 for the others))."""
    import pyarrow as pa

    from features.schema import validate_frame

    valid, rejected = validate_frame(table.to_pandas())
    reasons = [tail for _, tail, _ in malformed] + rejected[REASON_COLUMN].astype(str).tolist()
    raw = [json.dumps({"line": text}) for _, _, text in malformed]
    raw += [json.dumps(rec, default=str) for rec in rejected.drop(columns=[REASON_COLUMN]).to_dict(orient="records")]
    lines = [line for line, _, _ in malformed] + [0] * len(rejected)
    rejects = pa.table({REASON_COLUMN: pa.array(reasons, pa.string()), _RAW_COLUMN: pa.array(raw, pa.string()),
                        _LINE_COLUMN: pa.array(lines, pa.int64())})
    return pa.Table.from_pandas(valid, preserve_index=False), rejects


class HistoryRead:
    """An input being read and validated by Ray tasks, one per block; started when
    made (the caller goes on with other work), collected by `result`."""

    def __init__(self, path: str | os.PathLike[str], block_bytes: int | None = None):
        import ray

        self.blocks = plan_blocks(path, block_bytes or CSV_BLOCK_BYTES)
        self._task = ray.remote(read_block).options(num_cpus=TASK_CPUS, num_returns=3)
        self._refs = [self._task.remote(b) for b in self.blocks]

    def result(self) -> ValidHistory:
        """Waits for every block. Raises InvalidInputError, or the storage error of a
        block (FileNotFoundError, PermissionError) naming its file."""
        import ray

        infos = ray.get([refs[2] for refs in self._refs])
        # Arrow types each block's other columns from that block's values alone;
        # a column typed differently in two blocks is read again, alike, as a
        # reader of the whole file would have typed it.
        again = retypes(infos)
        for i, types in again.items():
            self._refs[i] = self._task.remote(self.blocks[i], types)
        for i, info in zip(again, ray.get([self._refs[i][2] for i in again]), strict=True):
            infos[i] = info
        rejects = ray.get([refs[1] for refs in self._refs])
        return ValidHistory([refs[0] for refs in self._refs], _rejects_frame(self.blocks, rejects, infos))


def retypes(infos: list[dict[str, Any]]) -> dict[int, dict[str, Any]]:
    """Which blocks to read again, with which column types, so that every block
    types each column alike: {block index: {column: type}}."""
    seen: dict[str, set[Any]] = {}
    for info in infos:
        for column, type_ in info["types"].items():
            seen.setdefault(column, set()).add(type_)
    common = {c: _common_type(types) for c, types in seen.items() if len(types) > 1}
    out = {}
    for i, info in enumerate(infos):
        retype = {c: t for c, t in common.items() if c in info["types"]}
        if any(info["types"][c] != t for c, t in retype.items()):
            out[i] = retype
    return out


def _common_type(types: set[Any]) -> Any:
    """The type Arrow gives a column over the values of all blocks: an empty block's
    (null) gives way; integers and floats make floats; any other mix is text."""
    import pyarrow as pa

    typed = {t for t in types if not pa.types.is_null(t)}
    if not typed:
        return pa.null()
    if len(typed) == 1:
        return typed.pop()
    if all(pa.types.is_integer(t) or pa.types.is_floating(t) for t in typed):
        return pa.float64()
    return pa.string()


def _rejects_frame(blocks: list[Block], tables: list[Any], infos: list[dict[str, Any]]) -> pd.DataFrame:
    """The rejects of every block as one frame: original values plus ``reason``; a
    malformed line's number counted from the start of its file."""
    before: list[int] = []
    lines_so_far: dict[str, int] = {}
    for block, info in zip(blocks, infos, strict=True):
        before.append(lines_so_far.get(block.file, 0))
        lines_so_far[block.file] = before[-1] + info["lines"]
    reasons: list[str] = []
    raw: list[str] = []
    for table, offset in zip(tables, before, strict=True):
        for reason, values, line in zip(table[REASON_COLUMN].to_pylist(), table[_RAW_COLUMN].to_pylist(),
                                        table[_LINE_COLUMN].to_pylist(), strict=True):
            reasons.append(f"csv: line {offset + line}{reason}" if line else reason)
            raw.append(values)
    if not reasons:
        return pd.DataFrame({REASON_COLUMN: pd.Series([], dtype=str)})
    original = pd.DataFrame([json.loads(r) for r in raw])
    original[REASON_COLUMN] = reasons
    return original


def read_valid_history(path: str | os.PathLike[str]) -> tuple[Any, pd.DataFrame]:
    """Reads ``path`` (a local path or a URI) in Ray tasks and validates every row once.

    Returns (a Ray dataset of the valid, normalised rows; the rejected rows as a
    pandas frame with their original values and a ``reason``). Raises
    InvalidInputError naming the missing columns, FileNotFoundError when
    ``path`` does not exist, PermissionError when the storage refuses it.
    """
    import ray

    path = location(path)
    check_input(path)
    history = HistoryRead(path).result()
    return ray.data.from_arrow_refs(history.valid), history.rejects


def features_dataset(valid: Any) -> Any:
    """The point-in-time features of a validated dataset, with the `features` pipeline."""
    from features.pipeline import compute_features_dataset

    return compute_features_dataset(valid)


# ------------------------------------------------------------------ input files


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
