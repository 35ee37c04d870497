"""Retrying: which failures are transient (retried without limit) and the backoff."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from configs.errors import FraudScoringError

log = logging.getLogger(__name__)

BACKOFF_INITIAL_S = 0.1
BACKOFF_MAX_S = 5.0


class BatchAbandoned(Exception):
    """A stop was requested while a batch was still waiting on a retry."""


def is_transient(exc: BaseException) -> bool:
    """A failure worth retrying without limit: the database, the broker or the scoring
    application is unreachable, restarting or full. Anything else may be caused by a
    message itself, so the loop retries it a bounded number of times (`MAX_ATTEMPTS`)."""
    import ray.exceptions as ray_errors
    import ray.serve.exceptions as serve_errors

    from cluster.store.audit import database_unavailable

    if database_unavailable(exc) or isinstance(exc, ConnectionError | TimeoutError):
        return True
    if isinstance(exc, FraudScoringError):  # 503s: no model yet, state not ready, backpressure
        return exc.status_code >= 500
    if isinstance(exc, ray_errors.RayTaskError):  # judged by what the replica raised
        cause = getattr(exc, "cause", None)
        return cause is not None and is_transient(cause)
    if isinstance(exc, ray_errors.RayActorError | ray_errors.ActorUnavailableError | ray_errors.GetTimeoutError
                  | ray_errors.ObjectLostError | ray_errors.RaySystemError | ray_errors.NodeDiedError
                  | serve_errors.BackPressureError | serve_errors.DeploymentUnavailableError
                  | serve_errors.ReplicaUnavailableError):
        return True
    try:
        from kafka.errors import KafkaError

        if isinstance(exc, KafkaError) and getattr(exc, "retriable", False):
            return True
    except ImportError:  # pragma: no cover
        pass
    return False


class Backoff:
    """Exponential backoff that gives up only when a stop deadline has passed."""

    def __init__(self, sleep: Callable[[float], None] = time.sleep,
                 stop_deadline: Callable[[], float | None] = lambda: None,
                 initial_s: float = BACKOFF_INITIAL_S, max_s: float = BACKOFF_MAX_S,
                 on_wait: Callable[[str, int], None] | None = None) -> None:
        self.sleep, self.stop_deadline = sleep, stop_deadline
        self.initial_s, self.max_s = initial_s, max_s
        self.on_wait = on_wait

    def delay(self, attempt: int) -> float:
        return min(self.initial_s * 2 ** attempt, self.max_s)

    def retry(self, what: str, fn: Callable[..., Any], *args: Any) -> Any:
        """Call fn until it succeeds or fails with a non-transient error."""
        attempt = 0
        while True:
            try:
                return fn(*args)
            except Exception as exc:
                if not is_transient(exc):
                    raise
                deadline = self.stop_deadline()
                if deadline is not None and time.monotonic() >= deadline:
                    raise BatchAbandoned(f"{what}: stopping while it still fails ({exc})") from exc
                wait = self.delay(attempt)
                log.warning("%s failed (%s: %s); retry %d in %.1fs", what, type(exc).__name__,
                            str(exc).splitlines()[0] if str(exc) else "", attempt + 1, wait)
                if self.on_wait is not None:
                    self.on_wait(what, attempt)
                self.sleep(wait)
                attempt += 1
