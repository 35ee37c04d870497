"""The explainer abstraction: the compiled TreeSHAP by default, shap as a fallback.

Both return shap's raw values (path-length units, positive = more normal) and
shap's ``expected_value``; ``scoring.risk`` turns them into an explanation.

Artifacts hold arrays, not a pickled scikit-learn model, so the shap fallback
hands ``shap.TreeExplainer`` the forest as shap's own model description (a dict
of per-tree arrays, see :func:`shap_model_description`).
"""

from __future__ import annotations

from typing import Any, Literal, Protocol

import numpy as np

from configs.errors import InvalidInputError
from scoring.forest import CompiledForest
from scoring.risk import ScoredBatch, explanation_from_shap, is_anomaly

ExplainerKind = Literal["compiled", "shap"]


class Explainer(Protocol):
    kind: str
    expected_value: float

    def shap_values(self, X: Any) -> np.ndarray:
        """(n, n_features) TreeSHAP values of the rows of ``X``."""
        ...


class CompiledExplainer:
    """TreeSHAP from the compiled forest's numba kernels."""

    kind = "compiled"

    def __init__(self, forest: CompiledForest) -> None:
        self.forest = forest
        self.expected_value = forest.expected_value_

    def shap_values(self, X: Any) -> np.ndarray:
        return self.forest.shap_values(X)


class ShapExplainer:
    """``shap.TreeExplainer`` (slow, the reference): over the forest's own arrays, or
    over the original scikit-learn model when one is given."""

    kind = "shap"

    def __init__(self, forest: CompiledForest, sklearn_model: Any = None) -> None:
        import shap

        if sklearn_model is not None and int(getattr(sklearn_model, "n_features_in_", -1)) != forest.n_features_in_:
            raise InvalidInputError(
                "sklearn_model: its number of features differs from the compiled forest's"
            )
        self.forest = forest
        model = shap_model_description(forest) if sklearn_model is None else sklearn_model
        self._explainer = shap.TreeExplainer(model)
        self.expected_value = float(np.ravel(self._explainer.expected_value)[0])

    def shap_values(self, X: Any) -> np.ndarray:
        X32 = self.forest.check_input(X)
        if X32.shape[0] == 0:
            return np.zeros((0, self.forest.n_features_in_))
        # float32 values widened to float64: the same splits as scikit-learn's trees
        values = self._explainer.shap_values(X32.astype(np.float64), check_additivity=False)
        return np.asarray(values, dtype=np.float64).reshape(X32.shape[0], -1)


def shap_model_description(forest: CompiledForest) -> dict[str, Any]:
    """The forest in the dict form ``shap.TreeExplainer`` accepts, with shap's
    Isolation Forest conventions (those of ``shap.explainers._tree.IsoTree``):
    node values are the forest's path-length values divided by the number of
    trees (the output is their mean), node weights are the covers, and features
    are already the input's columns.
    """
    n_nodes = forest.feature.shape[0]
    # Which tree each node belongs to: parents come before children (checked at load).
    tree_of = np.full(n_nodes, -1, dtype=np.int64)
    tree_of[forest.roots] = np.arange(forest.n_estimators)
    for n in np.nonzero(forest.feature >= 0)[0]:
        tree_of[forest.left[n]] = tree_of[forest.right[n]] = tree_of[n]
    local = np.empty(n_nodes, dtype=np.int64)
    trees = []
    for t in range(forest.n_estimators):
        nodes = np.nonzero(tree_of == t)[0]  # ascending, so the root comes first
        local[nodes] = np.arange(nodes.shape[0])
        leaf = forest.feature[nodes] < 0
        left = np.where(leaf, -1, local[forest.left[nodes]])
        right = np.where(leaf, -1, local[forest.right[nodes]])
        trees.append({
            "children_left": left,
            "children_right": right,
            "children_default": left,  # inputs are checked finite: no missing values
            "features": np.where(leaf, -2, forest.feature[nodes]),
            "thresholds": np.where(leaf, -2.0, forest.threshold[nodes]),
            "values": (forest.value[nodes] / forest.n_estimators).reshape(-1, 1),
            "node_sample_weight": forest.cover[nodes].copy(),
        })
    return {"trees": trees, "tree_output": "raw_value", "base_offset": 0.0}


def make_explainer(
    forest: CompiledForest,
    kind: ExplainerKind | None = None,
    sklearn_model: Any = None,
) -> Explainer:
    """The explainer of the given kind; ``None`` reads ``configs.get_settings().explainer``."""
    if kind is None:
        from configs import get_settings

        kind = get_settings().explainer
    if kind == "compiled":
        return CompiledExplainer(forest)
    if kind == "shap":
        return ShapExplainer(forest, sklearn_model)
    raise InvalidInputError(f"explainer: expected 'compiled' or 'shap', got {kind!r}")


def score_and_explain(
    forest: CompiledForest,
    X: np.ndarray,
    *,
    threshold_override: float | None = None,
    explainer: Explainer | None = None,
) -> ScoredBatch:
    """Scores and explains ``X``; the single function serving and jobs call.

    ``explainer`` defaults to the compiled one; pass ``make_explainer(...)`` to use
    the configured kind (for instance shap as a fallback).
    """
    threshold = forest.threshold_ if threshold_override is None else float(threshold_override)
    if explainer is None:
        risk, phi = forest.risk_and_shap(X)
        expected = forest.expected_value_
    else:
        X32 = forest.check_input(X)
        risk = forest._risk_score_unchecked(X32)
        phi = explainer.shap_values(X32)
        expected = float(explainer.expected_value)
    return ScoredBatch(
        risk_score=risk,
        anomaly=is_anomaly(risk, threshold),
        explanation=explanation_from_shap(phi),
        expected_value=expected,
        threshold=threshold,
        model_version=forest.model_version,
        feature_names=forest.feature_names,
    )
