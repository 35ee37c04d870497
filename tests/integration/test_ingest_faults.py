"""Kafka ingestion under faults, on the real broker, real PostgreSQL and real Ray.

Each fault test streams thousands of transactions through its own topic and
consumer group into the real scoring application (feature, model and SHAP
steps on Serve, the shared online state), injects a fault mid-stream, and then
checks exact counts (one audit row per valid transaction, one dead-letter row
per poison message, nothing else) and the online state (`online_parity`):
stored user features equal an offline recomputation, the merchant feature
lies within the bounds its streaming meaning gives, and the state holds every
transaction exactly once.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from typing import Any

import pandas as pd
import pytest
import ray
from sqlalchemy import text

from cluster.dev import ensure_servers, stop_servers
from cluster.ingest import start_ingestion, stop_ingestion
from cluster.producer import ensure_topics, produce, simulated_transactions
from configs.settings import load_settings
from tests.integration.online_parity import (
    event_time_span_fits_merchant_state,
    live_state,
    merchant_skew,
    offline_features,
    skew_outside_bounds,
    skew_summary,
    state_count_mismatches,
    stored_decisions,
    user_feature_mismatches,
)

# The fake scorer below travels to the actors by value (workers cannot import this module).
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

N_VALID = 5_000
DEADLINE_S = 120
# Two days of event time: under the merchant state's keep window (24 h + a grace
# day), so no event is expired while the stream runs and the skew bounds hold.
DAYS = 2


class FakeScorer:
    """Deterministic stand-in for the scoring application (same answer shape): the
    alerts test needs to know which transactions are anomalies."""

    def __call__(self, transactions: list[dict[str, Any]]) -> list[dict[str, Any]]:
        out = []
        for t in transactions:
            score = min(t["amount"] / 2_000.0, 1.0)
            anomaly = score > 0.5
            out.append({
                "transaction_id": t["transaction_id"], "risk_score": score, "anomaly": anomaly,
                "threshold": 0.5, "model_version": "fake", "reasons": ["large amount"] if anomaly else [],
                "audit_row": {
                    "transaction_id": t["transaction_id"], "payload_hash": "", "user_id": t["user_id"],
                    "amount": t["amount"], "merchant": t["merchant"], "country": t["country"],
                    "event_time": t["timestamp"], "features": {"amount": t["amount"]},
                    "feature_set_version": "fake", "risk_score": score, "threshold": 0.5,
                    "anomaly": anomaly, "explanation": {"amount": score}, "model_version": "fake",
                    "reasons": [],
                },
            })
        return out


def _settings(name: str, **overrides):
    return load_settings(kafka_topic=name, kafka_dead_letter_topic=f"{name}-dlq",
                         kafka_alerts_topic=f"{name}-alerts", kafka_consumer_group=name, **overrides)


def _transactions(name: str, n: int, seed: int, days: int = DAYS) -> list[dict[str, Any]]:
    """Simulated transactions whose ids, users and merchants belong to this test alone
    (merchants are shared by its users, as in the simulation)."""
    rows = simulated_transactions(n, seed=seed, days=days)
    for r in rows:
        r["transaction_id"] = f"{name}:{r['transaction_id']}"
        r["user_id"] = f"{name[-8:]}-{r['user_id']}"
        r["merchant"] = f"{name[-8:]}-{r['merchant']}"
    return rows


def _current(engine):
    """The engine of the running PostgreSQL (a restart may move it to another port)."""
    from cluster.dev import database_url
    from cluster.store.db import engine_for

    return engine_for(database_url())


def _counts(engine, topic: str) -> tuple[int, int]:
    with _current(engine).connect() as conn:
        audited = conn.execute(text("SELECT count(*) FROM audit_decisions WHERE kafka_topic = :t"),
                               {"t": topic}).scalar_one()
        dead = conn.execute(text("SELECT count(*) FROM dead_letters WHERE position LIKE :p"),
                            {"p": f"{topic}[%"}).scalar_one()
    return audited, dead


def _wait_for(engine, topic: str, audited: int, dead: int, timeout_s: float = DEADLINE_S) -> tuple[int, int]:
    deadline = time.monotonic() + timeout_s
    got = (-1, -1)
    while time.monotonic() < deadline:
        try:
            got = _counts(engine, topic)
        except Exception as exc:  # the database may be restarting
            got = (-1, -1)
            print("counting failed:", type(exc).__name__, str(exc)[:200])
        if got == (audited, dead):
            return got
        time.sleep(0.5)
    return got


def _wait_until_audited(engine, topic: str, at_least: int, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if _counts(engine, topic)[0] >= at_least:
            return
        time.sleep(0.2)
    raise AssertionError(f"fewer than {at_least} rows audited from {topic} after {timeout_s}s")


def _check_exact(engine, topic: str, valid: list[dict], poison_positions: int) -> None:
    """One row per valid transaction, with its own payload; one dead letter per poison message."""
    with _current(engine).connect() as conn:
        rows = conn.execute(text(
            "SELECT transaction_id, amount, user_id, count(*) OVER (PARTITION BY transaction_id) "
            "FROM audit_decisions WHERE kafka_topic = :t"), {"t": topic}).all()
        dead = conn.execute(text("SELECT position, reason FROM dead_letters WHERE position LIKE :p"),
                            {"p": f"{topic}[%"}).all()
    ids = [r[0] for r in rows]
    assert len(ids) == len(set(ids)) == len(valid)
    assert set(ids) == {t["transaction_id"] for t in valid}
    by_id = {t["transaction_id"]: t for t in valid}
    assert all(r[1] == by_id[r[0]]["amount"] and r[2] == by_id[r[0]]["user_id"] for r in rows)
    assert len(dead) == poison_positions == len({d[0] for d in dead})


class Stream:
    """Topics, ingestion actors and a producer thread of one test; stops all it starts."""

    def __init__(self, servers, name: str, scorer=None, app_name: str = "fraud-scoring", actors: int = 2):
        self.name = name
        self.settings = _settings(name)
        self.bootstrap = servers["kafka_bootstrap_servers"]
        ensure_topics(self.bootstrap, [name, f"{name}-dlq", f"{name}-alerts"], partitions=4)
        self.ingestion = start_ingestion(self.settings, app_name, actors,
                                         scorer=scorer if scorer is not None else None)
        self.thread: threading.Thread | None = None
        self.error: BaseException | None = None

    def produce_in_background(self, messages: list) -> None:
        def run():
            try:
                produce(self.bootstrap, self.name, messages)
            except BaseException as exc:  # reported by join()
                self.error = exc

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()

    def join(self) -> None:
        if self.thread is not None:
            self.thread.join(60)
        if self.error is not None:
            raise self.error

    def stop(self) -> list[dict]:
        return stop_ingestion(self.ingestion, timeout_s=20)


@pytest.fixture
def stream_factory(servers, ray_local):
    started: list[Stream] = []

    def make(name: str, **kwargs) -> Stream:
        s = Stream(servers, name, **kwargs)
        started.append(s)
        return s

    yield make
    for s in started:
        s.stop()


def _poison(n: int) -> list[bytes | dict]:
    kinds = [
        b"{this is not json",
        b"[1, 2, 3]",
        {"user_id": "p", "amount": -1, "merchant": "m", "country": "FR", "timestamp": "2025-01-01T00:00:00Z"},
        {"user_id": "p", "amount": 3, "country": "FR", "timestamp": "2025-01-01T00:00:00Z"},
        {"user_id": "p", "amount": 3, "merchant": "m", "country": "France", "timestamp": "2025-01-01T00:00:00Z"},
        {"user_id": "p", "amount": 3, "merchant": "m" * 20_000, "country": "FR", "timestamp": "2025-01-01T00:00:00Z"},
    ]
    return [kinds[i % len(kinds)] for i in range(n)]


def _check_online_state(engine, topic: str, valid: list[dict], record_property,
                        shared_merchants: bool = True, measured: list[dict] | None = None) -> None:
    """Stored features against offline ones, and the state's final counts (`online_parity`).

    User features must equal offline exactly. With merchants shared across
    partitions the merchant feature must lie within its streaming bounds, and its
    skew over the rows of `measured` (default: all) is reported (`record_property`,
    and printed: see it with `pytest -rP`); with merchants private to one user
    (hence to one partition) it must be exact.
    """
    stored = stored_decisions(_current(engine), topic)
    offline = offline_features(valid)
    problem = user_feature_mismatches(stored, offline)
    assert problem is None, problem
    skew = merchant_skew(valid, stored, offline)
    if shared_merchants:
        problem = skew_outside_bounds(skew)
        assert problem is None, problem
        summary = skew_summary(skew if measured is None else skew.loc[[t["transaction_id"] for t in measured]])
        record_property("merchant_volume_24h_skew", summary)
        print(f"merchant_volume_24h offline - online, {topic}: {json.dumps(summary)}")
    else:
        differ = skew[skew.online != skew.offline]
        assert differ.empty, f"merchant_volume_24h differs from offline:\n{differ.head(10).to_string()}"
    state = live_state()
    problem = state_count_mismatches(state, valid)
    assert problem is None, problem


@pytest.mark.slow
def test_one_percent_poison_is_dead_lettered_and_the_rest_audited(live_app, stream_factory, engine, unique_name,
                                                                   record_property):
    from deployments.app import APP_NAME

    valid = _transactions(unique_name, N_VALID, seed=11)
    assert event_time_span_fits_merchant_state(valid)
    poison = _poison(N_VALID // 100)
    messages: list = list(valid)
    for i, p in enumerate(poison):  # spread through the stream
        messages.insert((i + 1) * 100, p)
    s = stream_factory(unique_name, app_name=APP_NAME)
    s.produce_in_background(messages)
    s.join()
    assert _wait_for(engine, unique_name, len(valid), len(poison)) == (len(valid), len(poison))
    s.stop()
    _check_exact(engine, unique_name, valid, len(poison))
    with _current(engine).connect() as conn:
        reasons = [r[0] for r in conn.execute(text(
            "SELECT reason FROM dead_letters WHERE position LIKE :p"), {"p": f"{unique_name}[%"})]
    for prefix in ("invalid JSON", "invalid transaction: amount", "invalid transaction: merchant",
                   "invalid transaction: country", "oversized"):
        assert any(r.startswith(prefix) for r in reasons), prefix
    _check_online_state(engine, unique_name, valid, record_property)


@pytest.mark.slow
def test_killed_ingestion_actor_restarts_and_nothing_is_lost_or_doubled(live_app, stream_factory, engine,
                                                                         unique_name, record_property):
    from deployments.app import APP_NAME

    valid = _transactions(unique_name, 6_000, seed=12)
    assert event_time_span_fits_merchant_state(valid)
    s = stream_factory(unique_name, app_name=APP_NAME)
    s.produce_in_background(valid)
    _wait_until_audited(engine, unique_name, 1_000, timeout_s=90)
    # Killed mid-batch: what it scored (and the state recorded) but did not audit is redelivered.
    ray.kill(s.ingestion.actors[0], no_restart=False)
    s.join()
    assert _wait_for(engine, unique_name, len(valid), 0) == (len(valid), 0)
    stats = s.stop()
    _check_exact(engine, unique_name, valid, 0)
    assert all("error" not in st for st in stats), stats
    _check_online_state(engine, unique_name, valid, record_property)


@pytest.mark.slow
def test_postgres_outage_is_waited_out_without_loss(live_app, stream_factory, engine, unique_name,
                                                    record_property):
    from deployments.app import APP_NAME

    valid = _transactions(unique_name, 6_000, seed=13)
    assert event_time_span_fits_merchant_state(valid)
    s = stream_factory(unique_name, app_name=APP_NAME)
    s.produce_in_background(valid)
    _wait_until_audited(engine, unique_name, 1_000, timeout_s=90)
    stop_servers(only="postgres")
    try:
        time.sleep(4)
    finally:
        ensure_servers()
    s.join()
    assert _wait_for(engine, unique_name, len(valid), 0) == (len(valid), 0)
    s.stop()
    _check_exact(engine, unique_name, valid, 0)
    _check_online_state(engine, unique_name, valid, record_property)


@pytest.mark.slow
def test_merchant_feature_skew_on_a_paced_live_stream(live_app, stream_factory, engine, unique_name,
                                                      record_property):
    """The tests above replay a backlog: partitions are read at their own pace, so their
    event times drift apart by hours. Here each event is stamped when it is sent, at a
    steady rate, as in a live stream: only the events still in flight on other
    partitions can be missing from the merchant feature."""
    from deployments.app import APP_NAME

    rate = 150.0
    valid = _transactions(unique_name, 3_200, seed=16)
    warmup, live = valid[:200], valid[200:]
    s = stream_factory(unique_name, app_name=APP_NAME)
    # Warm-up, at merchants of its own: the group is formed and every actor has had a
    # batch before the measured stream starts, so the figures are of a steady state.
    start = pd.Timestamp.now(tz="UTC") - pd.Timedelta(minutes=5)
    for i, r in enumerate(warmup):
        r["merchant"] = f"warmup-{r['user_id']}"
        r["timestamp"] = (start + pd.Timedelta(seconds=i)).isoformat(timespec="microseconds")
    produce(s.bootstrap, unique_name, warmup)
    assert _wait_for(engine, unique_name, len(warmup), 0) == (len(warmup), 0)
    deadline = time.monotonic() + 30  # (past it, the figures include the group's forming)
    while not all(st.get("batches", 0) > 0 for st in s.ingestion.stats()) and time.monotonic() < deadline:
        time.sleep(0.5)
    start = pd.Timestamp.now(tz="UTC")
    for i, r in enumerate(live):  # `produce` sends message i no earlier than i / rate after it starts
        r["timestamp"] = (start + pd.Timedelta(seconds=i / rate)).isoformat(timespec="microseconds")
    produce(s.bootstrap, unique_name, live, rate=rate)
    assert _wait_for(engine, unique_name, len(valid), 0) == (len(valid), 0)
    s.stop()
    _check_exact(engine, unique_name, valid, 0)
    _check_online_state(engine, unique_name, valid, record_property, measured=live)


@pytest.mark.slow
def test_killed_scoring_replica_loses_nothing_and_features_match_offline(live_app, stream_factory, engine,
                                                                          unique_name, record_property):
    from deployments.app import APP_NAME

    valid = _transactions(unique_name, N_VALID, seed=14)
    # Partitions are keyed by user, so only per-user order is kept across actors: merchants
    # private to one user make the arrival order of every merchant's events their time order,
    # and then the online merchant feature equals the offline one exactly (the tests above
    # keep merchants shared and check the bounds of the skew instead).
    for r in valid:
        r["merchant"] = f"{r['user_id']}-{r['merchant'][-6:]}"
    assert event_time_span_fits_merchant_state(valid)
    s = stream_factory(unique_name, app_name=APP_NAME)
    s.produce_in_background(valid)
    _wait_until_audited(engine, unique_name, 500, timeout_s=90)
    replicas = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                if "ScoringIngress" in a["name"]]
    ray.kill(ray.get_actor(replicas[0], namespace="serve"), no_restart=True)
    s.join()
    assert _wait_for(engine, unique_name, len(valid), 0) == (len(valid), 0)
    s.stop()
    _check_exact(engine, unique_name, valid, 0)
    _check_online_state(engine, unique_name, valid, record_property, shared_merchants=False)


@pytest.mark.slow
def test_alerts_replay_and_operational_summary(stream_factory, engine, unique_name):
    from cluster.deadletters import replay
    from cluster.metrics import operational_summary
    from kafka import KafkaConsumer

    valid = _transactions(unique_name, 200, seed=15)
    valid[0]["amount"] = 1_500.0  # the fake scorer flags it
    oversized = dict(valid[1], transaction_id=f"{unique_name}:big", merchant="m" * 300)
    s = stream_factory(unique_name, scorer=FakeScorer())
    produce(s.bootstrap, unique_name, [*valid, json.dumps(oversized).encode()[:50], oversized])
    assert _wait_for(engine, unique_name, len(valid), 2) == (len(valid), 2)

    summary = operational_summary(s.settings)
    assert summary["ingestion"]["lag"] == 0, summary
    assert summary["dead_letters"]["total"] >= 2 and summary["audit"]["from_kafka"] >= len(valid)

    consumer = KafkaConsumer(f"{unique_name}-alerts", bootstrap_servers=s.bootstrap,
                             auto_offset_reset="earliest", consumer_timeout_ms=5000)
    alerts = [json.loads(m.value) for m in consumer]
    consumer.close()
    assert any(a["transaction_id"] == valid[0]["transaction_id"] and a["model_version"] == "fake"
               and a["reasons"] for a in alerts)

    # Replay the truncated one: still poison, so a new dead letter at its new position.
    assert replay(s.settings, reason="invalid JSON", limit=10, topic=unique_name) >= 1
    _, dead = _wait_for(engine, unique_name, len(valid), 3)
    assert dead == 3
