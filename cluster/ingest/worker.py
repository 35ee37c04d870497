"""The loop of one consumer-group member: poll, process, commit, until stopped."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from cluster.ingest.batch import Batch, BatchOutcome, BatchProcessor, Message, _describe, _Stopwatch, position
from cluster.ingest.retry import BatchAbandoned, is_transient
from configs.settings import Settings

log = logging.getLogger(__name__)

POLL_TIMEOUT_MS = 500
# Tries of a message whose failure is not transient: with its batch, then alone; then
# it becomes a dead letter, so that one bad message never stalls its partitions.
MAX_ATTEMPTS = 3


class Consumer(Protocol):
    """The part of `kafka.KafkaConsumer` the loop uses."""

    def poll(self, timeout_ms: int, max_records: int) -> dict[Any, list[Any]]: ...
    def commit(self, offsets: dict[Any, Any]) -> None: ...
    def seek(self, partition: Any, offset: int) -> None: ...
    def close(self, autocommit: bool = ...) -> None: ...


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
