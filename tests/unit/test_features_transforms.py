"""Pure offline transforms and the feature definitions, checked by hand on small cases."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from configs.errors import InvalidInputError
from features import definitions
from features.definitions import FEATURE_NAMES, FEATURE_SET_VERSION, RETENTION_SECONDS
from features.transforms import compute_features, compute_merchant_features, compute_user_features

T0 = pd.Timestamp("2024-03-01T00:00:00", tz="UTC")


def frame(rows):
    """rows: (tid, user, amount, merchant, country, seconds after T0)."""
    tid, user, amount, merchant, country, sec = zip(*rows)
    return pd.DataFrame({"transaction_id": list(tid), "user_id": list(user), "amount": list(amount),
                         "merchant": list(merchant), "country": list(country),
                         "timestamp": [T0 + pd.Timedelta(seconds=s) for s in sec]})


def feats(rows):
    out = compute_features(frame(rows))
    return {tid: dict(zip(FEATURE_NAMES, vals)) for tid, vals in
            zip(out["transaction_id"], out[list(FEATURE_NAMES)].to_numpy())}


def test_names_version_and_docs():
    assert FEATURE_NAMES == (
        "amount_log", "transaction_hour", "velocity_1h", "velocity_24h", "amount_to_mean_7d",
        "amount_to_mean_30d", "seconds_since_prev", "is_new_merchant", "is_new_country",
        "merchant_volume_24h")
    assert set(definitions.FEATURE_DOCS) == set(FEATURE_NAMES)
    assert FEATURE_SET_VERSION.startswith("fs-") and len(FEATURE_SET_VERSION) == 15


def test_version_is_derived_from_the_definitions():
    base = definitions.describe_definitions()
    assert definitions.feature_set_version(base) == FEATURE_SET_VERSION
    for change in (
        {"windows_ns": {**base["windows_ns"], "retention": 60 * definitions.DAY_NS}},
        {"names": list(reversed(base["names"]))},
        {"cold_start": {**base["cold_start"], "amount_to_mean_7d": 0.0}},
        {"docs": {**base["docs"], "amount_log": "log(amount)"}},
        {"revision": base["revision"] + 1},
    ):
        assert definitions.feature_set_version({**base, **change}) != FEATURE_SET_VERSION


def test_cold_start_values():
    f = feats([("a", "u", 10.0, "m", "FR", 3600 * 5 + 7)])["a"]
    assert f == pytest.approx({
        "amount_log": np.log1p(10.0), "transaction_hour": 5.0, "velocity_1h": 0.0,
        "velocity_24h": 0.0, "amount_to_mean_7d": 1.0, "amount_to_mean_30d": 1.0,
        "seconds_since_prev": RETENTION_SECONDS, "is_new_merchant": 1.0, "is_new_country": 1.0,
        "merchant_volume_24h": 0.0}, abs=0)
    assert definitions.COLD_START["seconds_since_prev"] == 90 * 86400


def test_windows_are_half_open_on_the_left():
    hour, day = 3600, 86400
    f = feats([
        ("a", "u", 10.0, "m", "FR", 0),
        ("b", "u", 20.0, "m", "FR", hour),          # exactly 1 h after a: a is outside (t-1h, t]
        ("c", "u", 30.0, "m", "FR", hour + 1),      # a is 1h+1s before: outside; b inside
        ("d", "u", 40.0, "m", "FR", day),           # a exactly 24 h before: outside
        ("e", "u", 50.0, "m", "FR", 7 * day + hour),  # b is exactly 7 d before e
    ])
    assert f["b"]["velocity_1h"] == 0 and f["b"]["velocity_24h"] == 1
    assert f["c"]["velocity_1h"] == 1 and f["c"]["velocity_24h"] == 2
    assert f["d"]["velocity_24h"] == 2  # b, c; a is exactly 24 h earlier
    # 7 d window of e: (e - 7d, e] = (hour, ...]: b at exactly hour is out; c, d in.
    assert f["e"]["amount_to_mean_7d"] == 5000 * 2 / (3000 + 4000)
    assert f["e"]["amount_to_mean_30d"] == 5000 * 4 / (1000 + 2000 + 3000 + 4000)
    assert f["b"]["seconds_since_prev"] == hour
    assert f["e"]["seconds_since_prev"] == 6 * day + hour


def test_ties_on_timestamp_are_broken_by_id():
    f = feats([("b", "u", 20.0, "m", "FR", 100), ("a", "u", 10.0, "m2", "FR", 100)])
    assert f["a"]["velocity_1h"] == 0 and f["a"]["is_new_merchant"] == 1.0
    assert f["b"]["velocity_1h"] == 1 and f["b"]["seconds_since_prev"] == 0.0
    assert f["b"]["amount_to_mean_7d"] == 2.0
    assert f["a"]["merchant_volume_24h"] == 0 and f["b"]["merchant_volume_24h"] == 0  # other merchants


def test_new_merchant_and_country_use_the_retention():
    day = 86400
    f = feats([
        ("a", "u", 10.0, "m", "FR", 0),
        ("b", "u", 10.0, "m", "FR", 89 * day),
        ("c", "u", 10.0, "m", "DE", 89 * day + 10),
        ("d", "u", 10.0, "m2", "DE", 180 * day),  # b and c are 91 days back: outside retention
        ("e", "v", 10.0, "m", "FR", 89 * day + 20),  # another user: everything new for them
    ])
    assert (f["b"]["is_new_merchant"], f["b"]["is_new_country"]) == (0.0, 0.0)
    assert (f["c"]["is_new_merchant"], f["c"]["is_new_country"]) == (0.0, 1.0)
    assert (f["d"]["is_new_merchant"], f["d"]["is_new_country"]) == (1.0, 1.0)
    assert f["d"]["seconds_since_prev"] == RETENTION_SECONDS
    assert (f["e"]["is_new_merchant"], f["e"]["is_new_country"]) == (1.0, 1.0)
    assert f["e"]["merchant_volume_24h"] == 2  # b and c, all users, same merchant


def test_merchant_volume_counts_all_users_in_24h():
    f = feats([("a", "u", 1.0, "m", "FR", 0), ("b", "v", 1.0, "m", "FR", 10),
               ("c", "w", 1.0, "m", "FR", 86400), ("d", "w", 1.0, "x", "FR", 86400)])
    assert [f[k]["merchant_volume_24h"] for k in "abcd"] == [0, 1, 1, 0]


def test_ratios_use_integer_cents_exactly():
    f = feats([("a", "u", 0.1, "m", "FR", 0), ("b", "u", 0.2, "m", "FR", 1),
               ("c", "u", 0.3, "m", "FR", 2)])
    assert f["c"]["amount_to_mean_7d"] == 30 * 2 / 30 == 2.0


def test_duplicate_ids_count_once_and_copy_features():
    rows = [("a", "u", 10.0, "m", "FR", 0), ("b", "u", 20.0, "m", "FR", 60), ("a", "u", 10.0, "m", "FR", 0)]
    out = compute_features(frame(rows))
    X = out[list(FEATURE_NAMES)].to_numpy()
    assert np.array_equal(X[0], X[2])
    assert out.loc[1, "velocity_1h"] == 1 and out.loc[1, "merchant_volume_24h"] == 1


def test_row_identity_and_input_columns_are_kept():
    rng = np.random.default_rng(3)
    rows = [(f"t{i}", f"u{rng.integers(5)}", float(rng.integers(1, 500)), f"m{rng.integers(4)}",
             "FR", int(rng.integers(0, 10 * 86400))) for i in range(300)]
    df = frame(rows).sample(frac=1, random_state=1)
    df.index = df.index + 1000
    out = compute_features(df)
    assert out.index.equals(df.index)
    assert list(out.columns) == list(df.columns) + list(FEATURE_NAMES)
    pd.testing.assert_frame_equal(out[df.columns], df)
    X = out[list(FEATURE_NAMES)].to_numpy()
    assert X.dtype == np.float64 and not np.isnan(X).any()
    # Same result whatever the input order; user and merchant parts compose.
    again = compute_features(df.sort_values("transaction_id")).loc[df.index]
    assert np.array_equal(again[list(FEATURE_NAMES)].to_numpy(), X)
    split = compute_merchant_features(compute_user_features(df))
    assert np.array_equal(split[list(FEATURE_NAMES)].to_numpy(), X)


def test_timestamps_may_be_strings_or_naive():
    rows = [("a", "u", 10.0, "m", "FR", 0), ("b", "u", 20.0, "m", "FR", 60)]
    ref = compute_features(frame(rows))[list(FEATURE_NAMES)].to_numpy()
    df = frame(rows)
    df["timestamp"] = df["timestamp"].dt.tz_localize(None)
    assert np.array_equal(compute_features(df)[list(FEATURE_NAMES)].to_numpy(), ref)
    df["timestamp"] = ["2024-03-01T01:00:00+01:00", "2024-03-01T00:01:00Z"]
    assert np.array_equal(compute_features(df)[list(FEATURE_NAMES)].to_numpy(), ref)


def test_empty_frame_and_missing_columns():
    empty = frame([("a", "u", 1.0, "m", "FR", 0)]).iloc[:0]
    assert list(compute_features(empty).columns)[-10:] == list(FEATURE_NAMES)
    with pytest.raises(InvalidInputError, match="missing columns: merchant"):
        compute_user_features(frame([("a", "u", 1.0, "m", "FR", 0)]).drop(columns="merchant"))
