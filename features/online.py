"""Online state of trailing aggregates, shared by every Serve replica and every
Kafka ingestion actor.

The state lives in named, detached Ray actors: `UserStateShard` (one per
``crc32(user_id) % settings.user_state_shards``) keeps, per user, the events of
the retention window plus one grace day and the ids already recorded;
`MerchantStateShard` (``crc32(merchant) % settings.merchant_state_shards``)
keeps, per merchant, the events of the last 24 h plus the grace day.

Memory is bounded twice over:

- per key, each recording call drops a key's events older than that before the
  key's *earliest* event in the call: dropping them relative to the latest event
  made a repeated batch (redelivered after a replica died mid-call, the first
  call having recorded it) lose what its earlier events need when the batch
  spans more than the grace day, as a fast replay of history does;
- per shard, a key whose newest event is more than its window, the grace day and
  `IDLE_MARGIN_NS` behind the shard's *frontier* (the newest event time it has
  recorded, never more than `FRONTIER_AHEAD_NS` past the wall clock) is dropped,
  ids and all. So a shard holds the keys active in the last 121 days (users,
  with the default retention) or 32 days (merchants) of event time, not every
  key ever seen. Keys are filed by the day of their newest event, so a call drops
  whole days of idle keys without scanning the others.

What dropping an idle key cannot change: an event at most the grace day plus
the margin (31 days) behind the frontier reads nothing older than its window,
and every event of a dropped key is older than that, so its features and its
duplicate check are the same as if the key had been kept (online still equals
offline); a batch sent again finds its keys as long as its events are at most
the window, the grace day and the margin behind the frontier. An event later
than that is scored against what is left: the history of a key idle that long
is gone.

Feature values of an event depend only on the recorded events strictly before
it in (timestamp, transaction_id) order, so scoring an already-recorded event
again gives the same vector. ``record=True`` adds an event only if its id is new
(a redelivered transaction never counts twice); ``record=False`` only reads.
The final float arithmetic is shared with the offline transforms
(`features.transforms.assemble_user_features`), so online and offline features
are bit-for-bit equal.

Event times are int64 nanoseconds since the epoch (1677-09-21 to 2262-04-11);
a time outside that range, or missing, raises `InvalidInputError` naming
``timestamp`` before it reaches a shard.

After a restart a shard rebuilds from the history loader it was given (in
production `AuditHistoryLoader`, the ``audit_decisions`` table) in a background
thread; `ready()` is false until the rebuild is done, and calls wait for it. A
loader that fails is logged and retried with backoff: the shard never serves
from a silently empty state.

Client: ``store = OnlineFeatureStore.connect(settings, loader=...)``, then
``store.compute(events, record=True)`` (or ``await store.compute_async(...)``
inside a Serve replica). The caller chooses the loader: this library does not
know where the audit database lives.

`InProcessFeatureStore` has the same client methods and holds the same shard
objects in the calling process, called without a Ray round trip: for the one
process that owns every key (the Serve feature step with a single replica).
"""

from __future__ import annotations

import asyncio
import bisect
import heapq
import logging
import threading
import time
import uuid
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import ray

from configs.errors import FraudScoringError, InvalidInputError
from configs.settings import Settings, get_settings
from features.definitions import (
    DAY_NS,
    FEATURE_NAMES,
    RETENTION_DAYS,
    RETENTION_NS,
    WINDOW_1H_NS,
    WINDOW_7D_NS,
    WINDOW_24H_NS,
    WINDOW_30D_NS,
)
from features.schema import Transaction, datetime_to_ns, parse_transaction, to_cents
from features.transforms import (
    assemble_merchant_features,
    assemble_user_features,
    cents_of,
    timestamps_to_ns,
)

log = logging.getLogger(__name__)

NAMESPACE = "fraud-scoring"
DEFAULT_PREFIX = "fraud"
GRACE_NS = DAY_NS
# How far behind the frontier a key's newest event may fall, beyond its window and
# the grace day, before the key is dropped. Events up to this much (plus the grace
# day) later than the newest one seen still find what they need: a lagging
# partition, a replay, late clearing, a backfill of the last weeks through the API.
IDLE_MARGIN_NS = 30 * DAY_NS
# The frontier never runs further ahead of the wall clock than this, so that one
# event stamped in the far future cannot make every key look idle.
FRONTIER_AHEAD_NS = DAY_NS
# What int64 nanoseconds since the epoch hold (the lowest value is pandas' NaT).
MIN_NS, MAX_NS = pd.Timestamp.min.value, pd.Timestamp.max.value
_NS_RANGE = f"{pd.Timestamp.min:%Y-%m-%d} to {pd.Timestamp.max:%Y-%m-%d}"
READY_WAIT_SECONDS = 60.0
# A history row: (transaction_id, user_id, amount, merchant, country, event_time)
# with event_time a datetime (naive = UTC) or integer nanoseconds since the epoch.
HistoryRow = tuple[str, str, float, str, str, "datetime | int"]
HistoryLoader = Callable[[datetime], Iterable[HistoryRow]]


class StateNotReadyError(FraudScoringError):
    """A state shard is still rebuilding, or cannot load its history."""

    status_code = 503
    public = "the online feature state is not ready (rebuilding, or its database is unreachable): retry shortly"


def shard_of(key: str, shards: int) -> int:
    """Stable shard of a key: ``crc32(utf-8) % shards`` (never Python's salted `hash`)."""
    return zlib.crc32(key.encode()) % shards


def _event_time_ns(value: datetime | int | pd.Timestamp) -> int:
    """Nanoseconds since the epoch of a history row's event time (naive = UTC); a
    missing time or one int64 nanoseconds cannot hold raises naming ``timestamp``."""
    if value is None or value is pd.NaT:
        raise InvalidInputError("timestamp: required by the online state")
    if isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_)):
        ns = int(value)
    elif isinstance(value, datetime):
        if isinstance(value, pd.Timestamp):
            value = value.to_pydatetime()
        if value.tzinfo is None:
            value = value.replace(tzinfo=timezone.utc)
        try:
            ns = datetime_to_ns(value)
        except OverflowError:
            raise _out_of_range(value) from None
    else:
        raise InvalidInputError(f"timestamp: must be a date-time or integer nanoseconds, "
                                f"got {type(value).__name__}")
    if not MIN_NS <= ns <= MAX_NS:
        raise _out_of_range(value)
    return ns


def _out_of_range(value: object) -> InvalidInputError:
    return InvalidInputError(f"timestamp: {value} is outside what the online state holds "
                             f"(int64 nanoseconds since the epoch, {_NS_RANGE})")


def _checked_ns(ns: list[int], tids: list[str]) -> np.ndarray:
    """``ns`` as int64, or `InvalidInputError` naming the first time out of range."""
    try:
        out = np.array(ns, dtype=np.int64)
        if not len(out) or out.min() >= MIN_NS:
            return out
    except OverflowError:
        pass
    j = next(j for j, v in enumerate(ns) if not MIN_NS <= v <= MAX_NS)
    raise InvalidInputError(f"timestamp: transaction {tids[j]} is outside what the online state "
                            f"holds (int64 nanoseconds since the epoch, {_NS_RANGE})")


# --------------------------------------------------------------------------- loaders


@dataclass(frozen=True)
class AuditHistoryLoader:
    """Recorded events since a time, from ``audit_decisions``, in (event_time, id) order.

    ``database_url`` is the URL, or a callable returning it (the caller passes
    `cluster.dev.database_url`, which also finds the embedded server), called
    inside the shard each time a rebuild runs; an unreachable database raises
    (the shard logs it, stays not ready and retries).
    """

    database_url: str | Callable[[], str]

    def __call__(self, since: datetime) -> Iterable[HistoryRow]:
        from sqlalchemy import create_engine, text

        url = self.database_url if isinstance(self.database_url, str) else self.database_url()
        engine = create_engine(url, pool_pre_ping=True)
        query = text(
            "SELECT transaction_id, user_id, amount, merchant, country, event_time "
            "FROM audit_decisions WHERE event_time >= :since "
            "ORDER BY event_time, transaction_id")
        try:
            with engine.connect() as conn:
                result = conn.execution_options(stream_results=True, yield_per=10_000).execute(
                    query, {"since": since})
                yield from (tuple(row) for row in result)
        finally:
            engine.dispose()


@dataclass(frozen=True)
class FileHistoryLoader:
    """Every event of a Parquet file (columns transaction_id, user_id, amount,
    merchant, country and timestamp or event_time), read when the shard
    rebuilds. For replays, tests and benchmarks; ``since`` is not applied (the
    shard drops what it would not keep, relative to each key's newest event and
    to its frontier)."""

    path: str

    def __call__(self, since: datetime) -> Iterable[HistoryRow]:
        if not Path(self.path).exists():
            return []
        df = pd.read_parquet(self.path)
        time_col = "event_time" if "event_time" in df.columns else "timestamp"
        ts = timestamps_to_ns(df[time_col])
        return zip(df["transaction_id"].astype(str), df["user_id"].astype(str),
                   df["amount"].to_numpy(dtype=np.float64).tolist(), df["merchant"].astype(str),
                   df["country"].astype(str), ts.tolist())


@dataclass(frozen=True)
class EmptyHistoryLoader:
    """Start with no history, on purpose (benchmarks, fresh test namespaces)."""

    def __call__(self, since: datetime) -> Iterable[HistoryRow]:
        return []


# --------------------------------------------------------------------------- shard state


@dataclass
class _Timeline:
    """Events of one key sorted by (ts, id), with parallel columns."""

    keys: list[tuple[int, str]] = field(default_factory=list)
    ts: list[int] = field(default_factory=list)
    cents: list[int] = field(default_factory=list)
    merchants: list[str] = field(default_factory=list)
    countries: list[str] = field(default_factory=list)
    ids: set[str] = field(default_factory=set)
    day: int | None = None  # the day (since the epoch) of the newest event, once filed

    def insert(self, t: int, tid: str, cents: int, merchant: str, country: str) -> None:
        if self.keys and (t, tid) > self.keys[-1]:
            p = len(self.keys)
        else:
            p = bisect.bisect_left(self.keys, (t, tid))
        self.keys.insert(p, (t, tid))
        self.ts.insert(p, t)
        self.cents.insert(p, cents)
        self.merchants.insert(p, merchant)
        self.countries.insert(p, country)
        self.ids.add(tid)

    def expire(self, cutoff_ns: int) -> None:
        """Drop events at or before cutoff_ns."""
        k = bisect.bisect_right(self.ts, cutoff_ns)
        if k:
            for _, tid in self.keys[:k]:
                self.ids.discard(tid)
            del self.keys[:k], self.ts[:k], self.cents[:k], self.merchants[:k], self.countries[:k]


class _ShardBase:
    """Shared lifecycle: background rebuild with retries, readiness, locking, and
    forgetting idle keys."""

    kind = "shard"

    def __init__(self, index: int, shards: int, keep_ns: int, loader: HistoryLoader,
                 idle_margin_ns: int = IDLE_MARGIN_NS) -> None:
        self.index, self.shards, self.keep_ns, self.loader = index, shards, keep_ns, loader
        self.idle_margin_ns = idle_margin_ns
        self._lock = threading.Lock()
        self._ready = threading.Event()
        self._error: str | None = None
        self._timelines: dict[str, _Timeline] = {}
        # The newest event time recorded (capped by the wall clock), and the keys filed
        # by the day of their newest event, with a heap of those days: dropping the
        # idle keys pops whole days and never scans the active ones.
        self._frontier_ns: int | None = None
        self._by_day: dict[int, set[str]] = {}
        self._days: list[int] = []
        self._started = time.time()
        # Tells restarts apart: a killed shard answers with a new incarnation once restarted.
        self.incarnation = uuid.uuid4().hex
        threading.Thread(target=self._rebuild, name=f"rebuild-{self.kind}-{index}", daemon=True).start()

    def _key_of(self, row: HistoryRow) -> str:
        raise NotImplementedError

    def _history(self) -> Iterator[tuple[str, str, int, int, str, str]]:
        """The loader's events of this shard's keys: (key, id, ns, cents, merchant, country)."""
        since = datetime.now(timezone.utc) - timedelta(microseconds=(self.keep_ns // 1000))
        for row in self.loader(since):
            key = self._key_of(row)
            if shard_of(key, self.shards) != self.index:
                continue
            tid, _, amount, merchant, country, event_time = row
            try:
                t = _event_time_ns(event_time)
            except InvalidInputError as exc:
                raise InvalidInputError(f"{exc} (history row {tid})") from exc
            yield key, str(tid), t, to_cents(float(amount)), str(merchant), str(country)

    def _rebuild(self) -> None:
        delay = 1.0
        while True:
            try:
                timelines: dict[str, _Timeline] = {}
                count = 0
                for key, tid, t, cents, merchant, country in self._history():
                    tl = timelines.get(key)
                    if tl is None:
                        tl = timelines[key] = _Timeline()
                    if tid in tl.ids:
                        continue
                    tl.insert(t, tid, cents, merchant, country)
                    count += 1
                with self._lock:
                    self._timelines, self._by_day, self._days = timelines, {}, []
                    self._frontier_ns = None
                    # as after a call holding each key's newest event: keep_ns back from it
                    newest = {key: tl.ts[-1] for key, tl in timelines.items()}
                    self._forget(newest, max(newest.values(), default=None))
                    self._error = None
                self._ready.set()
                log.info("%s %d/%d rebuilt from %d events of %d keys (%d held) in %.2fs", self.kind,
                         self.index, self.shards, count, len(newest), len(self._timelines),
                         time.time() - self._started)
                return
            except Exception as exc:  # noqa: BLE001 - any loader failure: log loudly, retry
                self._error = f"{type(exc).__name__}: {exc}"
                log.error("%s %d/%d cannot load its history (retrying in %.0fs): %s",
                          self.kind, self.index, self.shards, delay, self._error)
                time.sleep(delay)
                delay = min(delay * 2, 30.0)

    def catch_up(self, chunk: int = 1000) -> int:
        """Records the loader's events that this shard does not hold, each id once, and
        returns how many: those a previous owner of the keys recorded after this
        shard's rebuild read the history (a replica being replaced keeps serving for
        a moment after its successor rebuilt). Recording an audited event that is
        already held changes nothing, so this is safe at any time; it takes the lock
        `chunk` events at a time, so calls wait at most that long."""
        self._wait()
        added = 0
        rows = self._history()
        while True:
            part = list(islice(rows, chunk))
            if not part:
                break
            with self._lock:
                newest: dict[str, int] = {}
                for key, tid, t, cents, merchant, country in part:
                    tl = self._timelines.get(key)
                    if tl is None:
                        tl = self._timelines[key] = _Timeline()
                    # Held already, or older than what the key keeps (expired here, as
                    # the previous owner expired it too): nothing to add.
                    if tid in tl.ids or (tl.ts and t < tl.ts[-1] - self.keep_ns):
                        continue
                    tl.insert(t, tid, cents, merchant, country)
                    newest[key] = tl.ts[-1]
                    added += 1
                for key in newest:
                    self._file(key, self._timelines[key])
                if newest:
                    self._forget({}, max(newest.values()))
        if added:
            log.warning("%s %d/%d caught up %d events recorded elsewhere after its rebuild",
                        self.kind, self.index, self.shards, added)
        return added

    def _forget(self, earliest: dict[str, int], newest_ns: int | None) -> None:
        """After recording (under the lock): drop, for each key recorded, its events
        more than keep_ns before the key's earliest event in the call (the call,
        repeated, finds all it needs); move the frontier to ``newest_ns``; drop
        the keys gone idle."""
        for key, t in earliest.items():
            tl = self._timelines[key]
            tl.expire(t - self.keep_ns)
            self._file(key, tl)
        if newest_ns is not None:
            newest_ns = min(newest_ns, time.time_ns() + FRONTIER_AHEAD_NS)
            if self._frontier_ns is None or newest_ns > self._frontier_ns:
                self._frontier_ns = newest_ns
        self._drop_idle()

    def _file(self, key: str, tl: _Timeline) -> None:
        """Files the key under the day of its newest event (which only moves forward)."""
        day = tl.ts[-1] // DAY_NS
        if day == tl.day:
            return
        if tl.day is not None:
            self._by_day[tl.day].discard(key)
        keys = self._by_day.get(day)
        if keys is None:
            keys = self._by_day[day] = set()
            heapq.heappush(self._days, day)
        keys.add(key)
        tl.day = day

    def _drop_idle(self) -> None:
        """Drops every key whose newest event is more than keep_ns + idle_margin_ns
        behind the frontier, a whole day of keys at a time (rounding down, so a key
        is kept up to a day longer, never dropped sooner)."""
        if self._frontier_ns is None:
            return
        first_kept_day = (self._frontier_ns - self.keep_ns - self.idle_margin_ns) // DAY_NS
        dropped = 0
        while self._days and self._days[0] < first_kept_day:
            for key in self._by_day.pop(heapq.heappop(self._days)):
                del self._timelines[key]
                dropped += 1
        if dropped > len(self._timelines):
            # A dict keeps its table after deletions; a copy is sized to what is left.
            self._timelines = dict(self._timelines)

    def _wait(self) -> None:
        if not self._ready.wait(READY_WAIT_SECONDS):
            raise StateNotReadyError(
                f"{self.kind} {self.index}/{self.shards} is not ready"
                + (f": {self._error}" if self._error else " (still rebuilding)"))

    def ready(self) -> bool:
        return self._ready.is_set()

    def status(self) -> dict[str, Any]:
        """Readiness, and what the shard holds: keys, events, and its frontier (the
        newest event time recorded, ISO 8601 UTC, None before the first)."""
        with self._lock:
            keys = len(self._timelines)
            events = sum(len(t.ts) for t in self._timelines.values())
            frontier = self._frontier_ns
        return {"kind": self.kind, "index": self.index, "ready": self._ready.is_set(),
                "error": self._error, "keys": keys, "events": events,
                "frontier": None if frontier is None else pd.Timestamp(frontier, tz="UTC").isoformat(),
                "incarnation": self.incarnation}

    def ping(self) -> bool:
        return True


class UserStateShard(_ShardBase):
    """Per-user events of the retention window (+ grace) for users of one shard."""

    kind = "user-state"

    def _key_of(self, row: HistoryRow) -> str:
        return str(row[1])

    def compute(self, batch: dict[str, list], record: bool) -> np.ndarray:
        """Integer aggregates (k, 9) for the events of `batch`, in batch order.

        Columns: v1h, v24h, n7, sum7, n30, sum30, gap_ns (-1: none), new_merchant, new_country.
        """
        self._wait()
        ts, tid, user = batch["ts"], batch["tid"], batch["user"]
        cents, merchant, country = batch["cents"], batch["merchant"], batch["country"]
        k = len(ts)
        out = np.empty((k, 9), dtype=np.int64)
        earliest: dict[str, int] = {}  # per key, its first event time in this call
        with self._lock:
            for j in sorted(range(k), key=lambda j: (ts[j], tid[j])):
                t = ts[j]
                if record:
                    earliest.setdefault(user[j], t)
                tl = self._timelines.get(user[j])
                if tl is None:
                    out[j] = (0, 0, 0, 0, 0, 0, -1, 1, 1)
                    if not record:
                        continue
                    tl = self._timelines[user[j]] = _Timeline()
                else:
                    p = bisect.bisect_left(tl.keys, (t, tid[j]))
                    tss = tl.ts
                    l1 = bisect.bisect_right(tss, t - WINDOW_1H_NS, 0, p)
                    l24 = bisect.bisect_right(tss, t - WINDOW_24H_NS, 0, l1)
                    l7 = bisect.bisect_right(tss, t - WINDOW_7D_NS, 0, l24)
                    l30 = bisect.bisect_right(tss, t - WINDOW_30D_NS, 0, l7)
                    lr = bisect.bisect_right(tss, t - RETENTION_NS, 0, l30)
                    out[j] = (p - l1, p - l24, p - l7, sum(tl.cents[l7:p]), p - l30,
                              sum(tl.cents[l30:p]), t - tss[p - 1] if lr < p else -1,
                              0 if merchant[j] in tl.merchants[lr:p] else 1,
                              0 if country[j] in tl.countries[lr:p] else 1)
                if record and tid[j] not in tl.ids:
                    tl.insert(t, tid[j], cents[j], merchant[j], country[j])
            if record and k:
                self._forget(earliest, max(ts))
        return out


class MerchantStateShard(_ShardBase):
    """Per-merchant events of the last 24 h (+ grace) for merchants of one shard."""

    kind = "merchant-state"

    def _key_of(self, row: HistoryRow) -> str:
        return str(row[3])

    def compute(self, batch: dict[str, list], record: bool) -> np.ndarray:
        """Count (k,) of earlier events at the same merchant in 24 h, in batch order."""
        self._wait()
        ts, tid, merchant = batch["ts"], batch["tid"], batch["merchant"]
        k = len(ts)
        out = np.zeros(k, dtype=np.int64)
        earliest: dict[str, int] = {}
        with self._lock:
            for j in sorted(range(k), key=lambda j: (ts[j], tid[j])):
                t = ts[j]
                if record:
                    earliest.setdefault(merchant[j], t)
                tl = self._timelines.get(merchant[j])
                if tl is None:
                    if not record:
                        continue
                    tl = self._timelines[merchant[j]] = _Timeline()
                else:
                    p = bisect.bisect_left(tl.keys, (t, tid[j]))
                    out[j] = p - bisect.bisect_right(tl.ts, t - WINDOW_24H_NS, 0, p)
                if record and tid[j] not in tl.ids:
                    tl.insert(t, tid[j], 0, "", "")
            if record and k:
                self._forget(earliest, max(ts))
        return out


# --------------------------------------------------------------------------- client


@dataclass(frozen=True)
class EventColumns:
    """Validated transactions as columns, what the state shards read: cheap to send
    to another process (a list of `Transaction` models pickles at 18-28 us a row)."""

    tid: list[str]
    user: list[str]
    merchant: list[str]
    country: list[str]
    amount: np.ndarray  # float64
    ts: np.ndarray  # int64 nanoseconds since the epoch, UTC

    @classmethod
    def of(cls, txns: Sequence[Transaction]) -> EventColumns:
        if any(t.transaction_id is None for t in txns):
            raise InvalidInputError("transaction_id: required by the online state")
        tid = [t.transaction_id for t in txns]
        return cls(tid=tid, user=[t.user_id for t in txns],
                   merchant=[t.merchant for t in txns], country=[t.country for t in txns],
                   amount=np.fromiter((t.amount for t in txns), dtype=np.float64, count=len(txns)),
                   ts=_checked_ns([t.timestamp_ns for t in txns], tid))

    @classmethod
    def from_frame(cls, frame: pd.DataFrame) -> EventColumns:
        """The columns of a frame of transactions (jobs, warm-up), checked by name."""
        missing = [c for c in ("transaction_id", "user_id", "amount", "merchant", "country",
                               "timestamp") if c not in frame.columns]
        if missing:
            raise InvalidInputError(f"missing columns: {', '.join(missing)}")
        if frame["transaction_id"].isna().any():
            raise InvalidInputError("transaction_id: required by the online state")
        try:
            ts = timestamps_to_ns(frame["timestamp"])
        except (ValueError, TypeError, OverflowError) as exc:  # out of bounds is a ValueError
            raise InvalidInputError(f"timestamp: must be an ISO 8601 date-time from {_NS_RANGE} "
                                    f"({exc})") from exc
        if len(ts) and ts.min() < MIN_NS:  # NaT
            raise InvalidInputError("timestamp: required by the online state")
        return cls(tid=frame["transaction_id"].astype(str).tolist(),
                   user=frame["user_id"].astype(str).tolist(),
                   merchant=frame["merchant"].astype(str).tolist(),
                   country=frame["country"].astype(str).str.upper().tolist(),
                   amount=frame["amount"].to_numpy(dtype=np.float64), ts=ts)

    def take(self, index: Sequence[int]) -> EventColumns:
        return EventColumns(tid=[self.tid[i] for i in index], user=[self.user[i] for i in index],
                            merchant=[self.merchant[i] for i in index],
                            country=[self.country[i] for i in index],
                            amount=self.amount[list(index)], ts=self.ts[list(index)])

    def __len__(self) -> int:
        return len(self.tid)


Events = Sequence[Transaction | dict] | pd.DataFrame | EventColumns


def _event_columns(events: Events) -> EventColumns:
    if isinstance(events, EventColumns):
        return events
    if isinstance(events, pd.DataFrame):
        return EventColumns.from_frame(events)
    return EventColumns.of([e if isinstance(e, Transaction) else parse_transaction(e) for e in events])


def keep_ns(settings: Settings) -> tuple[int, int]:
    """How far back from a key's earliest event in a call the user and the merchant
    state keep its events: the retention window (or the 24 h window) plus the grace day."""
    return (max(settings.history_retention_days, RETENTION_DAYS) * DAY_NS + GRACE_NS,
            WINDOW_24H_NS + GRACE_NS)


def _features(cols: EventColumns, cents: np.ndarray, agg: np.ndarray, volume: np.ndarray) -> np.ndarray:
    """Feature vectors from the shards' integer aggregates, with the offline float arithmetic."""
    user_part = assemble_user_features(cols.amount, cols.ts, cents, *(agg[:, c] for c in range(9)))
    out = np.hstack([user_part, assemble_merchant_features(volume)])
    assert out.shape[1] == len(FEATURE_NAMES)
    return out


class OnlineFeatureStore:
    """Client of the state shards; cheap to create, safe to use from many processes."""

    def __init__(self, user_shards: list, merchant_shards: list) -> None:
        self.user_shards = list(user_shards)
        self.merchant_shards = list(merchant_shards)

    @classmethod
    def connect(cls, settings: Settings | None = None, *, loader: HistoryLoader,
                namespace: str = NAMESPACE, prefix: str = DEFAULT_PREFIX,
                max_concurrency: int = 8) -> OnlineFeatureStore:
        """Get (or create) the shards ``{prefix}-user-state-{i}`` and ``{prefix}-merchant-state-{i}``.

        ``loader`` gives a shard its history when it is created or restarts (the
        service passes ``AuditHistoryLoader(cluster.dev.database_url)``); a shard
        that exists already keeps the loader it was created with.
        """
        settings = settings or get_settings()
        user_keep_ns, merchant_keep_ns = keep_ns(settings)
        options = dict(namespace=namespace, lifetime="detached", get_if_exists=True,
                       max_restarts=-1, max_task_retries=-1, num_cpus=0,
                       max_concurrency=max_concurrency)
        user_cls = ray.remote(UserStateShard)
        merchant_cls = ray.remote(MerchantStateShard)
        n_users, n_merchants = settings.user_state_shards, settings.merchant_state_shards
        users = [user_cls.options(name=f"{prefix}-user-state-{i}", **options).remote(
            i, n_users, user_keep_ns, loader) for i in range(n_users)]
        merchants = [merchant_cls.options(name=f"{prefix}-merchant-state-{i}", **options).remote(
            i, n_merchants, merchant_keep_ns, loader) for i in range(n_merchants)]
        return cls(users, merchants)

    # -- fan out

    def _submit(self, events: Events, record: bool) -> tuple[EventColumns, np.ndarray, list, list]:
        cols = _event_columns(events)
        cents = cents_of(cols.amount)
        source = {"ts": cols.ts.tolist(), "cents": cents.tolist(), "tid": cols.tid, "user": cols.user,
                  "merchant": cols.merchant, "country": cols.country}
        user_calls, merchant_calls = [], []
        for shards, key, calls, fields in (
                (self.user_shards, "user", user_calls, ("ts", "tid", "user", "cents", "merchant", "country")),
                (self.merchant_shards, "merchant", merchant_calls, ("ts", "tid", "merchant"))):
            groups: dict[int, list[int]] = {}
            for j, k in enumerate(source[key]):
                groups.setdefault(shard_of(k, len(shards)), []).append(j)
            for s, idx in groups.items():
                batch = {f: [source[f][j] for j in idx] for f in fields}
                calls.append((idx, shards[s].compute.remote(batch, record)))
        return cols, cents, user_calls, merchant_calls

    @staticmethod
    def _assemble(cols: EventColumns, cents: np.ndarray, user_calls: list, user_results: list,
                  merchant_calls: list, merchant_results: list) -> np.ndarray:
        n = len(cols)
        agg = np.empty((n, 9), dtype=np.int64)
        for (idx, _), res in zip(user_calls, user_results):
            agg[idx] = res
        volume = np.empty(n, dtype=np.int64)
        for (idx, _), res in zip(merchant_calls, merchant_results):
            volume[idx] = res
        return _features(cols, cents, agg, volume)

    def compute(self, events: Events, record: bool) -> np.ndarray:
        """Feature vectors (n, len(FEATURE_NAMES)) in input order; record=True updates the state."""
        cols, cents, uc, mc = self._submit(events, record)
        if len(cols) == 0:
            return np.empty((0, len(FEATURE_NAMES)))
        ur = ray.get([ref for _, ref in uc])
        mr = ray.get([ref for _, ref in mc])
        return self._assemble(cols, cents, uc, ur, mc, mr)

    async def compute_async(self, events: Events, record: bool) -> np.ndarray:
        """`compute` for event loops (Serve replicas): awaits the shard calls."""
        cols, cents, uc, mc = self._submit(events, record)
        if len(cols) == 0:
            return np.empty((0, len(FEATURE_NAMES)))
        results = await asyncio.gather(*(ref for _, ref in uc), *(ref for _, ref in mc))
        return self._assemble(cols, cents, uc, list(results[:len(uc)]), mc, list(results[len(uc):]))

    # -- lifecycle

    @property
    def shards(self) -> list:
        return self.user_shards + self.merchant_shards

    def ready(self) -> bool:
        return all(ray.get([s.ready.remote() for s in self.shards]))

    async def ready_async(self) -> bool:
        return all(await asyncio.gather(*(s.ready.remote() for s in self.shards)))

    async def alive_async(self, timeout: float = 5.0) -> bool:
        try:
            await asyncio.wait_for(asyncio.gather(*(s.ping.remote() for s in self.shards)), timeout)
            return True
        except (asyncio.TimeoutError, ray.exceptions.RayError):
            return False

    def status(self) -> list[dict[str, Any]]:
        return ray.get([s.status.remote() for s in self.shards])

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Block until every shard has rebuilt; raise `StateNotReadyError` naming the laggards."""
        deadline = time.monotonic() + timeout
        while True:
            states = self.status()
            if all(s["ready"] for s in states):
                return
            if time.monotonic() >= deadline:
                late = [f"{s['kind']} {s['index']}" + (f" ({s['error']})" if s["error"] else "")
                        for s in states if not s["ready"]]
                raise StateNotReadyError(f"online state not ready after {timeout:.0f}s: {', '.join(late)}")
            time.sleep(0.05)

    def catch_up(self) -> int:
        """`_ShardBase.catch_up` of every shard: the events they did not hold."""
        return sum(ray.get([s.catch_up.remote() for s in self.shards]))

    def kill(self) -> None:
        """Destroy the shards for good (tests, resets); the state is lost."""
        for s in self.shards:
            ray.kill(s, no_restart=True)


# --------------------------------------------------------------------------- in process


class InProcessFeatureStore:
    """The whole online state inside the calling process: one user and one merchant
    shard object, called directly (no Ray actor round trip).

    The state is shared only by what calls this process, so it is the state of the
    system only when this process is the one owner of every key: the Serve feature
    step with a single replica, which the scoring API and the Kafka ingestion
    actors (through the scoring application) both call. Several owners would each
    count only the events they saw. Everything else is as with the actors: the
    same shard code, the same rebuild from the history loader when the process
    starts, the same ids-once rule, the same numbers; `catch_up` records what a
    previous owner recorded after this one's rebuild read the history.
    """

    # Up to this many rows a call runs on the caller's event loop: a few tens of
    # microseconds, cheaper than a hop to a thread. Larger batches (Kafka's) run in
    # a thread, so that requests behind them are not held up by their Python loop.
    INLINE_ROWS = 64

    def __init__(self, settings: Settings | None = None, *, loader: HistoryLoader) -> None:
        user_keep_ns, merchant_keep_ns = keep_ns(settings or get_settings())
        self.users = UserStateShard(0, 1, user_keep_ns, loader)
        self.merchants = MerchantStateShard(0, 1, merchant_keep_ns, loader)

    @property
    def shards(self) -> list[_ShardBase]:
        return [self.users, self.merchants]

    def compute(self, events: Events, record: bool) -> np.ndarray:
        """Feature vectors (n, len(FEATURE_NAMES)) in input order; record=True updates the state."""
        cols = _event_columns(events)
        if len(cols) == 0:
            return np.empty((0, len(FEATURE_NAMES)))
        cents = cents_of(cols.amount)
        ts, tid, merchant = cols.ts.tolist(), cols.tid, cols.merchant
        agg = self.users.compute({"ts": ts, "tid": tid, "user": cols.user, "cents": cents.tolist(),
                                  "merchant": merchant, "country": cols.country}, record)
        volume = self.merchants.compute({"ts": ts, "tid": tid, "merchant": merchant}, record)
        return _features(cols, cents, agg, volume)

    async def compute_async(self, events: Events, record: bool) -> np.ndarray:
        """`compute` for event loops: small calls inline once the state is ready; large
        ones, and any call that would wait for the rebuild, in a thread."""
        if len(events) <= self.INLINE_ROWS and self.ready():
            return self.compute(events, record)
        return await asyncio.to_thread(self.compute, events, record)

    def ready(self) -> bool:
        return all(s.ready() for s in self.shards)

    async def ready_async(self) -> bool:
        return self.ready()

    async def alive_async(self, timeout: float = 5.0) -> bool:
        return True  # the state lives and dies with this process

    def status(self) -> list[dict[str, Any]]:
        return [s.status() for s in self.shards]

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Block until both shards have rebuilt; raise `StateNotReadyError` naming the laggards."""
        deadline = time.monotonic() + timeout
        for s in self.shards:
            if not s._ready.wait(max(deadline - time.monotonic(), 0)):
                raise StateNotReadyError(f"online state not ready after {timeout:.0f}s: {s.kind}"
                                         + (f" ({s._error})" if s._error else ""))

    def catch_up(self) -> int:
        """`_ShardBase.catch_up` of both shards: the events recorded here since."""
        return sum(s.catch_up() for s in self.shards)
