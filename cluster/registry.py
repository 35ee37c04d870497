"""The model registry: versions, their artifacts and metrics, and which one is active.

The database enforces at most one active version; every activation is kept in
`model_activations` with who did it and what was active before.

An activation first loads the version's artifact as a replica would (sha256,
feature-set version, arrays) and refuses with a ConflictError (409) naming the
problem, changing nothing. Activations are serialised by a PostgreSQL advisory
lock; one that had to wait for another is refused (409) if the other changed the
active version meanwhile, and succeeds if the other activated the same version.

A version's artifact is named by a URI in the model store (`artifact_uri`, see
`scoring.store`); rows registered before the store existed have a plain path,
which is a file:// URI. Every load goes through this node's cache and checks the
registered sha256.
"""

from __future__ import annotations

import getpass
import logging
import socket
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, func, select, text, update
from sqlalchemy.exc import IntegrityError as SQLIntegrityError
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from cluster.store.models import ModelActivation, ModelVersion
from configs.errors import (
    ConflictError,
    FraudScoringError,
    IntegrityError,
    InvalidInputError,
    ModelUnavailableError,
    ModelVersionMismatchError,
    NotFoundError,
)
from configs.settings import get_settings
from features.definitions import FEATURE_SET_VERSION
from scoring.forest import CompiledForest
from scoring.store import load_model_from_store, local_path, normalize_uri

log = logging.getLogger(__name__)

# Any fixed 64-bit key: every process that activates takes the same lock.
_ACTIVATION_LOCK_KEY = 0x5C0_12E_AC71
# How long an activation waits for a concurrent one (whose artifact check takes
# a moment) before giving up with a 409.
ACTIVATION_LOCK_TIMEOUT_MS = 30_000


def new_version_id(now: datetime | None = None) -> str:
    """Sortable, unique enough for a registry: `v20261125-140512-123456`."""
    now = now or datetime.now(UTC)
    return now.strftime("v%Y%m%d-%H%M%S-%f")


def default_actor() -> str:
    return f"{getpass.getuser()}@{socket.gethostname()}"


def artifact_uri_of(row: dict[str, Any]) -> str:
    """The artifact's URI; a row from before the model store has its local path only."""
    return row.get("artifact_uri") or normalize_uri(row["artifact_path"])


def load_artifact(row: dict[str, Any], cache_dir: Path | None = None) -> CompiledForest:
    """The compiled forest of a registry row, read through this node's cache
    (`cache_dir`, default the settings' `model_cache_path`) and checked against the
    row's sha256 and the running code's feature-set version.

    Raises the model's errors (ModelUnavailableError and its subclasses) with a
    message naming the version and the problem but no file path (it reaches API
    clients); the full cause is logged.
    """
    version = row["version"]
    if row["feature_set_version"] != FEATURE_SET_VERSION:
        raise ModelVersionMismatchError(
            f"model {version} was trained for feature set {row['feature_set_version']} but the "
            f"code computes {FEATURE_SET_VERSION}: retrain it, or deploy the code it was trained with")
    try:
        return load_model_from_store(
            artifact_uri_of(row), sha256=row["artifact_sha256"], feature_set_version=FEATURE_SET_VERSION,
            cache_dir=cache_dir or get_settings().model_cache_path)
    except (FraudScoringError, OSError) as exc:
        log.warning("model %s cannot be loaded: %s", version, exc)
        if isinstance(exc, IntegrityError):
            raise IntegrityError(
                f"model {version}: its artifact's sha256 differs from the registered one "
                "(the files were changed or replaced after registration)") from exc
        if isinstance(exc, ModelVersionMismatchError):
            raise ModelVersionMismatchError(
                f"model {version}: its artifact's feature set is not {FEATURE_SET_VERSION}, "
                "the one its registry entry and the code name") from exc
        if isinstance(exc, InvalidInputError) or isinstance(exc.__cause__, InvalidInputError):
            raise ModelUnavailableError(f"model {version}: its artifact's tree arrays are inconsistent") from exc
        raise ModelUnavailableError(f"model {version}: its artifact is missing, unreadable or malformed") from exc


class ModelRegistry:
    """`check_artifact(row)` runs before an activation and raises when the version
    must not be served; the default loads the artifact (`load_artifact`)."""

    def __init__(self, engine: Engine, check_artifact: Callable[[dict[str, Any]], object] = load_artifact):
        self.engine = engine
        self.check_artifact = check_artifact

    def register(self, *, version: str, parameters: dict[str, Any], feature_set_version: str,
                 data_fingerprint: str, metrics: dict[str, Any], artifact_sha256: str,
                 artifact_uri: str | None = None, artifact_path: str | None = None) -> dict[str, Any]:
        """Registers a candidate version whose artifact is at `artifact_uri` (a URI in the
        model store, or a plain path). `artifact_path` is the older name of a local one."""
        uri = artifact_uri or artifact_path
        if not uri:
            raise InvalidInputError("artifact_uri: the stored artifact's URI is required")
        uri = normalize_uri(uri)
        with Session(self.engine) as session, session.begin():
            row = ModelVersion(
                version=version, parameters=parameters, feature_set_version=feature_set_version,
                data_fingerprint=data_fingerprint, metrics=metrics, artifact_uri=uri,
                # kept for code older than migration 0003, which reads local paths only
                artifact_path=str(local_path(uri)) if uri.startswith("file://") else None,
                artifact_sha256=artifact_sha256, status="candidate",
            )
            session.add(row)
            session.flush()
            return _as_dict(row)

    def activate(self, version: str, activated_by: str | None = None) -> dict[str, Any]:
        """Make `version` the active one; the previous active version is retired.

        Raises NotFoundError (404) for an unknown version and ConflictError (409)
        when its artifact cannot be served or a concurrent activation changed the
        active version first; nothing changes then. Activating the active version
        again succeeds and changes nothing.
        """
        _check_version(version)
        try:
            with Session(self.engine) as session, session.begin():
                return self._activate(session, version, activated_by)
        except SQLIntegrityError as exc:
            # Only an activation that skipped the lock (older code) can get here.
            raise ConflictError(
                f"model {version} was not activated: another version was activated at the same "
                "time; look at GET /models and try again if it is still wanted") from exc
        except OperationalError as exc:
            if getattr(exc.orig, "pgcode", None) != "55P03":  # lock_not_available
                raise
            raise ConflictError(
                f"model {version} was not activated: another activation still held the registry "
                f"after {ACTIVATION_LOCK_TIMEOUT_MS / 1000:.0f}s; try again") from exc

    def _activate(self, session: Session, version: str, activated_by: str | None) -> dict[str, Any]:
        if not session.scalar(select(func.pg_try_advisory_xact_lock(_ACTIVATION_LOCK_KEY))):
            # Another activation runs: what it is activating becomes visible when it commits.
            seen = self._active_row(session)
            seen_version = seen.version if seen is not None else None
            session.execute(text(f"SET LOCAL lock_timeout = {int(ACTIVATION_LOCK_TIMEOUT_MS)}"))
            session.execute(select(func.pg_advisory_xact_lock(_ACTIVATION_LOCK_KEY)))
            now = self._active_row(session)
            now_version = now.version if now is not None else None
            if now_version != seen_version and now_version != version:
                raise ConflictError(
                    f"model {version} was not activated: a concurrent activation made {now_version} "
                    f"active while this one waited; activate {version} again if it is still wanted")
        target = session.get(ModelVersion, version, populate_existing=True)
        if target is None:
            raise NotFoundError(f"model version {version!r} is not registered")
        previous = self._active_row(session)
        if previous is not None and previous.version == version:
            return _as_dict(target)
        try:
            self.check_artifact(_as_dict(target))
        except FraudScoringError as exc:
            raise ConflictError(
                f"{exc}; model {version} was not activated and "
                f"{previous.version if previous else 'no version'} stays active") from exc
        if previous is not None:
            session.execute(
                update(ModelVersion).where(ModelVersion.version == previous.version).values(status="retired")
            )
            session.flush()
        target.status = "active"
        session.add(ModelActivation(
            version=version,
            previous_version=previous.version if previous else None,
            activated_by=activated_by or default_actor(),
        ))
        session.flush()
        return _as_dict(target)

    @staticmethod
    def _active_row(session: Session) -> ModelVersion | None:
        # populate_existing: a later read in the same session must see a concurrent commit
        return session.execute(
            select(ModelVersion).where(ModelVersion.status == "active")
            .execution_options(populate_existing=True)
        ).scalar_one_or_none()

    def active(self) -> dict[str, Any] | None:
        with Session(self.engine) as session:
            row = session.execute(select(ModelVersion).where(ModelVersion.status == "active")).scalar_one_or_none()
            return None if row is None else _as_dict(row)

    def get(self, version: str) -> dict[str, Any]:
        _check_version(version)
        with Session(self.engine) as session:
            row = session.get(ModelVersion, version)
            if row is None:
                raise NotFoundError(f"model version {version!r} is not registered")
            return _as_dict(row)

    def list(self) -> list[dict[str, Any]]:
        with Session(self.engine) as session:
            rows = session.execute(select(ModelVersion).order_by(ModelVersion.created_at.desc())).scalars()
            return [_as_dict(r) for r in rows]

    def history(self) -> list[dict[str, Any]]:
        with Session(self.engine) as session:
            rows = session.execute(select(ModelActivation).order_by(ModelActivation.id.desc())).scalars()
            return [
                {"version": r.version, "previous_version": r.previous_version,
                 "activated_by": r.activated_by, "activated_at": r.activated_at}
                for r in rows
            ]


def _check_version(version: str) -> None:
    # PostgreSQL refuses NUL in text; the column holds 64 characters.
    if not 0 < len(version) <= 64 or "\x00" in version:
        raise InvalidInputError("version: expected 1 to 64 characters without NUL")


def _as_dict(row: ModelVersion) -> dict[str, Any]:
    return {c.name: getattr(row, c.name) for c in ModelVersion.__table__.columns}
