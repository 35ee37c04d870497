"""A bounded, local, append-only spool in front of the audit table.

Scoring must go on while PostgreSQL is down, and no audit row may be lost or
doubled. `AuditSink.write` inserts a batch directly; when the database cannot
be reached it appends the rows to this process's spool file (one JSON object a
line, fsynced) and a background thread replays the spool once the database is
back. Replays are idempotent (`ON CONFLICT DO NOTHING`), so a crash between
insert and truncate costs nothing but a retry.

Each live process holds an exclusive `flock` on its own spool file. At start a
sink claims the files whose lock it can take, i.e. those of dead processes (a
replaced replica), and replays them: nothing a dead replica accepted is lost.
Beyond `max_rows` spooled rows the sink refuses with `BackpressureError`
rather than drop a record.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import threading
import uuid
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy.exc import DBAPIError, OperationalError

from cluster.store.audit import AuditRepository, WriteResult
from configs.errors import BackpressureError

log = logging.getLogger(__name__)

_DB_DOWN = (OperationalError, DBAPIError)


def _encode(row: dict[str, Any]) -> str:
    return json.dumps({k: (v.isoformat() if isinstance(v, datetime) else v) for k, v in row.items()})


def _decode(line: str) -> dict[str, Any]:
    row = json.loads(line)
    if isinstance(row.get("event_time"), str):
        row["event_time"] = datetime.fromisoformat(row["event_time"])
    return row


class AuditSink:
    def __init__(self, repository: AuditRepository, spool_dir: Path, max_rows: int,
                 retry_interval_s: float = 1.0):
        self.repository = repository
        self.max_rows = max_rows
        self.retry_interval_s = retry_interval_s
        spool_dir.mkdir(parents=True, exist_ok=True)
        self._dir = spool_dir
        self._lock = threading.Lock()
        self._path = spool_dir / f"{os.getpid()}-{uuid.uuid4().hex[:8]}.jsonl"
        self._file = open(self._path, "a+", encoding="utf-8")
        fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        self._spooled = 0
        self._stop = threading.Event()
        self._claim_orphans()
        self._thread = threading.Thread(target=self._flush_loop, name="audit-spool", daemon=True)
        self._thread.start()

    @property
    def backlog(self) -> int:
        """Rows accepted but not yet in PostgreSQL."""
        return self._spooled

    def write(self, rows: Sequence[dict[str, Any]]) -> WriteResult | None:
        """Insert now, or spool; returns the insert result, or None when spooled."""
        if not rows:
            return WriteResult(0, 0)
        with self._lock:
            if self._spooled == 0:
                try:
                    return self.repository.write_decisions(rows)
                except _DB_DOWN as exc:
                    log.warning("audit database unavailable, spooling %d rows: %s", len(rows), exc.__class__.__name__)
            self._append(rows)
            return None

    def flush(self) -> bool:
        """Replay the spool into PostgreSQL; True when it is empty afterwards."""
        with self._lock:
            if self._spooled == 0:
                return True
            self._file.seek(0)
            rows = [_decode(line) for line in self._file if line.strip()]
            try:
                for start in range(0, len(rows), 1000):
                    self.repository.write_decisions(rows[start:start + 1000])
            except _DB_DOWN:
                return False
            self._file.seek(0)
            self._file.truncate()
            os.fsync(self._file.fileno())
            log.info("replayed %d spooled audit rows", len(rows))
            self._spooled = 0
            return True

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.flush()
        with self._lock:
            empty = self._spooled == 0
            self._file.close()
            if empty:
                self._path.unlink(missing_ok=True)

    # --- internals --------------------------------------------------------

    def _append(self, rows: Sequence[dict[str, Any]]) -> None:
        if self._spooled + len(rows) > self.max_rows:
            raise BackpressureError(
                f"audit database unavailable and the local spool is full "
                f"({self._spooled} of {self.max_rows} rows): refusing rather than dropping records"
            )
        self._file.seek(0, os.SEEK_END)
        self._file.write("".join(_encode(r) + "\n" for r in rows))
        self._file.flush()
        os.fsync(self._file.fileno())
        self._spooled += len(rows)

    def _claim_orphans(self) -> None:
        for path in sorted(self._dir.glob("*.jsonl")):
            if path == self._path:
                continue
            try:
                handle = open(path, "r+", encoding="utf-8")
            except FileNotFoundError:
                continue
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.close()  # a live process owns it
                continue
            rows = [_decode(line) for line in handle if line.strip()]
            if rows:
                log.info("claiming %d audit rows spooled by a stopped process (%s)", len(rows), path.name)
                with self._lock:
                    self._append(rows)
            path.unlink(missing_ok=True)
            handle.close()

    def _flush_loop(self) -> None:
        while not self._stop.wait(self.retry_interval_s):
            if self._spooled:
                self.flush()
