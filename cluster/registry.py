"""The model registry: versions, their artifacts and metrics, and which one is active.

The database enforces at most one active version; every activation is kept in
`model_activations` with who did it and what was active before.
"""

from __future__ import annotations

import getpass
import socket
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Engine, select, update
from sqlalchemy.orm import Session

from cluster.store.models import ModelActivation, ModelVersion
from configs.errors import NotFoundError


def new_version_id(now: datetime | None = None) -> str:
    """Sortable, unique enough for a registry: `v20261125-140512-123456`."""
    now = now or datetime.now(UTC)
    return now.strftime("v%Y%m%d-%H%M%S-%f")


def default_actor() -> str:
    return f"{getpass.getuser()}@{socket.gethostname()}"


class ModelRegistry:
    def __init__(self, engine: Engine):
        self.engine = engine

    def register(self, *, version: str, parameters: dict[str, Any], feature_set_version: str,
                 data_fingerprint: str, metrics: dict[str, Any], artifact_path: str,
                 artifact_sha256: str) -> dict[str, Any]:
        with Session(self.engine) as session, session.begin():
            row = ModelVersion(
                version=version, parameters=parameters, feature_set_version=feature_set_version,
                data_fingerprint=data_fingerprint, metrics=metrics, artifact_path=artifact_path,
                artifact_sha256=artifact_sha256, status="candidate",
            )
            session.add(row)
            session.flush()
            return _as_dict(row)

    def activate(self, version: str, activated_by: str | None = None) -> dict[str, Any]:
        """Make `version` the active one; the previous active version is retired."""
        with Session(self.engine) as session, session.begin():
            # Lock the registry rows so that two activations cannot interleave.
            target = session.execute(
                select(ModelVersion).where(ModelVersion.version == version).with_for_update()
            ).scalar_one_or_none()
            if target is None:
                raise NotFoundError(f"model version {version!r} is not registered")
            previous = session.execute(
                select(ModelVersion).where(ModelVersion.status == "active").with_for_update()
            ).scalar_one_or_none()
            if previous is not None and previous.version == version:
                return _as_dict(target)
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

    def active(self) -> dict[str, Any] | None:
        with Session(self.engine) as session:
            row = session.execute(select(ModelVersion).where(ModelVersion.status == "active")).scalar_one_or_none()
            return None if row is None else _as_dict(row)

    def get(self, version: str) -> dict[str, Any]:
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


def _as_dict(row: ModelVersion) -> dict[str, Any]:
    return {c.name: getattr(row, c.name) for c in ModelVersion.__table__.columns}
