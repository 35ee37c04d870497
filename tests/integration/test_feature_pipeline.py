"""The Ray Data pipeline equals the pure pandas transform exactly."""

from __future__ import annotations

import numpy as np
import pytest

from configs.errors import InvalidInputError
from features.definitions import FEATURE_NAMES
from features.pipeline import compute_features_dataset, read_history
from features.transforms import compute_features

from tests.integration.test_online_state import simulate


def test_pipeline_equals_pandas_transform(ray_local, tmp_path):
    df = simulate(6_000, users=300, merchants=60, days=20, seed=11)
    expected = compute_features(df).set_index("transaction_id")
    folder = tmp_path / "history"
    folder.mkdir()
    df.iloc[:2500].to_parquet(folder / "a.parquet")
    df.iloc[2500:].to_parquet(folder / "b.parquet")
    out = compute_features_dataset(read_history(folder), buckets=4).to_pandas()
    assert len(out) == len(df)
    assert set(out.columns) == set(df.columns) | set(FEATURE_NAMES)
    out = out.set_index("transaction_id").loc[expected.index]
    assert np.array_equal(out[list(FEATURE_NAMES)].to_numpy(), expected[list(FEATURE_NAMES)].to_numpy())


def test_read_history_csv_and_bad_paths(ray_local, tmp_path):
    df = simulate(500, users=20, merchants=5, days=3, seed=2)
    df.to_csv(tmp_path / "h.csv", index=False)
    expected = compute_features(df).set_index("transaction_id")
    for buckets in (1, 2):
        out = compute_features_dataset(read_history(tmp_path / "h.csv"), buckets=buckets).to_pandas()
        out = out.set_index("transaction_id").loc[expected.index]
        assert np.array_equal(out[list(FEATURE_NAMES)].to_numpy(), expected[list(FEATURE_NAMES)].to_numpy())
    with pytest.raises(InvalidInputError, match="does not exist"):
        read_history(tmp_path / "missing")
    (tmp_path / "x.json").write_text("{}")
    with pytest.raises(InvalidInputError, match="only .csv or only .parquet"):
        read_history(tmp_path)
