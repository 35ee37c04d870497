"""Engines, one per database URL and process."""

from __future__ import annotations

import functools

from sqlalchemy import Engine, create_engine

from configs.settings import Settings


@functools.cache
def engine_for(url: str) -> Engine:
    # pre_ping: a replica must survive a PostgreSQL restart without stale connections.
    return create_engine(url, pool_pre_ping=True, pool_size=5, max_overflow=5, pool_recycle=300)


def get_engine(settings: Settings | None = None) -> Engine:
    from cluster.dev.records import database_url

    return engine_for(database_url(settings))
