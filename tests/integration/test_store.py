"""The audit store and the registry against the real embedded PostgreSQL."""

from __future__ import annotations

import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime

import pytest
from sqlalchemy import text

from cluster.registry import ModelRegistry, new_version_id
from cluster.store.audit import AuditFilter, AuditRepository
from cluster.store.migrate import upgrade
from configs.errors import NotFoundError


def _decision(tid: str, *, anomaly: bool = False, source: str = "api", score: float = 0.4) -> dict:
    return {
        "transaction_id": tid, "payload_hash": "h" * 64, "reasons": ["because"],
        "source": source, "kafka_topic": None, "kafka_partition": None, "kafka_offset": None,
        "user_id": "u1", "amount": 12.5, "merchant": "m1", "country": "DE",
        "event_time": datetime(2026, 1, 1, tzinfo=UTC), "features": {"amount_log": 2.6},
        "feature_set_version": "fs-test", "risk_score": score, "threshold": 0.6,
        "anomaly": anomaly, "explanation": {"amount_log": 0.1}, "model_version": "v1",
    }


def test_audit_write_is_idempotent(engine):
    repo = AuditRepository(engine)
    ids = [f"tx-{uuid.uuid4()}" for _ in range(50)]
    batch = [_decision(t) for t in ids]
    first = repo.write_decisions(batch)
    again = repo.write_decisions(batch + [_decision(f"tx-{uuid.uuid4()}")])
    assert (first.inserted, first.duplicates) == (50, 0)
    assert (again.inserted, again.duplicates) == (1, 50)
    with engine.connect() as conn:
        n = conn.execute(
            text("SELECT count(*) FROM audit_decisions WHERE transaction_id = ANY(:ids)"), {"ids": ids}
        ).scalar_one()
    assert n == 50
    stored = repo.get(ids[0])
    assert stored["features"] == {"amount_log": 2.6} and stored["explanation"] == {"amount_log": 0.1}
    assert repo.payload_hashes(ids[:3]) == {t: "h" * 64 for t in ids[:3]}


def test_a_column_with_special_characters_and_nulls_keeps_both(engine):
    """COPY's text is built a column at a time: escaping one field of a column must
    leave a NULL in the same column a NULL."""
    repo = AuditRepository(engine)
    odd, plain = f"tx-{uuid.uuid4()}", f"tx-{uuid.uuid4()}"
    rows = [_decision(odd) | {"kafka_topic": "t\tab\\N", "kafka_partition": 1, "kafka_offset": 2},
            _decision(plain)]
    assert repo.write_decisions(rows).inserted == 2
    assert repo.get(odd)["kafka_topic"] == "t\tab\\N"
    assert repo.get(plain)["kafka_topic"] is None and repo.get(plain)["kafka_offset"] is None


def test_audit_write_with_an_id_twice_in_one_batch_keeps_the_first(engine):
    """The straight COPY fails on the repeated id; the staging insert keeps one row of it."""
    repo = AuditRepository(engine)
    tid, other = f"tx-{uuid.uuid4()}", f"tx-{uuid.uuid4()}"
    result = repo.write_decisions([_decision(tid, score=0.1), _decision(other), _decision(tid, score=0.9)])
    assert (result.inserted, result.duplicates) == (2, 1)
    with engine.connect() as conn:
        scores = conn.execute(text("SELECT risk_score FROM audit_decisions WHERE transaction_id = :t"),
                              {"t": tid}).scalars().all()
    assert scores == [0.1]
    assert repo.get(other) is not None


def test_audit_write_keeps_every_character(engine):
    """Rows travel in COPY's text format: its special characters must come back unchanged."""
    repo = AuditRepository(engine)
    awkward = 'a\tb\nc\rd\\e "f" \\N ü€ \u2028'
    tid = f"tx-{uuid.uuid4()}\t\\N"
    row = _decision(tid) | {"user_id": awkward, "merchant": "\\", "reasons": [awkward, "\\n"],
                            "features": {"amount_log": 1e-05, awkward: -0.0}, "amount": 0.1 + 0.2,
                            "explanation": {"amount_log": 5e-324}}
    assert repo.write_decisions([row]).inserted == 1
    stored = repo.get(tid)
    for key in ("user_id", "merchant", "reasons", "features", "explanation", "amount", "kafka_topic",
                "event_time", "anomaly"):
        assert stored[key] == row[key], key
    assert stored["amount"] == 0.30000000000000004


def test_audit_query_filters_and_stats(engine):
    repo = AuditRepository(engine)
    user = f"user-{uuid.uuid4().hex[:6]}"
    rows = [_decision(f"q-{uuid.uuid4()}", anomaly=i % 4 == 0, source="kafka" if i % 2 else "api",
                      score=i / 10) for i in range(10)]
    for r in rows:
        r["user_id"] = user
    repo.write_decisions(rows)
    page, total = repo.query(AuditFilter(user_id=user), limit=4)
    assert total == 10 and len(page) == 4
    _, anomalies = repo.query(AuditFilter(user_id=user, anomalies_only=True))
    assert anomalies == 3
    _, from_kafka = repo.query(AuditFilter(user_id=user, source="kafka"))
    assert from_kafka == 5
    stats = repo.stats(AuditFilter(user_id=user))
    assert stats["total"] == 10 and stats["anomalies"] == 3
    assert sum(stats["score_histogram"]["counts"]) == 10
    assert stats["per_source"] == {"api": 5, "kafka": 5}


def test_dead_letters_are_recorded_once_per_position(engine):
    repo = AuditRepository(engine)
    pos = f"topic-{uuid.uuid4().hex[:6]}[0]@17"
    row = {"payload": "{not json", "reason": "invalid JSON", "source": "kafka", "position": pos}
    assert repo.write_dead_letters([row]).inserted == 1
    assert repo.write_dead_letters([row]).inserted == 0
    listed, _ = repo.dead_letters(reason="invalid JSON")
    assert [r["position"] for r in listed].count(pos) == 1


def test_migrations_run_once_under_concurrency(servers):
    # Several replicas starting together: the advisory lock serialises them.
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda _: upgrade(servers["database_url"]), range(4)))


def test_registry_activation_history(engine):
    registry = ModelRegistry(engine)
    versions = []
    for _ in range(2):
        v = new_version_id()
        registry.register(version=v, parameters={"n_estimators": 10}, feature_set_version="fs-test",
                          data_fingerprint="f" * 64, metrics={"roc_auc": 0.9},
                          artifact_path=f"/tmp/{v}", artifact_sha256="0" * 64)
        versions.append(v)
    assert registry.get(versions[0])["status"] == "candidate"
    registry.activate(versions[0], activated_by="test")
    registry.activate(versions[1], activated_by="test")
    assert registry.active()["version"] == versions[1]
    assert registry.get(versions[0])["status"] == "retired"
    last = registry.history()[0]
    assert (last["version"], last["previous_version"], last["activated_by"]) == (versions[1], versions[0], "test")
    with pytest.raises(NotFoundError):
        registry.activate("v-does-not-exist")
