"""A bounded, local, append-only spool in front of the audit table.

Scoring must go on while PostgreSQL is down, and no audit row may be lost or
doubled. `AuditSink.write` inserts a batch directly; when the database cannot
be reached it appends the rows to this process's spool file (one JSON object a
line, fsynced before the write returns) and a background thread replays the
spool once the database is back. Replays are idempotent (`ON CONFLICT DO
NOTHING`), so a crash between insert and truncate costs nothing but a retry.
While anything is spooled, new rows queue behind it: nothing overtakes a row
accepted earlier.

Each live process holds an exclusive `flock` on its own spool file. A sink
claims the files whose lock it can take, i.e. those of dead processes (a
replaced replica), at start and then every retry interval, and writes their
rows to PostgreSQL; while the database is down it keeps such a file as it is,
under its own lock, and replays it first when the database is back. Beyond
`max_rows` rows waiting (its own and those it holds) the sink refuses with
`BackpressureError` rather than drop a record.

What a crash or a fault leaves behind, and what happens to it:

- a last line that does not parse is the write that a crash cut short, never
  acknowledged: dropped, with a warning;
- a line that does not parse before the last one is corruption: the file is
  renamed `<name>.corrupt`, untouched, and an error is logged; its rows reach
  the audit table when someone repairs it and renames it back to `*.jsonl`;
- a row PostgreSQL refuses for good (a constraint, a value out of range) is
  appended to `<name>.rejected` with an error naming its transaction id, and
  the rows around it are replayed;
- any other failure of a replay is logged and retried with backoff, keeping
  everything.

Files are created 0600 in a 0700 directory (they hold personal data), and the
directory is fsynced after a file is created, renamed or removed, so that a
row acknowledged as spooled survives a power cut.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import stat
import threading
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from cluster.store.audit import AuditRepository, WriteResult, database_unavailable, refused_for_good
from configs.errors import BackpressureError

log = logging.getLogger(__name__)

REPLAY_CHUNK_ROWS = 1000
# Backoff of the replay thread after an unexpected failure (an unreachable
# database is retried every interval: each try is one failed connect).
MAX_BACKOFF_S = 60.0
CORRUPT_SUFFIX = ".corrupt"
REJECTED_SUFFIX = ".rejected"


@dataclass
class _SpoolFile:
    """A spool file this process holds the lock of, and how many rows wait in it."""

    path: Path
    fd: int
    rows: int = 0


@dataclass(frozen=True)
class Spooled:
    """What `AuditSink.write` answers while PostgreSQL is down: the rows it appended,
    and the ids it did not append because this spool already holds them, with the same
    payload (`repeated`: the first is what will be recorded) or another (`conflicting`)."""

    rows: int
    repeated: frozenset[str] = frozenset()
    conflicting: frozenset[str] = frozenset()


class _CorruptSpool(Exception):
    def __init__(self, name: str, line: int, cause: BaseException):
        super().__init__(f"{name}: line {line} does not parse ({cause})")
        self.name, self.line = name, line


def _json_value(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    if hasattr(value, "item"):  # a numpy scalar
        return value.item()
    raise TypeError(f"cannot spool a value of type {type(value).__name__}")


def _encode(row: dict[str, Any]) -> bytes:
    # ensure_ascii: every line is ASCII, whatever the row holds.
    return json.dumps(row, default=_json_value).encode("ascii") + b"\n"


def _decode(line: bytes) -> dict[str, Any]:
    row = json.loads(line)
    if not isinstance(row, dict) or "transaction_id" not in row:
        raise ValueError("not an audit row")
    if isinstance(row.get("event_time"), str):
        row["event_time"] = datetime.fromisoformat(row["event_time"])
    return row


def _parse(data: bytes, name: str) -> list[dict[str, Any]]:
    """The rows of a spool file's bytes; see the module's docstring for torn and corrupt lines."""
    lines = data.split(b"\n")
    if lines[-1] == b"":  # the file ends with a newline
        lines.pop()
    rows = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            rows.append(_decode(line))
        except (ValueError, RecursionError) as exc:
            if number < len(lines):
                raise _CorruptSpool(name, number, exc) from exc
            log.warning("audit spool %s: dropped its last line (%d bytes), torn by a crash before its "
                        "write was acknowledged: %s", name, len(line), exc)
    return rows


def _read_all(fd: int) -> bytes:
    size, chunks, offset = os.fstat(fd).st_size, [], 0
    while offset < size:
        chunk = os.pread(fd, size - offset, offset)
        if not chunk:
            break
        chunks.append(chunk)
        offset += len(chunk)
    return b"".join(chunks)


def _fsync_dir(path: Path) -> None:
    """Makes the directory's entries durable: a file's own fsync does not."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _private_dir(path: Path) -> None:
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        try:
            os.chmod(path, 0o700)
            log.warning("audit spool directory %s was open to other users (%o): made 0700", path, mode)
        except PermissionError:
            log.warning("audit spool directory %s is open to other users (%o) and not ours to change: "
                        "its files are 0600 all the same", path, mode)


class AuditSink:
    def __init__(self, repository: AuditRepository, spool_dir: Path, max_rows: int,
                 retry_interval_s: float = 1.0):
        self.repository = repository
        self.max_rows = max_rows
        self.retry_interval_s = retry_interval_s
        _private_dir(spool_dir)
        self._dir = spool_dir
        self._lock = threading.Lock()
        self._own = self._create_own_file()
        self._held: list[_SpoolFile] = []  # claimed from dead processes, oldest first
        self._held_rows = 0
        # transaction_id -> payload_hash of the rows this sink has spooled (own file):
        # one id, one payload, also while PostgreSQL is down.
        self._spooled_ids: dict[str, str] = {}
        self._unreadable: set[Path] = set()  # orphans already reported as unreadable
        self._closed = False
        self._stop = threading.Event()
        # Orphans go straight to PostgreSQL when it is up; never a reason to fail here.
        self._claim_orphans()
        try:
            self.flush()
        except Exception:
            log.exception("audit spool: replaying at start failed; everything is kept and retried")
        self._thread = threading.Thread(target=self._flush_loop, name="audit-spool", daemon=True)
        self._thread.start()

    @property
    def backlog(self) -> int:
        """Rows accepted but not yet in PostgreSQL (spooled here, or held from a dead process)."""
        return self._own.rows + self._held_rows

    def write(self, rows: Sequence[dict[str, Any]]) -> WriteResult | Spooled:
        """Insert now, or spool; returns the insert result, or what was spooled.

        Raises `BackpressureError` when the spool is full or cannot be written, and
        what the repository raises for any failure other than an unreachable database.
        """
        if not rows:
            return WriteResult(0, 0)
        with self._lock:
            if self.backlog == 0:
                try:
                    return self.repository.write_decisions(rows)
                except Exception as exc:
                    if not database_unavailable(exc):
                        raise
                    log.warning("audit database unavailable, spooling %d rows: %s", len(rows),
                                exc.__class__.__name__)
            return self._spool(rows)

    def _spool(self, rows: Sequence[dict[str, Any]]) -> Spooled:
        fresh, known, repeated, conflicting = [], dict(self._spooled_ids), set(), set()
        for row in rows:
            tid, digest = row["transaction_id"], row.get("payload_hash")
            if tid not in known:
                known[tid] = digest
                fresh.append(row)
            elif known[tid] == digest:
                repeated.add(tid)
            else:
                conflicting.add(tid)
        self._append(fresh)
        self._spooled_ids = known
        return Spooled(len(fresh), frozenset(repeated), frozenset(conflicting))

    def flush(self) -> bool:
        """Replay what waits, oldest first. True when nothing is left; False when PostgreSQL
        cannot be reached (everything kept). Any other failure is raised, everything kept."""
        with self._lock:
            while self._held:
                held = self._held[0]
                try:
                    if not self._replay(held):
                        return False
                except _CorruptSpool as exc:
                    self._let_go(held)
                    self._move_aside(held, exc)
                    continue
                self._let_go(held)
                self._remove(held)
            if self._own.rows:
                try:
                    if not self._replay(self._own):
                        return False
                    os.ftruncate(self._own.fd, 0)
                    os.fsync(self._own.fd)
                    self._spooled_ids.clear()
                    log.info("replayed %d spooled audit rows", self._own.rows)
                except _CorruptSpool as exc:
                    corrupt, self._own = self._own, self._create_own_file()
                    self._move_aside(corrupt, exc)
                self._own.rows = 0
            return True

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        self._thread.join(timeout=5)
        try:
            self.flush()
        except Exception:
            log.exception("audit spool: the last replay failed; the rows stay for the next process")
        with self._lock:
            for held in self._held:  # unlocked: the next process claims them
                os.close(held.fd)
            self._held.clear()
            self._held_rows = 0
            if self._own.rows == 0:
                self._own.path.unlink(missing_ok=True)
                _fsync_dir(self._dir)
            os.close(self._own.fd)

    # --- internals --------------------------------------------------------

    def _create_own_file(self) -> _SpoolFile:
        name = f"{os.getpid()}-{uuid.uuid4().hex[:8]}.jsonl"
        path, hidden = self._dir / name, self._dir / f".{name}.new"
        # Locked before it gets a name others look for: no one can claim it in between.
        fd = os.open(hidden, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.fchmod(fd, 0o600)
            os.rename(hidden, path)
            _fsync_dir(self._dir)
        except BaseException:
            os.close(fd)
            hidden.unlink(missing_ok=True)
            raise
        return _SpoolFile(path, fd)

    def _append(self, rows: Sequence[dict[str, Any]]) -> None:
        if self.backlog + len(rows) > self.max_rows:
            raise BackpressureError(
                f"audit database unavailable and the local spool is full "
                f"({self.backlog} of {self.max_rows} rows): refusing rather than dropping records"
            )
        data = memoryview(b"".join(_encode(r) for r in rows))
        fd = self._own.fd
        size = os.fstat(fd).st_size
        try:
            while data:
                data = data[os.write(fd, data):]
            os.fsync(fd)
        except OSError as exc:
            # Cut back what was written: a half line would read as corruption later.
            try:
                os.ftruncate(fd, size)
            except OSError:
                log.exception("audit spool %s: could not cut back a failed append", self._own.path.name)
            raise BackpressureError(
                f"audit database unavailable and the local spool cannot be written ({exc.strerror}): "
                "refusing rather than dropping records") from exc
        self._own.rows += len(rows)

    def _replay(self, spool: _SpoolFile) -> bool:
        """Writes a file's rows to PostgreSQL; False when it cannot be reached."""
        rows = _parse(_read_all(spool.fd), spool.path.name)
        for start in range(0, len(rows), REPLAY_CHUNK_ROWS):
            chunk = rows[start:start + REPLAY_CHUNK_ROWS]
            try:
                written = self.repository.write_decisions(chunk)
            except Exception as exc:
                if database_unavailable(exc):
                    return False
                if not refused_for_good(exc):
                    raise
                if not self._write_each_or_reject(chunk):
                    return False
                continue
            if written.duplicates:
                self._keep_lost_decisions(chunk)
        return True

    def _keep_lost_decisions(self, rows: list[dict[str, Any]]) -> None:
        """Rows whose id another payload took while PostgreSQL was down (through another
        replica, or Kafka): their clients were answered, so they are not dropped in
        silence but kept as dead letters, source `api-spool`, for someone to review."""
        stored = self.repository.payload_hashes([r["transaction_id"] for r in rows])
        lost = [r for r in rows if stored.get(r["transaction_id"]) not in (None, r.get("payload_hash"))]
        if not lost:
            return
        self.repository.write_dead_letters([{
            "payload": _encode(r).rstrip(b"\n"), "source": "api-spool",
            "position": f"spool:{r['transaction_id']}:{r.get('payload_hash') or ''}"[:300],
            "reason": (f"conflict at replay: transaction_id {r['transaction_id']!r} was answered while "
                       "the audit database was down, but another payload was recorded under it first")}
            for r in lost])
        for r in lost:
            log.error("audit spool: transaction %r was answered during the outage but another payload holds "
                      "its id; kept as a dead letter (source api-spool)", r["transaction_id"])

    def _write_each_or_reject(self, rows: list[dict[str, Any]]) -> bool:
        """One row at a time, so that a row PostgreSQL refuses does not hold up the
        others; the refused ones go to the `.rejected` file. False when the database
        became unreachable meanwhile (the whole file is replayed again later)."""
        refused: list[tuple[dict[str, Any], BaseException]] = []
        for row in rows:
            try:
                self.repository.write_decisions([row])
            except Exception as exc:
                if database_unavailable(exc):
                    return False
                if not refused_for_good(exc):
                    raise
                refused.append((row, exc))
        if refused:
            path = self._own.path.with_suffix(REJECTED_SUFFIX)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
            try:
                data = memoryview(b"".join(_encode(row) for row, _ in refused))
                while data:
                    data = data[os.write(fd, data):]
                os.fsync(fd)
            finally:
                os.close(fd)
            _fsync_dir(self._dir)
            for row, exc in refused:
                log.error("audit spool: PostgreSQL refuses the row of transaction %r for good (%s: %s); "
                          "kept in %s for someone to repair", row.get("transaction_id"), type(exc).__name__,
                          str(exc).splitlines()[0] if str(exc) else "", path.name)
        return True

    def _claim_orphans(self) -> None:
        """Takes the spool files whose owner died (their lock is free)."""
        with self._lock:
            mine = {self._own.path, *(h.path for h in self._held)}
        for path in sorted(self._dir.glob("*.jsonl")):
            if path in mine:
                continue
            try:
                claimed = self._try_lock(path)
            except OSError as exc:
                self._cannot_read(path, exc)
                continue
            if claimed is None:
                continue
            try:
                claimed.rows = len(_parse(_read_all(claimed.fd), path.name))
            except _CorruptSpool as exc:
                self._move_aside(claimed, exc)
                continue
            except OSError as exc:
                os.close(claimed.fd)
                self._cannot_read(path, exc)
                continue
            if not claimed.rows:
                self._remove(claimed)
                continue
            log.info("claimed %d audit rows spooled by a stopped process (%s)", claimed.rows, path.name)
            with self._lock:
                self._held.append(claimed)
                self._held_rows += claimed.rows

    def _cannot_read(self, path: Path, exc: OSError) -> None:
        if path not in self._unreadable:  # once, not every retry interval
            self._unreadable.add(path)
            log.error("audit spool: cannot claim %s (%s); its rows wait until it can be read", path.name, exc)

    @staticmethod
    def _try_lock(path: Path) -> _SpoolFile | None:
        """The file, locked by this process; None when a live process holds it or it is gone."""
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            # Replayed and removed (or renamed) by another process between open and lock?
            opened, named = os.fstat(fd), os.stat(path)
            if (opened.st_dev, opened.st_ino) != (named.st_dev, named.st_ino):
                raise FileNotFoundError(path)
        except (BlockingIOError, FileNotFoundError):
            os.close(fd)
            return None
        except BaseException:
            os.close(fd)
            raise
        try:
            os.fchmod(fd, 0o600)  # a file from an older version may be world-readable
        except PermissionError:
            pass
        return _SpoolFile(path, fd)

    def _let_go(self, held: _SpoolFile) -> None:
        self._held.remove(held)
        self._held_rows -= held.rows

    def _remove(self, spool: _SpoolFile) -> None:
        """Unlinked while still locked (no one claims it again), then closed."""
        try:
            spool.path.unlink(missing_ok=True)
            _fsync_dir(self._dir)
        finally:
            os.close(spool.fd)

    def _move_aside(self, spool: _SpoolFile, exc: _CorruptSpool) -> None:
        aside = spool.path.with_name(spool.path.name + CORRUPT_SUFFIX)
        try:
            os.rename(spool.path, aside)
            _fsync_dir(self._dir)
        finally:
            os.close(spool.fd)
        log.error("audit spool: %s; the file is moved aside, untouched, to %s. Its rows are NOT in the "
                  "audit table: repair the line and rename the file back to *.jsonl to replay them.",
                  exc, aside.name)

    def _flush_loop(self) -> None:
        delay = self.retry_interval_s
        while not self._stop.wait(delay):
            try:
                self._claim_orphans()
                self.flush()
                delay = self.retry_interval_s
            except Exception:
                delay = max(self.retry_interval_s, min(delay * 2, MAX_BACKOFF_S))
                log.exception("audit spool: replay failed; everything is kept and retried in %.1f s", delay)
