"""The compiled Isolation Forest, its exact TreeSHAP explainer, risk semantics
(what `risk_score`, `anomaly` and an explanation's sign mean) and safe persistence.
A library: of this project it imports `configs` only, never `cluster`, `jobs` or `deployments`."""

from configs.settings import configure_numba_cache

# Before any kernel module imports numba: its `cache=True` folder is fixed then, and
# must be this node's data directory (a Ray worker imports this before any settings).
configure_numba_cache()
