"""The transaction schema and the one definition of every feature: pure offline
transforms, the Ray Data pipeline, and the online state shared by replicas.
A library: of this project it imports `configs` only, never `cluster`, `jobs` or `deployments`."""

from configs.settings import configure_numba_cache

# Before `features._kernels` imports numba: its `cache=True` folder is fixed then, and
# must be this node's data directory (a Ray worker imports this before any settings).
configure_numba_cache()
