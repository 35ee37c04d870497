"""Demo defaults never write sample data into a real database unless asked; the
broker epoch and URL redaction of `cluster.dev` (no server started here)."""

from __future__ import annotations

import doctest
import logging

import pytest

import deployments.bootstrap
from cluster.dev import broker_epoch
from cluster.dev.records import _redact
from configs.settings import load_settings
from deployments.app import AppArgs
from deployments.bootstrap import decide_demo_step, demo_step_enabled


@pytest.mark.parametrize(
    ("requested", "external_database", "enabled"),
    [
        (None, False, True),   # auto, embedded database: a demo
        (None, True, False),   # auto, DATABASE_URL: a real deployment gets no sample data
        (True, True, True),    # asked for explicitly
        (True, False, True),
        (False, False, False),
        (False, True, False),
    ],
)
def test_decision_table(requested, external_database, enabled):
    decided, reason = decide_demo_step(requested, external_database=external_database)
    assert decided is enabled
    assert reason  # every decision says why


def test_app_args_default_to_auto():
    args = AppArgs.model_validate({})
    assert args.bootstrap is None and args.warm_state is None
    assert AppArgs.model_validate({"bootstrap": True, "warm_state": False}).warm_state is False


def test_the_shipped_serve_config_leaves_both_on_auto():
    from pathlib import Path

    import yaml

    config = yaml.safe_load((Path(__file__).parents[2] / "serve_config.yaml").read_text())
    scoring = next(a for a in config["applications"] if a["import_path"] == "deployments.app:build_app")
    args = AppArgs.model_validate(scoring["args"])
    assert args.bootstrap is None and args.warm_state is None


def test_the_decision_is_logged_with_its_reason(tmp_path, caplog):
    real = load_settings(data_dir=tmp_path, database_url="postgresql+psycopg2://u:secret@db.example/fraud")
    caplog.set_level(logging.INFO, logger="ray.serve")
    assert demo_step_enabled("bootstrap", None, real) is False
    assert demo_step_enabled("warm_state", True, real) is True
    lines = [r.getMessage() for r in caplog.records]
    assert any(m.startswith("bootstrap is off:") and "DATABASE_URL" in m for m in lines), lines
    forced = [r for r in caplog.records if r.getMessage().startswith("warm_state is on:")]
    assert forced and forced[0].levelno == logging.WARNING  # sample data into a real database
    assert not any("secret" in m for m in lines)


def test_doctests_of_the_decision():
    assert doctest.testmod(deployments.bootstrap).failed == 0


def test_an_external_broker_has_no_epoch(tmp_path):
    assert broker_epoch(load_settings(data_dir=tmp_path, kafka_bootstrap_servers="kafka.example:9092")) is None


def test_an_embedded_broker_never_started_has_no_epoch_to_give(tmp_path):
    with pytest.raises(RuntimeError, match="cluster.dev up"):
        broker_epoch(load_settings(data_dir=tmp_path))


@pytest.mark.parametrize(
    "url",
    [
        "postgresql+psycopg2://postgres:s3cr3t-Pass_word@127.0.0.1:5432/fraud",
        "postgresql://app@db.example/fraud?password=s3cr3t-Pass_word&sslmode=require",
        "postgres:s3cr3t-Pass_word@db.example/fraud",          # no scheme: not a URL SQLAlchemy reads
        "weird://user:s3cr3t-Pass_word@with@at@db.example/x",   # an "@" inside the password
    ],
)
def test_redact_hides_every_password(url):
    shown = _redact(url)
    assert "s3cr3t" not in shown and "Pass_word" not in shown
    assert "db.example" in shown or "127.0.0.1" in shown
