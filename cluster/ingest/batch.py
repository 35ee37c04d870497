"""One polled batch through its steps: decode, look up, send, receive, record.

The scoring application, the audit store and the publisher are seams (`ScoreBatch`,
`AuditStore`, `Publisher`), so the steps run against hand-written fakes in unit tests.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import orjson

from cluster.ingest.retry import Backoff
from configs.errors import InvalidInputError
from configs.settings import Settings

log = logging.getLogger(__name__)

# One call per batch: validated transaction dicts in, one result per transaction
# out, in the same order (see deployments.ingress `score_for_ingest`).
ScoreBatch = Callable[[list[dict[str, Any]]], list[dict[str, Any]]]

SOURCE = "kafka"


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


class AuditStore(Protocol):
    def payload_hashes(self, transaction_ids: Iterable[str]) -> dict[str, str]: ...
    def write_decisions(self, rows: Sequence[dict[str, Any]]) -> Any: ...
    def write_dead_letters(self, rows: Sequence[dict[str, Any]]) -> Any: ...


class Publisher(Protocol):
    def send(self, topic: str, key: bytes | None, value: bytes) -> None: ...
    def flush(self) -> None: ...


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
