"""Migration 0003 on the real PostgreSQL, in a database of its own: a version
registered before the model store existed (a plain path) loads after the upgrade
through its file:// URI, and a downgrade gives the path back."""

from __future__ import annotations

import uuid

import numpy as np
import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from features.definitions import FEATURE_NAMES, FEATURE_SET_VERSION

pytestmark = pytest.mark.slow


@pytest.fixture
def scratch_database(servers):
    """A new, empty database on the embedded PostgreSQL; dropped afterwards."""
    admin = servers["database_url"]
    name = f"migration_{uuid.uuid4().hex[:10]}"
    engine = create_engine(admin, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield make_url(admin).set(database=name).render_as_string(hide_password=False)
    finally:
        with engine.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        engine.dispose()


def _downgrade(url: str, revision: str) -> None:
    from alembic import command

    from cluster.store.migrate import alembic_config

    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            config = alembic_config()
            config.attributes["connection"] = conn
            command.downgrade(config, revision)
            conn.commit()
    finally:
        engine.dispose()


def test_a_version_registered_with_a_path_loads_after_the_upgrade(scratch_database, tmp_path):
    from sklearn.ensemble import IsolationForest

    from cluster.registry import ModelRegistry, load_artifact
    from cluster.store.migrate import upgrade
    from scoring.forest import CompiledForest
    from scoring.persistence import save_model

    X = np.random.default_rng(0).normal(size=(200, len(FEATURE_NAMES)))
    forest = CompiledForest.from_sklearn(
        IsolationForest(n_estimators=5, max_samples=64, random_state=0).fit(X),
        feature_names=list(FEATURE_NAMES), feature_set_version=FEATURE_SET_VERSION, model_version="v-old")
    directory = tmp_path / "models with space" / "v-old"  # a path a URI must escape
    artifact = save_model(forest, directory)

    upgrade(scratch_database, "0002")
    engine = create_engine(scratch_database)
    try:
        with engine.begin() as conn:
            conn.execute(text(
                "INSERT INTO model_registry (version, parameters, feature_set_version, data_fingerprint, "
                "metrics, artifact_path, artifact_sha256, status) VALUES ('v-old', '{}', :fsv, :fp, '{}', "
                ":path, :sha, 'active')"),
                {"fsv": FEATURE_SET_VERSION, "fp": "f" * 64, "path": str(directory), "sha": artifact.sha256})

        upgrade(scratch_database, "head")
        row = ModelRegistry(engine).get("v-old")
        assert row["artifact_uri"] == directory.as_uri() and "%20" in row["artifact_uri"]
        assert row["artifact_path"] == str(directory)
        loaded = load_artifact(row, cache_dir=tmp_path / "cache")
        np.testing.assert_array_equal(loaded.risk_score(X), forest.risk_score(X))
        assert not (tmp_path / "cache").exists()  # a file:// artifact is read in place

        # A version registered now on a remote store has no path; a downgrade keeps its URI.
        ModelRegistry(engine).register(
            version="v-new", parameters={}, feature_set_version=FEATURE_SET_VERSION,
            data_fingerprint="f" * 64, metrics={}, artifact_uri="s3://bucket/models/v-new",
            artifact_sha256=artifact.sha256)
        assert ModelRegistry(engine).get("v-new")["artifact_path"] is None
        engine.dispose()
        _downgrade(scratch_database, "0002")
        with engine.connect() as conn:
            paths = dict(conn.execute(text("SELECT version, artifact_path FROM model_registry")).all())
        assert paths == {"v-old": str(directory), "v-new": "s3://bucket/models/v-new"}
    finally:
        engine.dispose()
