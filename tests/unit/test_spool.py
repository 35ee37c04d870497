"""The audit spool: nothing lost, nothing doubled, bounded. A hand-written fake
stands in for the repository here; tests/integration stops the real PostgreSQL."""

from __future__ import annotations

import fcntl
from datetime import UTC, datetime

import pytest
from sqlalchemy.exc import OperationalError

from cluster.store.audit import WriteResult
from cluster.store.spool import AuditSink
from configs.errors import BackpressureError


class FakeRepository:
    def __init__(self):
        self.rows: dict[str, dict] = {}
        self.down = False

    def write_decisions(self, rows):
        if self.down:
            raise OperationalError("INSERT", {}, Exception("connection refused"))
        new = 0
        for r in rows:
            if r["transaction_id"] not in self.rows:
                self.rows[r["transaction_id"]] = r
                new += 1
        return WriteResult(new, len(rows) - new)


def _rows(prefix: str, n: int) -> list[dict]:
    return [{"transaction_id": f"{prefix}-{i}", "event_time": datetime(2026, 1, 1, tzinfo=UTC),
             "features": {"a": 1.0}} for i in range(n)]


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
    assert sink.write(_rows("a", 4)) is None
    assert sink.write(_rows("b", 2)) is None
    assert sink.backlog == 6 and repo.rows == {}
    assert sink.flush() is False  # still down: kept
    repo.down = False
    # While the spool is non-empty, new rows join it (order of arrival kept).
    assert sink.write(_rows("a", 1)) is None
    assert sink.flush() is True
    assert sink.backlog == 0
    assert sorted(repo.rows) == sorted(f"a-{i}" for i in range(4)) + ["b-0", "b-1"]
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
    # Simulate the process dying: its lock goes, its file stays.
    dead._stop.set()
    fcntl.flock(dead._file, fcntl.LOCK_UN)
    dead._file.close()
    live_file = tmp_path / "live-owner.jsonl"
    live_file.write_text("")
    holder = open(live_file)
    fcntl.flock(holder, fcntl.LOCK_EX)  # a live owner's file is left alone

    repo.down = False
    heir = AuditSink(repo, tmp_path, max_rows=10, retry_interval_s=3600)
    assert heir.backlog == 3
    assert heir.flush() and sorted(repo.rows) == ["dead-0", "dead-1", "dead-2"]
    assert live_file.exists()
    heir.close()
    holder.close()
