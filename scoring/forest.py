"""`CompiledForest`: a fitted scikit-learn IsolationForest as flat arrays.

Scores equal scikit-learn's (1e-9) and TreeSHAP values equal
``shap.TreeExplainer(model)``'s (1e-6), with shap's conventions for Isolation
Forest (see shap/explainers/_tree.py, ``IsoTree``):

- a leaf's value is its path length: depth (root = 0) + c(n_node_samples);
  an internal node's value is the n_node_samples-weighted mean of its leaves,
  so ``expected_value`` is the mean over trees of the root's value;
- node cover (the zero fractions of TreeSHAP) is ``weighted_n_node_samples``;
- tree-local features map to columns through ``estimators_features_``;
- the forest's output is the mean over trees.

One difference from shap: rows are cast to float32 before comparing with the
thresholds, as scikit-learn's trees do (shap compares float64), so that the
explanation adds up to the score exactly. The two only differ for values that
round across a threshold in float32.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np

from configs.errors import InvalidInputError
from scoring import _kernels
from scoring.risk import average_path_length

logger = logging.getLogger(__name__)

# Below this many rows a batch runs on the calling thread: waking the pool's
# sleeping threads costs more (SHAP: two chunks of vector code at least).
PARALLEL_MIN_ROWS_SCORE = 2048
PARALLEL_MIN_ROWS_SHAP = 2 * _kernels.SHAP_VECTOR_ROWS

# The arrays that define a forest; everything else is derived from them.
ARRAY_FIELDS = (
    "roots", "feature", "threshold", "left", "right", "n_node_samples", "cover",
)


@dataclass(frozen=True, eq=False)
class CompiledForest:
    """An Isolation Forest as flat per-node arrays (all trees concatenated).

    ``feature[n] == -1`` marks a leaf; ``left``/``right`` are global node indices;
    ``roots[t]`` is tree t's root. Build with :meth:`from_sklearn` or
    ``scoring.persistence.load_model``.
    """

    roots: np.ndarray
    feature: np.ndarray
    threshold: np.ndarray
    left: np.ndarray
    right: np.ndarray
    n_node_samples: np.ndarray
    cover: np.ndarray
    n_features_in_: int
    max_samples_: int
    offset_: float
    feature_names: tuple[str, ...]
    feature_set_version: str
    model_version: str = ""
    params: dict[str, Any] = field(default_factory=dict)
    # derived in __post_init__
    value: np.ndarray = field(init=False, repr=False)
    score_value: np.ndarray = field(init=False, repr=False)
    expected_value_: float = field(init=False)
    max_depth_: int = field(init=False)
    _layout: tuple = field(init=False, repr=False)

    # ---------------------------------------------------------------- building
    @classmethod
    def from_sklearn(
        cls,
        model: Any,
        *,
        feature_names: list[str] | tuple[str, ...] | None = None,
        feature_set_version: str,
        model_version: str = "",
    ) -> CompiledForest:
        """Flattens a fitted ``sklearn.ensemble.IsolationForest``."""
        from sklearn.ensemble import IsolationForest

        if not isinstance(model, IsolationForest):
            raise InvalidInputError(
                f"model: expected a fitted sklearn IsolationForest, got {type(model).__name__}"
            )
        if not hasattr(model, "estimators_"):
            raise InvalidInputError("model: the IsolationForest is not fitted")
        n_features = int(model.n_features_in_)
        if feature_names is None:
            names = getattr(model, "feature_names_in_", None)
            feature_names = (
                [str(n) for n in names] if names is not None
                else [f"x{i}" for i in range(n_features)]
            )
        feature_names = tuple(str(n) for n in feature_names)
        if len(feature_names) != n_features:
            raise InvalidInputError(
                f"feature_names: {len(feature_names)} names for a model of {n_features} features"
            )
        # scikit-learn indexes columns only when features were subsampled.
        subsample = model._max_features != n_features
        roots, feats, thrs, lefts, rights, counts, covers = [], [], [], [], [], [], []
        offset = 0
        for est, cols in zip(model.estimators_, model.estimators_features_):
            tree = est.tree_
            local = tree.feature.astype(np.int64)
            is_leaf = tree.children_left < 0
            mapped = np.asarray(cols, dtype=np.int64)[np.where(is_leaf, 0, local)] if subsample else local
            roots.append(offset)
            feats.append(np.where(is_leaf, -1, mapped))
            thrs.append(np.where(is_leaf, 0.0, tree.threshold.astype(np.float64)))
            lefts.append(np.where(is_leaf, -1, tree.children_left + offset))
            rights.append(np.where(is_leaf, -1, tree.children_right + offset))
            counts.append(tree.n_node_samples.astype(np.float64))
            covers.append(tree.weighted_n_node_samples.astype(np.float64))
            offset += tree.node_count
        params = {
            k: v for k, v in model.get_params().items()
            if v is None or isinstance(v, (bool, int, float, str))
        }
        return cls(
            roots=np.asarray(roots, dtype=np.int64),
            feature=np.concatenate(feats).astype(np.int64),
            threshold=np.concatenate(thrs),
            left=np.concatenate(lefts).astype(np.int64),
            right=np.concatenate(rights).astype(np.int64),
            n_node_samples=np.concatenate(counts),
            cover=np.concatenate(covers),
            n_features_in_=n_features,
            max_samples_=int(model.max_samples_),
            offset_=float(model.offset_),
            feature_names=feature_names,
            feature_set_version=str(feature_set_version),
            model_version=str(model_version),
            params=params,
        )

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        _check_structure(self)
        value, score_value, depth = _node_values(
            self.roots, self.feature, self.left, self.right, self.n_node_samples)
        set_(self, "value", value)
        set_(self, "score_value", score_value)
        set_(self, "max_depth_", int(depth))
        set_(self, "expected_value_", float(value[self.roots].mean()))
        set_(self, "_score_denominator", self.n_estimators * float(average_path_length(self.max_samples_)))
        # breadth-first trees with adjacent children and float32 thresholds
        order, child, tree_start, tree_depth = _kernels.build_layout(
            self.roots, self.feature, self.left, self.right)
        feat = np.where(self.feature[order] < 0, 0, self.feature[order]).astype(np.int32)
        thr = _round_down_to_float32(self.threshold[order])
        thr[self.feature[order] < 0] = np.inf  # a leaf keeps every row where it is
        set_(self, "_layout", (feat, thr, child, np.ascontiguousarray(score_value[order]),
                               tree_start, tree_depth))

    # The TreeSHAP tables are built on first use: a process that only scores (the
    # model step) neither builds them nor compiles their kernels, which on a cold
    # numba cache is most of a first start (see `warmup`).
    @cached_property
    def _fused_tables(self) -> tuple:
        """`_kernels.fuse_twigs`'s tables: the batch kernel's, then the leaves'
        scoring values (single rows)."""
        t, w = _quadrature(self.max_depth_)
        order, parent, level, tree_start = _kernels.build_preorder(
            self.roots, self.feature, self.left, self.right)
        full = _kernels.prepare_shap(
            self.feature[order], _round_down_to_float32(self.threshold[order]),
            self.cover[order], self.value[order], parent, level, tree_start, t, w)
        return _kernels.fuse_twigs(tree_start, *full, self.score_value[order])

    @cached_property
    def _shap_tables(self) -> tuple:
        """The batch TreeSHAP kernels' arguments after the rows."""
        return (*self._fused_tables[:-2], self.max_depth_)

    @cached_property
    def _row_program(self) -> tuple:
        """`_kernels.score_shap_rows`' arguments after the rows and the tree count;
        the kernel compiled for float32 and float64 rows (`compile_row_walk`)."""
        *fused, leaf_score, twig_score = self._fused_tables
        program = _kernels.row_program(*fused, self.max_depth_, leaf_score, twig_score)
        for dtype in (np.float32, np.float64):
            _kernels.compile_row_walk(np.zeros((1, self.n_features_in_), dtype), self.n_estimators, *program)
        return program

    @property
    def n_estimators(self) -> int:
        return int(self.roots.shape[0])

    @property
    def threshold_(self) -> float:
        """The risk threshold, ``-offset_``: see scoring.risk."""
        return -self.offset_

    # -------------------------------------------------------------- validation
    def check_input(self, X: Any) -> np.ndarray:
        """Returns ``X`` as a C-contiguous float32 (n, n_features) array or raises
        InvalidInputError naming the problem."""
        try:
            arr = np.asarray(X)
        except (TypeError, ValueError) as e:
            raise InvalidInputError(f"X: cannot be read as a numeric array ({e})") from e
        if arr.ndim != 2:
            raise InvalidInputError(
                f"X: expected a 2-D array of shape (n_rows, {self.n_features_in_}), "
                f"got {arr.ndim}-D with shape {arr.shape}"
            )
        if arr.shape[1] != self.n_features_in_:
            raise InvalidInputError(
                f"X: expected {self.n_features_in_} features {list(self.feature_names)}, "
                f"got {arr.shape[1]}"
            )
        if arr.dtype.kind not in "biuf":
            try:
                arr = arr.astype(np.float64)
            except (TypeError, ValueError) as e:
                raise InvalidInputError(f"X: values must be numbers ({e})") from e
        with np.errstate(over="ignore"):
            X32 = np.ascontiguousarray(arr, dtype=np.float32)
        # One test for the common case: a float64 sum of float32 values cannot
        # overflow, so it is finite exactly when every value is (a single row
        # spent 4 of its ~25 us outside the kernels in two isfinite passes).
        if not math.isfinite(X32.sum(dtype=np.float64)):
            self._raise_not_finite(arr, X32)
        return X32

    def _raise_not_finite(self, arr: np.ndarray, X32: np.ndarray) -> None:
        """Names the first NaN or infinite input, or else the first value that
        float32 cannot hold."""
        if arr.dtype.kind == "f" and not np.isfinite(arr).all():
            rows, cols = np.nonzero(~np.isfinite(arr))
            raise InvalidInputError(
                f"X: NaN or infinite value at row {rows[0]}, feature "
                f"{self.feature_names[cols[0]]!r} ({int(rows.size)} such values)"
            )
        rows, cols = np.nonzero(~np.isfinite(X32))
        raise InvalidInputError(
            f"X: value out of float32 range at row {rows[0]}, feature "
            f"{self.feature_names[cols[0]]!r}"
        )

    # ----------------------------------------------------------------- scoring
    def mean_path_length(self, X: Any) -> np.ndarray:
        """E[h(x)]: the mean over trees of depth + c(leaf size)."""
        return self._mean_path_length_unchecked(self.check_input(X))

    def score_samples(self, X: Any) -> np.ndarray:
        """As ``IsolationForest.score_samples``: ``-risk_score``."""
        return -self._risk_score_unchecked(self.check_input(X))

    def risk_score(self, X: Any) -> np.ndarray:
        return self._risk_score_unchecked(self.check_input(X))

    def decision_function(self, X: Any) -> np.ndarray:
        return self.score_samples(X) - self.offset_

    def predict(self, X: Any) -> np.ndarray:
        """+1 inlier, -1 outlier, as scikit-learn."""
        return np.where(self.decision_function(X) < 0, -1, 1)

    def shap_values(self, X: Any) -> np.ndarray:
        """Path-dependent TreeSHAP values, (n, n_features), path-length units, as shap."""
        return self._shap_values_unchecked(self.check_input(X))

    @property
    def expected_value(self) -> float:
        return self.expected_value_

    # ---------------------------------------------- private fast path, no checks
    def _path_length_sums(self, X32: np.ndarray) -> np.ndarray:
        kernel = (
            _kernels.path_length_sums_parallel
            if X32.shape[0] >= PARALLEL_MIN_ROWS_SCORE
            else _kernels.path_length_sums_serial
        )
        return kernel(X32, *self._layout)

    def _mean_path_length_unchecked(self, X32: np.ndarray) -> np.ndarray:
        if X32.shape[0] == 0:
            return np.empty(0)
        return self._path_length_sums(X32) / self.n_estimators

    def _risk_score_unchecked(self, X32: np.ndarray) -> np.ndarray:
        if X32.shape[0] == 0:
            return np.empty(0)
        return self._risk_from_sums(self._path_length_sums(X32))

    def _risk_from_sums(self, path_length_sums: np.ndarray) -> np.ndarray:
        # the same operations in the same order as scikit-learn, so that a row
        # exactly at the threshold gets the same side
        denominator = self._score_denominator
        if denominator == 0.0:
            return np.full(path_length_sums.shape[0], 0.5)
        return 2 ** (-(path_length_sums / denominator))

    def _shap_values_unchecked(self, X32: np.ndarray) -> np.ndarray:
        n = X32.shape[0]
        if n == 0:
            return np.zeros((0, self.n_features_in_))
        if n >= PARALLEL_MIN_ROWS_SHAP:
            # chunks of at least SHAP_VECTOR_ROWS rows, so that each reaches the vector code
            n_chunks = max(1, min(4 * _n_threads(), n // _kernels.SHAP_VECTOR_ROWS))
            phi = _kernels.shap_parallel(X32, n_chunks, *self._shap_tables)
        elif n >= _kernels.SHAP_VECTOR_ROWS:
            phi = _kernels.shap_serial(X32, *self._shap_tables)
        else:  # too few rows for the vector code
            return _kernels.score_shap_rows(X32, self.n_estimators, *self._row_program)[:, 1:]
        phi /= self.n_estimators
        return phi

    def risk_and_shap(self, X: Any) -> tuple[np.ndarray, np.ndarray]:
        """(risk score, SHAP values) of ``X``, checked as `check_input` checks it.

        Below SHAP_VECTOR_ROWS rows one walk per row does both (the SHAP walk
        passes the leaf each tree sends the row to: a separate scoring walk was
        10-25% of a single row's time), and float rows go to it unconverted: it
        reads them as float32 and refuses a non-finite value itself (with the
        checks, conversions and results in numpy, a single row spent 25-29 us
        outside its ~100 us walk; now 12-15).
        """
        if (type(X) is np.ndarray and X.ndim == 2 and 0 < X.shape[0] < _kernels.SHAP_VECTOR_ROWS
                and X.shape[1] == self.n_features_in_ and X.dtype.char in "fd" and X.flags.c_contiguous):
            out = _kernels.score_shap_rows(X, self.n_estimators, *self._row_program)
            if out.shape[0]:
                return self._risk_from_sums(out[:, 0]), out[:, 1:]
        X32 = self.check_input(X)  # names the problem
        if X32.shape[0] == 0 or X32.shape[0] >= _kernels.SHAP_VECTOR_ROWS:
            return self._risk_score_unchecked(X32), self._shap_values_unchecked(X32)
        out = _kernels.score_shap_rows(X32, self.n_estimators, *self._row_program)
        return self._risk_from_sums(out[:, 0]), out[:, 1:]

    def warmup(self, score: bool = True, shap: bool = True) -> None:
        """Compiles (or loads from numba's cache) the scoring and/or the SHAP kernels.

        On a cold cache this takes about a minute of CPU in all (most of it SHAP),
        so the serving steps each warm only what they call."""
        X = np.zeros((PARALLEL_MIN_ROWS_SCORE, self.n_features_in_), dtype=np.float32)
        if score:
            self._risk_score_unchecked(X[:1])
            self._risk_score_unchecked(X)
        if shap:
            self._shap_values_unchecked(X[:1])
            self._shap_values_unchecked(X[:_kernels.SHAP_VECTOR_ROWS])
            self._shap_values_unchecked(X[:PARALLEL_MIN_ROWS_SHAP])
        if score and shap:
            self.risk_and_shap(X[:1])


def _check_structure(forest: CompiledForest) -> None:
    """Refuses arrays the kernels could not walk safely (they do no bounds checks)."""
    dtypes = {"roots": np.int64, "feature": np.int64, "left": np.int64, "right": np.int64,
              "threshold": np.float64, "n_node_samples": np.float64, "cover": np.float64}
    for name, dtype in dtypes.items():
        arr = getattr(forest, name)
        if not isinstance(arr, np.ndarray) or arr.dtype != dtype or arr.ndim != 1:
            raise InvalidInputError(f"forest.{name}: expected a 1-D {np.dtype(dtype)} array")
        object.__setattr__(forest, name, np.ascontiguousarray(arr))
    n = forest.feature.shape[0]
    if any(getattr(forest, k).shape[0] != n for k in ARRAY_FIELDS if k != "roots"):
        raise InvalidInputError("forest: per-node arrays differ in length")
    if forest.roots.shape[0] == 0 or n == 0:
        raise InvalidInputError("forest: no trees")
    if len(forest.feature_names) != forest.n_features_in_:
        raise InvalidInputError("forest.feature_names: one name per feature expected")
    idx = np.arange(n)
    internal = forest.feature >= 0
    if (
        forest.roots.min() < 0 or forest.roots.max() >= n
        or forest.feature.max() >= forest.n_features_in_ or forest.feature.min() < -1
        or np.any(forest.left[internal] <= idx[internal]) or np.any(forest.right[internal] <= idx[internal])
        or np.any(forest.left[internal] >= n) or np.any(forest.right[internal] >= n)
        or not np.all(forest.cover > 0) or not np.all(forest.n_node_samples >= 1)
        or not np.isfinite(forest.threshold).all() or forest.max_samples_ < 1
    ):
        raise InvalidInputError("forest: inconsistent tree arrays (indices, features or counts)")
    parents = np.bincount(np.concatenate([forest.left[internal], forest.right[internal]]), minlength=n)
    expected = np.ones(n, dtype=np.int64)
    expected[forest.roots] = 0
    if not np.array_equal(parents, expected):
        raise InvalidInputError("forest: every node but a root must have exactly one parent")


def _quadrature(max_depth: int) -> tuple[np.ndarray, np.ndarray]:
    """Gauss-Legendre nodes and weights on [0, 1], exact for polynomials of degree
    < 2m (m = ceil(max_depth / 2)), padded with zero-weight nodes to a multiple
    of 4: the single-row kernel takes them four at a time, and a zero weight
    adds exactly 0."""
    m = max(1, math.ceil(max(max_depth, 1) / 2))
    nodes, weights = np.polynomial.legendre.leggauss(m)
    pad = -m % 4
    t = np.concatenate([(nodes + 1.0) / 2.0, np.full(pad, 0.5)])
    w = np.concatenate([weights / 2.0, np.zeros(pad)])
    return t, w


def _round_down_to_float32(threshold: np.ndarray) -> np.ndarray:
    """The largest float32 <= each threshold: for float32 x, ``x <= t`` exactly
    when ``x <= _round_down_to_float32(t)``."""
    with np.errstate(over="ignore"):
        t32 = threshold.astype(np.float32)
    above = t32.astype(np.float64) > threshold
    t32[above] = np.nextafter(t32[above], np.float32(-np.inf))
    return t32


def _n_threads() -> int:
    """numba's thread count (NUMBA_NUM_THREADS): a plain read, where
    ``numba.get_num_threads()`` costs ~10 us a call."""
    import numba

    return int(numba.config.NUMBA_NUM_THREADS) or (os.cpu_count() or 1)


def _node_values(roots, feature, left, right, n_node_samples):
    """shap's IsoTree values: leaf = depth + c(n); internal = count-weighted mean.

    Returns (value, max_depth). Nodes of a tree are stored parent before child.
    """
    n_nodes = feature.shape[0]
    depth = np.zeros(n_nodes, dtype=np.int64)
    internal = np.nonzero(feature >= 0)[0]
    for n in internal:  # parents come first, so depths propagate in one pass
        depth[left[n]] = depth[n] + 1
        depth[right[n]] = depth[n] + 1
    c = average_path_length(n_node_samples)
    # scikit-learn's per-tree path length, rounded as it rounds it: (depth + 1) + c - 1
    score_value = np.where(feature < 0, ((depth + 1).astype(np.float64) + c) - 1.0, 0.0)
    value = depth + c
    # weighted sums bottom-up (children have larger indices than parents)
    wsum = np.where(feature < 0, value * n_node_samples, 0.0)
    for n in internal[::-1]:
        wsum[n] = wsum[left[n]] + wsum[right[n]]
        value[n] = wsum[n] / n_node_samples[n]
    return value, score_value, int(depth.max()) if n_nodes else 0
