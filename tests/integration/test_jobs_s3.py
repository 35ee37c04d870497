"""Jobs and the model store on S3: a real S3-compatible server (moto's, on
127.0.0.1), the real registry (embedded PostgreSQL) and Ray.

The jobs run as a user runs them, `python -m jobs.train ...` in a process of its
own, with the storage credentials in its environment only: its Ray workers get
them from the node they run on, not from the job. Each job starts its own local
Ray in a temporary folder of its own, so its Ray logs can be searched for the
secret afterwards.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from jobs.simulate import simulate
from tests.s3_server import aws_env, create_bucket
from tests.s3_server import start_moto as _start_moto
from tests.s3_server import stop as _stop

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
BUCKET = "fraud-test"
SECRET = f"s3cr3t-{uuid.uuid4().hex}"  # distinctive, so a leak anywhere is found
BAD_AMOUNTS = {7: "-3", 11: "abc"}
JOB_TIMEOUT_S = 600


def _aws_env(endpoint: str) -> dict[str, str]:
    return aws_env(endpoint, SECRET)


@pytest.fixture(scope="session")
def s3_server():
    """moto's S3 server on a free port with one bucket; stopped at the end."""
    proc, endpoint = _start_moto()
    try:
        create_bucket(endpoint, SECRET, BUCKET)
        yield endpoint
    finally:
        _stop(proc)


@pytest.fixture
def aws(s3_server, monkeypatch):
    """This process talks to the S3 server through the standard variables only."""
    for key, value in _aws_env(s3_server).items():
        monkeypatch.setenv(key, value)
    return s3_server


def _s3():
    from pyarrow.fs import FileSystem

    return FileSystem.from_uri(f"s3://{BUCKET}")[0]  # endpoint, region, credentials from the environment


@pytest.fixture(scope="module")
def history(s3_server) -> pd.DataFrame:
    """A labelled history as two Parquet files under s3://<bucket>/history/, two bad amounts."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from pyarrow.fs import S3FileSystem

    df = simulate(users=60, days=10, seed=31).astype({"amount": str})
    for pos, value in BAD_AMOUNTS.items():
        df.iloc[pos, df.columns.get_loc("amount")] = value
    env = _aws_env(s3_server)
    fs = S3FileSystem(endpoint_override=s3_server, region=env["AWS_REGION"],
                      access_key=env["AWS_ACCESS_KEY_ID"], secret_key=env["AWS_SECRET_ACCESS_KEY"])
    half = len(df) // 2
    for i, part in enumerate((df.iloc[:half], df.iloc[half:])):
        pq.write_table(pa.Table.from_pandas(part, preserve_index=False), f"{BUCKET}/history/part-{i}.parquet",
                       filesystem=fs)
    return df


def _run_job(module: str, args: list[str], endpoint: str, tmp: Path) -> tuple[subprocess.CompletedProcess, str]:
    """Runs ``python -m <module> <args>`` with the model store on S3 and its own local Ray;
    returns the process and the text of every log it and its Ray left."""
    ray_tmp = Path(f"/tmp/rt-{uuid.uuid4().hex[:6]}")  # Ray's socket paths must stay short
    env = dict(os.environ, **_aws_env(endpoint), FRAUD_MODEL_STORE=f"s3://{BUCKET}/models",
               RAY_TMPDIR=str(ray_tmp), RAY_ADDRESS="local")
    try:
        result = subprocess.run([sys.executable, "-m", module, *args], check=False, cwd=REPO, env=env,
                                capture_output=True, text=True, timeout=JOB_TIMEOUT_S)
        logs = [result.stdout, result.stderr]
        for path in ray_tmp.rglob("*"):
            if path.is_file() and not path.is_socket():
                logs.append(path.read_bytes().decode("utf-8", errors="replace"))
        return result, "\n".join(logs)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)


@pytest.fixture(scope="module")
def trained(s3_server, history, servers, tmp_path_factory) -> tuple[dict, str]:
    """`jobs.train` from the s3:// Parquet folder, the model store on s3:// (not activated)."""
    result, logs = _run_job("jobs.train", ["--input", f"s3://{BUCKET}/history/", "--n-estimators", "20"],
                            s3_server, tmp_path_factory.mktemp("train"))
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout), logs


@pytest.fixture(scope="module")
def backfilled(s3_server, trained, tmp_path_factory) -> tuple[dict, str]:
    version = trained[0]["version"]
    result, logs = _run_job(
        "jobs.backfill", ["--input", f"s3://{BUCKET}/history/", "--output", f"s3://{BUCKET}/scored/",
                          "--model-version", version, "--actors", "1", "--batch-size", "500"],
        s3_server, tmp_path_factory.mktemp("backfill"))
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout), logs


def test_train_writes_the_artifact_and_card_to_s3_and_registers_uri_and_sha256(trained, engine, aws):
    from pyarrow.fs import FileSelector

    from cluster.registry import ModelRegistry

    result, _ = trained
    version = result["version"]
    row = ModelRegistry(engine).get(version)
    assert row["artifact_uri"] == result["artifact_uri"] == f"s3://{BUCKET}/models/{version}"
    assert row["artifact_sha256"] == result["sha256"] and len(row["artifact_sha256"]) == 64
    assert row["artifact_path"] is None and result["artifact_path"] is None
    stored = {i.base_name: i.size for i in _s3().get_file_info(FileSelector(f"{BUCKET}/models/{version}"))}
    for name in ("model.npz", "model.json", "model_card.md", "model_card.json", "score_distribution.png",
                 "rejects.csv"):
        assert stored.get(name, 0) > 0, (name, stored)
    with _s3().open_input_stream(f"{BUCKET}/models/{version}/model_card.md") as card:
        text = card.read().decode()
    assert f"s3://{BUCKET}/models/{version}" in text and row["artifact_sha256"] in text
    assert row["parameters"]["source"] == f"s3://{BUCKET}/history"
    assert row["metrics"]["rejects"] == len(BAD_AMOUNTS)


def test_a_loader_on_a_fresh_data_dir_fetches_verifies_and_caches(trained, engine, aws, tmp_path):
    from cluster.registry import ModelRegistry, load_artifact
    from features.definitions import FEATURE_NAMES

    row = ModelRegistry(engine).get(trained[0]["version"])
    cache = tmp_path / "fresh-node" / "cache" / "models"
    forest = load_artifact(row, cache_dir=cache)
    assert [p.name for p in cache.iterdir()] == [row["artifact_sha256"]]
    again = load_artifact(row, cache_dir=cache)  # from the node's copy
    X = np.random.default_rng(2).normal(size=(20, len(FEATURE_NAMES)))
    np.testing.assert_array_equal(forest.risk_score(X), again.risk_score(X))
    assert forest.model_version == row["version"]


def test_a_tampered_object_is_refused_naming_the_sha256_mismatch(trained, backfilled, engine, aws, tmp_path,
                                                                 caplog):
    from cluster.registry import ModelRegistry, load_artifact
    from configs.errors import IntegrityError

    row = ModelRegistry(engine).get(trained[0]["version"])
    key = f"{BUCKET}/models/{row['version']}/model.json"
    fs = _s3()
    with fs.open_input_stream(key) as src:
        original = src.read()
    with fs.open_output_stream(key) as out:
        out.write(original.replace(b'"offset"', b'"offset" ', 1))
    try:
        with caplog.at_level(logging.WARNING), pytest.raises(IntegrityError) as err:
            load_artifact(row, cache_dir=tmp_path / "another-node")
    finally:
        with fs.open_output_stream(key) as out:
            out.write(original)
    assert "sha256 differs from the registered one" in str(err.value)
    assert f"expected {row['artifact_sha256']}" in caplog.text and "sha256 is " in caplog.text
    assert not (tmp_path / "another-node" / row["artifact_sha256"]).exists()


def test_backfill_from_s3_to_s3_keeps_every_input_row(backfilled, history, aws):
    import pyarrow.parquet as pq

    summary, _ = backfilled
    scored = pq.read_table(f"{BUCKET}/scored", filesystem=_s3(),
                           columns=["transaction_id", "risk_score", "model_version"]).to_pandas()
    with _s3().open_input_stream(f"{BUCKET}/scored.rejects.csv") as fh:
        rejects = pd.read_csv(fh, dtype=str)
    assert summary["rows_scored"] == len(scored) == len(history) - len(BAD_AMOUNTS)
    assert summary["rejects"] == len(rejects) == len(BAD_AMOUNTS)
    assert summary["output"] == f"s3://{BUCKET}/scored"
    assert summary["rejects_path"] == f"s3://{BUCKET}/scored.rejects.csv"
    # every input row is in exactly one of the two
    assert scored["transaction_id"].is_unique
    assert sorted([*scored["transaction_id"], *rejects["transaction_id"]]) == sorted(history["transaction_id"])
    assert set(rejects["amount"]) == set(BAD_AMOUNTS.values())
    assert np.isfinite(scored["risk_score"]).all()


def test_credentials_never_appear_in_the_logs_nor_in_status(trained, backfilled, aws, caplog):
    from cluster.dev import status
    from configs.settings import load_settings

    for _, logs in (trained, backfilled):
        assert "s3://" in logs  # the logs were captured, and name the URIs
        assert SECRET not in logs
    report = status(load_settings(model_store=f"s3://{BUCKET}/models?region=us-east-1"))
    assert report["model_store"] == f"s3://{BUCKET}/models"
    assert SECRET not in json.dumps(report, default=str) and SECRET not in caplog.text


def test_a_missing_input_uri_exits_2_naming_it(aws, capsys):
    from jobs import backfill, train

    assert train.main(["--input", f"s3://{BUCKET}/no-such-history/"]) == 2
    assert f"input: s3://{BUCKET}/no-such-history does not exist" in capsys.readouterr().err
    assert backfill.main(["--input", f"s3://{BUCKET}/no-such.csv", "--output", f"s3://{BUCKET}/o/"]) == 2
    assert f"input: s3://{BUCKET}/no-such.csv does not exist" in capsys.readouterr().err


def test_refused_credentials_exit_2_naming_the_uri(monkeypatch, capsys):
    """moto with authentication on: the key `testing` is unknown, so S3 refuses it."""
    from jobs import simulate, train

    proc, endpoint = _start_moto({"INITIAL_NO_AUTH_ACTION_COUNT": "0"})
    try:
        for key, value in _aws_env(endpoint).items():
            monkeypatch.setenv(key, value)
        assert train.main(["--input", f"s3://{BUCKET}/history/"]) == 2
        read_err = capsys.readouterr().err
        assert simulate.main(["--out", f"s3://{BUCKET}/h.csv", "--users", "5", "--days", "2", "--seed", "1"]) == 2
        write_err = capsys.readouterr().err
    finally:
        _stop(proc)
    assert f"input: s3://{BUCKET}/history: access denied" in read_err and "AWS_ACCESS_KEY_ID" in read_err
    assert f"out: s3://{BUCKET}/h.csv: access denied" in write_err
    for err in (read_err, write_err):
        assert SECRET not in err and "Traceback" not in err
