"""The audit store and the registry against the real embedded PostgreSQL."""

from __future__ import annotations

import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime

import random

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from cluster.deadletters import original_payload
from cluster.registry import ModelRegistry, new_version_id
from cluster.store.audit import AuditFilter, AuditRepository
from cluster.store.migrate import upgrade
from configs.errors import InvalidInputError, NotFoundError


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


# Payloads PostgreSQL text cannot hold as they are, and ones it can.
HOSTILE_PAYLOADS = {
    "nul": b"\x00",
    "invalid_utf8": b"\xff\xfe",
    "nul_in_json_string": b'{"user_id": "u\x001", "amount": 1}',
    "escaped_nul_in_json": b'{"user_id": "u\\u00001"}',  # valid text: kept as it is
    "looks_escaped": b"\\x00 is four characters",  # must not come back as a NUL
    "big_binary": random.Random(7).randbytes(100_000),
    "big_text": ("\u20ac" * 50_000).encode(),
    "empty": b"",
}


@pytest.mark.parametrize("name", list(HOSTILE_PAYLOADS))
def test_a_dead_letter_of_any_bytes_is_one_row_and_replays_its_exact_bytes(engine, name):
    payload = HOSTILE_PAYLOADS[name]
    repo = AuditRepository(engine)
    token = f"dl-{uuid.uuid4().hex}"
    row = {"payload": payload, "reason": f"{token} invalid JSON: NUL \x00 here", "source": "kafka",
           "position": f"topic-{token}[0]@1"}
    assert repo.write_dead_letters([row]).inserted == 1
    assert repo.write_dead_letters([row]).inserted == 0  # a redelivery: still one row
    [stored], total = repo.dead_letters(reason=token, include_raw=True)
    assert total == 1
    assert original_payload(stored) == payload
    assert "\x00" not in stored["payload"] and "\x00" not in stored["reason"]
    assert stored["reason"] == f"{token} invalid JSON: NUL \\x00 here"
    # The text shown is the payload itself whenever it is valid text without NUL.
    plain = b"\x00" not in payload and _is_utf8(payload)
    assert stored["payload_escaped"] is (not plain)
    if plain:
        assert stored["payload"] == payload.decode() and stored["payload_raw"] is None
    # A page for people (the API, the UI) carries no bytes.
    [shown], _ = repo.dead_letters(reason=token)
    assert "payload_raw" not in shown and shown["payload"] == stored["payload"]


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def test_dead_letters_given_as_text_keep_it_exactly(engine):
    """Callers that still pass text: a NUL or a lone surrogate no longer fails the insert."""
    repo = AuditRepository(engine)
    token = f"dl-{uuid.uuid4().hex}"
    texts = ["plain {\"a\": 1}", "nul \x00 inside", "lone \udc80 surrogate", None]
    rows = [{"payload": t, "reason": f"{token} \ud800", "source": "kafka", "position": f"{token}[0]@{i}"}
            for i, t in enumerate(texts)]
    assert repo.write_dead_letters(rows).inserted == len(texts)
    stored, total = repo.dead_letters(reason=token, include_raw=True)
    assert total == len(texts)
    by_position = {r["position"]: r for r in stored}
    for i, t in enumerate(texts):
        expected = b"" if t is None else t.encode("utf-8", errors="surrogatepass")
        assert original_payload(by_position[f"{token}[0]@{i}"]) == expected
    assert {r["reason"] for r in stored} == {f"{token} \\ud800"}


def test_the_reason_filter_matches_wildcards_literally(engine):
    repo = AuditRepository(engine)
    token = uuid.uuid4().hex
    reasons = {"pct": f"{token} 50% off", "pct_wild": f"{token} 50 percent off",
               "under": f"{token} a_c", "under_wild": f"{token} abc",
               "slash": f"{token} x\\y", "slash_wild": f"{token} xy"}
    repo.write_dead_letters([{"payload": b"{}", "reason": r, "source": "kafka", "position": f"{token}@{k}"}
                             for k, r in reasons.items()])

    def matching(needle: str) -> set[str]:
        rows, total = repo.dead_letters(reason=needle, limit=100)
        assert total == len(rows)
        return {k for k, r in reasons.items() if r in {row["reason"] for row in rows}}

    assert matching(f"{token} 50%") == {"pct"}
    assert matching(f"{token} a_c") == {"under"}
    assert matching(f"{token} x\\y") == {"slash"}
    assert matching(f"{token} 50% OFF".upper()) == {"pct"}  # still case-insensitive
    assert matching(token) == set(reasons)


@pytest.mark.parametrize(("call", "parameter"), [
    (lambda repo: repo.get("tx\x00"), "transaction_id"),
    (lambda repo: repo.get("tx\udc80"), "transaction_id"),
    (lambda repo: repo.get_many(["ok", "tx\x00"]), "transaction_id"),
    (lambda repo: repo.payload_hashes(["tx\x00"]), "transaction_id"),
    (lambda repo: repo.query(AuditFilter(user_id="\x00")), "user_id"),
    (lambda repo: repo.stats(AuditFilter(user_id="u\x00")), "user_id"),
    (lambda repo: repo.dead_letters(reason="\x00"), "reason"),
    (lambda repo: repo.count_backfill("v\x00"), "model_version"),
    (lambda repo: repo.query(AuditFilter(), offset=2**63), "offset"),
    (lambda repo: repo.dead_letters(offset=2**63), "offset"),
    (lambda repo: repo.dead_letters(limit=-1), "limit"),
])
def test_a_filter_value_postgres_cannot_take_is_invalid_input(engine, call, parameter):
    """Never a driver error (a 500): InvalidInputError naming the parameter (a 422)."""
    with pytest.raises(InvalidInputError, match=f"^{parameter}: "):
        call(AuditRepository(engine))


def test_migration_0002_keeps_dead_letters_written_before_it(servers):
    """Old rows have no payload_raw: their text is their original."""
    url = make_url(servers["database_url"])
    name = f"m_{uuid.uuid4().hex[:12]}"
    admin = create_engine(url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    fresh = create_engine(url.set(database=name))
    try:
        upgrade(fresh.url.render_as_string(hide_password=False), "0001")
        with fresh.begin() as conn:
            conn.execute(text("INSERT INTO dead_letters (payload, reason, source, position) "
                              "VALUES ('{broken', 'invalid JSON', 'kafka', 't[0]@1')"))
        upgrade(fresh.url.render_as_string(hide_password=False))
        [old], _ = AuditRepository(fresh).dead_letters(include_raw=True)
        assert old["payload_raw"] is None and old["payload_escaped"] is False
        assert original_payload(old) == b"{broken"
    finally:
        fresh.dispose()
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE "{name}"'))
        admin.dispose()


def test_migrations_run_once_under_concurrency(servers):
    # Several replicas starting together: the advisory lock serialises them.
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda _: upgrade(servers["database_url"]), range(4)))


def test_registry_activation_history(engine):
    # the artifacts here are placeholders: activation's artifact check is tested in test_model_activation
    registry = ModelRegistry(engine, check_artifact=lambda row: None)
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
