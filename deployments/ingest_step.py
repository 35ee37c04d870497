"""Runs the Kafka ingestion actors as part of `serve run`, with a status route."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI
from ray import serve

from configs.settings import get_settings

log = logging.getLogger("ray.serve")

status_app = FastAPI(title="Ingestion status")


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

    @status_app.get("/status")
    async def status(self) -> dict[str, Any]:
        from cluster.metrics import operational_summary

        return {"enabled": self.enabled} | operational_summary(get_settings())

    def __del__(self) -> None:
        if self.ingestion is not None:
            from cluster.ingest import stop_ingestion

            stop_ingestion(self.ingestion)
