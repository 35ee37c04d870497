"""A corpus of hostile messages through the real pipeline (issue #22): the real
broker, PostgreSQL and scoring application. Every valid transaction is audited
exactly once, every hostile message is one dead-letter row holding its exact
bytes, every offset is committed and the consumer lag drains to zero."""

from __future__ import annotations

import json

from sqlalchemy import text

from cluster.producer import produce
from tests.integration.test_ingest_faults import (  # noqa: F401  (stream_factory is a fixture)
    _check_exact,
    _current,
    _transactions,
    _wait_for,
    stream_factory,
)


# The original API's own example request, sent verbatim (an integer user_id, no id).
ORIGINAL_EXAMPLE = (b'{"user_id": 101, "amount": 98000, "merchant": "CryptoX", "country": "SG", '
                    b'"timestamp": "2024-11-21T10:16:30"}')


def _body(**overrides) -> dict:
    return {"user_id": "hostile", "amount": 3.5, "merchant": "m", "country": "FR",
            "timestamp": "2025-01-01T00:00:00Z"} | overrides


def _json(**overrides) -> bytes:
    return json.dumps(_body(**overrides)).encode()


HOSTILE: list[bytes] = [
    b"\x00",
    b"\xff\xfe\xfd",  # not UTF-8
    b"",  # an empty message
    b"[" * 4_000 + b"]" * 4_000,  # deep nesting, under the size limit
    _json(user_id=[[[[[[["deep"]]]]]]]),
    _json()[:-1] + b', "amount": 1e309}',  # a number no float holds (and a repeated key)
    b'{"user_id": "u", "amount": 1e309, "merchant": "m", "country": "FR", "timestamp": "2025-01-01T00:00:00Z"}',
    _json(amount=10 ** 400),
    _json(timestamp="0001-01-01T00:00:00+01:00"),
    _json(timestamp="9999-12-31T23:30:00-05:00"),
    _json(timestamp="1600-01-01T00:00:00Z"),
    _json(timestamp="1969-12-31T23:59:59Z"),
    _json(user_id="u" * 65),  # an oversized field in a message of ordinary size
    _json(merchant="m" * 20_000),  # an oversized message
    _json(user_id="u\x00x"),  # a NUL inside a JSON string (escaped as \u0000)
    b'{"user_id": "u\x00x", "amount": 1, "merchant": "m", "country": "FR", "timestamp": "2025-01-01T00:00:00Z"}',
    _json(user_id=101.0),
    _json(user_id=True),
    _json(amount="NaN"),
    b"NaN",
    b'"just a string"',
]


def test_hostile_messages_are_dead_letters_and_the_valid_ones_audited_once(
        live_app, stream_factory, engine, unique_name):
    valid = _transactions(unique_name, 400, seed=21)
    valid[0]["user_id"] = 10_100 + int.from_bytes(unique_name[-4:].encode(), "big")  # an integer key
    messages: list = []
    for i, t in enumerate(valid):  # hostile ones spread through the stream
        messages.append(t)
        if i % 19 == 0 and i // 19 < len(HOSTILE):
            messages.append(HOSTILE[i // 19])
    assert sum(isinstance(m, bytes) for m in messages) == len(HOSTILE)
    s = stream_factory(unique_name)  # the real scoring application (live_app)
    produce(s.bootstrap, unique_name, [*messages, ORIGINAL_EXAMPLE])
    got = _wait_for(engine, unique_name, len(valid) + 1, len(HOSTILE), timeout_s=180)
    assert got == (len(valid) + 1, len(HOSTILE)), got
    stats = s.stop()
    with _current(engine).begin() as conn:  # (the example is checked, then set aside for the exact count)
        example = conn.execute(text(
            "SELECT transaction_id, amount, risk_score, explanation FROM audit_decisions "
            "WHERE kafka_topic = :t AND user_id = '101' AND merchant = 'CryptoX'"), {"t": unique_name}).all()
        conn.execute(text("DELETE FROM audit_decisions WHERE kafka_topic = :t AND user_id = '101'"),
                     {"t": unique_name})
    [(tid, amount, risk, explanation)] = example  # scored and audited once, with its explanation
    assert tid.startswith(f"kafka:{unique_name}:") and amount == 98000 and 0 < risk <= 1 and explanation
    valid[0]["user_id"] = str(valid[0]["user_id"])  # audited as its decimal text
    _check_exact(engine, unique_name, valid, len(HOSTILE))
    with _current(engine).connect() as conn:
        stored = [bytes(r[0]) for r in conn.execute(text(
            "SELECT coalesce(payload_raw, convert_to(payload, 'UTF8')) FROM dead_letters "
            "WHERE position LIKE :p ORDER BY id"), {"p": f"{unique_name}[%"})]
    assert sorted(stored) == sorted(HOSTILE)  # each kept byte for byte, for a replay after a fix
    from cluster.metrics import operational_summary

    summary = operational_summary(s.settings)
    assert summary["ingestion"]["lag"] == 0, summary
    assert all("error" not in st for st in stats), stats
