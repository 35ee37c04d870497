"""Training and backfill jobs through real Ray (in-process), embedded PostgreSQL and the registry."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs.simulate import simulate

pytestmark = pytest.mark.slow

BAD_ROWS = {  # row position -> (column, value, expected reason)
    3: ("amount", "-3", "amount: must be greater than 0"),
    4: ("timestamp", "not-a-time", "timestamp: must be an ISO 8601"),
    5: ("country", "FRA", "country: must be two letters"),
    6: ("amount", "abc", "amount: must be a finite number"),
}
# Lines with the wrong number of fields: one at line 12 of the file, one last.
MALFORMED_AT_12 = "u-broken,12.50,m-1"
MALFORMED_LAST = "u-extra,3.00,m-2,FR,2025-01-01T00:00:00Z,x,y,z,w,v"
N_REJECTS = len(BAD_ROWS) + 2


@pytest.fixture(scope="module")
def history(tmp_path_factory):
    """A small labelled history as CSV, without ids (so they are derived), with bad rows."""
    df = simulate(users=120, days=14, seed=5).drop(columns=["transaction_id"])
    df["timestamp"] = df["timestamp"].dt.strftime("%Y-%m-%dT%H:%M:%SZ")
    df = df.astype({"amount": object})
    for pos, (col, value, _) in BAD_ROWS.items():
        df.iloc[pos, df.columns.get_loc(col)] = value
    path = tmp_path_factory.mktemp("jobs") / "history.csv"
    df.to_csv(path, index=False)
    lines = path.read_text().splitlines()
    lines.insert(11, MALFORMED_AT_12)
    lines.append(MALFORMED_LAST)
    path.write_text("\n".join(lines) + "\n")
    return path, df


def run_job(job, argv: list[str]) -> dict:
    """Runs ``job.main(argv)``, asserts success and returns the JSON result it prints."""
    results: list[dict] = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("jobs._common.print_result", results.append)
        assert job.main(argv) == 0
    assert len(results) == 1
    return json.loads(json.dumps(results[0], default=str))


@pytest.fixture(scope="module")
def trained(history, ray_local, servers):
    from jobs import train

    path, _ = history
    return run_job(train, ["--input", str(path), "--n-estimators", "50", "--activate"])


# Bytes per read block in the first backfill: the CSV is cut into many blocks
# (a malformed line falls in a block other than the first); the second reads it whole.
SMALL_BLOCK_BYTES = 2048


@pytest.fixture(scope="module")
def backfilled(trained, history, tmp_path_factory):
    """Two backfills of the CSV to one output: the first in small blocks, the second in
    one block; what the first wrote is kept in ``first["written"]``."""
    from jobs import backfill

    path, _ = history
    out = tmp_path_factory.mktemp("backfill") / "scores.parquet"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("jobs._common.CSV_BLOCK_BYTES", SMALL_BLOCK_BYTES)
        first = run_job(backfill, ["--input", str(path), "--output", str(out), "--write-db", "--batch-size", "500"])
    first["written"] = (pq.read_table(out).to_pandas(), pd.read_csv(first["rejects_path"], dtype=str))
    second = run_job(backfill, ["--input", str(path), "--output", str(out), "--write-db", "--batch-size", "700"])
    return out, first, second


def test_train_registers_a_version_with_artifact_card_and_metrics(trained, engine):
    from pathlib import Path

    from cluster.registry import ModelRegistry
    from features.definitions import FEATURE_SET_VERSION
    from scoring.persistence import artifact_sha256

    row = ModelRegistry(engine).get(trained["version"])
    assert row["status"] == "active" and row["feature_set_version"] == FEATURE_SET_VERSION
    directory = Path(row["artifact_path"])
    assert artifact_sha256(directory) == row["artifact_sha256"] == trained["sha256"]
    for name in ("model_card.md", "model_card.json", "score_distribution.png", "rejects.csv"):
        assert (directory / name).stat().st_size > 0
    metrics = row["metrics"]
    for key in ("roc_auc", "average_precision", "precision_at_100", "precision_at_n_frauds",
                "alert_rate", "threshold", "per_scenario_roc_auc"):
        assert metrics[key] is not None
    assert metrics["rejects"] == N_REJECTS
    assert len(row["data_fingerprint"]) == 64
    card = json.loads((directory / "model_card.json").read_text())
    assert card["data_fingerprint"] == row["data_fingerprint"] and card["threshold"] == metrics["threshold"]


def test_backfill_writes_every_valid_row_with_features_scores_and_shap(backfilled, history):
    from features.definitions import FEATURE_NAMES

    out, first, _ = backfilled
    _, df = history
    table = pq.read_table(out).to_pandas()
    assert len(table) == first["rows_scored"] == len(df) - len(BAD_ROWS)
    expected = {"transaction_id", "user_id", "amount", "merchant", "country", "timestamp", "is_fraud",
                "scenario", "risk_score", "anomaly", "model_version", *FEATURE_NAMES,
                *(f"shap_{n}" for n in FEATURE_NAMES)}
    assert expected <= set(table.columns)
    assert table["transaction_id"].is_unique
    assert first["anomalies"] == int(table["anomaly"].sum())


def test_backfill_scores_equal_score_and_explain_on_offline_features(backfilled, trained, history):
    from features.definitions import FEATURE_NAMES
    from features.schema import validate_frame
    from features.transforms import compute_features
    from scoring.explain import score_and_explain
    from scoring.persistence import load_model
    from scoring.risk import risk_from_explanation

    out, _, _ = backfilled
    _, df = history
    table = pq.read_table(out).to_pandas().set_index("transaction_id")
    offline = compute_features(validate_frame(df)[0]).set_index("transaction_id").loc[table.index]
    np.testing.assert_array_equal(table[list(FEATURE_NAMES)].to_numpy(), offline[list(FEATURE_NAMES)].to_numpy())
    forest = load_model(trained["artifact_path"], expected_sha256=trained["sha256"])
    ref = score_and_explain(forest, offline[list(FEATURE_NAMES)].to_numpy())
    shap = table[[f"shap_{n}" for n in FEATURE_NAMES]].to_numpy()
    np.testing.assert_allclose(table["risk_score"].to_numpy(), ref.risk_score, rtol=0, atol=1e-12)
    np.testing.assert_allclose(shap, ref.explanation, rtol=0, atol=1e-9)
    np.testing.assert_array_equal(table["anomaly"].to_numpy(), ref.anomaly)
    # The explanation adds up: sum(shap_*) == expected_value - mean path length.
    np.testing.assert_allclose(
        risk_from_explanation(shap, forest.expected_value_, forest.max_samples_),
        table["risk_score"].to_numpy(), rtol=1e-9)
    assert (table["model_version"] == trained["version"]).all()


def test_write_db_twice_leaves_no_duplicates(backfilled, engine, trained):
    from cluster.store.audit import AuditRepository

    _, first, second = backfilled
    assert first["db_inserted"] == first["rows_scored"] and first["db_duplicates"] == 0
    assert second["db_inserted"] == 0 and second["db_duplicates"] == second["rows_scored"]
    assert AuditRepository(engine).count_backfill(trained["version"]) == first["rows_scored"]


def test_rejects_file_names_each_bad_row_and_its_reason(backfilled, history):
    _, first, second = backfilled
    n_columns = len(history[1].columns)
    assert first["rejects"] == second["rejects"] == N_REJECTS
    rejects = first["written"][1]  # read in small blocks
    assert len(rejects) == N_REJECTS
    for col, value, reason in BAD_ROWS.values():
        hit = rejects.loc[rejects[col] == value]
        assert len(hit) == 1 and reason in hit["reason"].iloc[0]
    # a malformed line is kept whole, with its line number and field count
    n_lines = 1 + len(history[1]) + 2
    for number, text in ((12, MALFORMED_AT_12), (n_lines, MALFORMED_LAST)):
        hit = rejects.loc[rejects["line"] == text]
        assert len(hit) == 1, text
        assert hit["reason"].iloc[0] == (
            f"csv: line {number} of history.csv has {len(text.split(','))} fields, expected {n_columns}")


def test_small_blocks_and_one_block_give_the_same_output_and_every_row(backfilled, history):
    """The CSV cut into many blocks and read whole: the same scored rows, the same
    rejects, and each data line of the file is either scored or rejected."""
    from features.definitions import FEATURE_NAMES

    out, first, second = backfilled
    path, _ = history
    n_blocks = -(-path.stat().st_size // SMALL_BLOCK_BYTES)
    assert n_blocks > 10
    scored_small, rejects_small = first["written"]
    scored_whole = pq.read_table(out).to_pandas()
    key = ["transaction_id"]
    columns = ["transaction_id", "user_id", "amount", "timestamp", "risk_score", "anomaly", *FEATURE_NAMES]
    pd.testing.assert_frame_equal(scored_small[columns].sort_values(key).reset_index(drop=True),
                                  scored_whole[columns].sort_values(key).reset_index(drop=True))
    rejects_whole = pd.read_csv(second["rejects_path"], dtype=str)

    def canonical(frame):
        return frame.fillna("").sort_values(list(frame.columns)).reset_index(drop=True)

    pd.testing.assert_frame_equal(canonical(rejects_small), canonical(rejects_whole[rejects_small.columns]))
    data_lines = len(path.read_text().splitlines()) - 1
    assert first["rows_scored"] + first["rejects"] == data_lines == second["rows_scored"] + second["rejects"]


def test_parquet_history_is_read_and_validated_like_the_same_csv(history, ray_local, tmp_path):
    """The jobs' own Parquet reader: every row of a folder of files is kept or
    rejected with its reason, the same rows (same derived ids) as from CSV."""
    from jobs import _common

    csv_path, df = history
    folder = tmp_path / "history"
    folder.mkdir()
    as_text = df.astype({"amount": str})  # a Parquet column has one type: the bad amounts stay text
    half = len(df) // 2
    as_text.iloc[:half].to_parquet(folder / "part-0.parquet", index=False)
    as_text.iloc[half:].to_parquet(folder / "part-1.parquet", index=False)

    valid, rejects = _common.read_valid_history(folder)
    csv_valid, csv_rejects = _common.read_valid_history(csv_path)

    ids = valid.to_pandas()["transaction_id"]
    assert len(ids) == len(df) - len(BAD_ROWS) and ids.is_unique
    assert set(ids) == set(csv_valid.to_pandas()["transaction_id"])
    assert len(rejects) == len(BAD_ROWS) == len(csv_rejects) - 2  # CSV also rejects its 2 malformed lines
    for col, value, reason in BAD_ROWS.values():
        hit = rejects.loc[rejects[col].astype(str) == value]
        assert len(hit) == 1 and reason in hit["reason"].iloc[0]


def test_fit_and_register_in_process_without_ray(servers, engine, tmp_path):
    from cluster.registry import ModelRegistry
    from configs.settings import get_settings
    from jobs.train import fit_and_register

    df = simulate(users=60, days=10, seed=9)
    result = fit_and_register(df, settings=get_settings(), n_estimators=20, source="unit")
    assert {"version", "metrics", "artifact_path", "sha256"} <= set(result)
    row = ModelRegistry(engine).get(result["version"])
    assert row["status"] == "candidate" and row["metrics"]["threshold"] == result["metrics"]["threshold"]


def test_an_input_file_gone_before_its_task_reads_it_exits_2_naming_it(ray_local, tmp_path, capsys):
    """An error in a read task reaches the job as itself, naming the file."""
    from jobs import _common

    folder = tmp_path / "history"
    folder.mkdir()
    df = simulate(users=10, days=3, seed=2)
    df.iloc[:50].to_parquet(folder / "part-0.parquet", index=False)
    df.iloc[50:].to_parquet(folder / "part-1.parquet", index=False)
    import ray

    blocks = _common.plan_blocks(folder)  # listed now, read by the tasks
    (folder / "part-1.parquet").unlink()
    read = ray.remote(_common.read_block).options(num_returns=3)
    with pytest.raises(Exception) as err:
        ray.get([read.remote(b)[2] for b in blocks])
    assert _common.failure(err.value, "train") == 2
    stderr = capsys.readouterr().err
    assert f"error: input: {folder / 'part-1.parquet'} does not exist" in stderr
    assert "Traceback" not in stderr.split("error: input:")[-1]


def test_a_column_typed_differently_in_two_blocks_is_read_alike_through_ray(ray_local, tmp_path):
    """Through Ray's tasks: a column empty in the first blocks and text further on is
    text in every block (the blocks that typed it otherwise are read again)."""
    import ray

    from jobs import _common

    df = simulate(users=30, days=5, seed=4)
    df["note"] = ""
    df.loc[df.index[-5:], "note"] = "late note"
    path = tmp_path / "h.csv"
    df.to_csv(path, index=False)
    reading = _common.HistoryRead(path, block_bytes=2048)
    assert len(reading.blocks) > 5
    history = reading.result()
    tables = ray.get(history.valid)
    assert len({t.schema.field("note").type for t in tables}) == 1
    assert sum(t.num_rows for t in tables) == len(df) and history.rejects.empty
    notes = pa.concat_tables(tables).column("note").to_pylist()
    assert notes.count("late note") == 5 and notes.count("") == len(df) - 5
