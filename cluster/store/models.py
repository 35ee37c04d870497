"""SQLAlchemy 2.0 models of everything the system keeps in PostgreSQL.

Feature values and explanations are JSONB, so these tables do not change
when the feature set does; the feature-set version is stored beside them.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class Base(DeclarativeBase):
    pass


class _ScoreColumns:
    """What every stored score carries, live or backfilled."""

    user_id: Mapped[str] = mapped_column(String(64))
    amount: Mapped[float] = mapped_column(Float)
    merchant: Mapped[str] = mapped_column(String(64))
    country: Mapped[str] = mapped_column(String(2))
    event_time: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    features: Mapped[dict[str, Any]] = mapped_column(JSONB)
    feature_set_version: Mapped[str] = mapped_column(String(64))
    risk_score: Mapped[float] = mapped_column(Float)
    threshold: Mapped[float] = mapped_column(Float)
    anomaly: Mapped[bool] = mapped_column(Boolean)
    explanation: Mapped[dict[str, Any]] = mapped_column(JSONB)
    model_version: Mapped[str] = mapped_column(String(64))
    scored_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class AuditDecision(_ScoreColumns, Base):
    """One live decision per transaction: the compliance record."""

    __tablename__ = "audit_decisions"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    transaction_id: Mapped[str] = mapped_column(String(128), unique=True)
    # sha256 of the canonical payload: the same id with another payload is a conflict.
    payload_hash: Mapped[str] = mapped_column(String(64))
    reasons: Mapped[list[str]] = mapped_column(JSONB, default=list)
    source: Mapped[str] = mapped_column(String(8))
    kafka_topic: Mapped[str | None] = mapped_column(String(255))
    kafka_partition: Mapped[int | None] = mapped_column(Integer)
    kafka_offset: Mapped[int | None] = mapped_column(BigInteger)

    __table_args__ = (
        CheckConstraint("source IN ('api', 'kafka')", name="ck_audit_source"),
        Index("ix_audit_event_time", "event_time"),
        Index("ix_audit_user_time", "user_id", "event_time"),
        Index("ix_audit_scored_at", "scored_at"),
        Index("ix_audit_anomaly_scored_at", "anomaly", "scored_at"),
    )


class BackfillScore(_ScoreColumns, Base):
    """Scores of history by a given model; never overwrites a live decision."""

    __tablename__ = "backfill_scores"

    transaction_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    model_version: Mapped[str] = mapped_column(String(64), primary_key=True)


class DeadLetter(Base):
    """A message or request that could not be scored, with why and where from."""

    __tablename__ = "dead_letters"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    # Text safe to store and show: invalid UTF-8 as backslash escapes, NUL as \x00.
    payload: Mapped[str] = mapped_column(Text)
    # The exact bytes received, kept only when `payload` is not exactly them (what a
    # replay sends); NULL means `payload` encoded as UTF-8 is the original.
    payload_raw: Mapped[bytes | None] = mapped_column(LargeBinary)
    reason: Mapped[str] = mapped_column(Text)
    source: Mapped[str] = mapped_column(String(16))
    # `topic[partition]@offset` for Kafka; unique so that a redelivery is recorded once.
    position: Mapped[str | None] = mapped_column(String(300), unique=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    replayed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))

    __table_args__ = (Index("ix_dead_letters_created_at", "created_at"),)


class ModelVersion(Base):
    """The model registry: one row per trained version."""

    __tablename__ = "model_registry"

    version: Mapped[str] = mapped_column(String(64), primary_key=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    parameters: Mapped[dict[str, Any]] = mapped_column(JSONB)
    feature_set_version: Mapped[str] = mapped_column(String(64))
    data_fingerprint: Mapped[str] = mapped_column(String(64))
    metrics: Mapped[dict[str, Any]] = mapped_column(JSONB)
    # The artifact's folder in the model store (scoring.store), e.g. s3://bucket/models/<version>.
    artifact_uri: Mapped[str] = mapped_column(Text)
    # Deprecated: the local folder of a file:// artifact, for code older than migration 0003.
    artifact_path: Mapped[str | None] = mapped_column(Text)
    artifact_sha256: Mapped[str] = mapped_column(String(64))
    status: Mapped[str] = mapped_column(String(16), default="candidate")

    __table_args__ = (
        CheckConstraint("status IN ('candidate', 'active', 'retired')", name="ck_model_status"),
        # At most one active version, enforced by the database.
        Index("ux_model_one_active", "status", unique=True,
              postgresql_where=text("status = 'active'")),
    )


class ModelActivation(Base):
    """Who activated which version when, and what was active before."""

    __tablename__ = "model_activations"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    version: Mapped[str] = mapped_column(ForeignKey("model_registry.version"))
    previous_version: Mapped[str | None] = mapped_column(String(64))
    activated_by: Mapped[str] = mapped_column(String(128))
    activated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
