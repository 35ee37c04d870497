"""Operational figures of Kafka ingestion: Ray metrics and a one-shot summary.

The ingestion actors export, in Prometheus format through Ray's metrics agent:

- ``fraud_ingest_consumer_lag`` (gauge, messages): log end offset minus the
  actor's position, summed over its partitions;
- ``fraud_ingest_batch_latency_seconds`` (histogram): poll to offset commit;
- ``fraud_ingest_audit_backlog`` (gauge, rows): scored rows waiting for
  PostgreSQL (non-zero while the database is down);
- ``fraud_ingest_messages_total`` (counter, by ``outcome``: scored, skipped,
  dead_letter) and ``fraud_ingest_dead_letter_ratio`` (gauge over the actor's
  life), so the dead-letter rate is ``rate(...{outcome="dead_letter"}[5m])``.

`operational_summary(settings)` computes the same picture from outside, for
`python -m cluster.dev status`: committed offsets of the consumer group
against the log end offsets (the ingestion backlog), audit rows and dead
letters in PostgreSQL (count, share of handled messages, last hour), and the
rows waiting in the API's local audit spool.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from configs.settings import Settings

log = logging.getLogger(__name__)

LATENCY_BUCKETS_S = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0]
SUMMARY_TIMEOUT_MS = 5_000


class IngestMetrics:
    """Ray metrics of one ingestion actor; every method is a no-op outside Ray."""

    def __init__(self, topic: str, group: str) -> None:
        self._tags = {"topic": topic, "group": group}
        self._messages = 0
        self._dead_letters = 0
        self._enabled = False
        try:
            import ray
            from ray.util import metrics

            if not ray.is_initialized():
                return
            keys = ("topic", "group")
            self.lag = metrics.Gauge(
                "fraud_ingest_consumer_lag", "Messages behind the log end, over the actor's partitions.",
                tag_keys=keys)
            self.latency = metrics.Histogram(
                "fraud_ingest_batch_latency_seconds", "From poll to offset commit of one batch.",
                boundaries=LATENCY_BUCKETS_S, tag_keys=keys)
            self.backlog = metrics.Gauge(
                "fraud_ingest_audit_backlog", "Scored rows waiting for their audit insert.",
                tag_keys=keys)
            self.messages = metrics.Counter(
                "fraud_ingest_messages_total", "Messages handled, by outcome.",
                tag_keys=(*keys, "outcome"))
            self.dead_letter_ratio = metrics.Gauge(
                "fraud_ingest_dead_letter_ratio", "Dead letters / messages since the actor started.",
                tag_keys=keys)
            for m in (self.lag, self.latency, self.backlog, self.messages, self.dead_letter_ratio):
                m.set_default_tags(self._tags)
            self._enabled = True
        except Exception:  # metrics are never worth stopping the stream for
            log.warning("Ray metrics unavailable; ingestion continues without them", exc_info=True)

    def batch_done(self, latency_s: float, scored: int, skipped: int, dead_letters: int) -> None:
        self._messages += scored + skipped + dead_letters
        self._dead_letters += dead_letters
        if not self._enabled:
            return
        self.latency.observe(latency_s)
        for outcome, n in (("scored", scored), ("skipped", skipped), ("dead_letter", dead_letters)):
            if n:
                self.messages.inc(n, tags={"outcome": outcome})
        self.dead_letter_ratio.set(self._dead_letters / self._messages if self._messages else 0.0)

    def set_lag(self, lag: int) -> None:
        if self._enabled:
            self.lag.set(lag)

    def set_backlog(self, rows: int) -> None:
        if self._enabled:
            self.backlog.set(rows)


# --- the summary ------------------------------------------------------------------


class LagReader:
    """Reads a consumer group's lag with one long-lived client (a status endpoint
    must not open a Kafka connection per call)."""

    def __init__(self, bootstrap: str, topic: str, group: str) -> None:
        from kafka import KafkaConsumer

        self.topic, self.group = topic, group
        # A consumer with the group's id that never subscribes reads the group's
        # committed offsets (OffsetFetch) without joining it or disturbing it.
        self._consumer = KafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False,
                                       request_timeout_ms=SUMMARY_TIMEOUT_MS + 1000)

    def read(self) -> dict[str, Any]:
        """Per partition: log end offset, committed offset of the group, lag."""
        from kafka import TopicPartition

        consumer = self._consumer
        partitions = consumer.partitions_for_topic(self.topic) or set()
        tps = [TopicPartition(self.topic, p) for p in sorted(partitions)]
        committed = {tp: consumer.committed(tp, timeout_ms=SUMMARY_TIMEOUT_MS) or 0 for tp in tps}
        ends = _log_end_offsets(consumer, committed)
        per_partition = {}
        for tp in tps:
            done = committed[tp]
            end = ends.get(tp, 0)
            per_partition[tp.partition] = {"end": end, "committed": done, "lag": max(end - done, 0)}
        return {
            "topic": self.topic,
            "group": self.group,
            "partitions": per_partition,
            "lag": sum(p["lag"] for p in per_partition.values()),
        }

    def close(self) -> None:
        self._consumer.close(autocommit=False)


def consumer_lag(bootstrap: str, topic: str, group: str) -> dict[str, Any]:
    """`LagReader.read` once, with a client of its own."""
    reader = LagReader(bootstrap, topic, group)
    try:
        return reader.read()
    finally:
        reader.close()


def _log_end_offsets(consumer, committed: dict) -> dict:
    """The high watermark of each partition, as fetch responses report it.

    (The memory-only Tansu broker answers ListOffsets "latest" with the start of
    the last record batch plus one, so `end_offsets` undercounts there.) One
    record is fetched per partition, from just before the committed offset.
    """
    tps = list(committed)
    if not tps:
        return {}
    listed = consumer.end_offsets(tps, timeout_ms=SUMMARY_TIMEOUT_MS)
    consumer.assign(tps)
    consumer.resume(*tps)  # paused by the previous read of a long-lived reader
    for tp in tps:
        consumer.seek(tp, max(committed[tp] - 1, 0))
    deadline = time.monotonic() + SUMMARY_TIMEOUT_MS / 1000
    ends: dict = {}
    while len(ends) < len(tps) and time.monotonic() < deadline:
        consumer.poll(timeout_ms=200, max_records=len(tps))
        for tp in tps:
            high = consumer.highwater(tp)
            if high is not None:
                ends[tp] = high
                consumer.pause(tp)
    return {tp: max(ends.get(tp, 0), listed.get(tp, 0), committed[tp]) for tp in tps}


def operational_summary(settings: Settings, lag_reader: LagReader | None = None) -> dict[str, Any]:
    """Consumer lag, audit rows and dead letters, each part failing on its own. A
    failed part says which kind of error it met; its text (which may name hosts and
    users) goes to the log only."""
    from cluster.dev.records import database_url, kafka_bootstrap

    summary: dict[str, Any] = {"at": time.time()}
    try:
        summary["ingestion"] = (lag_reader.read() if lag_reader is not None else consumer_lag(
            kafka_bootstrap(settings), settings.kafka_topic, settings.kafka_consumer_group))
    except Exception as exc:
        log.warning("consumer lag unavailable: %s", exc)
        summary["ingestion"] = {"error": f"Kafka unavailable ({type(exc).__name__})"}
    try:
        from sqlalchemy import func, select

        from cluster.store.db import engine_for
        from cluster.store.models import AuditDecision, DeadLetter

        engine = engine_for(database_url(settings))
        with engine.connect() as conn:
            total, kafka_rows, anomalies = conn.execute(
                select(func.count(), func.count().filter(AuditDecision.source == "kafka"),
                       func.count().filter(AuditDecision.anomaly))
                .select_from(AuditDecision)).one()
            dead, pending = conn.execute(
                select(func.count(), func.count().filter(DeadLetter.replayed_at.is_(None)))
                .select_from(DeadLetter)).one()
            recent_dead = conn.execute(
                select(func.count()).select_from(DeadLetter)
                .where(DeadLetter.created_at > func.now() - func.make_interval(0, 0, 0, 0, 1))).scalar_one()
            recent_rows = conn.execute(
                select(func.count()).select_from(AuditDecision)
                .where(AuditDecision.scored_at > func.now() - func.make_interval(0, 0, 0, 0, 1))).scalar_one()
        summary["audit"] = {"rows": total, "from_kafka": kafka_rows, "anomalies": anomalies}
        handled = kafka_rows + dead
        summary["dead_letters"] = {
            "total": dead,
            "not_replayed": pending,
            "rate": dead / handled if handled else 0.0,
            "last_hour": recent_dead,
            "rate_last_hour": recent_dead / (recent_dead + recent_rows) if recent_dead + recent_rows else 0.0,
        }
    except Exception as exc:
        log.warning("audit summary unavailable: %s", exc)
        summary["audit"] = {"error": f"audit database unavailable ({type(exc).__name__})"}
    summary["audit_backlog"] = {"spooled_rows": spooled_rows(settings)}
    return summary


def spooled_rows(settings: Settings) -> int:
    """Audit rows the API accepted while PostgreSQL was down, not yet replayed."""
    total = 0
    for path in settings.spool_path.glob("*.jsonl"):
        try:
            with open(path, "rb") as f:
                total += sum(1 for line in f if line.strip())
        except OSError:
            continue
    return total
