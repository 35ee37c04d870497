"""The jobs' pure parts: fingerprint, evaluation, paths, and bad input refused before Ray."""

from __future__ import annotations

import os

import numpy as np
import pandas as pd
import pytest

from configs.errors import InvalidInputError
from jobs import _common, backfill, train


def test_fingerprint_ignores_row_order_and_counts_rows():
    ids = np.array(["b", "a", "c"])
    assert train.data_fingerprint(ids) == train.data_fingerprint(ids[::-1])
    assert train.data_fingerprint(ids) != train.data_fingerprint(ids[:2])
    assert len(train.data_fingerprint(ids)) == 64


def test_precision_at_k_counts_frauds_among_the_riskiest():
    risk = np.array([0.9, 0.8, 0.7, 0.1])
    fraud = np.array([True, False, True, False])
    assert train.precision_at_k(risk, fraud, 2) == 0.5
    assert train.precision_at_k(risk, fraud, 100) == 0.5  # k capped at the row count
    assert train.precision_at_k(risk, fraud, 0) is None


def test_evaluate_gives_per_scenario_auc_against_all_legit_rows():
    risk = np.array([0.9, 0.2, 0.8, 0.1, 0.3, 0.4])
    fraud = np.array([True, True, True, False, False, False])
    scenario = np.array(["a", "b", "a", "normal", "normal", "normal"])
    metrics, per = train.evaluate(risk, 0.5, fraud, scenario)
    assert per == {"a": 1.0, "b": pytest.approx(1 / 3)}  # b: 0.2 beats one legit row of three
    assert metrics["anomalies"] == 2 and metrics["alert_rate"] == pytest.approx(2 / 6)
    assert metrics["precision_at_n_frauds"] == pytest.approx(2 / 3)
    assert metrics["threshold"] == 0.5 and metrics["per_scenario_roc_auc"] == per


def test_evaluate_without_labels_reports_alert_rate_only():
    metrics, per = train.evaluate(np.array([0.1, 0.9]), 0.5)
    assert per == {} and "roc_auc" not in metrics and metrics["alert_rate"] == 0.5


def test_rejects_file_sits_beside_the_output():
    from pathlib import Path

    assert backfill.rejects_path_for(Path("/x/scores.parquet")) == "/x/scores.rejects.csv"
    assert backfill.rejects_path_for(Path("/x/out")) == "/x/out.rejects.csv"
    assert backfill.rejects_path_for("file:///x/out/") == "/x/out.rejects.csv"
    assert backfill.rejects_path_for("s3://b/scored/") == "s3://b/scored.rejects.csv"
    assert backfill.rejects_path_for("s3://b/p/s.parquet?region=eu-west-1") == \
        "s3://b/p/s.rejects.csv?region=eu-west-1"


def test_prepare_output_never_deletes_foreign_files(tmp_path):
    (tmp_path / "notes.txt").write_text("keep me")
    with pytest.raises(InvalidInputError, match="other than Parquet"):
        backfill.prepare_output(tmp_path)
    assert (tmp_path / "notes.txt").exists()


def test_check_columns_names_every_missing_one():
    with pytest.raises(InvalidInputError, match="missing columns: amount, country"):
        _common.check_columns(["user_id", "merchant", "timestamp"], "h.csv")


@pytest.mark.parametrize("job", [train, backfill])
def test_missing_column_exits_2_naming_it_without_traceback(job, tmp_path, capsys):
    path = tmp_path / "h.csv"
    pd.DataFrame({"user_id": ["u"], "merchant": ["m"], "country": ["FR"],
                  "timestamp": ["2025-01-01T00:00:00Z"]}).to_csv(path, index=False)
    argv = ["--input", str(path)] + (["--output", str(tmp_path / "o")] if job is backfill else [])
    assert job.main(argv) == 2
    err = capsys.readouterr().err
    assert "missing columns: amount" in err and "Traceback" not in err


@pytest.mark.parametrize("job", [train, backfill])
def test_every_flag_is_documented(job, capsys):
    with pytest.raises(SystemExit) as exc:
        job.main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    flags = {"--input", "--model-store", "--n-estimators", "--max-samples", "--contamination", "--seed",
             "--activate"} if job is train else {"--input", "--output", "--model-version", "--write-db",
                                                 "--batch-size", "--actors"}
    for flag in flags:
        assert flag in out


@pytest.mark.parametrize("address", ["local", "10.0.0.7:6379"])
def test_init_ray_passes_the_settings_to_a_ray_it_starts_or_joins(address, monkeypatch, tmp_path):
    """A Ray the job starts inherits FRAUD_DATA_DIR from the job's environment (no
    runtime_env, no dashboard); a cluster it joins gets it in the runtime_env."""
    import ray

    from configs.settings import load_settings

    calls: list[dict] = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: calls.append(kw))
    monkeypatch.setattr(ray, "cluster_resources", dict)
    monkeypatch.setenv("RAY_ADDRESS", address)
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    monkeypatch.setenv("FRAUD_DATA_DIR", "/somewhere/else")
    settings = load_settings(data_dir=tmp_path)
    _common.init_ray(settings)
    (kwargs,) = calls
    if address == "local":
        assert "runtime_env" not in kwargs and kwargs["include_dashboard"] is False
        assert os.environ["FRAUD_DATA_DIR"] == str(tmp_path)
    else:
        assert kwargs["runtime_env"]["env_vars"]["FRAUD_DATA_DIR"] == str(tmp_path)
        assert "include_dashboard" not in kwargs
