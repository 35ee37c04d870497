"""Idle keys leave the online state: a shard holds the keys active within its window,
the grace day and the idle margin behind its frontier, and dropping the others
changes no aggregate for events that arrive no later than the margin.

The shard classes are plain Python (Ray wraps them in `OnlineFeatureStore.connect`),
so these tests drive them directly, without Ray."""

from __future__ import annotations

import time

import numpy as np
import pandas as pd
import pytest

from features.definitions import DAY_NS, HOUR_NS, RETENTION_DAYS, WINDOW_24H_NS
from features.online import (
    GRACE_NS,
    IDLE_MARGIN_NS,
    EmptyHistoryLoader,
    MerchantStateShard,
    UserStateShard,
)

USER_KEEP_NS = RETENTION_DAYS * DAY_NS + GRACE_NS
MERCHANT_KEEP_NS = WINDOW_24H_NS + GRACE_NS
T0 = 1_717_200_000 * 10**9  # 2024-06-01T00:00:00Z


def _users(keep_ns: int = USER_KEEP_NS, **kw) -> UserStateShard:
    return UserStateShard(0, 1, keep_ns, EmptyHistoryLoader(), **kw)


def _merchants(**kw) -> MerchantStateShard:
    return MerchantStateShard(0, 1, MERCHANT_KEEP_NS, EmptyHistoryLoader(), **kw)


def _batch(ts, users, merchants=None, tag="e") -> dict[str, list]:
    n = len(ts)
    merchants = merchants if merchants is not None else [f"m{i % 7}" for i in range(n)]
    return {"ts": [int(t) for t in ts], "tid": [f"{tag}-{i}" for i in range(n)], "user": list(users),
            "cents": [1000 + i % 500 for i in range(n)], "merchant": list(merchants),
            "country": ["FR"] * n}


def test_100k_idle_users_and_merchants_leave_once_recent_events_arrive():
    users, merchants = _users(), _merchants()
    n = 100_000
    rng = np.random.default_rng(0)
    old = T0 + rng.integers(0, DAY_NS, n)  # one day of old traffic, every key new
    for start in range(0, n, 20_000):
        part = slice(start, start + 20_000)
        batch = _batch(old[part], [f"u{i}" for i in range(start, start + 20_000)],
                       [f"m{i}" for i in range(start, start + 20_000)], tag=f"old{start}")
        users.compute(batch, record=True)
        merchants.compute(batch, record=True)
    assert users.status()["keys"] == n and merchants.status()["keys"] == n

    # 200 days on: a few events, two of them by users last seen in the old day.
    now = T0 + 200 * DAY_NS
    recent = _batch([now, now + 1, now + 2], ["u5", "u77", "fresh"], ["m5", "new-shop", "new-shop"],
                    tag="recent")
    agg = users.compute(recent, record=True)
    merchants.compute(recent, record=True)
    assert users.status()["keys"] == 3
    assert users.status()["events"] == 3
    assert merchants.status()["keys"] == 2
    # u5's old event is beyond every window: it reads as a new user, as offline.
    assert agg[0].tolist() == [0, 0, 0, 0, 0, 0, -1, 1, 1]


@pytest.mark.parametrize("make, keep_ns", [(_users, USER_KEEP_NS), (_merchants, MERCHANT_KEEP_NS)])
def test_a_key_is_dropped_only_beyond_its_window_grace_and_margin(make, keep_ns):
    shard = make()
    frontier = T0 + 400 * DAY_NS + 12 * HOUR_NS  # so the limit falls at noon
    limit = keep_ns + IDLE_MARGIN_NS
    behind = {"kept": limit - 12 * HOUR_NS, "kept-rounding": limit + HOUR_NS, "dropped": limit + DAY_NS,
              "long-gone": 350 * DAY_NS}
    for key, lag in behind.items():
        shard.compute(_batch([frontier - lag], [key], [key], tag=key), record=True)
    shard.compute(_batch([frontier], ["now"], ["now"], tag="now"), record=True)
    # Kept up to one day longer than the limit (keys are dropped a whole day at a time),
    # never dropped sooner.
    assert set(shard._timelines) == {"kept", "kept-rounding", "now"}
    assert shard.status()["frontier"] == pd.Timestamp(frontier, tz="UTC").isoformat()


def test_an_event_stamped_in_the_far_future_does_not_make_everyone_idle():
    shard = _users()
    now = time.time_ns()
    shard.compute(_batch([now - HOUR_NS], ["regular"], tag="a"), record=True)
    shard.compute(_batch([now + 200 * 365 * DAY_NS], ["time-traveller"], tag="b"), record=True)
    assert set(shard._timelines) == {"regular", "time-traveller"}


def _late_stream(seed: int, days: int, users: int, n: int, max_late_ns: int):
    """Sparse users over many days (gaps longer than the retention are common),
    sent in batches whose order is shuffled by up to ``max_late_ns`` of event time,
    some batches sent again later (a redelivery)."""
    rng = np.random.default_rng(seed)
    ts = np.sort(rng.integers(0, days * DAY_NS, n)) + T0
    user = [f"u{u}" for u in rng.integers(0, users, n)]
    merchant = [f"m{m}" for m in np.minimum(rng.zipf(1.5, n), 200)]
    batches = []
    for start in range(0, n, 10):
        part = slice(start, start + 10)
        b = _batch(ts[part], user[part], merchant[part], tag=f"b{start}")
        b["tid"] = [f"t{i}" for i in range(start, min(start + 10, n))]
        b["due"] = int(ts[part][0]) + int(rng.integers(0, max_late_ns))  # when it arrives
        batches.append(b)
    sent = sorted(batches, key=lambda b: b["due"])
    again = [sent[i] for i in rng.choice(len(sent), 30, replace=False)]
    order = []
    for b in sent:
        order.append(b)
        if any(b is a for a in again):
            order.append(b)  # sent again at once: a replica died before answering
    return [{k: v for k, v in b.items() if k != "due"} for b in order]


def test_dropping_idle_keys_changes_no_aggregate_of_events_within_the_margin():
    """The same stream through a shard that forgets idle keys and one that never does:
    every aggregate is equal, replays included, and the forgetting shard holds fewer keys."""
    # Batches span under a day, arrive up to 28 days late: within the grace day + margin.
    stream = _late_stream(seed=4, days=420, users=2_000, n=6_000, max_late_ns=IDLE_MARGIN_NS - 2 * DAY_NS)
    forgetting = (_users(), _merchants())
    remembering = (_users(idle_margin_ns=10**30), _merchants(idle_margin_ns=10**30))
    for batch in stream:
        for a, b in zip(forgetting, remembering):
            got, want = a.compute(batch, record=True), b.compute(batch, record=True)
            assert np.array_equal(got, want), f"{a.kind} differs in batch starting {batch['tid'][0]}"
    for a, b in zip(forgetting, remembering):
        assert a.status()["keys"] < b.status()["keys"], a.kind
    # and the kept events are the very same for every key still held
    for a, b in zip(forgetting, remembering):
        for key, tl in a._timelines.items():
            assert tl.keys == b._timelines[key].keys
