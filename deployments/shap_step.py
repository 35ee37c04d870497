"""SHAP step: exact per-feature explanations with the model version that scored the batch.

A version that cannot be loaded never stops the replica: at start it loads what
the model step will serve (the active version, or the newest earlier active one
that loads); a request for a version that cannot be loaded gets a 503 naming it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from typing import Any

from ray import serve

from configs.errors import ModelUnavailableError
from configs.settings import get_settings
from deployments.model_source import ModelSource
from scoring.explain import make_explainer

log = logging.getLogger("ray.serve")

_CACHED_VERSIONS = 3  # the active one, the previous one during a switch, a spare


@serve.deployment(ray_actor_options={"num_cpus": 0.2}, max_ongoing_requests=64,
                  health_check_period_s=10)
class ShapStep:
    async def __init__(self, pinned_version: str | None = None, source: ModelSource | None = None) -> None:
        self.kind = get_settings().explainer
        # shap walks the trees itself: only the compiled explainer needs its kernels compiled
        self.source = source or ModelSource(pinned_version, kernels="shap" if self.kind == "compiled" else "none")
        self.explainers: OrderedDict[str, Any] = OrderedDict()
        self._loading = asyncio.Lock()
        # Load the version to serve before taking traffic, so no request pays for it.
        try:
            wanted = await asyncio.to_thread(self.source.wanted_version)
            loaded = None if wanted is None else await asyncio.to_thread(self.source.load_best, wanted)
        except Exception as exc:  # registry unreachable: the first batch loads it
            log.warning("model registry unavailable at start: %s", exc.__class__.__name__)
            loaded = None
        if loaded is not None:
            try:
                self._keep(loaded[0], await asyncio.to_thread(self._make_explainer, *loaded))
            except ModelUnavailableError as exc:
                log.error("%s", exc)

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
                if not self.source.may_try(version):  # failed a moment ago: answer at once
                    raise ModelUnavailableError(self.source.failure(version).reason)
                forest = await asyncio.to_thread(self.source.load, version)
                self._keep(version, await asyncio.to_thread(self._make_explainer, version, forest))
        return self.explainers[version]

    def _make_explainer(self, version: str, forest: Any) -> Any:
        try:
            return make_explainer(forest, self.kind)
        except Exception as exc:  # e.g. shap missing: a 503 naming it, not a replica crash
            log.exception("cannot build the %s explainer of model %s", self.kind, version)
            raise ModelUnavailableError(
                f"model {version}: the {self.kind!r} explainer cannot be built ({exc.__class__.__name__})"
            ) from exc

    def _keep(self, version: str, explainer: Any) -> None:
        self.explainers[version] = explainer
        while len(self.explainers) > _CACHED_VERSIONS:
            self.explainers.popitem(last=False)
