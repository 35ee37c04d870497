"""Feature step: point-in-time features from the shared online state.

Holds a client of the state shards (Ray actors shared with every other replica
and the Kafka ingestion actors). One call carries a whole batch.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np
from ray import serve

from cluster.dev import database_url
from configs.settings import get_settings
from features.definitions import FEATURE_NAMES
from features.online import AuditHistoryLoader, EventColumns, OnlineFeatureStore

log = logging.getLogger("ray.serve")


@serve.deployment(ray_actor_options={"num_cpus": 0.1}, max_ongoing_requests=64,
                  health_check_period_s=10)
class FeatureStep:
    def __init__(self) -> None:
        self.store = OnlineFeatureStore.connect(get_settings(), loader=AuditHistoryLoader(database_url))

    async def compute(self, rows: EventColumns, record: list[bool]) -> dict[str, Any]:
        """Features of `rows` in input order; rows with `record` true update the state."""
        start = time.perf_counter()
        X = np.zeros((len(rows), len(FEATURE_NAMES)))
        for flag in (True, False):  # recorded rows first, so dry runs see them
            index = [i for i, r in enumerate(record) if r is flag]
            if index:
                # `index` is in order: all of it is `rows` itself (every Kafka batch), no copy
                part = rows if len(index) == len(rows) else rows.take(index)
                X[index] = await self.store.compute_async(part, record=flag)
        return {"X": X, "timings": {"features_ms": (time.perf_counter() - start) * 1e3}}

    async def ready(self) -> bool:
        return await self.store.ready_async()

    async def check_health(self) -> None:
        if not await self.store.alive_async():
            raise RuntimeError("the online feature state is unreachable")
