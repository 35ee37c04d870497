"""The explainer abstraction: the compiled TreeSHAP by default, shap as a fallback.

Both return shap's raw values (path-length units, positive = more normal) and
shap's ``expected_value``; ``scoring.risk`` turns them into an explanation.
"""

from __future__ import annotations

from typing import Any, Literal, Protocol

import numpy as np

from configs.errors import InvalidInputError, ModelUnavailableError
from scoring.forest import CompiledForest

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
    """``shap.TreeExplainer`` over the original scikit-learn model (slow, the oracle)."""

    kind = "shap"

    def __init__(self, forest: CompiledForest, sklearn_model: Any) -> None:
        import shap

        if int(getattr(sklearn_model, "n_features_in_", -1)) != forest.n_features_in_:
            raise InvalidInputError(
                "sklearn_model: its number of features differs from the compiled forest's"
            )
        self.forest = forest
        self._explainer = shap.TreeExplainer(sklearn_model)
        self.expected_value = float(np.ravel(self._explainer.expected_value)[0])

    def shap_values(self, X: Any) -> np.ndarray:
        X32 = self.forest.check_input(X)
        if X32.shape[0] == 0:
            return np.zeros((0, self.forest.n_features_in_))
        # float32 values widened to float64: the same splits as scikit-learn's trees
        values = self._explainer.shap_values(X32.astype(np.float64), check_additivity=False)
        return np.asarray(values, dtype=np.float64).reshape(X32.shape[0], -1)


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
        if sklearn_model is None:
            raise ModelUnavailableError(
                "explainer 'shap' needs the scikit-learn model (sklearn_model=...); "
                "use the 'compiled' explainer with a compiled-only artifact"
            )
        return ShapExplainer(forest, sklearn_model)
    raise InvalidInputError(f"explainer: expected 'compiled' or 'shap', got {kind!r}")
