"""The demo's simulated traffic against what the bootstrap knows (issue #23 item 6).

`serve run` trains the bootstrap model on data/sample_transactions.csv and warms
the online state with it; `python -m cluster.producer` then sends simulated
traffic. That traffic must come from the sample's customers: a user the state
has never seen gets cold-start features on their first purchase, and the model
flags every one of those (out of the box, 1,878 of 10,000 were flagged, 1,462 of
them cold starts). No Ray here: the offline features equal the online ones
(tests/integration/test_online_state.py), so the alert rate is computed offline;
tests/integration/test_demo_alert_rate.py measures it on the real system.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cluster.producer import DEMO_POPULATION, DEMO_USERS, simulated_transactions
from jobs.simulate import simulate

SAMPLE = Path(__file__).resolve().parents[2] / "data" / "sample_transactions.csv"


@pytest.fixture(scope="module")
def sample() -> pd.DataFrame:
    return pd.read_csv(SAMPLE)


def _habits(df: pd.DataFrame) -> pd.DataFrame:
    """Per user: home (the most frequent country), the median amount and the row count."""
    return df.groupby("user_id").agg(
        home=("country", lambda c: c.value_counts().index[0]), median=("amount", "median"),
        rows=("amount", "size"))


def _same_people(a: pd.DataFrame, b: pd.DataFrame) -> tuple[float, float]:
    """Shares of the users of both with the same home, and with medians within a factor 2
    (a user's amounts are log-normal around their median with sigma <= 0.6; two users'
    medians are log-uniform over 5-200, within a factor 2 of each other a third of the time)."""
    both = _habits(a).join(_habits(b), lsuffix="_a", rsuffix="_b", how="inner")
    both = both[(both["rows_a"] >= 5) & (both["rows_b"] >= 5)]
    assert len(both) >= 80, "too few users in common to compare"
    same_home = float((both["home_a"] == both["home_b"]).mean())
    close = float((np.abs(np.log(both["median_a"] / both["median_b"])) < np.log(2.0)).mean())
    return same_home, close


def test_demo_population_is_the_sample(sample):
    again = simulate(DEMO_USERS, DEMO_POPULATION[1], DEMO_POPULATION[0])
    assert again["transaction_id"].tolist() == sample["transaction_id"].tolist()
    assert again["user_id"].tolist() == sample["user_id"].tolist()


@pytest.mark.parametrize("days", [2, 18, 33])  # spans whose own draw of trips would shift the users
def test_population_gives_new_transactions_of_the_same_people(sample, days):
    new = simulate(DEMO_USERS, days, seed=99, population=DEMO_POPULATION)
    assert not set(new["transaction_id"]) & set(sample["transaction_id"])
    same_home, close = _same_people(sample, new)
    assert same_home >= 0.95 and close >= 0.9, (same_home, close)


def test_strangers_are_not_the_same_people(sample):
    """The comparison above can tell: another population of the same size fails it."""
    other = simulate(DEMO_USERS, 30, seed=8)
    same_home, close = _same_people(sample, other)
    assert close < 0.5, (same_home, close)


def test_population_is_validated():
    from configs.errors import InvalidInputError

    with pytest.raises(InvalidInputError, match="population"):
        simulate(10, 2, 1, population=(7, 0))


def test_default_traffic_comes_from_the_sample_customers(sample):
    traffic = pd.DataFrame(simulated_transactions(3_000, seed=123))
    assert set(traffic["user_id"]) <= set(sample["user_id"])
    assert set(traffic["merchant"]) <= set(sample["merchant"])
    same_home, close = _same_people(sample, traffic)
    assert same_home >= 0.95 and close >= 0.9, (same_home, close)


def test_traffic_with_days_spans_them_with_its_own_users():
    traffic = pd.DataFrame(simulated_transactions(2_000, seed=5, days=2))
    ts = pd.to_datetime(traffic["timestamp"], utc=True)
    assert len(traffic) == 2_000 and ts.max() - ts.min() <= pd.Timedelta(days=2)
    assert traffic["user_id"].nunique() > DEMO_USERS


@pytest.mark.slow
def test_demo_alert_rate_is_within_twice_the_contamination(sample):
    """The bootstrap model (as `jobs.train.fit_and_register` fits it on the sample) scores the
    producer's default traffic after the state was warmed with the sample (`warm_history`)."""
    from configs.settings import get_settings
    from deployments.bootstrap import warm_history
    from features.definitions import (
        FEATURE_NAMES,
        FEATURE_SET_VERSION,
        RETENTION_SECONDS,
    )
    from features.transforms import compute_features
    from jobs.train import DEFAULT_MAX_SAMPLES, DEFAULT_N_ESTIMATORS, fit_forest
    from scoring.forest import CompiledForest

    contamination = get_settings().contamination
    history = compute_features(sample)
    model = fit_forest(history[list(FEATURE_NAMES)].to_numpy(np.float64), n_estimators=DEFAULT_N_ESTIMATORS,
                       max_samples=DEFAULT_MAX_SAMPLES, contamination=contamination, seed=0)
    forest = CompiledForest.from_sklearn(model, feature_names=list(FEATURE_NAMES),
                                         feature_set_version=FEATURE_SET_VERSION, model_version="bootstrap")
    warm = warm_history(sample, datetime.now(UTC))
    traffic = pd.DataFrame(simulated_transactions(3_000, seed=321))
    both = compute_features(pd.concat([warm, traffic], ignore_index=True))
    live = both.iloc[len(warm):]
    alerts = forest.risk_score(live[list(FEATURE_NAMES)].to_numpy(np.float64)) > forest.threshold_
    cold_starts = int((live["seconds_since_prev"] == RETENTION_SECONDS).sum())
    assert alerts.mean() <= 2 * contamination, (
        f"{alerts.sum()} of {len(live)} flagged ({alerts.mean():.1%}); {cold_starts} cold starts")
