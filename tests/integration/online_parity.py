"""Online features against an offline recomputation, for tests that stream
transactions through Kafka into the real scoring application.

What the online state promises (features/online.py, features/definitions.py):

- User features: a user's events travel through one partition (messages are
  keyed by user), so they are recorded in event-time order and every stored
  user feature equals the offline value exactly, whatever the faults.
- `merchant_volume_24h` counts the merchant's events in the 24 h window,
  earlier in (timestamp, transaction_id) order, *that were recorded before this
  one was scored*. A merchant's events come through several partitions, read
  by several actors at their own pace, so an earlier event may be recorded
  after a later one was scored. Hence, per transaction,

      known to be recorded first  <=  online  <=  offline

  The right side is every earlier event of the window. The left side counts
  the earlier events of the window that were certainly recorded before this
  one was scored:
  * those of the same partition at a lower offset: one actor handles a
    partition in offset order, and a batch is scored only once the batch
    before it is recorded;
  * those audited (`scored_at`, the database clock at the insert) before this
    one's event time: an event is recorded when first scored, before its audit
    insert, and a transaction is scored only after it is sent, which is after
    its event time when, as in these tests, events are stamped before they are
    sent. In a backlog replay this adds nothing; in a live stream it leaves
    undetermined only the events still in flight when this one was sent.
  The sandwich holds only while nothing in a window is expired, so callers
  keep the data's event-time span under the merchant state's keep window
  (24 h + a grace day).
- Each transaction is counted once: after the stream, every transaction scored
  again without recording, and a probe 1 s after each user's (each merchant's)
  last event, equal their offline features exactly (the state then holds every
  event, so arrival order no longer matters).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
from sqlalchemy import Engine, text

from features.definitions import (
    FEATURE_NAMES,
    MERCHANT_FEATURES,
    USER_FEATURES,
    WINDOW_24H_NS,
)
from features.online import GRACE_NS, EventColumns
from features.schema import parse_transaction
from features.transforms import compute_features, timestamps_to_ns

MERCHANT_KEEP_NS = WINDOW_24H_NS + GRACE_NS  # what a merchant shard keeps (`features.online.keep_ns`)
PROBE_GAP = pd.Timedelta(seconds=1)
# Slack between the test's clock (event times) and the database's (`scored_at`): one machine.
CLOCK_SLACK_NS = 50_000_000


def offline_features(rows: list[dict[str, Any]]) -> pd.DataFrame:
    """`features.transforms.compute_features` of the rows, indexed by transaction id."""
    df = pd.DataFrame(rows)
    df["timestamp"] = pd.to_datetime(df["timestamp"], utc=True, format="ISO8601")
    return compute_features(df).set_index("transaction_id")


def stored_decisions(engine: Engine, topic: str) -> pd.DataFrame:
    """The audit rows of one topic: Kafka position, event time and stored features,
    indexed by transaction id."""
    with engine.connect() as conn:
        rows = conn.execute(text(
            "SELECT id, transaction_id, user_id, merchant, event_time, scored_at, kafka_partition, "
            "kafka_offset, features FROM audit_decisions WHERE kafka_topic = :t"), {"t": topic}).mappings().all()
    df = pd.DataFrame([{k: v for k, v in r.items() if k != "features"} | dict(r["features"]) for r in rows])
    return df.set_index("transaction_id")


def user_feature_mismatches(stored: pd.DataFrame, offline: pd.DataFrame) -> str | None:
    """None when every stored user feature equals the offline one; else what differs."""
    names = list(USER_FEATURES)
    online = stored[names].to_numpy(dtype=np.float64)
    expected = offline.loc[stored.index, names].to_numpy(dtype=np.float64)
    bad = np.flatnonzero((online != expected).any(axis=1))
    if not len(bad):
        return None
    lines = [f"{len(bad)} of {len(stored)} stored user-feature vectors differ from the offline ones:"]
    for i in bad[:5]:
        tid = stored.index[i]
        row = stored.iloc[i]
        diff = {n: (online[i, j], expected[i, j]) for j, n in enumerate(names) if online[i, j] != expected[i, j]}
        same_user = stored[stored.user_id == row.user_id]
        earlier_later = same_user[(same_user.event_time < row.event_time) & (same_user["id"] > row["id"])]
        lines.append(f"  {tid} (partition {row.kafka_partition} offset {row.kafka_offset}): (online, offline) "
                     f"{diff}; {len(earlier_later)} earlier events of its user audited after it")
    return "\n".join(lines)


def merchant_skew(valid: list[dict[str, Any]], stored: pd.DataFrame, offline: pd.DataFrame) -> pd.DataFrame:
    """Per transaction: the stored (online) and offline `merchant_volume_24h`, and the
    count of the window's events known to be recorded before it was scored (`lower`,
    see the module docstring)."""
    name = MERCHANT_FEATURES[0]
    tid = np.array([t["transaction_id"] for t in valid], dtype=object)
    rows = stored.loc[tid]
    frame = pd.DataFrame({
        "merchant": [t["merchant"] for t in valid],
        "ts": timestamps_to_ns(pd.Series([t["timestamp"] for t in valid])),
        "audited": timestamps_to_ns(pd.to_datetime(rows["scored_at"], utc=True).reset_index(drop=True)),
        "partition": rows["kafka_partition"].to_numpy(),
        "offset": rows["kafka_offset"].to_numpy(),
    }, index=pd.Index(tid, name="transaction_id"))
    lower = np.zeros(len(frame), dtype=np.int64)
    cols = {c: frame[c].to_numpy() for c in ("ts", "audited", "partition", "offset")}
    for at in frame.groupby("merchant", sort=False).indices.values():
        ts, audited, part, off, ids = (cols["ts"][at], cols["audited"][at], cols["partition"][at],
                                       cols["offset"][at], tid[at])
        for i, row in enumerate(at):
            in_window = (ts > ts[i] - WINDOW_24H_NS) & ((ts < ts[i]) | ((ts == ts[i]) & (ids < ids[i])))
            known = ((part == part[i]) & (off < off[i])) | (audited < ts[i] - CLOCK_SLACK_NS)
            lower[row] = int((in_window & known).sum())
    return pd.DataFrame({
        "online": rows[name].to_numpy(dtype=np.float64),
        "offline": offline.loc[tid, name].to_numpy(dtype=np.float64),
        "lower": lower.astype(np.float64),
        "partition": frame["partition"], "offset": frame["offset"], "merchant": frame["merchant"],
    }, index=frame.index)


def skew_outside_bounds(skew: pd.DataFrame) -> str | None:
    """None when lower <= online <= offline for every row; else the rows that break it."""
    bad = skew[(skew.online < skew.lower) | (skew.online > skew.offline)]
    if bad.empty:
        return None
    return (f"{len(bad)} of {len(skew)} rows break known-recorded <= online <= offline "
            f"for merchant_volume_24h:\n{bad.head(10).to_string()}")


def skew_summary(skew: pd.DataFrame) -> dict[str, Any]:
    """The measured distribution of offline - online merchant_volume_24h."""
    diff = skew.offline - skew.online
    differ = diff[diff > 0]
    rel = differ / skew.offline[diff > 0]
    return {
        "rows": len(skew),
        "differ": int(len(differ)),
        "share_differ": round(len(differ) / len(skew), 4),
        "max_diff": float(diff.max()),
        "mean_diff": round(float(diff.mean()), 3),
        "p50_p90_p99_diff_where_differ": [round(float(differ.quantile(q)), 1) if len(differ) else 0.0
                                           for q in (0.5, 0.9, 0.99)],
        "max_relative_diff": round(float(rel.max()), 3) if len(rel) else 0.0,
        "mean_offline": round(float(skew.offline.mean()), 2),
        "merchants": int(skew.merchant.nunique()),
        # How much the bounds leave open: offline - lower.
        "rows_fully_determined": int((skew.lower == skew.offline).sum()),
        "max_undetermined": float((skew.offline - skew.lower).max()),
    }


def event_time_span_fits_merchant_state(valid: list[dict[str, Any]]) -> bool:
    """True when no merchant event of `valid` can be expired while the stream runs: a
    merchant shard drops events `MERCHANT_KEEP_NS` before the earliest event of a call."""
    ts = timestamps_to_ns(pd.Series([t["timestamp"] for t in valid]))
    return int(ts.max() - ts.min()) < MERCHANT_KEEP_NS


def probes(valid: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One probe transaction 1 s after each user's last event (at a merchant of its own)
    and one 1 s after each merchant's last event (by a user of its own)."""
    df = pd.DataFrame(valid)
    df["timestamp"] = pd.to_datetime(df["timestamp"], utc=True, format="ISO8601")
    out = []
    for kind, key in (("u", "user_id"), ("m", "merchant")):
        last = df.groupby(key)["timestamp"].max()
        for value, ts in last.items():
            user = value if kind == "u" else f"probe-user-{value}"
            merchant = value if kind == "m" else f"probe-merchant-{value}"
            out.append({"transaction_id": f"probe-{kind}-{value}", "user_id": user, "amount": 12.34,
                        "merchant": merchant, "country": "FR",
                        "timestamp": (ts + PROBE_GAP).isoformat(timespec="microseconds")})
    return out


class ServedState:
    """The running scoring application's online state, read through its FeatureStep
    deployment, wherever the state lives (in the replica, or in the state actors)."""

    def __init__(self, app_name: str) -> None:
        from ray import serve

        self.handle = serve.get_deployment_handle("FeatureStep", app_name)

    def compute(self, rows: list[dict[str, Any]], record: bool) -> np.ndarray:
        cols = EventColumns.of([parse_transaction(r) for r in rows])
        return self.handle.compute.remote(cols, [record] * len(cols)).result(timeout_s=120)["X"]


def live_state() -> ServedState:
    """A client of the online state the running application uses (it creates none)."""
    from deployments.app import APP_NAME

    return ServedState(APP_NAME)


def state_count_mismatches(store: Any, valid: list[dict[str, Any]]) -> str | None:
    """None when the online state holds each valid transaction exactly once; else what
    differs. Every valid transaction scored again without recording, and a probe
    after each user's and each merchant's last event, must equal their offline
    features (nothing of `valid` may have been expired: see
    `event_time_span_fits_merchant_state`)."""
    rows = [*valid, *probes(valid)]
    online = store.compute(rows, record=False)
    offline = offline_features(rows).loc[[r["transaction_id"] for r in rows],
                                         list(FEATURE_NAMES)].to_numpy(dtype=np.float64)
    bad = np.flatnonzero((online != offline).any(axis=1))
    if not len(bad):
        return None
    lines = [f"{len(bad)} of {len(rows)} transactions and probes scored again differ from offline "
             "(the state lost or doubled events):"]
    for i in bad[:5]:
        diff = {n: (online[i, j], offline[i, j]) for j, n in enumerate(FEATURE_NAMES) if online[i, j] != offline[i, j]}
        lines.append(f"  {rows[i]['transaction_id']}: (online, offline) {diff}")
    return "\n".join(lines)
