"""SHAP step: exact per-feature explanations with the model version that scored the batch."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from typing import Any

from ray import serve

from configs.settings import get_settings
from deployments.model_source import ModelSource
from scoring.explain import make_explainer

log = logging.getLogger("ray.serve")

_CACHED_VERSIONS = 3  # the active one, the previous one during a switch, a spare


@serve.deployment(ray_actor_options={"num_cpus": 0.2}, max_ongoing_requests=64,
                  health_check_period_s=10)
class ShapStep:
    async def __init__(self, pinned_version: str | None = None) -> None:
        self.source = ModelSource(pinned_version, kernels="shap")
        self.kind = get_settings().explainer
        self.explainers: OrderedDict[str, Any] = OrderedDict()
        self._loading = asyncio.Lock()
        # Load the version to serve before taking traffic, so no request pays for it.
        try:
            wanted = await asyncio.to_thread(self.source.wanted_version)
        except Exception as exc:  # registry unreachable: the first batch loads it
            log.warning("model registry unavailable at start: %s", exc.__class__.__name__)
            wanted = None
        if wanted is not None:
            await self._explainer(wanted)

    async def explain(self, scored: dict[str, Any]) -> dict[str, Any]:
        explainer = await self._explainer(scored["model_version"])
        start = time.perf_counter()
        # The sign convention of scoring.risk: positive pushes towards anomaly.
        explanation = -explainer.shap_values(scored["X"])
        timings = scored["timings"] | {"shap_ms": (time.perf_counter() - start) * 1e3}
        return scored | {"explanation": explanation, "timings": timings}

    async def _explainer(self, version: str) -> Any:
        if version in self.explainers:
            self.explainers.move_to_end(version)
            return self.explainers[version]
        async with self._loading:
            if version not in self.explainers:
                forest = await asyncio.to_thread(self.source.load, version)
                self.explainers[version] = make_explainer(forest, self.kind)
                while len(self.explainers) > _CACHED_VERSIONS:
                    self.explainers.popitem(last=False)
        return self.explainers[version]
