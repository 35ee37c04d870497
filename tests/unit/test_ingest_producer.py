"""Producer messages and dead-letter helpers, without a broker."""

from __future__ import annotations

import json
from datetime import UTC, datetime

from cluster.deadletters import _key
from cluster.metrics import IngestMetrics
from cluster.producer import MESSAGE_FIELDS, _user_key, encode, frame_to_messages, simulated_transactions
from features.schema import parse_transaction


def test_simulated_messages_are_valid_unlabelled_and_end_before_now():
    messages = simulated_transactions(300, seed=5)
    assert len(messages) == 300
    assert all(tuple(m) == MESSAGE_FIELDS for m in messages)  # no is_fraud, no scenario
    parsed = [parse_transaction(m) for m in messages]
    assert max(t.timestamp for t in parsed) <= datetime.now(UTC)
    assert [t.timestamp for t in parsed] == sorted(t.timestamp for t in parsed)
    assert len({m["transaction_id"] for m in messages}) == 300


def test_messages_are_json_keyed_by_user():
    import pandas as pd

    df = pd.DataFrame({"transaction_id": ["a"], "user_id": ["u7"], "amount": [3.5], "merchant": ["m"],
                       "country": ["FR"], "timestamp": pd.to_datetime(["2025-01-02T03:04:05Z"]),
                       "is_fraud": [1], "scenario": ["night_activity"]})
    [m] = frame_to_messages(df)
    assert m == {"transaction_id": "a", "user_id": "u7", "amount": 3.5, "merchant": "m", "country": "FR",
                 "timestamp": "2025-01-02T03:04:05Z"}
    assert json.loads(encode(m)) == m and encode(b"raw") == b"raw"
    assert _user_key(m) == b"u7" and _user_key(b"raw") is None


def test_replayed_payload_keeps_its_user_key():
    assert _key('{"user_id": "u1", "amount": 1}') == b"u1"
    assert _key("{broken") is None and _key("[1]") is None


def test_metrics_are_a_no_op_outside_ray():
    metrics = IngestMetrics("t", "g")
    metrics.batch_done(0.1, scored=3, skipped=1, dead_letters=1)
    metrics.set_lag(5)
    metrics.set_backlog(2)
    assert metrics._messages == 5 and metrics._dead_letters == 1
