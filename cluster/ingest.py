"""Kafka ingestion: consumer-group actors that score, audit, then commit.

    python -m cluster.ingest [--actors N]    # on a running Ray cluster, until Ctrl-C

Each ingestion actor is one member of `settings.kafka_consumer_group` and runs
one loop on its own thread:

1. poll at most `settings.ingest_poll_max_records` messages; one batch may be
   scored while the one before it is audited, never more (nothing else is
   polled until the older one is committed: that is the backpressure);
2. validate every message; poison (oversized, not JSON, invalid fields, a
   transaction id already recorded with another payload) becomes a dead letter;
   a message without `transaction_id` gets one derived from its position, so a
   redelivery maps to the same audit row; an id already audited with the same
   payload is skipped, never re-scored;
3. score the valid ones with one call of the scoring application;
4. publish dead letters and alerts (anomalies) and flush the producer;
5. write the dead-letter rows, then the audit rows, each in one idempotent
   insert, retried with exponential backoff while PostgreSQL is unreachable;
6. commit, per partition, the offset after the batch's last message.

Nothing is committed that is not audited or dead-lettered; anything audited but
not committed (a crash, a rebalance) is redelivered and skipped as a duplicate.
Any other failure rewinds the consumer to the first offsets of the batches in
flight (at most two) and retries them after a backoff. Alerts are published before the audit insert,
so they are delivered at least once.

The scoring application is reached through `ScoreBatch`, a plain callable (with
an optional `submit` that returns before the scores, as `ServeScorer` has), so
the loop runs against hand-written fakes in unit tests.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import orjson

from configs.errors import FraudScoringError, InvalidInputError
from configs.settings import Settings

log = logging.getLogger(__name__)

# One call per batch: validated transaction dicts in, one result per transaction
# out, in the same order (see deployments.ingress `score_for_ingest`).
ScoreBatch = Callable[[list[dict[str, Any]]], list[dict[str, Any]]]

SOURCE = "kafka"
# The Serve application the actors score through; deployments.app deploys it under this name.
SCORING_APP = "fraud-scoring"
SESSION_TIMEOUT_MS = 6_000
HEARTBEAT_INTERVAL_MS = 1_000
MAX_POLL_INTERVAL_MS = 120_000
POLL_TIMEOUT_MS = 500
SCORE_TIMEOUT_S = 120.0
BACKOFF_INITIAL_S = 0.1
BACKOFF_MAX_S = 5.0
# Tries of a message whose failure is not transient: with its batch, then alone; then
# it becomes a dead letter, so that one bad message never stalls its partitions.
MAX_ATTEMPTS = 3


def position(topic: str, partition: int, offset: int) -> str:
    """Where a message is: `topic[partition]@offset`, as stored with dead letters."""
    return f"{topic}[{partition}]@{offset}"


@dataclass(frozen=True)
class Message:
    """What the loop needs of one Kafka record."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None

    @property
    def position(self) -> str:
        return position(self.topic, self.partition, self.offset)


@dataclass
class BatchOutcome:
    scored: int = 0
    skipped: int = 0
    dead_letters: int = 0
    alerts: int = 0
    # Seconds spent per stage of the batch (decode, lookup, score, publish, audit).
    seconds: dict[str, float] = field(default_factory=dict)
    # (topic, partition) -> the offset to commit (after the last message handled).
    offsets: dict[tuple[str, int], int] = field(default_factory=dict)


@dataclass
class Batch:
    """One polled batch on its way through `BatchProcessor`'s steps."""

    messages: Sequence[Message]
    outcome: BatchOutcome = field(default_factory=BatchOutcome)
    dead: list[tuple[Message, str]] = field(default_factory=list)
    # transaction_id -> (message, transaction, payload fingerprint), first occurrence
    fresh: dict[str, tuple[Message, Any, str]] = field(default_factory=dict)
    to_score: list[tuple[Message, Any, str]] = field(default_factory=list)
    results: Callable[[], list[dict[str, Any]]] | None = None  # waits for the scores once sent
    rows: list[dict[str, Any]] | None = None  # audit rows, once the scores are back
    alerts: list[tuple[bytes | None, dict]] = field(default_factory=list)


def submit(scorer: ScoreBatch, transactions: list[dict[str, Any]]) -> Callable[[], list[dict[str, Any]]]:
    """Starts one scoring call; returns what waits for its results. A scorer with a
    `submit` method (`ServeScorer`) runs while the caller goes on; a plain callable
    runs now."""
    start = getattr(scorer, "submit", None)
    if start is not None:
        return start(transactions)
    results = scorer(transactions)
    return lambda: results


class BatchAbandoned(Exception):
    """A stop was requested while a batch was still waiting on a retry."""


# --- the seams: what the loop talks to ------------------------------------------


class AuditStore(Protocol):
    def payload_hashes(self, transaction_ids: Iterable[str]) -> dict[str, str]: ...
    def write_decisions(self, rows: Sequence[dict[str, Any]]) -> Any: ...
    def write_dead_letters(self, rows: Sequence[dict[str, Any]]) -> Any: ...


def audit_store(settings: Settings) -> Any:
    """The audit repository; the database URL is resolved on every call, so that a
    restarted embedded PostgreSQL is found whatever port it came back on."""
    from cluster.dev import database_url
    from cluster.store.audit import AuditRepository
    from cluster.store.db import engine_for

    class _ResolvingRepository(AuditRepository):
        def __init__(self) -> None:  # no fixed engine: see `engine`
            pass

        @property
        def engine(self):
            try:
                return engine_for(database_url(settings))
            except RuntimeError as exc:  # the embedded server was never started: retried
                raise ConnectionError(str(exc)) from exc

    return _ResolvingRepository()


class Publisher(Protocol):
    def send(self, topic: str, key: bytes | None, value: bytes) -> None: ...
    def flush(self) -> None: ...


class Consumer(Protocol):
    """The part of `kafka.KafkaConsumer` the loop uses."""

    def poll(self, timeout_ms: int, max_records: int) -> dict[Any, list[Any]]: ...
    def commit(self, offsets: dict[Any, Any]) -> None: ...
    def seek(self, partition: Any, offset: int) -> None: ...
    def close(self, autocommit: bool = ...) -> None: ...


def is_transient(exc: BaseException) -> bool:
    """A failure worth retrying without limit: the database, the broker or the scoring
    application is unreachable, restarting or full. Anything else may be caused by a
    message itself, so the loop retries it a bounded number of times (`MAX_ATTEMPTS`)."""
    import ray.exceptions as ray_errors
    import ray.serve.exceptions as serve_errors

    from cluster.store.audit import database_unavailable

    if database_unavailable(exc) or isinstance(exc, ConnectionError | TimeoutError):
        return True
    if isinstance(exc, FraudScoringError):  # 503s: no model yet, state not ready, backpressure
        return exc.status_code >= 500
    if isinstance(exc, ray_errors.RayTaskError):  # judged by what the replica raised
        cause = getattr(exc, "cause", None)
        return cause is not None and is_transient(cause)
    if isinstance(exc, ray_errors.RayActorError | ray_errors.ActorUnavailableError | ray_errors.GetTimeoutError
                  | ray_errors.ObjectLostError | ray_errors.RaySystemError | ray_errors.NodeDiedError
                  | serve_errors.BackPressureError | serve_errors.DeploymentUnavailableError
                  | serve_errors.ReplicaUnavailableError):
        return True
    try:
        from kafka.errors import KafkaError

        if isinstance(exc, KafkaError) and getattr(exc, "retriable", False):
            return True
    except ImportError:  # pragma: no cover
        pass
    return False


class Backoff:
    """Exponential backoff that gives up only when a stop deadline has passed."""

    def __init__(self, sleep: Callable[[float], None] = time.sleep,
                 stop_deadline: Callable[[], float | None] = lambda: None,
                 initial_s: float = BACKOFF_INITIAL_S, max_s: float = BACKOFF_MAX_S,
                 on_wait: Callable[[str, int], None] | None = None) -> None:
        self.sleep, self.stop_deadline = sleep, stop_deadline
        self.initial_s, self.max_s = initial_s, max_s
        self.on_wait = on_wait

    def delay(self, attempt: int) -> float:
        return min(self.initial_s * 2 ** attempt, self.max_s)

    def retry(self, what: str, fn: Callable[..., Any], *args: Any) -> Any:
        """Call fn until it succeeds or fails with a non-transient error."""
        attempt = 0
        while True:
            try:
                return fn(*args)
            except Exception as exc:
                if not is_transient(exc):
                    raise
                deadline = self.stop_deadline()
                if deadline is not None and time.monotonic() >= deadline:
                    raise BatchAbandoned(f"{what}: stopping while it still fails ({exc})") from exc
                wait = self.delay(attempt)
                log.warning("%s failed (%s: %s); retry %d in %.1fs", what, type(exc).__name__,
                            str(exc).splitlines()[0] if str(exc) else "", attempt + 1, wait)
                if self.on_wait is not None:
                    self.on_wait(what, attempt)
                self.sleep(wait)
                attempt += 1


# --- one batch --------------------------------------------------------------------


def decode(message: Message, max_bytes: int, epoch: str | None = None) -> Any:
    """The validated `Transaction` of a message, or the reason it is poison (a str).
    A message without an id gets one from its position (and the broker's `epoch`)."""
    from features.schema import kafka_transaction_id, parse_transaction

    value = message.value
    if value is None:
        return "empty message: no value"
    if len(value) > max_bytes:
        return f"oversized: {len(value)} bytes > max_message_bytes {max_bytes}"
    try:
        data = orjson.loads(value)  # strict RFC 8259 (no NaN literals), invalid UTF-8 refused
    except orjson.JSONDecodeError as exc:
        return f"invalid JSON: {exc}"
    if not isinstance(data, dict):
        return f"invalid JSON: expected an object, got {type(data).__name__}"
    if data.get("transaction_id") is None:
        data["transaction_id"] = kafka_transaction_id(message.topic, message.partition, message.offset, epoch)
    try:
        return parse_transaction(data)
    except InvalidInputError as exc:
        return f"invalid transaction: {exc}"
    except Exception as exc:  # a rule that broke on odd input: the message is poison all the same
        log.warning("validation of %s raised %s", message.position, type(exc).__name__, exc_info=True)
        return f"invalid transaction: {_describe(exc)}"


def _describe(exc: BaseException) -> str:
    """`Type: first line of the message`, bounded, for a dead letter's reason."""
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {text[:500]}"


class _Stopwatch:
    def __init__(self, into: dict[str, float]) -> None:
        self.into, self.last = into, time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.into[name] = self.into.get(name, 0.0) + now - self.last
        self.last = now


def _payload_text(value: bytes | None) -> str:
    return "" if value is None else value.decode("utf-8", errors="backslashreplace")


class BatchProcessor:
    """The steps of one batch, in order: `decode`, `look_up`, `send` (to be scored),
    `receive` (the scores), `record` (publish, dead letters, audit), after which
    its outcome says which offsets may be committed. `IngestWorker` interleaves
    the steps of two batches."""

    def __init__(self, settings: Settings, scorer: ScoreBatch, store: AuditStore,
                 publisher: Publisher, backoff: Backoff | None = None,
                 epoch: Callable[[], str | None] = lambda: None) -> None:
        self.settings = settings
        self.epoch = epoch  # the broker's, read per batch: see features.schema.kafka_transaction_id
        self.scorer = scorer
        self.store = store
        self.publisher = publisher
        self.backoff = backoff or Backoff()
        self.pending_rows = 0  # scored rows not yet audited: the audit backlog

    def decode(self, messages: Sequence[Message]) -> Batch:
        """Validates every message; poison and in-batch conflicts become dead letters."""
        from features.schema import payload_fingerprint

        batch = Batch(messages)
        clock = _Stopwatch(batch.outcome.seconds)
        epoch = self.epoch()
        for m in messages:
            key = (m.topic, m.partition)
            batch.outcome.offsets[key] = max(batch.outcome.offsets.get(key, 0), m.offset + 1)
            txn = decode(m, self.settings.max_message_bytes, epoch)
            if isinstance(txn, str):
                batch.dead.append((m, txn))
                continue
            fp = payload_fingerprint(txn)
            first = batch.fresh.get(txn.transaction_id)
            if first is None:
                batch.fresh[txn.transaction_id] = (m, txn, fp)
            elif first[2] == fp:
                batch.outcome.skipped += 1  # the same transaction twice in one batch
            else:
                batch.dead.append((m, f"conflict: transaction_id {txn.transaction_id!r} was already "
                                      f"sent with another payload (at {first[0].position})"))
        clock.lap("decode")
        return batch

    def look_up(self, batch: Batch) -> None:
        """Skips what is already audited; another payload under an audited id is a dead letter."""
        clock = _Stopwatch(batch.outcome.seconds)
        fresh = batch.fresh
        stored = self.backoff.retry("audit lookup", self.store.payload_hashes, list(fresh)) if fresh else {}
        for tid, (m, txn, fp) in fresh.items():
            if tid not in stored:
                batch.to_score.append((m, txn, fp))
            elif stored[tid] == fp:
                batch.outcome.skipped += 1
            else:
                batch.dead.append((m, f"conflict: transaction_id {tid!r} was already recorded with another payload"))
        clock.lap("lookup")

    def send(self, batch: Batch) -> None:
        """Sends the batch to be scored, without waiting for the scores."""
        clock = _Stopwatch(batch.outcome.seconds)
        if batch.to_score:
            batch.results = submit(self.scorer, [txn.model_dump(mode="json") for _, txn, _ in batch.to_score])
        clock.lap("send")

    def receive(self, batch: Batch) -> None:
        """Waits for the scores (the online state has then recorded the batch) and builds
        the audit rows and alerts; a second call does nothing."""
        if batch.rows is not None:
            return
        clock = _Stopwatch(batch.outcome.seconds)
        batch.rows, batch.alerts = self._rows(batch.to_score, batch.results()) if batch.results else ([], [])
        clock.lap("score")

    def record(self, batch: Batch) -> BatchOutcome:
        """Publishes, writes the dead letters and the audit rows: what must happen before the commit."""
        self.receive(batch)
        outcome, dead, to_score, rows = batch.outcome, batch.dead, batch.to_score, batch.rows
        clock = _Stopwatch(outcome.seconds)
        self.pending_rows = len(rows)
        self._publish(dead, batch.alerts)
        clock.lap("publish")
        self._write_dead_letters(dead)
        result = self.backoff.retry("audit insert", self.store.write_decisions, rows) if rows else None
        lost: list[tuple[Message, str]] = []
        if result is not None and result.duplicates:
            # Another member recorded some of these ids meanwhile: same payload is fine,
            # another payload makes this message a dead letter.
            stored = self.backoff.retry("audit lookup", self.store.payload_hashes, [r["transaction_id"] for r in rows])
            lost = [(m, f"conflict: transaction_id {r['transaction_id']!r} was already recorded "
                        "with another payload")
                    for (m, _, _), r in zip(to_score, rows, strict=True)
                    if stored.get(r["transaction_id"]) != r["payload_hash"]]
            if lost:
                self._publish(lost, [])
                self._write_dead_letters(lost)
        self.pending_rows = 0
        clock.lap("audit")
        outcome.scored = len(rows) - len(lost)
        outcome.dead_letters = len(dead) + len(lost)
        outcome.alerts = len(batch.alerts)
        return outcome

    def _rows(self, items: list[tuple[Message, Any, str]],
              results: list[dict[str, Any]]) -> tuple[list[dict], list[tuple[bytes | None, dict]]]:
        """Audit rows and alerts from the scoring application's results."""
        if len(results) != len(items):
            raise RuntimeError(f"the scoring application returned {len(results)} results for {len(items)} "
                               "transactions")
        rows, alerts = [], []
        for (m, txn, fp), res in zip(items, results, strict=True):
            if res.get("transaction_id") != txn.transaction_id:
                raise RuntimeError(f"the scoring application answered {res.get('transaction_id')!r} "
                                   f"for {txn.transaction_id!r}: results out of order")
            row = dict(res["audit_row"])
            row.update(payload_hash=fp, source=SOURCE, kafka_topic=m.topic,
                       kafka_partition=m.partition, kafka_offset=m.offset)
            rows.append(row)
            if res["anomaly"]:
                alerts.append((m.key, {
                    "transaction_id": txn.transaction_id, "user_id": txn.user_id,
                    "amount": txn.amount, "merchant": txn.merchant, "country": txn.country,
                    "timestamp": txn.timestamp.isoformat(),
                    "risk_score": res["risk_score"], "threshold": res["threshold"],
                    "model_version": res["model_version"], "reasons": list(res.get("reasons") or []),
                    "position": m.position,
                }))
        return rows, alerts

    def bury(self, dead: list[tuple[Message, str]]) -> None:
        """Publishes and stores messages as dead letters (for those the loop gave up on)."""
        self._publish(dead, [])
        self._write_dead_letters(dead)

    def _publish(self, dead: list[tuple[Message, str]], alerts: list[tuple[bytes | None, dict]]) -> None:
        if not dead and not alerts:
            return
        for m, reason in dead:
            value = json.dumps({"position": m.position, "reason": reason, "payload": _payload_text(m.value)})
            self.publisher.send(self.settings.kafka_dead_letter_topic, m.key, value.encode())
        for key, alert in alerts:
            self.publisher.send(self.settings.kafka_alerts_topic, key, json.dumps(alert).encode())
        self.backoff.retry("publish", self.publisher.flush)

    def _write_dead_letters(self, dead: list[tuple[Message, str]]) -> None:
        if dead:
            # The exact bytes: the store keeps them whatever they hold (a NUL, invalid UTF-8).
            rows = [{"payload": m.value, "reason": reason, "source": SOURCE, "position": m.position}
                    for m, reason in dead]
            self.backoff.retry("dead-letter insert", self.store.write_dead_letters, rows)


# --- the loop of one group member ---------------------------------------------------


class IngestWorker:
    """Poll, process, commit, until stopped; owns the consumer it is given.

    Two batches overlap (`settings.ingest_overlap`): the next one is polled,
    validated and looked up while the one before it is being scored, and is sent
    to be scored as soon as those scores are back, while the one before it is
    published and audited. So the scoring application is not idle while an
    actor writes to PostgreSQL, and the online state still records one actor's
    batches in order (a batch is sent only once the one before it has been
    recorded: a user's later events see the earlier ones). Offsets are committed
    in order, each after its batch's audit insert; a batch that repeats an id
    of the batch in flight waits for that batch's audit row first.
    """

    def __init__(self, settings: Settings, consumer: Consumer, processor: BatchProcessor,
                 metrics: Any = None, sleep: Callable[[float], None] = time.sleep) -> None:
        self.settings = settings
        self.consumer = consumer
        self.processor = processor
        self.metrics = metrics
        self.sleep = sleep
        self.totals = {"batches": 0, "scored": 0, "skipped": 0, "dead_letters": 0, "alerts": 0,
                       "failed_batches": 0, "commit_failures": 0}
        self._next: dict[tuple[str, int], int] = {}
        self.seconds: dict[str, float] = {}
        self._in_flight: tuple[Batch, float] | None = None  # (batch, monotonic time polled)
        # position -> failures that were not transient, of the batches it was in
        self._strikes: dict[str, int] = {}

    def run(self, stop: threading.Event) -> None:
        failures = 0
        try:
            while not stop.is_set():
                # With a batch in flight, take only what is already fetched: on a quiet
                # stream the batch is audited now, not after a poll's timeout.
                messages = self._poll(POLL_TIMEOUT_MS if self._in_flight is None else 0)
                try:
                    if not messages:
                        self._finish_in_flight()
                        self._report_lag()
                        continue
                    if any(self._strikes.get(m.position, 0) >= MAX_ATTEMPTS for m in messages):
                        self._finish_in_flight()
                        self._isolate(messages, stop)
                        continue
                    self._start(messages)
                except BatchAbandoned:
                    raise
                except Exception as exc:
                    # Never drop, never commit: rewind and try the same messages again.
                    self._failed(messages, exc, failures)
                    failures += 1
                    continue
                failures = 0
            self._finish_in_flight()  # a graceful stop: the batch in flight is audited and committed
        except BatchAbandoned as exc:
            log.warning("stopping with an unfinished batch, not committed (it will be redelivered): %s", exc)
        finally:
            self._close()

    def _start(self, messages: Sequence[Message]) -> None:
        """Validates and sends a polled batch; finishes the one in flight on the way."""
        polled = time.monotonic()
        batch = self.processor.decode(messages)
        # (without overlap nothing is in flight here: each batch finishes below)
        if self._in_flight is not None and self._repeats_in_flight(batch):
            self._finish_in_flight()  # its audit rows decide: skip or conflict
        self.processor.look_up(batch)
        if self._in_flight is not None:
            self.processor.receive(self._in_flight[0])
        self.processor.send(batch)
        self._finish_in_flight()
        self._in_flight = (batch, polled)
        if not self.settings.ingest_overlap:
            self._finish_in_flight()

    def _failed(self, messages: Sequence[Message], exc: Exception, failures: int) -> None:
        """Rewinds what is not committed. A failure that is not transient counts against
        each of those messages: one that reaches `MAX_ATTEMPTS` is next tried alone."""
        uncommitted = list(messages)
        if self._in_flight is not None:
            uncommitted += self._in_flight[0].messages
            self._in_flight = None
        self.totals["failed_batches"] += 1
        if not is_transient(exc):
            for m in uncommitted:
                self._strikes[m.position] = self._strikes.get(m.position, 0) + 1
        wait = self.processor.backoff.delay(failures)
        log.error("batch of %d messages failed (%s, %s); rewinding %d, retry in %.1fs", len(messages),
                  _describe(exc), "transient" if is_transient(exc) else "counted against its messages",
                  len(uncommitted), wait, exc_info=exc)
        self._rewind(uncommitted)
        self.sleep(wait)

    def _isolate(self, messages: Sequence[Message], stop: threading.Event) -> None:
        """Processes messages one at a time, after their batch failed `MAX_ATTEMPTS` times
        for a reason that is not transient: the one at fault becomes a dead letter and
        the others are audited as usual. Slow, but only ever after a fault."""
        ordered = sorted(messages, key=lambda m: (m.topic, m.partition, m.offset))
        log.warning("trying %d messages one at a time to find the one that fails", len(ordered))
        for k, m in enumerate(ordered):
            if stop.is_set():
                self._rewind(ordered[k:])
                return
            self._process_alone(m, stop)

    def _process_alone(self, m: Message, stop: threading.Event) -> None:
        attempts, transient_failures = 0, 0
        while True:
            polled = time.monotonic()
            try:
                batch = self.processor.decode([m])
                self.processor.look_up(batch)
                self.processor.send(batch)
                outcome = self.processor.record(batch)
                break
            except BatchAbandoned:
                raise
            except Exception as exc:
                if is_transient(exc):
                    if stop.is_set():
                        raise BatchAbandoned(f"{m.position}: stopping while it still fails ({exc})") from exc
                    self.sleep(self.processor.backoff.delay(transient_failures))
                    transient_failures += 1
                    continue
                attempts += 1
                if attempts < MAX_ATTEMPTS:
                    self.sleep(self.processor.backoff.delay(attempts - 1))
                    continue
                reason = f"unprocessable: failed {MAX_ATTEMPTS} times alone: {_describe(exc)}"
                log.error("%s becomes a dead letter: %s", m.position, reason, exc_info=exc)
                self._bury(m, reason)
                outcome = BatchOutcome(dead_letters=1, offsets={(m.topic, m.partition): m.offset + 1})
                break
        self._commit(outcome.offsets)
        self._strikes.pop(m.position, None)
        self._count(outcome, time.monotonic() - polled)

    def _bury(self, m: Message, reason: str) -> None:
        """A dead letter even when the store refuses its payload: then the payload is kept
        as hexadecimal text, so that the stream never waits on one message."""
        try:
            self.processor.bury([(m, reason)])
        except BatchAbandoned:
            raise
        except Exception as exc:
            if is_transient(exc):
                raise
            hexed = Message(m.topic, m.partition, m.offset, m.key, (m.value or b"").hex().encode())
            self.processor.bury([(hexed, f"{reason} (payload stored as hex: the store refused it: "
                                         f"{_describe(exc)})")])

    def before_rebalance(self) -> None:
        """The consumer calls this before it gives up partitions: the batch in flight
        is finished and committed first, so nothing is in flight across a rebalance
        (if that fails, the batch stays uncommitted and its next owner redelivers it)."""
        try:
            self._finish_in_flight()
        except Exception:
            log.warning("the batch in flight could not be finished before a rebalance; it will be "
                        "redelivered", exc_info=True)
            self._in_flight = None

    def _repeats_in_flight(self, batch: Batch) -> bool:
        assert self._in_flight is not None
        return any(txn.transaction_id in batch.fresh for _, txn, _ in self._in_flight[0].to_score)

    def _finish_in_flight(self) -> None:
        if self._in_flight is None:
            return
        batch, polled = self._in_flight
        outcome = self.processor.record(batch)
        self._in_flight = None
        clock = _Stopwatch(outcome.seconds)
        self._commit(outcome.offsets)
        clock.lap("commit")
        if self._strikes:
            for m in batch.messages:
                self._strikes.pop(m.position, None)
        self._count(outcome, time.monotonic() - polled)

    def _poll(self, timeout_ms: int) -> list[Message]:
        records = self.consumer.poll(timeout_ms=timeout_ms,
                                     max_records=self.settings.ingest_poll_max_records)
        return [Message(r.topic, r.partition, r.offset, r.key, r.value)
                for batch in records.values() for r in batch]

    def _rewind(self, messages: Sequence[Message]) -> None:
        from kafka import TopicPartition

        first: dict[tuple[str, int], int] = {}
        for m in messages:
            key = (m.topic, m.partition)
            first[key] = min(first.get(key, m.offset), m.offset)
        for (topic, partition), offset in first.items():
            try:
                self.consumer.seek(TopicPartition(topic, partition), offset)
            except Exception as exc:  # the partition went to another member: it resumes from the commit
                log.info("not rewinding %s: %s", position(topic, partition, offset), exc)

    def _commit(self, offsets: dict[tuple[str, int], int]) -> None:
        from kafka import OffsetAndMetadata, TopicPartition
        from kafka.errors import CommitFailedError, KafkaError

        request = {TopicPartition(t, p): OffsetAndMetadata(o, "", -1) for (t, p), o in offsets.items()}
        for attempt in range(5):
            try:
                self.consumer.commit(offsets=request)
                self._next.update(offsets)
                return
            except CommitFailedError as exc:
                # The group rebalanced: the new owner redelivers, and the audit skips duplicates.
                log.warning("offset commit refused after a rebalance (%s); the batch is audited and "
                            "will be skipped on redelivery", exc)
                break
            except KafkaError as exc:
                if not getattr(exc, "retriable", False):
                    log.warning("offset commit failed (%s); the batch is audited and will be skipped "
                                "on redelivery", exc)
                    break
                self.sleep(self.processor.backoff.delay(attempt))
        self.totals["commit_failures"] += 1

    def _count(self, outcome: BatchOutcome, latency_s: float) -> None:
        self.totals["batches"] += 1
        for name in ("scored", "skipped", "dead_letters", "alerts"):
            self.totals[name] += getattr(outcome, name)
        for stage, s in outcome.seconds.items():
            self.seconds[stage] = self.seconds.get(stage, 0.0) + s
        if self.metrics is not None:
            self.metrics.batch_done(latency_s, outcome.scored, outcome.skipped, outcome.dead_letters)
            self._report_lag()

    def _report_lag(self) -> None:
        if self.metrics is None or not hasattr(self.consumer, "highwater"):
            return
        try:
            lag = 0
            for tp in self.consumer.assignment():
                end = self.consumer.highwater(tp)
                done = self._next.get((tp.topic, tp.partition))
                if end is not None and done is not None:
                    lag += max(end - done, 0)
            self.metrics.set_lag(lag)
        except Exception:  # lag is informative only
            log.debug("could not compute consumer lag", exc_info=True)

    def _close(self) -> None:
        try:
            self.consumer.close(autocommit=False)
        except Exception:
            log.warning("closing the consumer failed", exc_info=True)


# --- Kafka adapters -----------------------------------------------------------------


def _rebalance_listener(before_revoke: Callable[[], None] | None) -> Any:
    from kafka import ConsumerRebalanceListener

    class Listener(ConsumerRebalanceListener):
        # Rebalances run inside poll(); the batch in flight is finished and committed
        # before partitions are revoked. A member evicted while processing cannot
        # commit; its batch is redelivered.
        def on_partitions_revoked(self, revoked):
            if before_revoke is not None:
                before_revoke()
            if revoked:
                log.info("partitions revoked: %s", sorted((tp.topic, tp.partition) for tp in revoked))

        def on_partitions_assigned(self, assigned):
            log.info("partitions assigned: %s", sorted((tp.topic, tp.partition) for tp in assigned))

        def on_partitions_lost(self, lost):
            log.warning("partitions lost (evicted from the group): %s; uncommitted work is redelivered",
                        sorted((tp.topic, tp.partition) for tp in lost))

    return Listener()


def make_consumer(settings: Settings, bootstrap: str, client_id: str = "fraud-ingest",
                  before_revoke: Callable[[], None] | None = None) -> Any:
    """A group member subscribed to the transactions topic; `before_revoke` runs
    inside poll() before partitions are revoked (`IngestWorker.before_rebalance`)."""
    from kafka import KafkaConsumer

    consumer = KafkaConsumer(
        bootstrap_servers=bootstrap, group_id=settings.kafka_consumer_group, client_id=client_id,
        enable_auto_commit=False, auto_offset_reset="earliest",
        session_timeout_ms=SESSION_TIMEOUT_MS, heartbeat_interval_ms=HEARTBEAT_INTERVAL_MS,
        max_poll_interval_ms=MAX_POLL_INTERVAL_MS, max_poll_records=settings.ingest_poll_max_records,
        # Bounded prefetch: memory does not grow with the backlog.
        fetch_max_bytes=8 * 1024 * 1024, max_partition_fetch_bytes=2 * 1024 * 1024,
    )
    consumer.subscribe([settings.kafka_topic], listener=_rebalance_listener(before_revoke))
    return consumer


class ServeScorer:
    """`ScoreBatch` over the scoring application's `score_for_ingest` (one call per batch)."""

    def __init__(self, app_name: str, timeout_s: float = SCORE_TIMEOUT_S) -> None:
        self.app_name = app_name
        self.timeout_s = timeout_s
        self._handle = None

    def __call__(self, transactions: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return self.submit(transactions)()

    def submit(self, transactions: list[dict[str, Any]]) -> Callable[[], list[dict[str, Any]]]:
        """Sends the call and returns at once; the returned function waits for the answer."""
        if self._handle is None:
            from ray import serve

            # gRPC between this actor and the replica: cheaper than the object store here.
            self._handle = serve.get_app_handle(self.app_name).options(_by_reference=False)
        response = self._handle.score_for_ingest.remote(transactions)
        return lambda: response.result(timeout_s=self.timeout_s)

    def __getstate__(self) -> dict[str, Any]:
        return {"app_name": self.app_name, "timeout_s": self.timeout_s, "_handle": None}


# --- actors -------------------------------------------------------------------------


class IngestActor:
    """One consumer-group member; its loop starts in __init__, so a restart resumes it."""

    def __init__(self, settings: Settings, scorer: ScoreBatch, index: int = 0) -> None:
        logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        self.settings = settings
        self.scorer = scorer
        self.index = index
        self.worker: IngestWorker | None = None
        self._stop = threading.Event()
        self._deadline: float | None = None
        self._thread = threading.Thread(target=self._run, name=f"ingest-{index}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        # What the first batch needs (features.schema brings pandas; the scorer Ray
        # Serve), imported before joining the group: py-spy found the first batch
        # spending 2-5 s of CPU importing them, with its partitions waiting.
        import features.schema  # noqa: F401
        import ray.serve  # noqa: F401

        from cluster.dev import broker_epoch, kafka_bootstrap
        from cluster.metrics import IngestMetrics
        from cluster.producer import KafkaSender

        attempt = 0
        metrics = IngestMetrics(self.settings.kafka_topic, self.settings.kafka_consumer_group)
        while not self._stop.is_set():
            publisher = None
            try:
                bootstrap = kafka_bootstrap(self.settings)
                publisher = KafkaSender(bootstrap, timeout_s=30.0)
                backoff = Backoff(stop_deadline=lambda: self._deadline,
                                  on_wait=lambda what, n: metrics.set_backlog(processor.pending_rows))
                processor = BatchProcessor(self.settings, self.scorer, audit_store(self.settings),
                                           publisher, backoff, epoch=lambda: broker_epoch(self.settings))
                consumer = make_consumer(self.settings, bootstrap, client_id=f"fraud-ingest-{self.index}",
                                         before_revoke=lambda: self.worker.before_rebalance())
                self.worker = IngestWorker(self.settings, consumer, processor, metrics)
                self.worker.run(self._stop)
            except Exception:
                wait = Backoff().delay(attempt)
                log.exception("ingestion loop %d failed; starting again in %.1fs", self.index, wait)
                attempt += 1
                self._stop.wait(wait)
            finally:
                if publisher is not None:
                    publisher.close()

    def ready(self) -> bool:
        return self._thread.is_alive()

    def stats(self) -> dict[str, Any]:
        totals = dict(self.worker.totals) if self.worker else {}
        seconds = {k: round(v, 3) for k, v in self.worker.seconds.items()} if self.worker else {}
        return {"index": self.index, "running": self._thread.is_alive(), **totals, "seconds": seconds}

    def stop(self, timeout_s: float = 30.0) -> dict[str, Any]:
        """Finish the batch in flight, commit it, close; give up a retrying batch after timeout_s."""
        self._deadline = time.monotonic() + timeout_s
        self._stop.set()
        self._thread.join(timeout_s + 10)
        return self.stats()


@dataclass
class Ingestion:
    """The running ingestion actors (what `start_ingestion` returns)."""

    actors: list[Any]
    settings: Settings

    def stats(self, timeout_s: float = 10.0) -> list[dict[str, Any]]:
        import ray

        out = []
        for actor in self.actors:
            try:
                out.append(ray.get(actor.stats.remote(), timeout=timeout_s))
            except Exception as exc:
                out.append({"error": f"{type(exc).__name__}: {exc}"})
        return out


MAX_RESTARTS = 100


def start_ingestion(settings: Settings, app_name: str, n: int, *, scorer: ScoreBatch | None = None,
                    num_cpus: float = 0.1) -> Ingestion:
    """Start n ingestion actors in one consumer group, scoring through `app_name`."""
    import ray

    from cluster.dev import kafka_bootstrap
    from cluster.producer import ensure_topics

    ensure_topics(kafka_bootstrap(settings), [settings.kafka_topic, settings.kafka_dead_letter_topic,
                                              settings.kafka_alerts_topic])
    remote = ray.remote(IngestActor).options(
        max_restarts=MAX_RESTARTS, max_task_retries=3, num_cpus=num_cpus, max_concurrency=4)
    scorer = scorer or ServeScorer(app_name)
    actors = [remote.remote(settings, scorer, i) for i in range(n)]
    ray.get([a.ready.remote() for a in actors])
    return Ingestion(actors=actors, settings=settings)


def stop_ingestion(ingestion: Ingestion, timeout_s: float = 30.0) -> list[dict[str, Any]]:
    """Graceful stop: every actor finishes and commits its batch, then is killed for good."""
    import ray

    refs = [a.stop.remote(timeout_s) for a in ingestion.actors]
    stats = []
    for actor, ref in zip(ingestion.actors, refs, strict=True):
        try:
            stats.append(ray.get(ref, timeout=timeout_s + 20))
        except Exception as exc:
            stats.append({"error": f"{type(exc).__name__}: {exc}"})
        ray.kill(actor, no_restart=True)
    return stats


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m cluster.ingest",
        description="Run Kafka ingestion actors on the running Ray cluster until Ctrl-C.")
    parser.add_argument("--actors", type=int, default=None, help="consumer actors (default: settings.ingest_actors)")
    parser.add_argument("--app", default=SCORING_APP, help="scoring application name (default: %(default)s)")
    parser.add_argument("--stop-timeout", type=float, default=30.0,
                        help="seconds a stopping actor may spend finishing its batch")
    args = parser.parse_args(argv)
    from configs.settings import get_settings

    settings = get_settings()
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import ray

    app_name = args.app
    n = settings.ingest_actors if args.actors is None else args.actors
    ray.init(address="auto", log_to_driver=False)
    ingestion = start_ingestion(settings, app_name, n)
    log.info("%d ingestion actors consume %s as group %s; Ctrl-C stops them", n,
             settings.kafka_topic, settings.kafka_consumer_group)
    done = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: done.set())
    while not done.wait(10.0):
        totals = ingestion.stats()
        log.info("scored %d, skipped %d, dead letters %d",
                 *(sum(s.get(k, 0) for s in totals) for k in ("scored", "skipped", "dead_letters")))
    log.info("stopping: finishing and committing in-flight batches")
    for s in stop_ingestion(ingestion, args.stop_timeout):
        log.info("actor stopped: %s", s)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
