"""The online state held in one process (`InProcessFeatureStore`): the same numbers as
the offline transform, each id counted once, and a replacement owner that rebuilt from
the audit while the previous owner still recorded catches up with what it missed.

No Ray: the shard classes are plain Python, the history a Parquet file."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from configs.settings import load_settings
from features.definitions import FEATURE_NAMES
from features.online import FileHistoryLoader, InProcessFeatureStore
from features.transforms import compute_features

T0 = pd.Timestamp("2024-06-01T00:00:00", tz="UTC")


def _transactions(n: int, seed: int) -> pd.DataFrame:
    """Bursty users, skewed merchants, some ties, in (timestamp, id) order."""
    rng = np.random.default_rng(seed)
    sec = np.sort(rng.integers(0, 10 * 86400, n))
    tie = rng.random(n) < 0.03  # the same second as the row before
    sec[1:][tie[1:]] = sec[:-1][tie[1:]]
    df = pd.DataFrame({
        "transaction_id": [f"tx-{seed}-{i:05d}" for i in rng.permutation(n)],
        "user_id": [f"user-{u}" for u in rng.integers(0, 60, n)],
        "amount": np.round(rng.lognormal(3.5, 1.2, n), 2) + 0.01,
        "merchant": [f"merchant-{m}" for m in np.minimum(rng.zipf(1.6, n), 20) - 1],
        "country": np.array(["FR", "DE", "US"])[rng.integers(0, 3, n)],
        "timestamp": T0 + pd.to_timedelta(sec, unit="s"),
    })
    return df.sort_values(["timestamp", "transaction_id"], kind="stable").reset_index(drop=True)


def _store(history) -> InProcessFeatureStore:
    store = InProcessFeatureStore(load_settings(), loader=FileHistoryLoader(str(history)))
    store.wait_ready(30)
    return store


def _user_events(store: InProcessFeatureStore) -> int:
    """Events the user state holds: all of them (ten days, within its retention;
    the merchant state keeps only 24 h and a grace day)."""
    return next(s["events"] for s in store.status() if s["kind"] == "user-state")


def test_equals_offline_counts_each_id_once_and_a_replacement_catches_up(tmp_path):
    df = _transactions(3000, seed=5)
    expected = compute_features(df)[list(FEATURE_NAMES)].to_numpy()
    audit = tmp_path / "audit.parquet"  # what the audit table holds: every recorded row
    got = np.full_like(expected, np.nan)

    first = _store(audit)  # no file yet: an empty history
    for start in range(0, 1500, 100):
        got[start:start + 100] = first.compute(df.iloc[start:start + 100], record=True)
    # A batch sent again, shuffled, some rows twice: same features, nothing counted twice.
    again = pd.concat([df.iloc[1400:1500], df.iloc[1400:1405]]).sample(frac=1, random_state=1)
    assert np.array_equal(first.compute(again, record=True), expected[again.index])
    assert _user_events(first) == 1500
    # A dry run records nothing.
    first.compute(df.iloc[1500:1600], record=False)
    assert _user_events(first) == 1500

    # A replacement owner rebuilds from the audit; the old one records 300 more
    # (audited after the rebuild read it) before it goes away.
    df.iloc[:1500].to_parquet(audit)
    second = _store(audit)
    for start in range(1500, 1800, 100):
        got[start:start + 100] = first.compute(df.iloc[start:start + 100], record=True)
    df.iloc[:1800].to_parquet(audit)
    assert second.catch_up() == 2 * 300  # both shards, only what the old owner added
    assert second.catch_up() == 0  # nothing twice
    for start in range(1800, len(df), 100):
        got[start:start + 100] = second.compute(df.iloc[start:start + 100], record=True)

    mismatch = np.flatnonzero(~(got == expected).all(axis=1))
    assert mismatch.size == 0, f"{mismatch.size} rows differ from offline, first {df.iloc[mismatch[0]].to_dict()}"
    assert _user_events(second) == len(df)
    # The last batch scored again without recording equals offline too (older ones are
    # past what the merchant state keeps).
    assert np.array_equal(second.compute(df.iloc[-100:], record=False), expected[-100:])


def test_async_calls_inline_and_in_a_thread_agree(tmp_path):
    import asyncio

    df = _transactions(400, seed=6)
    expected = compute_features(df)[list(FEATURE_NAMES)].to_numpy()
    store = _store(tmp_path / "none.parquet")

    async def run() -> np.ndarray:
        small = await store.compute_async(df.iloc[:10], record=True)  # inline
        large = await store.compute_async(df.iloc[10:], record=True)  # a thread
        return np.vstack([small, large])

    assert np.array_equal(asyncio.run(run()), expected)


@pytest.mark.parametrize(("world_size", "autoscaling", "refused"), [
    (1, None, False), (2, None, True), (1, SimpleNamespace(max_replicas=4), True),
    (None, SimpleNamespace(max_replicas=1), False),
])
def test_the_feature_step_refuses_an_in_process_state_over_several_replicas(monkeypatch, world_size,
                                                                             autoscaling, refused):
    from deployments import feature_step

    context = SimpleNamespace(world_size=world_size,
                              _deployment_config=SimpleNamespace(autoscaling_config=autoscaling))
    monkeypatch.setattr(feature_step.serve, "get_replica_context", lambda: context)
    if refused:
        with pytest.raises(RuntimeError, match="online_state: actors"):
            feature_step._refuse_several_replicas()
    else:
        feature_step._refuse_several_replicas()
