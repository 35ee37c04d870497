"""scoring/: exactness against scikit-learn (1e-9) and shap (1e-6), risk semantics,
safe persistence and input validation. Pure: no Ray, no servers."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import shap
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sklearn.ensemble import IsolationForest

from configs.errors import IntegrityError, InvalidInputError, ModelVersionMismatchError
from scoring.explain import make_explainer, score_and_explain
from scoring.forest import CompiledForest
from scoring.persistence import artifact_sha256, load_model, save_model
from scoring.risk import (
    average_path_length,
    path_length_from_explanation,
    risk_from_explanation,
)

FSV = "fs-test-1"
PROPERTY = settings(max_examples=25, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def _data(rng: np.random.Generator, n: int, f: int, constant: int | None = None) -> np.ndarray:
    # float32-representable values: scikit-learn's trees compare float32, shap float64
    X = rng.normal(size=(n, f)) * rng.uniform(0.1, 10, size=f)
    if constant is not None:
        X[:, constant] = 3.0
    return X.astype(np.float32).astype(np.float64)


def _fit(X: np.ndarray, **kw) -> IsolationForest:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # max_samples > n_samples
        return IsolationForest(**kw).fit(X)


def _brute_force_shapley(forest: CompiledForest, X: np.ndarray) -> np.ndarray:
    """Shapley values by enumerating coalitions, with TreeSHAP's path-dependent game:
    v(S) = the tree's value when features in S follow x and the others split by cover."""
    from itertools import combinations
    from math import factorial

    def v(x, node, S):
        f = forest.feature[node]
        if f < 0:
            return forest.value[node]
        l, r = forest.left[node], forest.right[node]
        if f in S:
            return v(x, l if np.float32(x[f]) <= forest.threshold[node] else r, S)
        c = forest.cover
        return (c[l] * v(x, l, S) + c[r] * v(x, r, S)) / c[node]

    F = X.shape[1]
    out = np.zeros((len(X), F))
    for row, x in enumerate(X):
        for i in range(F):
            others = [j for j in range(F) if j != i]
            for size in range(F):
                weight = factorial(size) * factorial(F - size - 1) / factorial(F)
                for S in combinations(others, size):
                    S = set(S)
                    out[row, i] += weight * sum(
                        v(x, root, S | {i}) - v(x, root, S) for root in forest.roots)
    return out / forest.n_estimators


@st.composite
def forests(draw):
    seed = draw(st.integers(0, 2**32 - 1))
    n_features = draw(st.sampled_from([1, 2, 3, 5, 10, 30]))
    max_features_choices = st.one_of(st.just(1.0), st.floats(0.2, 1.0), st.integers(1, n_features))
    n_rows = draw(st.integers(2, 300))
    max_samples = draw(st.one_of(st.integers(3, 16), st.just("auto"), st.floats(0.05, 1.0)))
    if isinstance(max_samples, float) and int(max_samples * n_rows) < 1:
        max_samples = 1.0  # scikit-learn refuses a subsample of zero rows
    # shap cannot check trees that see one feature; the brute force can, if few features
    max_features = draw(max_features_choices if n_features <= 5 else st.sampled_from([1.0, 0.5, 0.8]))
    contamination = draw(st.one_of(st.just("auto"), st.floats(0.01, 0.5)))
    constant = draw(st.one_of(st.none(), st.integers(0, n_features - 1)))
    rng = np.random.default_rng(seed)
    X = _data(rng, n_rows, n_features, constant)
    model = _fit(X, n_estimators=draw(st.integers(1, 6)), max_samples=max_samples,
                 max_features=max_features, contamination=contamination, random_state=seed % 1000)
    # the kernels' paths: one row at a time (< 32 rows), vector code on one thread, threads (>= 64)
    n_query = draw(st.sampled_from([0, 1, 7, 50, 100]))
    Xq = np.vstack([X, _data(rng, 100, n_features) * 3])[rng.permutation(n_rows + 100)[:n_query]]
    return model, Xq


def test_query_sizes_reach_every_shap_path():
    """`forests` draws 1, 7, 50 and 100 rows: keep them on each side of the kernels' thresholds."""
    from scoring import _kernels
    from scoring.forest import PARALLEL_MIN_ROWS_SHAP

    assert 7 < _kernels.SHAP_VECTOR_ROWS <= 50 < PARALLEL_MIN_ROWS_SHAP <= 100


@PROPERTY
@given(forests())
def test_scores_equal_sklearn(case):
    model, Xq = case
    forest = CompiledForest.from_sklearn(model, feature_set_version=FSV)
    if len(Xq) == 0:
        assert forest.score_samples(Xq).shape == (0,)
        return
    np.testing.assert_allclose(forest.score_samples(Xq), model.score_samples(Xq), rtol=0, atol=1e-9)
    np.testing.assert_allclose(forest.decision_function(Xq), model.decision_function(Xq), rtol=0, atol=1e-9)
    np.testing.assert_array_equal(forest.predict(Xq), model.predict(Xq))
    assert forest.threshold_ == -model.offset_
    # below SHAP_VECTOR_ROWS rows, one walk per row scores and explains: the same bits
    scored = score_and_explain(forest, Xq)
    np.testing.assert_array_equal(scored.risk_score, forest.risk_score(Xq))
    rows = [score_and_explain(forest, Xq[i:i + 1]).risk_score for i in range(min(len(Xq), 10))]
    np.testing.assert_array_equal(np.concatenate(rows), forest.risk_score(Xq[:10]))
    np.testing.assert_array_equal(scored.anomaly, model.predict(Xq) == -1)


@PROPERTY
@given(forests())
def test_shap_values_equal_shap_and_add_up(case):
    model, Xq = case
    forest = CompiledForest.from_sklearn(model, feature_set_version=FSV)
    phi = forest.shap_values(Xq)
    assert phi.shape == (len(Xq), model.n_features_in_)
    if min(len(f) for f in model.estimators_features_) > 1:
        explainer = shap.TreeExplainer(model)
        assert forest.expected_value == pytest.approx(float(np.ravel(explainer.expected_value)[0]), abs=1e-6)
        if len(Xq):
            np.testing.assert_allclose(phi, explainer.shap_values(Xq), rtol=0, atol=1e-6)
    else:
        # shap 0.51 cannot build a tree that sees one feature (it indexes
        # estimators_features_ with the leaf marker -2): compare with the definition.
        np.testing.assert_allclose(phi[:5], _brute_force_shapley(forest, Xq[:5]), rtol=0, atol=1e-9)
    # additivity: sum(explanation) == expected_value - E[h(x)], and it gives back the risk
    batch = score_and_explain(forest, Xq)
    np.testing.assert_allclose(batch.explanation.sum(axis=1),
                               forest.expected_value - forest.mean_path_length(Xq), rtol=0, atol=1e-9)
    np.testing.assert_allclose(
        risk_from_explanation(batch.explanation, batch.expected_value, forest.max_samples_),
        batch.risk_score, rtol=0, atol=1e-9)
    np.testing.assert_allclose(path_length_from_explanation(batch.explanation, batch.expected_value),
                               forest.mean_path_length(Xq), rtol=0, atol=1e-9)


@pytest.fixture(scope="module")
def fitted():
    rng = np.random.default_rng(7)
    X = _data(rng, 2000, 10)
    model = _fit(X, n_estimators=30, contamination=0.05, random_state=0)
    forest = CompiledForest.from_sklearn(model, feature_set_version=FSV, model_version="m-1")
    return model, forest, X


def test_risk_semantics_agree_with_sklearn(fitted):
    model, forest, X = fitted
    batch = score_and_explain(forest, X)
    np.testing.assert_allclose(batch.risk_score, -model.score_samples(X), atol=1e-9, rtol=0)
    assert np.all((batch.risk_score > 0) & (batch.risk_score <= 1))
    np.testing.assert_array_equal(batch.anomaly, model.predict(X) == -1)
    assert batch.anomaly.mean() == pytest.approx(0.05, abs=0.01)
    assert batch.threshold == -model.offset_ and batch.model_version == "m-1"
    assert batch.explanation.shape == (len(X), 10) and batch.anomaly.dtype == bool
    # a positive explanation pushes towards an anomaly: anomalies carry more of it
    assert batch.explanation[batch.anomaly].sum(1).mean() > batch.explanation[~batch.anomaly].sum(1).mean()
    lowered = score_and_explain(forest, X, threshold_override=0.0)
    assert lowered.anomaly.all() and lowered.threshold == 0.0


def test_large_batch_uses_parallel_path_and_stays_exact(fitted):
    model, forest, X = fitted
    Xbig = np.vstack([X] * 3)
    np.testing.assert_allclose(forest.score_samples(Xbig), model.score_samples(Xbig), atol=1e-9, rtol=0)
    np.testing.assert_allclose(forest.shap_values(Xbig[:64]),
                               shap.TreeExplainer(model).shap_values(Xbig[:64]), atol=1e-6, rtol=0)


@pytest.mark.parametrize("n", [37, 63, 200, 301])
def test_single_rows_and_blocks_agree(fitted, n):
    """The one-row kernel and the vector code give the same values, whatever the rows
    left in the lanes past a block's or a thread's last row (37: one thread; 63, 200
    and 301: chunks rounded up to whole vectors, the last one short)."""
    _, forest, X = fitted
    batch = forest.shap_values(X[:n])
    rows = np.vstack([forest.shap_values(X[i:i + 1]) for i in range(n)])
    np.testing.assert_allclose(rows, batch, rtol=0, atol=1e-12)
    # score_and_explain hands float64 and float32 rows to the walk unconverted: the same bits
    for dtype in (np.float64, np.float32):
        Xd = X[:n].astype(dtype)
        scored = [score_and_explain(forest, Xd[i:i + 1]) for i in range(n)]
        np.testing.assert_array_equal(np.vstack([s.explanation for s in scored]), -rows)
        np.testing.assert_array_equal(np.concatenate([s.risk_score for s in scored]), forest.risk_score(X[:n]))


def test_deep_trees_walk_every_group_of_quadrature_nodes():
    """max_samples 2000: depth 11, six quadrature nodes padded to eight, so the
    single-row walk runs two groups of four; it must still equal shap, the vector
    code and (the score, from the first group only) the scoring kernel bit for bit."""
    from scoring import _kernels

    rng = np.random.default_rng(11)
    X = _data(rng, 2000, 6)
    model = _fit(X, n_estimators=4, max_samples=2000, random_state=1)
    forest = CompiledForest.from_sklearn(model, feature_set_version=FSV)
    assert forest.max_depth_ > 8 and forest._row_program[-1] == 2
    Xq = X[:40]
    phi_rows = np.vstack([forest.shap_values(Xq[i:i + 1]) for i in range(len(Xq))])
    np.testing.assert_allclose(phi_rows, shap.TreeExplainer(model).shap_values(Xq), rtol=0, atol=1e-6)
    np.testing.assert_allclose(phi_rows, forest.shap_values(Xq), rtol=0, atol=1e-12)
    assert len(Xq) >= _kernels.SHAP_VECTOR_ROWS  # forest.shap_values(Xq) took the vector code
    risk_rows = [score_and_explain(forest, Xq[i:i + 1]).risk_score for i in range(len(Xq))]
    np.testing.assert_array_equal(np.concatenate(risk_rows), forest.risk_score(Xq))


def test_single_row_walk_is_compiled_with_the_slp_vectorizer_before_any_call(fitted, monkeypatch):
    """Building the single-row program compiles the walk for float32 and float64
    rows with SLP on, so that no first call compiles (and caches) it without; the
    flag is numba's own again afterwards."""
    from numba.core import config as numba_config

    from scoring import _kernels

    compiled = []

    class Recorder:  # stands in for the numba dispatcher: records each compilation
        def compile(self, signature):
            compiled.append((str(signature[0].dtype), numba_config.SLP_VECTORIZE))

    monkeypatch.setattr(_kernels, "score_shap_rows", Recorder())
    before = numba_config.SLP_VECTORIZE
    CompiledForest.from_sklearn(fitted[0], feature_set_version=FSV)._row_program
    assert sorted(compiled) == [("float32", 1), ("float64", 1)]
    assert numba_config.SLP_VECTORIZE == before


def test_scoring_alone_never_builds_the_shap_tables(fitted, tmp_path):
    """The model step warms and scores without the SHAP tables (nor their kernels);
    the SHAP step builds them on first use, with the same values as ever."""
    model, forest, X = fitted
    save_model(forest, tmp_path / "m")
    scorer = load_model(tmp_path / "m", expected_feature_set_version=FSV)
    scorer.warmup(score=True, shap=False)
    np.testing.assert_allclose(scorer.score_samples(X[:50]), model.score_samples(X[:50]), atol=1e-9, rtol=0)
    assert not {"_fused_tables", "_shap_tables", "_row_program"} & set(vars(scorer))
    explainer = load_model(tmp_path / "m", expected_feature_set_version=FSV)
    explainer.warmup(score=False, shap=True)
    assert {"_shap_tables", "_row_program"} <= set(vars(explainer))
    np.testing.assert_array_equal(explainer.shap_values(X[:70]), forest.shap_values(X[:70]))


def test_thresholds_between_float32_values_split_as_sklearn():
    """Rows exactly at, just below and just above a float32-rounded threshold."""
    rng = np.random.default_rng(3)
    X = _data(rng, 300, 3)
    model = _fit(X, n_estimators=5, random_state=1)
    forest = CompiledForest.from_sklearn(model, feature_set_version=FSV)
    tree = model.estimators_[0].tree_
    near = []
    for node in np.nonzero(tree.children_left >= 0)[0][:20]:
        t32 = np.float32(tree.threshold[node])
        for v in (np.nextafter(t32, np.float32(-np.inf)), t32, np.nextafter(t32, np.float32(np.inf))):
            row = X[node % len(X)].copy()
            row[tree.feature[node]] = v
            near.append(row)
    Xq = np.asarray(near)
    np.testing.assert_allclose(forest.score_samples(Xq), model.score_samples(Xq), rtol=0, atol=1e-9)
    np.testing.assert_allclose(forest.shap_values(Xq).sum(axis=1),
                               forest.mean_path_length(Xq) - forest.expected_value, rtol=0, atol=1e-9)


def test_explainers_agree_and_follow_settings(fitted):
    model, forest, X = fitted
    compiled = make_explainer(forest, "compiled")
    fallback = make_explainer(forest, "shap", sklearn_model=model)
    assert make_explainer(forest).kind == "compiled"  # the default setting
    assert compiled.expected_value == pytest.approx(fallback.expected_value, abs=1e-6)
    np.testing.assert_allclose(compiled.shap_values(X[:20]), fallback.shap_values(X[:20]), atol=1e-6, rtol=0)
    a = score_and_explain(forest, X[:20], explainer=fallback)
    b = score_and_explain(forest, X[:20])
    np.testing.assert_allclose(a.explanation, b.explanation, atol=1e-6, rtol=0)
    # without the scikit-learn model (artifacts have none), shap explains the forest's arrays
    from_arrays = make_explainer(forest, "shap")
    np.testing.assert_allclose(from_arrays.shap_values(X[:20]), fallback.shap_values(X[:20]), atol=1e-6, rtol=0)


def test_average_path_length_matches_sklearn():
    from sklearn.ensemble._iforest import _average_path_length

    n = np.arange(0, 600, dtype=np.float64)
    np.testing.assert_array_equal(average_path_length(n), _average_path_length(n))


def test_save_load_round_trip(fitted, tmp_path):
    model, forest, X = fitted
    artifact = save_model(forest, tmp_path / "m")
    assert artifact.sha256 == artifact_sha256(tmp_path / "m")
    loaded = load_model(tmp_path / "m", expected_sha256=artifact.sha256, expected_feature_set_version=FSV)
    np.testing.assert_array_equal(loaded.score_samples(X), forest.score_samples(X))
    np.testing.assert_array_equal(loaded.shap_values(X[:10]), forest.shap_values(X[:10]))
    assert (loaded.feature_names, loaded.feature_set_version, loaded.model_version) == (
        forest.feature_names, FSV, "m-1")
    assert loaded.threshold_ == forest.threshold_ and loaded.max_samples_ == model.max_samples_
    meta = json.loads((tmp_path / "m" / "model.json").read_text())
    assert meta["sklearn_params"]["n_estimators"] == 30 and "created_at" in meta


@pytest.mark.parametrize("victim", ["model.npz", "model.json"])
def test_tampered_file_is_refused(fitted, tmp_path, victim):
    _, forest, _ = fitted
    artifact = save_model(forest, tmp_path)
    target = tmp_path / victim
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0x01
    target.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="sha256"):
        load_model(tmp_path, expected_sha256=artifact.sha256)


def test_feature_set_version_mismatch_is_refused(fitted, tmp_path):
    _, forest, _ = fitted
    save_model(forest, tmp_path)
    with pytest.raises(ModelVersionMismatchError) as info:
        load_model(tmp_path, expected_feature_set_version="fs-other")
    assert FSV in str(info.value) and "fs-other" in str(info.value)


def test_pickled_arrays_are_refused(fitted, tmp_path):
    _, forest, _ = fitted
    save_model(forest, tmp_path)
    with np.load(tmp_path / "model.npz") as npz:
        arrays = dict(npz)
    arrays["feature"] = np.array([object()], dtype=object)
    np.savez(tmp_path / "model.npz", **arrays)
    with pytest.raises(Exception, match="cannot be read"):
        load_model(tmp_path)


@pytest.mark.parametrize(
    "bad, message",
    [
        (np.zeros(10), "2-D"),
        (np.zeros((2, 3, 10)), "2-D"),
        (np.zeros((3, 9)), "expected 10 features"),
        (np.array([[np.nan] * 10]), "NaN or infinite"),
        (np.array([[0.0] * 9 + [np.inf]]), "NaN or infinite"),
        (np.array([[0.0] * 9 + [1e300]]), "float32 range"),
        # the walk of a few rows checks them itself: a bad value in any row, float32 too
        (np.array([[0.0] * 10, [0.0] * 4 + [np.nan] + [0.0] * 5], dtype=np.float32),
         "NaN or infinite value at row 1, feature 'x4'"),
        (np.array([[0.0] * 10] * 3 + [[-1e39] + [0.0] * 9]), "float32 range at row 3"),
        ([["a"] * 10], "numbers"),
    ],
)
def test_bad_input_is_refused_with_a_clear_message(fitted, bad, message):
    _, forest, _ = fitted
    for method in (forest.score_samples, forest.shap_values, lambda X: score_and_explain(forest, X)):
        with pytest.raises(InvalidInputError, match=message):
            method(bad)


def test_empty_batch_returns_empty_arrays(fitted):
    _, forest, _ = fitted
    batch = score_and_explain(forest, np.zeros((0, 10)))
    assert batch.risk_score.shape == (0,) and batch.anomaly.shape == (0,)
    assert batch.explanation.shape == (0, 10) and len(batch) == 0
    assert forest.predict(np.zeros((0, 10))).shape == (0,)


def test_from_sklearn_checks_its_arguments(fitted):
    model, _, _ = fitted
    with pytest.raises(InvalidInputError, match="feature_names"):
        CompiledForest.from_sklearn(model, feature_names=["a"], feature_set_version=FSV)
    with pytest.raises(InvalidInputError, match="not fitted"):
        CompiledForest.from_sklearn(IsolationForest(), feature_set_version=FSV)
