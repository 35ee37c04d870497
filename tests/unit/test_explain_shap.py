"""The shap fallback explainer (`FRAUD_EXPLAINER=shap`) built from a pickle-free
artifact: it equals the compiled TreeSHAP within 1e-6. Pure: no Ray, no servers."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sklearn.ensemble import IsolationForest

from scoring.explain import ShapExplainer, make_explainer
from scoring.forest import CompiledForest
from scoring.persistence import load_model, save_model
from scoring.explain import score_and_explain

FSV = "fs-test-1"


def _forest(seed: int, n_rows: int, n_features: int, n_estimators: int, max_features, max_samples,
            constant: int | None = None) -> tuple[CompiledForest, np.ndarray]:
    rng = np.random.default_rng(seed)
    # float32-representable values: the trees compare float32
    X = (rng.normal(size=(n_rows, n_features)) * rng.uniform(0.1, 10, size=n_features))
    if constant is not None:
        X[:, constant] = 3.0
    X = X.astype(np.float32).astype(np.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # max_samples > n_samples
        model = IsolationForest(n_estimators=n_estimators, max_features=max_features,
                                max_samples=max_samples, random_state=seed % 1000).fit(X)
    forest = CompiledForest.from_sklearn(model, feature_set_version=FSV, model_version="m")
    Xq = np.vstack([X[:40], X[:40] * 3 + 1])
    return forest, Xq


def _at_thresholds(forest: CompiledForest, X: np.ndarray) -> np.ndarray:
    """Rows with one value exactly at, just below and just above a node's threshold."""
    rows = []
    for node in np.nonzero(forest.feature >= 0)[0][:30]:
        t32 = np.float32(forest.threshold[node])
        for v in (np.nextafter(t32, np.float32(-np.inf)), t32, np.nextafter(t32, np.float32(np.inf))):
            row = X[node % len(X)].copy()
            row[forest.feature[node]] = v
            rows.append(row)
    return np.asarray(rows).reshape(-1, X.shape[1])


def _assert_same_explainer(forest: CompiledForest, Xq: np.ndarray) -> None:
    fallback = make_explainer(forest, "shap")
    compiled = make_explainer(forest, "compiled")
    assert isinstance(fallback, ShapExplainer)
    assert fallback.expected_value == pytest.approx(compiled.expected_value, abs=1e-6)
    np.testing.assert_allclose(fallback.shap_values(Xq), compiled.shap_values(Xq), rtol=0, atol=1e-6)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**32 - 1), n_features=st.sampled_from([1, 2, 5, 10]),
       n_estimators=st.integers(1, 8), max_features=st.sampled_from([1.0, 0.5, 1]),
       max_samples=st.sampled_from([4, 32, "auto"]), constant=st.sampled_from([None, 0]))
def test_shap_fallback_from_arrays_equals_the_compiled_explainer(seed, n_features, n_estimators, max_features,
                                                                 max_samples, constant):
    # Trees that see one feature (max_features=1) are included: shap cannot explain
    # those from the scikit-learn model, but can from the arrays.
    forest, Xq = _forest(seed, 120, n_features, n_estimators, max_features, max_samples, constant)
    _assert_same_explainer(forest, np.vstack([Xq, _at_thresholds(forest, Xq)]))


def test_single_leaf_trees_explain_to_zero():
    _, Xq = _forest(1, 50, 3, 4, 1.0, 8)
    X = np.full((20, 3), 2.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = IsolationForest(n_estimators=3, random_state=0).fit(X)  # every tree is one leaf
    flat = CompiledForest.from_sklearn(model, feature_set_version=FSV)
    assert (flat.feature < 0).all()
    np.testing.assert_array_equal(make_explainer(flat, "shap").shap_values(Xq), np.zeros((len(Xq), 3)))
    _assert_same_explainer(flat, Xq)


def test_shap_fallback_works_on_a_loaded_artifact_and_in_score_and_explain(tmp_path):
    forest, Xq = _forest(7, 2000, 10, 30, 1.0, "auto")
    loaded = load_model(save_model(forest, tmp_path / "m").path, expected_feature_set_version=FSV)
    fallback = make_explainer(loaded, "shap")  # no scikit-learn model anywhere
    _assert_same_explainer(loaded, Xq)
    a = score_and_explain(loaded, Xq, explainer=fallback)
    b = score_and_explain(forest, Xq)
    np.testing.assert_array_equal(a.risk_score, b.risk_score)
    np.testing.assert_allclose(a.explanation, b.explanation, rtol=0, atol=1e-6)
    assert a.expected_value == pytest.approx(b.expected_value, abs=1e-6)
    assert fallback.shap_values(Xq[:0]).shape == (0, 10)


def test_shap_fallback_follows_the_setting(monkeypatch):
    from configs.settings import get_settings

    forest, Xq = _forest(3, 200, 4, 5, 1.0, "auto")
    monkeypatch.setenv("FRAUD_EXPLAINER", "shap")
    get_settings.cache_clear()
    try:
        assert make_explainer(forest).kind == "shap"
    finally:
        monkeypatch.delenv("FRAUD_EXPLAINER")
        get_settings.cache_clear()


def test_trees_interleaved_in_the_arrays_are_rebuilt_apart():
    """An artifact may store the trees' nodes interleaved (here level by level across
    all trees): the fallback must still give each tree its own nodes."""
    forest, Xq = _forest(11, 300, 5, 6, 0.6, 64)
    depth = np.zeros(forest.feature.shape[0], dtype=np.int64)
    for n in np.nonzero(forest.feature >= 0)[0]:
        depth[forest.left[n]] = depth[forest.right[n]] = depth[n] + 1
    order = np.lexsort((np.arange(depth.shape[0]), depth))  # by depth: parents stay first
    new = np.empty_like(order)
    new[order] = np.arange(order.shape[0])
    leaf = forest.feature[order] < 0
    mixed = CompiledForest(
        roots=new[forest.roots], feature=forest.feature[order], threshold=forest.threshold[order],
        left=np.where(leaf, -1, new[forest.left[order]]), right=np.where(leaf, -1, new[forest.right[order]]),
        n_node_samples=forest.n_node_samples[order], cover=forest.cover[order],
        n_features_in_=forest.n_features_in_, max_samples_=forest.max_samples_, offset_=forest.offset_,
        feature_names=forest.feature_names, feature_set_version=FSV)
    assert not np.array_equal(order, np.arange(order.shape[0]))
    np.testing.assert_allclose(make_explainer(mixed, "shap").shap_values(Xq), forest.shap_values(Xq),
                               rtol=0, atol=1e-6)
