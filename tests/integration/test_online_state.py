"""Online state through real Ray actors: parity with the offline transform across
actor restarts and redeliveries, idempotence, dry runs, and loud failures."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Iterator

import numpy as np
import pandas as pd
import pytest
import ray

from configs.settings import load_settings
from features.definitions import DAY_NS, FEATURE_NAMES, RETENTION_DAYS, WINDOW_24H_NS
from features.online import (
    GRACE_NS,
    IDLE_MARGIN_NS,
    AuditHistoryLoader,
    EmptyHistoryLoader,
    FileHistoryLoader,
    OnlineFeatureStore,
    StateNotReadyError,
    shard_of,
)
from features.transforms import compute_features

T0 = pd.Timestamp("2024-06-01T00:00:00", tz="UTC")


def simulate(n: int, users: int, merchants: int, days: float, seed: int) -> pd.DataFrame:
    """Small local generator: bursty users, skewed merchants, some timestamp ties."""
    rng = np.random.default_rng(seed)
    user = rng.integers(0, users, n)
    sec = np.sort(rng.integers(0, int(days * 86400), n))
    tie = rng.random(n) < 0.03  # same second as the previous row, often another user
    sec[1:][tie[1:]] = sec[:-1][tie[1:]]
    burst = rng.random(n) < 0.05  # a second event of the same user a few minutes later
    sec = np.where(burst, sec + rng.integers(1, 600, n), sec)
    merchant = np.minimum(rng.zipf(1.6, n), merchants) - 1
    return pd.DataFrame({
        "transaction_id": [f"tx-{seed}-{i:06d}" for i in rng.permutation(n)],
        "user_id": [f"user-{u}" for u in user],
        "amount": np.round(rng.lognormal(3.5, 1.2, n), 2) + 0.01,
        "merchant": [f"merchant-{m}" for m in merchant],
        "country": np.array(["FR", "DE", "US", "GB", "ES"])[
            np.where(rng.random(n) < 0.9, user % 5, rng.integers(0, 5, n))],
        "timestamp": T0 + pd.to_timedelta(sec, unit="s"),
    })


@pytest.fixture
def settings():
    return load_settings(user_state_shards=3, merchant_state_shards=2)


@pytest.fixture
def namespace():
    return f"test-features-{uuid.uuid4().hex[:8]}"


def _replay_order(df: pd.DataFrame) -> pd.DataFrame:
    return df.sort_values(["timestamp", "transaction_id"], kind="stable").reset_index(drop=True)


def _wait_for_restart(store: OnlineFeatureStore, before: set[str], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if not {s["incarnation"] for s in store.status()} & before:
                return
        except ray.exceptions.RayActorError:
            pass  # between death and restart
        assert time.monotonic() < deadline, "shards did not restart"
        time.sleep(0.05)


@contextlib.contextmanager
def _empty_store(settings, namespace: str, prefix: str) -> Iterator[OnlineFeatureStore]:
    """Shards with no history, ready; destroyed afterwards."""
    store = OnlineFeatureStore.connect(settings, namespace=namespace, prefix=prefix,
                                       loader=EmptyHistoryLoader())
    try:
        store.wait_ready(60)
        yield store
    finally:
        store.kill()


def _events(store: OnlineFeatureStore, kind: str) -> int:
    """Events held by the shards of one kind ("user-state" or "merchant-state")."""
    return sum(s["events"] for s in store.status() if s["kind"] == kind)


def test_online_equals_offline_across_restarts_and_redeliveries(ray_local, settings, namespace, tmp_path):
    df = _replay_order(simulate(12_000, users=400, merchants=60, days=20, seed=7))
    expected = compute_features(df)[list(FEATURE_NAMES)].to_numpy()
    history = tmp_path / "recorded.parquet"
    store = OnlineFeatureStore.connect(settings, namespace=namespace, prefix="parity",
                                       loader=FileHistoryLoader(str(history)))
    try:
        store.wait_ready(60)
        got = np.full_like(expected, np.nan)
        batch, recorded, restarts = 250, 0, 0
        for start in range(0, len(df), batch):
            part = df.iloc[start:start + batch]
            if start and start % 4000 == 0:
                # Kill every shard; it restarts and rebuilds from what was recorded so far.
                df.iloc[:recorded].to_parquet(history)
                before = {s["incarnation"] for s in store.status()}
                for shard in store.shards:
                    ray_local.kill(shard, no_restart=False)
                # ray.kill returns before the actor dies; a call sent now could still reach
                # the old incarnation and be lost with it. Wait for every shard's restart.
                _wait_for_restart(store, before)
                restarts += 1
            if start == 6000:
                X = asyncio.run(store.compute_async(part, record=True))
            else:
                X = store.compute(part, record=True)
            got[start:start + len(part)] = X
            recorded = start + len(part)
            if start % 3000 == 0 and start:
                # Redeliver this batch before any later one (as an ingestion actor does),
                # shuffled, some rows twice in the call.
                prev = pd.concat([part, part.iloc[:5]]).sample(frac=1, random_state=start)
                again = store.compute(prev, record=True)
                assert np.array_equal(again, expected[prev.index]), "redelivery changed features"
        assert restarts == 2
        assert not np.isnan(got).any()
        mismatch = np.flatnonzero(~(got == expected).all(axis=1))
        assert mismatch.size == 0, (
            f"{mismatch.size} rows differ, first {df.iloc[mismatch[0]].to_dict()}: "
            f"online {got[mismatch[0]]} offline {expected[mismatch[0]]}")
        # Every event counted once despite redeliveries: state sizes equal the row count.
        assert _events(store, "user-state") == len(df)
        assert store.ready()
    finally:
        store.kill()


def test_a_batch_spanning_days_sent_again_gets_the_same_features(ray_local, settings, namespace):
    """A batch already recorded, sent again (a replica died before answering): the
    same features, however many days it spans. Expiring relative to the newest
    event dropped what its first events need once it spanned more than the grace
    day (seen after a replica kill in a fast replay)."""
    df = _replay_order(simulate(900, users=4, merchants=3, days=4, seed=5))
    expected = compute_features(df)[list(FEATURE_NAMES)].to_numpy()
    with _empty_store(settings, namespace, "span") as store:
        first = store.compute(df, record=True)
        again = store.compute(df, record=True)
        assert np.array_equal(first, expected)
        differ = np.flatnonzero(~(again == expected).all(axis=1))
        assert differ.size == 0, f"{differ.size} of {len(df)} rows differ when sent again"
        assert _events(store, "user-state") == len(df)  # each event counted once
        # and memory stays bounded: ten days on, the merchants keep only the new events
        later = df.assign(transaction_id=df.transaction_id + "-later",
                          timestamp=df.timestamp + pd.Timedelta(days=10))
        store.compute(later, record=True)
        assert _events(store, "merchant-state") == len(later)


def _keys(store: OnlineFeatureStore, kind: str) -> int:
    """Keys held by the shards of one kind."""
    return sum(s["keys"] for s in store.status() if s["kind"] == kind)


def _held_bounds(df: pd.DataFrame, key: str, shards: int, keep_ns: int) -> tuple[int, int]:
    """How many keys of ``df`` shards may hold once they have recorded it all: every key whose
    newest event is within keep_ns + IDLE_MARGIN_NS of its shard's newest event, and at
    most those within a day more (idle keys are dropped a whole day at a time)."""
    newest = df.groupby(key)["timestamp"].max()
    shard = newest.index.map(lambda k: shard_of(k, shards))
    lag = (newest.groupby(shard).transform("max") - newest).dt.total_seconds() * 1e9
    limit = keep_ns + IDLE_MARGIN_NS
    return int((lag <= limit).sum()), int((lag < limit + DAY_NS).sum())


def test_idle_keys_leave_the_state_and_features_still_equal_offline(ray_local, settings, namespace):
    """100,000 users and 5,000 merchants seen once a year earlier, then a sparse stream of
    400 days in which users come back after more than the retention: the shards end up
    holding only the keys active in their window, the grace day and the idle margin,
    and every feature equals offline, batches sent again included."""
    n_old = 100_000
    old = pd.DataFrame({"transaction_id": [f"old-{i}" for i in range(n_old)],
                        "user_id": [f"gone-{i}" for i in range(n_old)], "amount": 12.5,
                        "merchant": [f"gone-shop-{i % 5000}" for i in range(n_old)], "country": "FR",
                        "timestamp": T0 - pd.Timedelta(days=365) + pd.to_timedelta(np.arange(n_old), unit="s")})
    df = _replay_order(simulate(4_000, users=1_500, merchants=200, days=400, seed=9))
    expected = compute_features(pd.concat([old, df], ignore_index=True))[list(FEATURE_NAMES)].to_numpy()[n_old:]
    with _empty_store(settings, namespace, "idle") as store:
        for start in range(0, n_old, 25_000):
            store.compute(old.iloc[start:start + 25_000], record=True)
        assert _keys(store, "user-state") == n_old and _keys(store, "merchant-state") == 5_000
        got = np.full_like(expected, np.nan)
        for number, start in enumerate(range(0, len(df), 100)):
            part = df.iloc[start:start + 100]
            got[start:start + len(part)] = store.compute(part, record=True)
            if number % 7 == 3:  # sent again (a replica died before answering): the same features
                assert np.array_equal(store.compute(part, record=True), got[start:start + len(part)])
        differ = np.flatnonzero(~(got == expected).all(axis=1))
        assert differ.size == 0, f"{differ.size} rows differ, first {df.iloc[differ[0]].to_dict()}"
        user_keep = max(settings.history_retention_days, RETENTION_DAYS) * DAY_NS + GRACE_NS
        low, high = _held_bounds(df, "user_id", settings.user_state_shards, user_keep)
        assert low <= _keys(store, "user-state") <= high < df["user_id"].nunique()
        low, high = _held_bounds(df, "merchant", settings.merchant_state_shards, WINDOW_24H_NS + GRACE_NS)
        assert low <= _keys(store, "merchant-state") <= high < df["merchant"].nunique()


def test_dry_run_reads_only_and_batches_are_ordered(ray_local, settings, namespace):
    df = _replay_order(simulate(300, users=5, merchants=3, days=2, seed=3))
    expected = compute_features(df)[list(FEATURE_NAMES)].to_numpy()
    with _empty_store(settings, namespace, "dry") as store:
        first = store.compute(df.iloc[:100], record=False)  # nothing recorded: all cold starts
        assert (first[:, FEATURE_NAMES.index("velocity_24h")] == 0).all()
        assert sum(s["events"] for s in store.status()) == 0
        # One call, shuffled input: processed in (timestamp, id) order, answered in input order.
        shuffled = df.iloc[:200].sample(frac=1, random_state=0)
        X = store.compute(shuffled.to_dict("records"), record=True)
        assert np.array_equal(X, expected[shuffled.index])
        # A dry run of later events sees the recorded ones and changes nothing.
        rest = df.iloc[200:]
        dry = store.compute(rest.iloc[:1], record=False)
        assert np.array_equal(dry, expected[200:201])
        assert np.array_equal(store.compute(rest, record=True), expected[200:])


def test_unreachable_history_is_loud_not_empty(ray_local, settings, namespace):
    loader = AuditHistoryLoader("postgresql+psycopg2://nobody:x@127.0.0.1:1/none")
    store = OnlineFeatureStore.connect(settings, namespace=namespace, prefix="down", loader=loader)
    try:
        deadline = time.monotonic() + 90
        while not all(s["error"] for s in store.status()) and time.monotonic() < deadline:
            time.sleep(0.2)
        with pytest.raises(StateNotReadyError, match="OperationalError"):
            store.wait_ready(1)
        assert not store.ready()
    finally:
        store.kill()
