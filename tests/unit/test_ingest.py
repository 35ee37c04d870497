"""The ingestion loop against hand-written fakes: no Ray, no broker, no database, no sleeps."""

from __future__ import annotations

import json
import threading
from collections import namedtuple
from typing import Any

import pytest
from sqlalchemy.exc import OperationalError

from cluster.ingest import Backoff, BatchProcessor, IngestWorker, Message, decode, position
from cluster.store.audit import WriteResult
from configs.settings import load_settings
from features.schema import kafka_transaction_id, parse_transaction, payload_fingerprint

TOPIC = "txns"
Record = namedtuple("Record", "topic partition offset key value")


def txn(i: int, amount: float = 10.0, **extra: Any) -> dict[str, Any]:
    return {"transaction_id": f"t{i}", "user_id": f"u{i % 3}", "amount": amount, "merchant": "m1",
            "country": "FR", "timestamp": "2025-01-01T00:00:00Z"} | extra


def msg(offset: int, value: Any, partition: int = 0) -> Message:
    raw = value if isinstance(value, bytes) or value is None else json.dumps(value).encode()
    return Message(TOPIC, partition, offset, b"k", raw)


class Log(list):
    """Every side effect in order, to check what happens before what."""


class FakeStore:
    def __init__(self, log: Log, fail_writes: int = 0, fail_lookups: int = 0):
        self.log = log
        self.hashes: dict[str, str] = {}
        self.rows: list[dict] = []
        self.dead: list[dict] = []
        self.fail_writes, self.fail_lookups = fail_writes, fail_lookups

    def payload_hashes(self, ids):
        if self.fail_lookups:
            self.fail_lookups -= 1
            raise OperationalError("SELECT", {}, ConnectionRefusedError("database down"))
        return {i: self.hashes[i] for i in ids if i in self.hashes}

    def write_decisions(self, rows):
        if self.fail_writes:
            self.fail_writes -= 1
            raise OperationalError("INSERT", {}, ConnectionRefusedError("database down"))
        new = [r for r in rows if r["transaction_id"] not in self.hashes]
        for r in new:
            self.hashes[r["transaction_id"]] = r["payload_hash"]
        self.rows.extend(new)
        self.log.append(("audit", len(new)))
        return WriteResult(len(new), len(rows) - len(new))

    def write_dead_letters(self, rows):
        known = {d["position"] for d in self.dead}
        new = [r for r in rows if r["position"] not in known]
        self.dead.extend(new)
        self.log.append(("dead_letters", len(new)))
        return WriteResult(len(new), len(rows) - len(new))


class FakePublisher:
    def __init__(self, log: Log):
        self.log = log
        self.sent: list[tuple[str, bytes | None, dict]] = []

    def send(self, topic, key, value):
        self.sent.append((topic, key, json.loads(value)))

    def flush(self):
        self.log.append(("flush", len(self.sent)))

    def on(self, topic):
        return [v for t, _, v in self.sent if t == topic]


class FakeScorer:
    """Anomaly when amount > 1000; the audit row the application would return."""

    def __init__(self, log: Log, fail: int = 0):
        self.log, self.fail = log, fail
        self.calls: list[list[dict]] = []

    def __call__(self, transactions):
        self.calls.append(transactions)
        if self.fail:
            self.fail -= 1
            raise RuntimeError("replica died")
        self.log.append(("score", len(transactions)))
        out = []
        for t in transactions:
            score = min(t["amount"] / 2000, 1.0)
            out.append({
                "transaction_id": t["transaction_id"], "risk_score": score, "anomaly": score > 0.5,
                "threshold": 0.5, "model_version": "v1", "reasons": ["amount is high"] if score > 0.5 else [],
                "audit_row": {"transaction_id": t["transaction_id"], "payload_hash": "app-hash",
                              "user_id": t["user_id"], "amount": t["amount"], "merchant": t["merchant"],
                              "country": t["country"], "event_time": t["timestamp"],
                              "features": {"amount": t["amount"]}, "feature_set_version": "f1",
                              "risk_score": score, "threshold": 0.5, "anomaly": score > 0.5,
                              "explanation": {"amount": 0.1}, "model_version": "v1", "reasons": []},
            })
        return out


class DeferredScorer(FakeScorer):
    """As `ServeScorer`: `submit` sends the call and returns at once; the scores come when waited for."""

    def submit(self, transactions):
        self.log.append(("submit", len(transactions)))
        return lambda: self(transactions)


class FakeConsumer:
    """Hands out prepared batches; sets `stop` when it has none left."""

    def __init__(self, batches: list[list[Message]], stop: threading.Event, log: Log):
        self.batches = [list(b) for b in batches]
        self.stop, self.log = stop, log
        self.committed: dict[tuple[str, int], int] = {}
        self.closed = False
        self.polls = 0
        self.timeouts: list[int] = []
        self.delivered: list[Message] = []  # polled, not rewound
        self.rewound: list[Message] = []

    def poll(self, timeout_ms, max_records):
        self.polls += 1
        self.timeouts.append(timeout_ms)
        if self.rewound:
            self.batches.insert(0, sorted(self.rewound, key=lambda m: (m.partition, m.offset)))
            self.rewound = []
        if not self.batches:
            self.stop.set()
            return {}
        batch = self.batches.pop(0)
        self.delivered += batch
        out: dict = {}
        for m in batch:
            out.setdefault((m.topic, m.partition), []).append(Record(*vars(m).values()))
        return out

    def commit(self, offsets):
        for tp, meta in offsets.items():
            self.committed[(tp.topic, tp.partition)] = meta.offset
        self.log.append(("commit", {(tp.topic, tp.partition): m.offset for tp, m in offsets.items()}))

    def seek(self, tp, offset):
        # Redeliver the rewound messages on the next poll.
        self.log.append(("seek", (tp.topic, tp.partition, offset)))
        again = [m for m in self.delivered if (m.topic, m.partition) == (tp.topic, tp.partition)
                 and m.offset >= offset]
        self.rewound += again
        self.delivered = [m for m in self.delivered if m not in again]

    def close(self, autocommit=True):
        self.closed = True


@pytest.fixture
def settings():
    return load_settings(kafka_topic=TOPIC, kafka_dead_letter_topic="dlq", kafka_alerts_topic="alerts",
                         max_message_bytes=1024)


class Harness:
    def __init__(self, settings, batches, fail_writes=0, fail_lookups=0, fail_scores=0, deferred=False):
        self.log = Log()
        self.sleeps: list[float] = []
        self.stop = threading.Event()
        self.deadline: float | None = None
        self.store = FakeStore(self.log, fail_writes, fail_lookups)
        self.publisher = FakePublisher(self.log)
        self.scorer = (DeferredScorer if deferred else FakeScorer)(self.log, fail_scores)
        self.backoff = Backoff(sleep=self.sleeps.append, stop_deadline=lambda: self.deadline)
        self.processor = BatchProcessor(settings, self.scorer, self.store, self.publisher, self.backoff)
        self.consumer = FakeConsumer(batches, self.stop, self.log)
        self.worker = IngestWorker(settings, self.consumer, self.processor, sleep=self.sleeps.append)

    def run(self):
        self.worker.run(self.stop)
        return self


def test_valid_batch_is_scored_once_audited_then_committed(settings):
    batch = [msg(i, txn(i), partition=i % 2) for i in range(6)]
    h = Harness(settings, [batch]).run()
    assert len(h.scorer.calls) == 1 and len(h.scorer.calls[0]) == 6
    assert len(h.store.rows) == 6
    row = h.store.rows[0]
    assert (row["source"], row["kafka_topic"], row["kafka_partition"], row["kafka_offset"]) == ("kafka", TOPIC, 0, 0)
    assert row["payload_hash"] == payload_fingerprint(parse_transaction(txn(0)))
    assert h.consumer.committed == {(TOPIC, 0): 5, (TOPIC, 1): 6}
    kinds = [k for k, _ in h.log]
    assert kinds.index("audit") < kinds.index("commit")
    assert h.consumer.closed
    assert h.worker.totals["scored"] == 6


def test_missing_id_is_derived_from_position_so_redelivery_is_skipped(settings):
    body = {k: v for k, v in txn(1).items() if k != "transaction_id"}
    h = Harness(settings, [[msg(7, body)], [msg(7, body)]]).run()
    assert [r["transaction_id"] for r in h.store.rows] == [kafka_transaction_id(TOPIC, 0, 7)]
    assert len(h.scorer.calls) == 1  # the redelivery is not scored again
    assert h.worker.totals["skipped"] == 1
    assert h.consumer.committed == {(TOPIC, 0): 8}


@pytest.mark.parametrize("value, reason", [
    (b"{not json", "invalid JSON"),
    (b"[1, 2]", "invalid JSON: expected an object"),
    (None, "empty message"),
    (json.dumps(txn(1, amount=-5)).encode(), "invalid transaction: amount: must be greater than 0"),
    (json.dumps({k: v for k, v in txn(1).items() if k != "merchant"}).encode(), "invalid transaction: merchant"),
    (json.dumps(txn(1, merchant="m" * 2000)).encode(), "oversized: "),
])
def test_poison_goes_to_dead_letters_before_commit_and_the_stream_goes_on(settings, value, reason):
    batch = [msg(0, txn(0)), msg(1, value), msg(2, txn(2))]
    h = Harness(settings, [batch]).run()
    assert [r["transaction_id"] for r in h.store.rows] == ["t0", "t2"]
    assert len(h.store.dead) == 1
    dead = h.store.dead[0]
    assert dead["position"] == position(TOPIC, 0, 1) == "txns[0]@1"
    assert dead["reason"].startswith(reason)
    assert dead["source"] == "kafka"
    [published] = h.publisher.on("dlq")
    assert published["position"] == "txns[0]@1" and published["reason"] == dead["reason"]
    kinds = [k for k, _ in h.log]
    assert kinds.index("flush") < kinds.index("dead_letters") < kinds.index("commit")
    assert h.consumer.committed == {(TOPIC, 0): 3}


def test_same_id_other_payload_is_a_dead_letter_same_payload_is_skipped(settings):
    first = txn(1)
    h = Harness(settings, [[msg(0, first)]]).run()
    redelivered = [msg(0, first), msg(1, txn(1, amount=99.0)), msg(2, txn(2)), msg(3, txn(2, amount=5.0)),
                   msg(4, txn(2))]
    h2 = Harness(settings, [redelivered])
    h2.store = h.store
    h2.processor.store = h.store
    h2.run()
    assert sorted(r["transaction_id"] for r in h.store.rows) == ["t1", "t2"]
    reasons = sorted(d["reason"] for d in h.store.dead)
    assert len(reasons) == 2 and all(r.startswith("conflict: transaction_id") for r in reasons)
    assert h2.worker.totals == h2.worker.totals | {"scored": 1, "skipped": 2, "dead_letters": 2}
    assert [t["transaction_id"] for t in h2.scorer.calls[0]] == ["t2"]


def test_anomalies_are_published_as_alerts(settings):
    h = Harness(settings, [[msg(0, txn(0, amount=1500.0)), msg(1, txn(1))]]).run()
    [alert] = h.publisher.on("alerts")
    assert alert["transaction_id"] == "t0" and alert["risk_score"] == pytest.approx(0.75)
    assert alert["model_version"] == "v1" and alert["reasons"] == ["amount is high"]
    assert alert["position"] == "txns[0]@0"


def test_database_down_is_retried_with_backoff_and_nothing_is_committed_meanwhile(settings):
    h = Harness(settings, [[msg(i, txn(i)) for i in range(3)]], fail_lookups=2, fail_writes=3).run()
    assert h.sleeps == [0.1, 0.2, 0.1, 0.2, 0.4]
    assert len(h.store.rows) == 3
    assert [k for k, _ in h.log] == ["score", "audit", "commit"]
    assert len(h.scorer.calls) == 1  # scored once, the insert alone is retried


def test_scoring_failure_rewinds_and_retries_the_batch_without_commit(settings):
    h = Harness(settings, [[msg(0, txn(0)), msg(1, txn(1), partition=1)]], fail_scores=2).run()
    assert ("seek", (TOPIC, 0, 0)) in h.log and ("seek", (TOPIC, 1, 1)) in h.log
    assert len(h.store.rows) == 2
    assert [k for k, _ in h.log if k == "commit"] == ["commit"]
    assert h.worker.totals["failed_batches"] == 2


def test_graceful_stop_finishes_and_commits_the_batch_in_flight(settings):
    h = Harness(settings, [[msg(0, txn(0))], [msg(1, txn(1))]])
    original = h.scorer.__call__

    def score_then_stop(transactions):
        h.stop.set()  # Ctrl-C arrives while the batch is being scored
        return original(transactions)

    h.processor.scorer = score_then_stop
    h.run()
    assert [r["transaction_id"] for r in h.store.rows] == ["t0"]
    assert h.consumer.committed == {(TOPIC, 0): 1}
    assert h.consumer.polls == 1 and h.consumer.closed


def test_stop_while_the_database_is_down_abandons_the_batch_uncommitted(settings):
    h = Harness(settings, [[msg(0, txn(0))]], fail_writes=10**6)
    h.deadline = 0.0  # the stop timeout has passed
    h.run()
    assert h.store.rows == [] and h.consumer.committed == {}
    assert h.consumer.closed


def test_lost_insert_race_with_another_payload_becomes_a_dead_letter(settings):
    h = Harness(settings, [[msg(0, txn(1))]])
    real_write = h.store.write_decisions

    def racing_write(rows):
        h.store.hashes["t1"] = "someone-else"  # another member recorded t1 first
        return real_write(rows)

    h.store.write_decisions = racing_write
    h.run()
    assert h.store.rows == []
    [dead] = h.store.dead
    assert dead["reason"].startswith("conflict") and dead["position"] == "txns[0]@0"
    assert h.consumer.committed == {(TOPIC, 0): 1}


def test_the_next_batch_is_scored_while_the_one_before_is_audited(settings):
    batches = [[msg(3 * b + i, txn(3 * b + i)) for i in range(3)] for b in range(3)]
    h = Harness(settings, batches, deferred=True).run()
    assert sorted(r["transaction_id"] for r in h.store.rows) == [f"t{i}" for i in range(9)]
    # a batch is sent once the scores of the one before are back (the online state has
    # recorded it), and is scored while that one is audited; commits in order
    steps = [e for e in h.log if e[0] in ("submit", "score", "audit", "commit")]
    assert steps == [("submit", 3),
                     ("score", 3), ("submit", 3), ("audit", 3), ("commit", {(TOPIC, 0): 3}),
                     ("score", 3), ("submit", 3), ("audit", 3), ("commit", {(TOPIC, 0): 6}),
                     ("score", 3), ("audit", 3), ("commit", {(TOPIC, 0): 9})]
    # with a batch in flight the loop takes only what is fetched: a quiet stream does not delay its audit
    assert h.consumer.timeouts == [500, 0, 0, 0]
    assert h.worker.totals | {"batches": 3, "scored": 9} == h.worker.totals


def test_without_overlap_each_batch_is_committed_before_the_next_is_scored(settings):
    batches = [[msg(2 * b + i, txn(2 * b + i)) for i in range(2)] for b in range(2)]
    h = Harness(settings.model_copy(update={"ingest_overlap": False}), batches, deferred=True).run()
    steps = [k for k, _ in h.log if k in ("submit", "score", "audit", "commit")]
    assert steps == ["submit", "score", "audit", "commit", "submit", "score", "audit", "commit"]
    assert h.consumer.timeouts == [500, 500, 500]


def test_an_id_of_the_batch_in_flight_waits_for_its_audit_row(settings):
    batches = [[msg(0, txn(1))], [msg(1, txn(1)), msg(2, txn(2))], [msg(3, txn(2, amount=99.0))]]
    h = Harness(settings, batches, deferred=True).run()
    assert [t["transaction_id"] for call in h.scorer.calls for t in call] == ["t1", "t2"]  # t1 once
    assert sorted(r["transaction_id"] for r in h.store.rows) == ["t1", "t2"]
    [dead] = h.store.dead
    assert dead["position"] == "txns[0]@3" and dead["reason"].startswith("conflict: transaction_id 't2'")
    assert h.worker.totals | {"scored": 2, "skipped": 1, "dead_letters": 1} == h.worker.totals
    assert h.consumer.committed == {(TOPIC, 0): 4}


def test_a_failure_with_a_batch_in_flight_rewinds_both(settings):
    batches = [[msg(i, txn(i)) for i in range(3)], [msg(i, txn(i)) for i in range(3, 6)]]
    h = Harness(settings, batches, fail_scores=1, deferred=True).run()
    assert ("seek", (TOPIC, 0, 0)) in h.log
    assert [k for k, _ in h.log if k == "commit"] == ["commit"]  # nothing before the retry succeeded
    assert sorted(r["transaction_id"] for r in h.store.rows) == [f"t{i}" for i in range(6)]
    assert h.consumer.committed == {(TOPIC, 0): 6}
    assert h.worker.totals["failed_batches"] == 1


def test_a_rebalance_finishes_and_commits_the_batch_in_flight_first(settings):
    h = Harness(settings, [[msg(0, txn(0))], [msg(1, txn(1))]], deferred=True)
    poll = h.consumer.poll

    def poll_with_rebalance(timeout_ms, max_records):
        if h.consumer.polls == 1:  # the group rebalances inside the second poll
            h.worker.before_rebalance()
            h.log.append(("revoked", None))
        return poll(timeout_ms, max_records)

    h.consumer.poll = poll_with_rebalance
    h.run()
    kinds = [k for k, _ in h.log if k in ("audit", "commit", "revoked")]
    assert kinds == ["audit", "commit", "revoked", "audit", "commit"]
    assert h.consumer.committed == {(TOPIC, 0): 2}


def test_decode_derives_the_id_only_when_missing():
    body = {k: v for k, v in txn(1).items() if k != "transaction_id"}
    derived = decode(msg(3, body), 1024)
    assert derived.transaction_id == "kafka:txns:0:3"
    assert decode(msg(3, txn(1)), 1024).transaction_id == "t1"
    assert decode(msg(3, txn(1, transaction_id="bad id!")), 1024).startswith("invalid transaction: transaction_id")


# --- a message that fails for a reason that is not transient (issue #22) ---------------


class PoisonScorer(FakeScorer):
    """Raises, as a replica's code would, whenever a batch holds an amount of 666."""

    def __call__(self, transactions):
        if any(t["amount"] == 666.0 for t in transactions):
            self.calls.append(transactions)
            raise ValueError("cannot score amount 666")
        return super().__call__(transactions)


def test_a_message_that_always_fails_becomes_a_dead_letter_and_the_stream_goes_on(settings):
    batch = [msg(i, txn(i, amount=666.0 if i == 2 else 10.0), partition=i % 2) for i in range(6)]
    h = Harness(settings, [batch, [msg(6, txn(6))]])
    h.scorer = h.processor.scorer = PoisonScorer(h.log)
    h.run()
    assert sorted(r["transaction_id"] for r in h.store.rows) == ["t0", "t1", "t3", "t4", "t5", "t6"]
    [dead] = h.store.dead
    assert dead["position"] == "txns[0]@2"
    assert dead["reason"].startswith("unprocessable: failed 3 times alone: ValueError: cannot score amount 666")
    assert h.consumer.committed == {(TOPIC, 0): 7, (TOPIC, 1): 6}
    assert h.worker.totals["failed_batches"] == 3  # then one at a time
    poison_calls = [c for c in h.scorer.calls if any(t["amount"] == 666.0 for t in c)]
    assert len(poison_calls) == 3 + 3  # three times in its batch, three times alone


def test_an_audit_row_the_database_refuses_becomes_a_dead_letter(settings):
    from sqlalchemy.exc import DataError

    # (without overlap the batch fails in the loop's poll, not after the fake consumer ran dry)
    h = Harness(settings.model_copy(update={"ingest_overlap": False}), [[msg(i, txn(i)) for i in range(4)]])
    real_write = h.store.write_decisions

    def refuse_t1(rows):
        if any(r["transaction_id"] == "t1" for r in rows):
            raise DataError("INSERT", {}, ValueError("value out of range"))
        return real_write(rows)

    h.store.write_decisions = refuse_t1
    h.run()
    assert sorted(r["transaction_id"] for r in h.store.rows) == ["t0", "t2", "t3"]
    assert [d["position"] for d in h.store.dead] == ["txns[0]@1"]
    assert "DataError" in h.store.dead[0]["reason"]
    assert h.consumer.committed == {(TOPIC, 0): 4}


def test_transient_failures_are_retried_without_limit_and_never_dead_lettered(settings):
    h = Harness(settings, [[msg(0, txn(0)), msg(1, txn(1))]], fail_scores=0)
    h.scorer.fail = 10
    real = h.scorer.__call__

    def unavailable(transactions):
        if h.scorer.fail:
            h.scorer.fail -= 1
            raise TimeoutError("the scoring application did not answer")
        return real(transactions)

    h.processor.scorer = unavailable
    h.run()
    assert h.store.dead == []
    assert sorted(r["transaction_id"] for r in h.store.rows) == ["t0", "t1"]
    assert h.worker.totals["failed_batches"] == 10


def test_a_dead_letter_the_store_refuses_is_kept_with_its_payload_as_hex(settings):
    from sqlalchemy.exc import DataError

    h = Harness(settings, [[msg(0, txn(0)), msg(1, txn(1, amount=666.0))]])
    h.scorer = h.processor.scorer = PoisonScorer(h.log)
    real_dead = h.store.write_dead_letters

    def refuse_raw(rows):
        if any(r["reason"].startswith("unprocessable") and "as hex" not in r["reason"] for r in rows):
            raise DataError("INSERT", {}, ValueError("invalid byte sequence"))
        return real_dead(rows)

    h.store.write_dead_letters = refuse_raw
    h.run()
    [dead] = h.store.dead
    raw = json.dumps(txn(1, amount=666.0)).encode()
    assert dead["payload"] == raw.hex().encode() and "payload stored as hex" in dead["reason"]
    assert h.consumer.committed == {(TOPIC, 0): 2}


@pytest.mark.parametrize("value", [
    b"\x00", b'{"user_id": "u\\u0000", "amount": 1}', b"\xff\xfe{", b"[" * 5000 + b"]" * 5000,
    b'{"amount": 1e309}', b"", json.dumps(txn(1, timestamp="0001-01-01T00:00:00+01:00")).encode(),
    json.dumps(txn(1, timestamp="9999-12-31T23:30:00-05:00")).encode(),
    json.dumps(txn(1, timestamp="1600-01-01T00:00:00Z")).encode(),
])
def test_decode_names_every_hostile_message_as_poison(value):
    reason = decode(msg(0, value), 1 << 20)
    assert isinstance(reason, str) and reason.startswith(("invalid JSON", "invalid transaction")), reason


def test_a_derived_id_carries_the_brokers_epoch_so_a_restarted_broker_never_reuses_one(settings):
    """The embedded broker keeps messages in memory: after a restart offset 7 is another message."""
    body = {k: v for k, v in txn(1).items() if k != "transaction_id"}
    epochs = iter(["e1", "e2"])
    h = Harness(settings, [[msg(7, body)], [msg(7, body | {"amount": 99.0})]])
    h.processor.epoch = lambda: next(epochs)
    h.run()
    assert [r["transaction_id"] for r in h.store.rows] == ["kafka:txns:0:7:e1", "kafka:txns:0:7:e2"]
    assert h.store.dead == []  # not a conflict: two messages, two ids
    assert decode(msg(7, body), 1024).transaction_id == "kafka:txns:0:7"  # a durable broker: no epoch
