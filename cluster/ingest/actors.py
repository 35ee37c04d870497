"""The ingestion actors on Ray, their Kafka consumer and the scorer they call:
`start_ingestion` and `stop_ingestion`."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from cluster.ingest.batch import BatchProcessor, ScoreBatch
from cluster.ingest.retry import Backoff
from cluster.ingest.worker import IngestWorker
from configs.settings import Settings

log = logging.getLogger(__name__)

# The Serve application the actors score through; deployments.app deploys it under this name.
SCORING_APP = "fraud-scoring"
SESSION_TIMEOUT_MS = 6_000
HEARTBEAT_INTERVAL_MS = 1_000
MAX_POLL_INTERVAL_MS = 120_000
SCORE_TIMEOUT_S = 120.0


def audit_store(settings: Settings) -> Any:
    """The audit repository; the database URL is resolved on every call, so that a
    restarted embedded PostgreSQL is found whatever port it came back on."""
    from cluster.dev.records import database_url
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

        from cluster.dev.records import broker_epoch, kafka_bootstrap
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

    from cluster.dev.records import kafka_bootstrap
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
