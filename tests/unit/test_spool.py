"""The audit spool: nothing lost, nothing doubled, bounded, and no crash of the
process that owns it. A hand-written fake stands in for the repository here;
tests/integration/test_spool_postgres.py uses the real PostgreSQL."""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import stat
import threading
from datetime import UTC, datetime
from pathlib import Path

import psycopg2
import psycopg2.errors
import pytest
from sqlalchemy.exc import OperationalError

from cluster.store.audit import WriteResult
from cluster.store.spool import AuditSink, Spooled
from configs.errors import BackpressureError

# A fake's failures reach the spool's thread: waits for it are bounded, never slept.
WAIT_S = 10


class FakeRepository:
    """Keeps rows by transaction id. `down` fails every write as an unreachable
    database; `errors` are raised first, one a write; `refused` ids fail as a row
    PostgreSQL refuses for good."""

    def __init__(self):
        self.rows: dict[str, dict] = {}
        self.down = False
        self.errors: list[BaseException] = []
        self.refused: set[str] = set()
        self.written = threading.Event()

    def write_decisions(self, rows):
        if self.errors:
            raise self.errors.pop(0)
        if self.down:
            raise OperationalError("INSERT", {}, Exception("connection refused"))
        if any(r["transaction_id"] in self.refused for r in rows):
            raise psycopg2.errors.CheckViolation("new row violates check constraint")
        new = 0
        for r in rows:
            if r["transaction_id"] not in self.rows:
                self.rows[r["transaction_id"]] = r
                new += 1
        self.written.set()
        return WriteResult(new, len(rows) - new)

    def payload_hashes(self, ids):
        return {i: self.rows[i].get("payload_hash") for i in ids if i in self.rows}

    def write_dead_letters(self, rows):
        self.dead = getattr(self, "dead", []) + list(rows)


def _rows(prefix: str, n: int) -> list[dict]:
    return [{"transaction_id": f"{prefix}-{i}", "event_time": datetime(2026, 1, 1, tzinfo=UTC),
             "features": {"a": 1.0}} for i in range(n)]


def _ids(prefix: str, n: int) -> list[str]:
    return [f"{prefix}-{i}" for i in range(n)]


def _orphan(spool_dir: Path, name: str, rows: list[dict], tail: bytes = b"") -> Path:
    """A spool file left by a process that died: JSON lines, nobody holds its lock."""
    spool_dir.mkdir(parents=True, exist_ok=True)
    path = spool_dir / name
    lines = b"".join(json.dumps(r | {"event_time": r["event_time"].isoformat()}).encode() + b"\n"
                     for r in rows)
    path.write_bytes(lines + tail)
    return path


def _locked_by_someone(path: Path) -> bool:
    with open(path, "rb") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(handle, fcntl.LOCK_UN)
        return False


def test_rows_written_directly_when_up(tmp_path):
    repo = FakeRepository()
    sink = AuditSink(repo, tmp_path, max_rows=10, retry_interval_s=3600)
    assert sink.write(_rows("a", 3)) == WriteResult(3, 0)
    assert sink.backlog == 0
    sink.close()
    assert list(tmp_path.glob("*.jsonl")) == []


def test_spooled_while_down_then_replayed_once(tmp_path):
    repo = FakeRepository()
    sink = AuditSink(repo, tmp_path, max_rows=10, retry_interval_s=3600)
    repo.down = True
    assert isinstance(sink.write(_rows("a", 4)), Spooled)
    assert isinstance(sink.write(_rows("b", 2)), Spooled)
    assert sink.backlog == 6 and repo.rows == {}
    assert sink.flush() is False  # still down: kept
    repo.down = False
    # While the spool is non-empty, new rows join it (order of arrival kept).
    assert isinstance(sink.write(_rows("a", 1)), Spooled)
    assert sink.flush() is True
    assert sink.backlog == 0
    assert sorted(repo.rows) == sorted(_ids("a", 4) + _ids("b", 2))
    assert repo.rows["a-0"]["event_time"] == datetime(2026, 1, 1, tzinfo=UTC)
    sink.close()


def test_full_spool_refuses_rather_than_drops(tmp_path):
    repo = FakeRepository()
    repo.down = True
    sink = AuditSink(repo, tmp_path, max_rows=5, retry_interval_s=3600)
    sink.write(_rows("a", 5))
    with pytest.raises(BackpressureError, match="spool is full"):
        sink.write(_rows("b", 1))
    assert sink.backlog == 5
    repo.down = False
    sink.close()
    assert len(repo.rows) == 5


def test_spool_of_a_dead_process_is_claimed(tmp_path):
    repo = FakeRepository()
    repo.down = True
    dead = AuditSink(repo, tmp_path, max_rows=10, retry_interval_s=3600)
    dead.write(_rows("dead", 3))
    # Simulate the process dying: its thread stops, its lock goes, its file stays.
    dead._stop.set()
    dead._thread.join()
    os.close(dead._own.fd)
    live_file = tmp_path / "live-owner.jsonl"
    live_file.write_text("")
    holder = open(live_file)
    fcntl.flock(holder, fcntl.LOCK_EX)  # a live owner's file is left alone

    repo.down = False
    heir = AuditSink(repo, tmp_path, max_rows=10, retry_interval_s=3600)
    # Claimed and written straight to PostgreSQL in the constructor.
    assert heir.backlog == 0 and sorted(repo.rows) == _ids("dead", 3)
    assert live_file.exists() and not dead._own.path.exists()
    heir.close()
    holder.close()


# --- item 11: the flush thread survives anything ---------------------------------


def test_flush_thread_survives_any_error_and_replays_later(tmp_path, caplog):
    """Before: any error other than SQLAlchemy's DBAPIError killed the thread, and
    every later request went to the spool until it was full."""
    repo = FakeRepository()
    sink = AuditSink(repo, tmp_path, max_rows=10, retry_interval_s=0.01)
    repo.down = True
    assert isinstance(sink.write(_rows("a", 3)), Spooled)
    repo.written.clear()
    repo.errors = [RuntimeError("boom from the driver"),
                   psycopg2.InterfaceError("connection already closed")]
    repo.down = False
    with caplog.at_level(logging.ERROR, logger="cluster.store.spool"):
        assert repo.written.wait(WAIT_S), "the spool's thread stopped replaying"
    assert sorted(repo.rows) == _ids("a", 3)
    assert "boom from the driver" in caplog.text
    sink.close()
    assert sink.backlog == 0


@pytest.mark.parametrize("error", [psycopg2.OperationalError("server closed the connection unexpectedly"),
                                   psycopg2.InterfaceError("connection already closed")])
def test_raw_driver_disconnects_count_as_database_down(tmp_path, error):
    """The COPY path works on the DBAPI cursor: its errors arrive unwrapped."""
    repo = FakeRepository()
    sink = AuditSink(repo, tmp_path, max_rows=10, retry_interval_s=3600)
    repo.errors = [error]
    assert isinstance(sink.write(_rows("a", 2)), Spooled)
    assert sink.backlog == 2
    assert sink.flush() and sorted(repo.rows) == _ids("a", 2)
    sink.close()


def test_a_row_the_database_refuses_for_good_is_set_aside_not_replayed_forever(tmp_path, caplog):
    repo = FakeRepository()
    sink = AuditSink(repo, tmp_path, max_rows=10, retry_interval_s=3600)
    repo.down = True
    sink.write(_rows("a", 4))
    repo.down, repo.refused = False, {"a-2"}
    with caplog.at_level(logging.ERROR, logger="cluster.store.spool"):
        assert sink.flush() is True
    assert sorted(repo.rows) == ["a-0", "a-1", "a-3"] and sink.backlog == 0
    [rejected] = tmp_path.glob("*.rejected")
    assert [json.loads(line)["transaction_id"] for line in rejected.read_text().splitlines()] == ["a-2"]
    assert "a-2" in caplog.text and rejected.name in caplog.text
    sink.close()


def test_a_refusal_outside_an_outage_reaches_the_caller_and_is_not_spooled(tmp_path):
    repo = FakeRepository()
    repo.refused = {"a-0"}
    sink = AuditSink(repo, tmp_path, max_rows=10, retry_interval_s=3600)
    with pytest.raises(psycopg2.IntegrityError):
        sink.write(_rows("a", 1))
    assert sink.backlog == 0
    sink.close()


# --- item 11: what a crash leaves behind ------------------------------------------


def test_a_torn_last_line_is_dropped_with_a_warning(tmp_path, caplog):
    """The write that was cut short by a crash was never acknowledged."""
    repo = FakeRepository()
    orphan = _orphan(tmp_path, "1-dead.jsonl", _rows("o", 3), tail=b'{"transaction_id": "o-3", "ev')
    zeros = _orphan(tmp_path, "2-dead.jsonl", _rows("z", 2), tail=b"\x00\x00\x00\x00")
    with caplog.at_level(logging.WARNING, logger="cluster.store.spool"):
        sink = AuditSink(repo, tmp_path, max_rows=10, retry_interval_s=3600)
    assert sorted(repo.rows) == _ids("o", 3) + _ids("z", 2) and sink.backlog == 0
    assert not orphan.exists() and not zeros.exists()
    assert "1-dead.jsonl" in caplog.text and "2-dead.jsonl" in caplog.text
    sink.close()


def test_an_invalid_last_line_with_its_newline_is_dropped_too(tmp_path, caplog):
    repo = FakeRepository()
    _orphan(tmp_path, "1-dead.jsonl", _rows("o", 2), tail=b'{"transaction_id": "o-\n')
    with caplog.at_level(logging.WARNING, logger="cluster.store.spool"):
        sink = AuditSink(repo, tmp_path, max_rows=10, retry_interval_s=3600)
    assert sorted(repo.rows) == _ids("o", 2) and "1-dead.jsonl" in caplog.text
    sink.close()


def test_a_complete_last_line_without_its_newline_is_kept(tmp_path):
    repo = FakeRepository()
    path = _orphan(tmp_path, "1-dead.jsonl", _rows("o", 2))
    path.write_bytes(path.read_bytes().rstrip(b"\n"))
    sink = AuditSink(repo, tmp_path, max_rows=10, retry_interval_s=3600)
    assert sorted(repo.rows) == _ids("o", 2)
    sink.close()


def test_a_corrupt_line_inside_a_file_moves_it_aside_untouched(tmp_path, caplog):
    repo = FakeRepository()
    good = _orphan(tmp_path, "1-dead.jsonl", _rows("g", 2))
    bad = _orphan(tmp_path, "2-dead.jsonl", _rows("b", 1))
    content = bad.read_bytes() + b"{not json\n" + json.dumps({"transaction_id": "b-9"}).encode() + b"\n"
    bad.write_bytes(content)
    with caplog.at_level(logging.ERROR, logger="cluster.store.spool"):
        sink = AuditSink(repo, tmp_path, max_rows=10, retry_interval_s=3600)
    assert sorted(repo.rows) == _ids("g", 2) and not good.exists()
    assert not bad.exists()
    [aside] = tmp_path.glob("2-dead.jsonl.corrupt")
    assert aside.read_bytes() == content
    assert "2-dead.jsonl" in caplog.text and "line 2" in caplog.text
    sink.close()


def test_a_failed_append_leaves_no_half_line_behind(tmp_path, monkeypatch):
    """A disk that fills up mid-write: the rows are refused (503), and the spool
    file is as it was, so the next replay does not meet a torn line."""
    repo = FakeRepository()
    repo.down = True
    sink = AuditSink(repo, tmp_path, max_rows=100, retry_interval_s=3600)
    sink.write(_rows("a", 2))
    before = sink._own.path.read_bytes()
    real_write = os.write

    def half_then_full(fd, data):
        if fd == sink._own.fd:
            real_write(fd, bytes(data)[: len(data) // 2])
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", half_then_full)
    with pytest.raises(BackpressureError, match="cannot be written"):
        sink.write(_rows("b", 3))
    monkeypatch.undo()
    assert sink._own.path.read_bytes() == before and sink.backlog == 2
    repo.down = False
    assert sink.flush() and sorted(repo.rows) == _ids("a", 2)
    sink.close()


# --- item 11: orphans beyond the limit --------------------------------------------


def test_orphans_beyond_the_limit_go_straight_to_a_healthy_database(tmp_path):
    """Before: the constructor copied them into its own spool and raised."""
    repo = FakeRepository()
    first = _orphan(tmp_path, "1-dead.jsonl", _rows("x", 4))
    second = _orphan(tmp_path, "2-dead.jsonl", _rows("y", 4))
    sink = AuditSink(repo, tmp_path, max_rows=5, retry_interval_s=3600)
    assert sink.backlog == 0 and sorted(repo.rows) == _ids("x", 4) + _ids("y", 4)
    assert not first.exists() and not second.exists()
    assert sink.write(_rows("z", 5)) == WriteResult(5, 0)
    sink.close()


def test_orphans_beyond_the_limit_are_held_while_the_database_is_down(tmp_path):
    repo = FakeRepository()
    repo.down = True
    first = _orphan(tmp_path, "1-dead.jsonl", _rows("x", 4))
    second = _orphan(tmp_path, "2-dead.jsonl", _rows("y", 4))
    sink = AuditSink(repo, tmp_path, max_rows=5, retry_interval_s=3600)
    # Held in their own files, under this process's lock; counted as backlog.
    assert sink.backlog == 8 and _locked_by_someone(first) and _locked_by_someone(second)
    with pytest.raises(BackpressureError, match="spool is full"):
        sink.write(_rows("z", 1))
    repo.down = False
    assert sink.flush() is True  # what the sink's thread does every retry interval
    assert sink.backlog == 0 and sorted(repo.rows) == _ids("x", 4) + _ids("y", 4)
    assert not first.exists() and not second.exists()
    assert sink.write(_rows("z", 1)) == WriteResult(1, 0)
    sink.close()


def test_a_running_sink_claims_an_orphan_that_appears_later(tmp_path):
    """A replica that died while this one runs: its rows do not wait for a restart."""
    repo = FakeRepository()
    sink = AuditSink(repo, tmp_path, max_rows=10, retry_interval_s=0.01)
    orphan = _orphan(tmp_path, "1-dead.jsonl", _rows("late", 2))
    assert repo.written.wait(WAIT_S)
    assert sorted(repo.rows) == _ids("late", 2) and not orphan.exists()
    sink.close()


# --- item 11: durability and permissions ------------------------------------------


def test_spool_files_and_directory_are_private(tmp_path):
    """The rows hold personal data: 0600 files in a 0700 directory, whatever the umask."""
    repo = FakeRepository()
    repo.down = True
    spool_dir = tmp_path / "spool"
    old = os.umask(0)
    try:
        sink = AuditSink(repo, spool_dir, max_rows=10, retry_interval_s=3600)
        sink.write(_rows("a", 1))
    finally:
        os.umask(old)
    assert stat.S_IMODE(spool_dir.stat().st_mode) == 0o700
    [path] = spool_dir.glob("*.jsonl")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    sink.close()

    spool_dir.chmod(0o755)  # a directory made by hand, too open
    AuditSink(repo, spool_dir, max_rows=10, retry_interval_s=3600).close()
    assert stat.S_IMODE(spool_dir.stat().st_mode) == 0o700


def test_the_directory_is_fsynced_after_files_come_and_go(tmp_path, monkeypatch):
    """A file's own fsync does not make its directory entry durable."""
    spool_dir = tmp_path / "spool"
    orphan = _orphan(spool_dir, "1-dead.jsonl", _rows("o", 1))
    seen: list[set[str]] = []  # the directory's names at each fsync of the directory
    real_fsync = os.fsync

    def recording_fsync(fd):
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode) and st.st_ino == spool_dir.stat().st_ino:
            seen.append(set(os.listdir(spool_dir)))
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    repo = FakeRepository()
    sink = AuditSink(repo, spool_dir, max_rows=10, retry_interval_s=3600)
    own = sink._own.path.name
    assert any(own in names for names in seen), "the new spool file's entry was not made durable"
    assert any(orphan.name not in names for names in seen), "the claimed orphan's removal was not"
    seen.clear()
    sink.close()
    assert seen and own not in seen[-1], "the removal at close was not made durable"


def test_new_rows_queue_behind_held_orphans(tmp_path):
    """A row a dead replica accepted is written before rows accepted after it."""
    repo = FakeRepository()
    repo.down = True
    _orphan(tmp_path, "1-dead.jsonl", _rows("x", 2))
    sink = AuditSink(repo, tmp_path, max_rows=10, retry_interval_s=3600)
    repo.down = False
    order: list[str] = []
    real = repo.write_decisions
    repo.write_decisions = lambda rows: (order.extend(r["transaction_id"] for r in rows), real(rows))[1]
    assert isinstance(sink.write(_rows("z", 1)), Spooled) and sink.backlog == 3
    assert sink.flush() and order == ["x-0", "x-1", "z-0"]
    sink.close()


def test_an_unreadable_orphan_is_reported_once_and_fails_nothing(tmp_path, caplog, monkeypatch):
    orphan = _orphan(tmp_path, "1-dead.jsonl", _rows("o", 1))
    real_open = os.open

    def refusing_open(path, *args, **kwargs):
        if Path(path) == orphan:
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", refusing_open)
    repo = FakeRepository()
    with caplog.at_level(logging.ERROR, logger="cluster.store.spool"):
        sink = AuditSink(repo, tmp_path, max_rows=10, retry_interval_s=3600)
        sink._claim_orphans()  # what the thread does every interval
    assert [r.getMessage().split(" (")[0] for r in caplog.records] == ["audit spool: cannot claim 1-dead.jsonl"]
    assert sink.backlog == 0
    assert sink.write(_rows("a", 1)) == WriteResult(1, 0)
    sink.close()
    monkeypatch.undo()
    assert orphan.exists()  # kept for when it can be read


# --- one id, one payload while PostgreSQL is down (issue #22 item 5) ---------------------


def _decided(tid: str, payload: str) -> dict:
    return {"transaction_id": tid, "payload_hash": payload, "event_time": datetime(2026, 1, 1, tzinfo=UTC)}


def test_an_id_spooled_with_another_payload_is_refused_and_the_same_payload_not_spooled_twice(tmp_path):
    repo = FakeRepository()
    repo.down = True
    sink = AuditSink(repo, tmp_path, max_rows=10, retry_interval_s=3600)
    assert sink.write([_decided("t1", "A"), _decided("t2", "B")]) == Spooled(2)
    again = sink.write([_decided("t1", "A"), _decided("t1", "X"), _decided("t3", "C")])
    assert again == Spooled(1, repeated=frozenset({"t1"}), conflicting=frozenset({"t1"}))  # "X" is refused
    assert sink.write([_decided("t2", "other")]) == Spooled(0, conflicting=frozenset({"t2"}))
    assert sink.backlog == 3
    repo.down = False
    assert sink.flush()
    assert {t: r["payload_hash"] for t, r in repo.rows.items()} == {"t1": "A", "t2": "B", "t3": "C"}
    # once replayed, PostgreSQL is the judge again
    assert sink.write([_decided("t4", "D")]) == WriteResult(1, 0)
    sink.close()


def test_a_decision_another_replica_recorded_first_is_kept_as_a_dead_letter_at_replay(tmp_path):
    repo = FakeRepository()
    repo.down = True
    sink = AuditSink(repo, tmp_path, max_rows=10, retry_interval_s=3600)
    sink.write([_decided("t1", "mine"), _decided("t2", "same")])
    repo.rows["t1"] = _decided("t1", "theirs")  # another replica's spool replayed first
    repo.rows["t2"] = _decided("t2", "same")
    repo.down = False
    assert sink.flush()
    [lost] = repo.dead
    assert lost["source"] == "api-spool" and lost["reason"].startswith("conflict at replay: transaction_id 't1'")
    assert json.loads(lost["payload"])["payload_hash"] == "mine"
    assert repo.rows["t1"]["payload_hash"] == "theirs"
    sink.close()
