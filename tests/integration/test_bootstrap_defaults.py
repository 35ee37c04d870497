"""With DATABASE_URL set, the scoring app's start-up puts no sample data into that
database unless `bootstrap` / `warm_state` ask for it (real PostgreSQL, no Ray)."""

from __future__ import annotations

import logging

import pytest

from cluster.dev import database_url, ensure_servers, kafka_bootstrap, stop_servers
from cluster.registry import ModelRegistry
from cluster.store.db import engine_for
from configs.settings import load_settings
from deployments.app import AppArgs
from deployments.bootstrap import prepare


@pytest.fixture
def real_database(tmp_path):
    """Settings as a deployment has them: both servers named by URL, none started for it."""
    embedded = load_settings(data_dir=tmp_path / "embedded")
    ensure_servers(embedded)
    try:
        yield load_settings(data_dir=tmp_path / "deployment", database_url=database_url(embedded),
                            kafka_bootstrap_servers=kafka_bootstrap(embedded))
    finally:
        stop_servers(embedded)
    assert not (tmp_path / "deployment" / "run" / "servers.json").exists()  # it started nothing


def test_auto_defaults_write_no_sample_data_into_a_real_database(real_database, caplog):
    caplog.set_level(logging.INFO, logger="ray.serve")
    prepare(real_database, AppArgs.model_validate({}))

    engine = engine_for(real_database.database_url)
    try:
        assert ModelRegistry(engine).active() is None  # no toy model trained and activated
    finally:
        engine.dispose()
    said = [r.getMessage() for r in caplog.records]
    assert any(m.startswith("bootstrap is off: auto, and DATABASE_URL is set") for m in said), said
    assert any(m.startswith("warm_state is off: auto, and DATABASE_URL is set") for m in said), said
    assert any("no model is registered and bootstrap is off" in m for m in said), said
