"""Properties of the synthetic transaction generator (cluster/simulation.py, written by jobs/simulate.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from configs.errors import InvalidInputError
from jobs.simulate import COLUMNS, SCENARIOS, main, simulate

START = pd.Timestamp("2025-03-01T00:00:00Z")
DAYS = 30
SAMPLE = Path(__file__).resolve().parents[2] / "data" / "sample_transactions.csv"


@pytest.fixture(scope="module")
def df() -> pd.DataFrame:
    return simulate(users=300, days=DAYS, seed=11, start="2025-03-01")


@pytest.fixture(scope="module")
def legit_range(df) -> tuple[float, float]:
    p5, p95 = df.loc[df["is_fraud"] == 0, "amount"].quantile([0.05, 0.95])
    return float(p5), float(p95)


def test_same_seed_same_frame_other_seed_other_frame(df):
    pd.testing.assert_frame_equal(df, simulate(users=300, days=DAYS, seed=11, start="2025-03-01"))
    assert not df["amount"].equals(simulate(users=300, days=DAYS, seed=12, start="2025-03-01")["amount"])


def test_columns_and_dtypes(df):
    assert tuple(df.columns) == COLUMNS
    assert str(df["timestamp"].dt.tz) == "UTC"
    assert df["amount"].dtype == np.float64
    assert df["is_fraud"].dtype == np.int64
    for column in ("transaction_id", "user_id", "merchant", "country", "scenario"):
        assert pd.api.types.is_string_dtype(df[column]), column
    assert df.notna().all().all()


def test_identifiers_and_formats(df):
    assert df["transaction_id"].is_unique
    assert df["transaction_id"].iloc[0] == "sim-11-000000000"
    assert df["transaction_id"].str.fullmatch(r"sim-11-\d{9}").all()
    assert df["user_id"].str.fullmatch(r"u\d{6}").all()
    assert df["merchant"].str.fullmatch(r"m\d{5}").all()
    assert df["country"].str.fullmatch(r"[A-Z]{2}").all()
    assert (df["amount"] > 0).all()
    assert np.allclose(df["amount"], df["amount"].round(2), rtol=0, atol=1e-9)


def test_timestamps_sorted_and_inside_the_period(df):
    assert df["timestamp"].is_monotonic_increasing
    assert df["timestamp"].min() >= START
    assert df["timestamp"].max() < START + pd.Timedelta(days=DAYS)


def test_fraud_rate_and_labels(df):
    assert 0.01 <= df["is_fraud"].mean() <= 0.02
    assert ((df["scenario"] == "normal") == (df["is_fraud"] == 0)).all()
    assert set(df.loc[df["is_fraud"] == 1, "scenario"]) == set(SCENARIOS)


@pytest.mark.parametrize("rate", [0.0, 0.005, 0.02])
def test_fraud_rate_is_never_exceeded(rate):
    out = simulate(users=60, days=10, seed=3, fraud_rate=rate)
    assert out["is_fraud"].mean() <= rate
    if rate == 0.0:
        assert (out["scenario"] == "normal").all()


def test_fraud_amounts_mostly_inside_the_normal_range(df, legit_range):
    p5, p95 = legit_range
    fraud = df.loc[df["is_fraud"] == 1, "amount"]
    assert p5 <= fraud.median() <= p95
    assert fraud.between(p5, p95).mean() > 0.5
    # An outlier is far above the user's typical amount, yet an ordinary amount overall.
    assert df.loc[df["scenario"] == "amount_outlier", "amount"].between(p5, p95).all()


def _user_medians(df: pd.DataFrame) -> pd.Series:
    return df[df["is_fraud"] == 0].groupby("user_id")["amount"].median()


def test_scenarios_move_behavioural_features(df):
    medians = _user_medians(df)
    fraud = df[df["is_fraud"] == 1]
    ratio = fraud["amount"] / fraud["user_id"].map(medians)
    by_scenario = ratio.groupby(fraud["scenario"]).median()
    assert by_scenario["amount_outlier"] > 5
    assert 3 < by_scenario["account_takeover"] < 8

    # Takeovers come in bursts: most takeover rows have 2+ more of the same user within two hours.
    takeover = fraud.loc[fraud["scenario"] == "account_takeover", ["user_id", "timestamp"]]
    pairs = takeover.reset_index().merge(takeover, on="user_id")
    near = (pairs["timestamp_x"] - pairs["timestamp_y"]).abs() <= pd.Timedelta(hours=2)
    assert (pairs[near].groupby("index").size() >= 3).mean() > 0.8

    # Night activity happens when legit users are rarely active (01-05 local, UTC+0..+2).
    night_hours = {23, 0, 1, 2, 3, 4}
    night = fraud[fraud["scenario"] == "night_activity"]["timestamp"].dt.hour
    legit = df[df["is_fraud"] == 0]["timestamp"].dt.hour
    assert night.isin(night_hours).all()
    assert legit.isin(night_hours - {23, 0}).mean() < 0.03

    # New country: a country the user never used legitimately.
    legit_pairs = set(zip(df.loc[df["is_fraud"] == 0, "user_id"], df.loc[df["is_fraud"] == 0, "country"]))
    new_country = fraud[fraud["scenario"] == "new_country"]
    assert not any(pair in legit_pairs for pair in zip(new_country["user_id"], new_country["country"]))

    # Compromised merchants: few merchants, many distinct victims.
    compromised = fraud[fraud["scenario"] == "compromised_merchant"]
    assert compromised["merchant"].nunique() <= 5
    assert compromised["user_id"].nunique() >= 10


def test_legit_users_sometimes_use_new_merchants_and_travel(df):
    legit = df[df["is_fraud"] == 0]
    first_use = ~legit.duplicated(["user_id", "merchant"])
    home = legit.groupby("user_id")["country"].agg(lambda c: c.mode().iloc[0])
    abroad = legit["country"] != legit["user_id"].map(home)
    assert 0.03 < first_use.mean() < 0.3
    assert 0.001 < abroad.mean() < 0.1


def test_start_with_offset_is_converted_to_utc():
    out = simulate(users=20, days=2, seed=1, start="2025-03-01T02:00:00+02:00")
    assert out["timestamp"].min() >= START
    assert out["timestamp"].max() < START + pd.Timedelta(days=2)


@pytest.mark.parametrize("kwargs", [
    {"users": 0}, {"days": 0}, {"fraud_rate": 0.03}, {"fraud_rate": -0.1}, {"start": "not a date"},
])
def test_invalid_arguments_are_refused(kwargs):
    with pytest.raises(InvalidInputError):
        simulate(**{"users": 10, "days": 5, "seed": 1, **kwargs})


def _args(out: Path, seed: int = 5) -> list[str]:
    return ["--out", str(out), "--users", "80", "--days", "14", "--seed", str(seed), "--start", "2025-03-01"]


def test_main_writes_csv_deterministically(tmp_path):
    first, second = tmp_path / "a.csv", tmp_path / "b.csv"
    assert main(_args(first)) == 0
    assert main(_args(second)) == 0
    assert first.read_bytes() == second.read_bytes()

    raw = pd.read_csv(first, dtype={"timestamp": str})
    assert tuple(raw.columns) == COLUMNS
    assert raw["timestamp"].str.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ").all()
    expected = simulate(users=80, days=14, seed=5, start="2025-03-01")
    pd.testing.assert_series_equal(pd.to_datetime(raw["timestamp"], utc=True), expected["timestamp"],
                                   check_dtype=False)
    pd.testing.assert_frame_equal(raw.drop(columns="timestamp"), expected.drop(columns="timestamp"),
                                  check_dtype=False)


def test_main_writes_parquet_deterministically(tmp_path):
    first, second = tmp_path / "a.parquet", tmp_path / "b.parquet"
    assert main(_args(first)) == 0
    assert main(_args(second)) == 0
    assert first.read_bytes() == second.read_bytes()
    back = pd.read_parquet(first)
    assert str(back["timestamp"].dt.tz) == "UTC"
    pd.testing.assert_frame_equal(back, simulate(users=80, days=14, seed=5, start="2025-03-01"),
                                  check_dtype=False)


def test_main_refuses_bad_input(tmp_path):
    assert main(_args(tmp_path / "out.json")) == 2
    assert main([*_args(tmp_path / "out.csv"), "--fraud-rate", "0.5"]) == 2
    assert not (tmp_path / "out.csv").exists()


def test_help_documents_every_flag(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--out", "--users", "--days", "--seed", "--start", "--fraud-rate"):
        assert flag in text


def test_sample_file_is_reproducible(tmp_path):
    """data/sample_transactions.csv is exactly `--users 400 --days 30 --seed 7`."""
    out = tmp_path / "sample.csv"
    assert main(["--out", str(out), "--users", "400", "--days", "30", "--seed", "7"]) == 0
    assert SAMPLE.read_bytes() == out.read_bytes()
    assert SAMPLE.stat().st_size < 3_000_000
