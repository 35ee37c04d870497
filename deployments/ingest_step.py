"""Runs the Kafka ingestion actors as part of `serve run`, with a status route."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from fastapi import FastAPI
from ray import serve

from configs.settings import get_settings
from deployments.http_guard import Authorized, guard

log = logging.getLogger("ray.serve")

# A status read costs a Kafka round trip and four counts in PostgreSQL: callers
# within this many seconds share one, and it runs off the replica's event loop.
STATUS_MAX_AGE_S = 5.0

status_app = FastAPI(title="Ingestion status")
guard(status_app, lambda: get_settings().max_request_bytes)


@serve.deployment(ray_actor_options={"num_cpus": 0.05}, num_replicas=1)
@serve.ingress(status_app)
class IngestSupervisor:
    def __init__(self, app_name: str, enabled: bool, actors: int | None) -> None:
        from cluster.ingest import start_ingestion

        settings = get_settings()
        self.enabled = enabled
        self.ingestion = None
        if enabled:
            n = settings.ingest_actors if actors is None else actors
            self.ingestion = start_ingestion(settings, app_name, n)
            log.info("started %d Kafka ingestion actors on %s", n, settings.kafka_topic)
        self._status: tuple[float, dict[str, Any]] | None = None
        self._status_lock = asyncio.Lock()
        self._lag_reader = None

    @status_app.get("/status", dependencies=[Authorized])
    async def status(self) -> dict[str, Any]:
        async with self._status_lock:  # concurrent callers wait for one read
            if self._status is None or time.monotonic() - self._status[0] > STATUS_MAX_AGE_S:
                self._status = (time.monotonic(), await asyncio.to_thread(self._read_status))
        return self._status[1]

    def _read_status(self) -> dict[str, Any]:
        from cluster.dev import kafka_bootstrap
        from cluster.metrics import LagReader, operational_summary

        settings = get_settings()
        if self._lag_reader is None:
            self._lag_reader = LagReader(kafka_bootstrap(settings), settings.kafka_topic,
                                         settings.kafka_consumer_group)
        return {"enabled": self.enabled} | operational_summary(settings, self._lag_reader)

    def __del__(self) -> None:
        if getattr(self, "_lag_reader", None) is not None:
            self._lag_reader.close()
        if self.ingestion is not None:
            from cluster.ingest import stop_ingestion

            stop_ingestion(self.ingestion)
