"""The audit spool and the dead-letter replay against the real PostgreSQL and broker:
the errors they meet are the driver's own, not a fake's."""

from __future__ import annotations

import random
import uuid
from datetime import UTC, datetime

import pytest
from sqlalchemy import create_engine, text

from cluster.store.audit import AuditRepository
from cluster.store.spool import AuditSink, Spooled


def _decision(tid: str, **changes) -> dict:
    return {
        "transaction_id": tid, "payload_hash": "h" * 64, "reasons": ["because"],
        "source": "api", "kafka_topic": None, "kafka_partition": None, "kafka_offset": None,
        "user_id": "u1", "amount": 12.5, "merchant": "m1", "country": "DE",
        "event_time": datetime(2026, 1, 1, tzinfo=UTC), "features": {"amount_log": 2.6},
        "feature_set_version": "fs-test", "risk_score": 0.4, "threshold": 0.6,
        "anomaly": False, "explanation": {"amount_log": 0.1}, "model_version": "v1",
    } | changes


def _stored(engine, ids: list[str]) -> set[str]:
    with engine.connect() as conn:
        return set(conn.execute(
            text("SELECT transaction_id FROM audit_decisions WHERE transaction_id = ANY(:ids)"), {"ids": ids}
        ).scalars())


def test_a_driver_error_raised_under_copy_is_taken_as_database_down(servers, engine, tmp_path):
    """The COPY runs on the DBAPI cursor, so what it raises arrives as psycopg2's own
    error, not SQLAlchemy's: here a lock timeout (an OperationalError) while another
    session holds the table. The sink must spool, not fail the request."""
    busy = create_engine(servers["database_url"], connect_args={"options": "-c lock_timeout=200"})
    repo = AuditRepository(busy)
    sink = AuditSink(repo, tmp_path, max_rows=100, retry_interval_s=3600)
    ids = [f"tx-{uuid.uuid4()}" for _ in range(3)]
    try:
        with engine.begin() as holder:
            holder.execute(text("LOCK TABLE audit_decisions IN EXCLUSIVE MODE"))
            assert isinstance(sink.write([_decision(t) for t in ids]), Spooled)  # spooled, not raised
        assert sink.backlog == 3
        assert sink.flush() is True
        assert _stored(engine, ids) == set(ids)
        sink.close()
    finally:
        busy.dispose()


def test_a_connection_dropped_by_the_server_is_spooled_then_replayed(servers, engine, tmp_path):
    name = f"spool-{uuid.uuid4().hex[:8]}"
    # No pre-ping, one connection: the next write meets the dropped one.
    fragile = create_engine(servers["database_url"], pool_size=1, max_overflow=0, pool_pre_ping=False,
                            connect_args={"application_name": name})
    try:
        repo = AuditRepository(fragile)
        sink = AuditSink(repo, tmp_path, max_rows=100, retry_interval_s=3600)
        repo.count()  # the pooled connection is open
        with engine.connect() as conn:
            dropped = conn.execute(text("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                                        "WHERE application_name = :n"), {"n": name}).scalar_one()
        assert dropped == 1
        ids = [f"tx-{uuid.uuid4()}" for _ in range(3)]
        assert isinstance(sink.write([_decision(t) for t in ids]), Spooled)
        assert sink.backlog == 3
        assert sink.flush() is True
        assert _stored(engine, ids) == set(ids)
        sink.close()
    finally:
        fragile.dispose()


def test_a_row_postgres_refuses_during_replay_is_set_aside(engine, tmp_path):
    """Rows spooled during an outage are not validated by PostgreSQL until replayed: one
    it refuses (here a NUL, which the schema would have stopped) must not block the rest."""
    down = create_engine("postgresql+psycopg2://nobody@127.0.0.1:9/none", connect_args={"connect_timeout": 2})
    sink = AuditSink(AuditRepository(down), tmp_path, max_rows=100, retry_interval_s=3600)
    ids = [f"tx-{uuid.uuid4()}" for _ in range(4)]
    rows = [_decision(t) for t in ids]
    rows[1]["user_id"] = "nul\x00inside"
    rows[2]["source"] = "bogus"  # breaks a CHECK constraint
    assert isinstance(sink.write(rows), Spooled)
    sink.repository = AuditRepository(engine)  # the database is back
    assert sink.flush() is True and sink.backlog == 0
    assert _stored(engine, ids) == {ids[0], ids[3]}
    [rejected] = tmp_path.glob("*.rejected")
    assert sorted(rejected.read_text().count(t) for t in ids) == [0, 0, 1, 1]
    sink.close()
    down.dispose()


@pytest.mark.slow
def test_replay_sends_the_exact_bytes_of_each_dead_letter(servers, engine, unique_name):
    from kafka import KafkaConsumer

    from cluster.deadletters import replay
    from cluster.producer import ensure_topics
    from configs.settings import get_settings

    payloads = [b"\x00", b"\xff\xfe", b'{"user_id": "u\x001", "amount": 1}', b'{"user_id": "u1", "amount": 1',
                random.Random(3).randbytes(100_000), b"\\x00 is four characters"]
    token = f"replay-{uuid.uuid4().hex}"
    repo = AuditRepository(engine)
    repo.write_dead_letters([{"payload": p, "reason": f"{token} poison", "source": "kafka",
                              "position": f"{unique_name}[0]@{i}"} for i, p in enumerate(payloads)])
    settings = get_settings().model_copy(update={"kafka_topic": unique_name})
    ensure_topics(servers["kafka_bootstrap_servers"], [unique_name], partitions=1)
    assert replay(settings, reason=token, limit=100) == len(payloads)
    assert replay(settings, reason=token, limit=100) == 0  # replayed once only

    consumer = KafkaConsumer(unique_name, bootstrap_servers=servers["kafka_bootstrap_servers"],
                             auto_offset_reset="earliest", consumer_timeout_ms=10_000)
    sent = [m.value for m in consumer]
    consumer.close()
    assert sorted(sent) == sorted(payloads)
