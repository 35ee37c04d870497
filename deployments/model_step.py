"""Model step: risk scores from the compiled Isolation Forest of one model version.

Follows the registry's active version (or a pinned one), swapping models
atomically between batches; every result carries the version that scored it,
so the SHAP step explains with the same version even during a switch.

A version that cannot be loaded is never fatal: a running replica keeps its
model, a starting one serves the newest earlier active version that loads, and
`served()["load_error"]` names the version that failed and why.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from ray import serve

from configs.errors import ModelUnavailableError
from deployments.model_source import NO_MODEL_HINT, ModelSource
from scoring.risk import is_anomaly

log = logging.getLogger("ray.serve")


@serve.deployment(ray_actor_options={"num_cpus": 0.2}, max_ongoing_requests=64,
                  health_check_period_s=10)
class ModelStep:
    async def __init__(self, pinned_version: str | None = None, poll_interval_s: float = 1.0,
                       source: ModelSource | None = None) -> None:
        self.source = source or ModelSource(pinned_version, kernels="score")
        self.poll_interval_s = poll_interval_s
        self.current: tuple[str, Any] | None = None
        self.wanted: str | None = None  # the version the registry (or the pin) asks for
        self.threshold_override: dict[str, Any] | None = None
        await self._refresh()
        self._poller = asyncio.get_running_loop().create_task(self._poll())

    def reconfigure(self, config: dict[str, Any]) -> None:
        """`threshold_override: {model_version, threshold}` in risk-score units."""
        self.threshold_override = config.get("threshold_override") or None
        self._warn_if_override_ignored()

    async def score(self, batch: dict[str, Any]) -> dict[str, Any]:
        current = self.current  # one snapshot per batch: no mix of versions
        if current is None:
            raise ModelUnavailableError(self.load_error() or NO_MODEL_HINT)
        version, forest = current
        start = time.perf_counter()
        risk = forest.risk_score(batch["X"])
        threshold = self._threshold(version, forest)
        timings = batch["timings"] | {"model_ms": (time.perf_counter() - start) * 1e3}
        return batch | {
            "timings": timings,
            "risk_score": risk,
            "anomaly": is_anomaly(risk, threshold),
            "threshold": threshold,
            "model_version": version,
        }

    def model_version(self) -> str | None:
        return self.current[0] if self.current else None

    def served(self) -> dict[str, Any]:
        """The version served now and its effective threshold (None before a model exists),
        and `load_error`: why the wanted version is not the served one (None when it is)."""
        current = self.current
        error = self.load_error()
        if current is None:
            return {"model_version": None, "threshold": None, "load_error": error}
        return {"model_version": current[0], "threshold": self._threshold(*current), "load_error": error}

    def load_error(self) -> str | None:
        """Names the wanted version that cannot be loaded, the problem and what is served instead."""
        wanted, current = self.wanted, self.current
        failure = self.source.failure(wanted) if wanted else None
        if failure is None or (current is not None and current[0] == wanted):
            return None
        instead = f"still serving {current[0]}" if current else "no model is served"
        return f"{failure.reason}; {instead}"

    def check_health(self) -> None:
        if self._poller.done() and self._poller.exception() is not None:
            raise RuntimeError(f"model poller died: {self._poller.exception()!r}")

    # --- internals --------------------------------------------------------

    def _threshold(self, version: str, forest: Any) -> float:
        override = self.threshold_override
        if override and override.get("model_version") == version:
            return float(override["threshold"])
        return float(forest.threshold_)

    def _warn_if_override_ignored(self) -> None:
        override, current = self.threshold_override, self.current
        if override and current and override.get("model_version") != current[0]:
            log.warning("threshold override is for model %s but %s is served: ignored",
                        override.get("model_version"), current[0])

    async def _refresh(self) -> None:
        try:
            wanted = await asyncio.to_thread(self.source.wanted_version)
        except Exception as exc:  # registry unreachable: keep serving what we have
            log.warning("model registry unavailable: %s", exc.__class__.__name__)
            return
        self.wanted = wanted
        if wanted is None:
            if self.current is None:
                log.warning(NO_MODEL_HINT)
            return
        if self.current and self.current[0] == wanted:
            return
        if self.current is None:  # at start, or nothing could be loaded so far
            try:
                self.current = await asyncio.to_thread(self.source.load_best, wanted)
            except Exception as exc:  # registry unreachable while looking for a fallback
                log.warning("model registry unavailable: %s", exc.__class__.__name__)
            self._warn_if_override_ignored()
            return
        if not self.source.may_try(wanted):
            return
        try:
            forest = await asyncio.to_thread(self.source.load, wanted)
        except ModelUnavailableError as exc:
            log.error("%s; still serving %s", exc, self.current[0])
            return
        self.current = (wanted, forest)
        self._warn_if_override_ignored()

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self.poll_interval_s)
            try:
                await self._refresh()
            except Exception:
                log.exception("could not switch model version; still serving %s", self.model_version())
