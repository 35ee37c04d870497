"""What the numbers mean, defined once for serving, jobs, the audit table and the UI.

- ``risk_score`` is the Isolation Forest anomaly score ``2 ** (-E[h(x)] / c(max_samples))``
  where ``E[h(x)]`` is the mean path length of ``x`` over the trees and ``c(n)`` the
  average path length of an unsuccessful search in a binary search tree of ``n``
  items. It equals ``-IsolationForest.score_samples(x)``, lies in (0, 1] and higher
  means riskier.
- ``threshold`` is ``-model.offset_``: fitted at the contamination rate and stored
  with the model (it can be overridden per call).
- ``anomaly`` is ``risk_score > threshold`` (strict), which agrees with
  scikit-learn's ``predict(x) == -1``.
- ``explanation`` has one value per feature and is ``-shap_values``: shap's
  Isolation Forest values are in path-length units, where a positive value means
  a longer path (more normal). Negated, a positive explanation pushes towards an
  anomaly. They add up exactly::

      sum(explanation) == expected_value - mean_path_length(x)
      risk_score == 2 ** (-(expected_value - sum(explanation)) / c(max_samples))

>>> float(average_path_length(2)), float(average_path_length(1))
(1.0, 0.0)
>>> float(risk_from_path_length(average_path_length(256), 256))
0.5
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

EULER_GAMMA = 0.5772156649015329


def average_path_length(n_samples: np.ndarray | float | int) -> np.ndarray:
    """c(n): 0 for n <= 1, 1 for n == 2, else 2 (ln(n - 1) + gamma) - 2 (n - 1) / n.

    The same formula as scikit-learn's private ``_average_path_length``.
    """
    n = np.asarray(n_samples, dtype=np.float64)
    out = np.zeros(n.shape)
    big = n > 2
    out[n == 2] = 1.0
    nb = n[big]
    out[big] = 2.0 * (np.log(nb - 1.0) + EULER_GAMMA) - 2.0 * (nb - 1.0) / nb
    return out


def risk_from_path_length(mean_path_length: np.ndarray, max_samples: int) -> np.ndarray:
    """``2 ** (-E[h(x)] / c(max_samples))``; 0.5 when c(max_samples) == 0, as scikit-learn."""
    h = np.asarray(mean_path_length, dtype=np.float64)
    denominator = float(average_path_length(max_samples))
    if denominator == 0.0:
        return np.full(h.shape, 0.5)
    return 2.0 ** (-h / denominator)


def path_length_from_explanation(explanation: np.ndarray, expected_value: float) -> np.ndarray:
    """``E[h(x)] = expected_value - sum(explanation)`` row by row."""
    return expected_value - np.asarray(explanation, dtype=np.float64).sum(axis=-1)


def risk_from_explanation(
    explanation: np.ndarray, expected_value: float, max_samples: int
) -> np.ndarray:
    """Recovers ``risk_score`` from an explanation alone (what the UI shows adds up)."""
    return risk_from_path_length(path_length_from_explanation(explanation, expected_value), max_samples)


def explanation_from_shap(shap_values: np.ndarray) -> np.ndarray:
    """The one definition of an explanation's sign: shap's path-length values negated,
    so that a positive value pushes towards an anomaly."""
    return -np.asarray(shap_values)


def is_anomaly(risk_score: np.ndarray, threshold: float) -> np.ndarray:
    """The one definition of ``anomaly``: strictly above the threshold."""
    return np.asarray(risk_score) > threshold


@dataclass(frozen=True)
class ScoredBatch:
    """Scores and explanations of a batch, row-aligned with the input."""

    risk_score: np.ndarray  # (n,) float64 in (0, 1]
    anomaly: np.ndarray  # (n,) bool
    explanation: np.ndarray  # (n, n_features) float64, positive = towards anomaly
    expected_value: float  # path-length units; see the module docstring
    threshold: float
    model_version: str
    feature_names: tuple[str, ...]

    def __len__(self) -> int:
        return int(self.risk_score.shape[0])
