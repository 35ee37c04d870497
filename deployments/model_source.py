"""Which model version to serve, and loading its artifact, shared by the model and SHAP steps.

A version that cannot be loaded (artifact changed, missing, or for another
feature set) never stops a replica: it keeps the model it has, or at start the
newest previously active version that loads, and says which version failed and
why (`LoadFailure`). A failed version is tried again after a growing delay.

Artifacts are read from the model store (`FRAUD_MODEL_STORE`, e.g. s3://) through
this node's cache under its own data directory, their sha256 checked before use
(`cluster.registry.load_artifact`, `scoring.store`): a replica on any node of
the cluster finds the model without a shared filesystem.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Literal

from cluster.registry import ModelRegistry, load_artifact
from cluster.store.db import get_engine
from configs.errors import FraudScoringError, ModelUnavailableError
from configs.settings import get_settings

log = logging.getLogger("ray.serve")

NO_MODEL_HINT = (
    "no active model: train one with `python -m jobs.train --input data/sample_transactions.csv "
    "--activate` (or `ray job submit --working-dir . -- python -m jobs.train ...`)"
)
# How many earlier active versions a replica tries when the active one cannot be loaded.
MAX_FALLBACKS = 5
RETRY_MAX_S = 300.0


@dataclass(frozen=True)
class LoadFailure:
    version: str
    reason: str  # names the version and the problem; no file paths (clients see it)
    attempts: int
    retry_at: float  # time.monotonic()


class ModelSource:
    """Resolves the version to serve (pinned, or the registry's active one) and loads it.

    `kernels` says which of the forest's kernels the step calls and so compiles at
    load: on a cold numba cache (a new data directory or numba version) the model
    step then compiles for 5.8 s of CPU and the SHAP step 42.6 s, not 52.8 s each;
    "none" for a step that calls neither (the shap explainer).

    `retry_after_s` is the first delay before a version that failed to load is
    tried again; it doubles with each failure, up to RETRY_MAX_S."""

    def __init__(self, pinned_version: str | None, kernels: Literal["score", "shap", "none"],
                 registry: ModelRegistry | None = None, retry_after_s: float = 5.0):
        self.pinned_version = pinned_version
        self.kernels = kernels
        self.registry = registry or ModelRegistry(get_engine(get_settings()))
        self.retry_after_s = retry_after_s
        self.failures: dict[str, LoadFailure] = {}

    def wanted_version(self) -> str | None:
        if self.pinned_version:
            return self.pinned_version
        active = self.registry.active()
        return active["version"] if active else None

    def load(self, version: str) -> Any:
        """The compiled forest of `version`, its hash and feature-set version verified, and
        its kernels compiled: a cold numba cache costs seconds, paid here and not by a request.

        Raises ModelUnavailableError (or a subclass) naming the version and the
        problem, and remembers the failure (see `failure`)."""
        try:
            row = self.registry.get(version)
            model = load_artifact(row)
            started = time.perf_counter()
            model.warmup(score=self.kernels == "score", shap=self.kernels == "shap")
        except FraudScoringError as exc:
            self._failed(version, str(exc))
            if isinstance(exc, ModelUnavailableError):
                raise
            raise ModelUnavailableError(str(exc)) from exc
        except Exception as exc:  # anything else from numba or numpy: the replica stays up
            log.exception("model %s cannot be loaded", version)
            reason = f"model {version} cannot be loaded ({exc.__class__.__name__}; see the replica's log)"
            self._failed(version, reason)
            raise ModelUnavailableError(reason) from exc
        self.failures.pop(version, None)
        log.info("loaded model %s (feature set %s), kernels ready in %.1fs", version,
                 row["feature_set_version"], time.perf_counter() - started)
        return model

    def failure(self, version: str) -> LoadFailure | None:
        return self.failures.get(version)

    def may_try(self, version: str) -> bool:
        """False while a version that failed to load waits for its next try."""
        failure = self.failures.get(version)
        return failure is None or time.monotonic() >= failure.retry_at

    def load_best(self, wanted: str) -> tuple[str, Any] | None:
        """(version, model) for a replica that has none: `wanted`, or else the newest
        earlier active version that loads (not when a version is pinned). None when
        none loads now; `failure(wanted)` then says why. Versions waiting for their
        next try (`may_try`) are skipped."""
        tried = False
        if self.may_try(wanted):
            tried = True
            try:
                return wanted, self.load(wanted)
            except ModelUnavailableError as exc:
                log.error("%s", exc)
        if self.pinned_version:
            return None  # a pin means this version or none: requests get 503 naming it
        for version in self.fallback_versions(exclude=wanted):
            if not self.may_try(version):
                continue
            tried = True
            try:
                model = self.load(version)
            except ModelUnavailableError as exc:
                log.error("fallback: %s", exc)
                continue
            log.warning("serving model %s, active before %s, until %s can be loaded", version, wanted, wanted)
            return version, model
        if tried:
            log.error("no model can be served: neither %s nor an earlier active version can be loaded", wanted)
        return None

    def fallback_versions(self, exclude: str) -> list[str]:
        """Earlier active versions, most recently activated first, at most MAX_FALLBACKS."""
        seen = {exclude}
        versions: list[str] = []
        for entry in self.registry.history():
            for version in (entry["version"], entry["previous_version"]):
                if version and version not in seen:
                    seen.add(version)
                    versions.append(version)
        return versions[:MAX_FALLBACKS]

    def _failed(self, version: str, reason: str) -> None:
        previous = self.failures.get(version)
        attempts = previous.attempts + 1 if previous else 1
        delay = min(RETRY_MAX_S, self.retry_after_s * 2 ** (attempts - 1))
        self.failures[version] = LoadFailure(version, reason, attempts, time.monotonic() + delay)
