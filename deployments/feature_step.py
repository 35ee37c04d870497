"""Feature step: point-in-time features from the online state.

`online_state: in_process` (the default, one replica): the replica holds the
whole state in its own process (`InProcessFeatureStore`). Every caller reaches
it through this deployment, the API's requests and the Kafka ingestion actors'
batches alike (they call the scoring application), so all of them see the same
counts, and a request pays no Ray actor round trip for it. A replica refuses
to start in this mode when the deployment may run more than one: each would
count only what it saw.

`online_state: actors`: the replicas, however many, share the state actors
(`OnlineFeatureStore`), two actor calls a batch.

Either way a replica rebuilds (or finds) the state before taking traffic, and
`CATCH_UP_AFTER_S` later records what a replica it replaced recorded meanwhile.
One call carries a whole batch.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Literal

import numpy as np
from ray import serve

from cluster.dev import database_url
from configs.settings import get_settings
from features.definitions import FEATURE_NAMES
from features.online import (
    READY_WAIT_SECONDS,
    AuditHistoryLoader,
    EventColumns,
    InProcessFeatureStore,
    OnlineFeatureStore,
    StateNotReadyError,
)

log = logging.getLogger("ray.serve")

StateMode = Literal["in_process", "actors"]
# A replica that replaces another (a redeploy, a switch of `online_state`) rebuilt
# from the audit while the other may still have been recording into a state of its
# own: once the other is surely gone (Serve's graceful shutdown takes up to 20 s by
# default), what it recorded meanwhile, audited by now, is recorded here too.
CATCH_UP_AFTER_S = 30.0


def _refuse_several_replicas() -> None:
    """An in-process state is the system's only while one replica holds it."""
    context = serve.get_replica_context()
    config = context._deployment_config  # Serve has no public view of autoscaling here
    autoscaling = config.autoscaling_config
    most = autoscaling.max_replicas if autoscaling is not None else context.world_size
    if most != 1:
        raise RuntimeError(
            f"FeatureStep may run {most} replicas, but online_state is in_process: each replica "
            "would count only the events it saw. Set `online_state: actors` in the scoring "
            "application's args (serve_config.yaml) to share the state actors, or run one replica")


@serve.deployment(ray_actor_options={"num_cpus": 0.1}, max_ongoing_requests=64,
                  health_check_period_s=10)
class FeatureStep:
    async def __init__(self, state: StateMode = "in_process", warm_sample: str | None = None) -> None:
        settings = get_settings()
        # Resolved at start, not first in the rebuild: on a Ray worker node without
        # DATABASE_URL this raises naming the setting (the state could never load).
        database_url(settings)
        loader = AuditHistoryLoader(database_url)
        if state == "in_process":
            _refuse_several_replicas()
            self.store: InProcessFeatureStore | OnlineFeatureStore = InProcessFeatureStore(settings, loader=loader)
        else:
            self.store = OnlineFeatureStore.connect(settings, loader=loader)
        # Take traffic once rebuilt, so that a replacement replica never answers from a
        # half-loaded state while the old one still could; but not forever: with the
        # database down, calls answer 503 (StateNotReadyError) until it is back.
        try:
            await asyncio.to_thread(self.store.wait_ready, READY_WAIT_SECONDS)
        except StateNotReadyError as exc:
            log.warning("starting before the online state is ready: %s", exc)
        else:
            if warm_sample:
                from deployments.bootstrap import warm_state

                await asyncio.to_thread(warm_state, self.store, warm_sample)
        self._catch_up = asyncio.get_running_loop().create_task(self._catch_up_later())

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

    async def _catch_up_later(self) -> None:
        await asyncio.sleep(CATCH_UP_AFTER_S)
        while True:
            try:
                await asyncio.to_thread(self.store.catch_up)
                return
            except Exception as exc:  # noqa: BLE001 - the database down: retried, never fatal
                log.warning("online state catch-up failed (retrying in %.0fs): %s", CATCH_UP_AFTER_S, exc)
                await asyncio.sleep(CATCH_UP_AFTER_S)
