"""numba's cache folder is the data directory's in a fresh process, such as a Ray worker.

numba fixes a cached kernel's folder when its `@njit(cache=True)` decorator runs,
at import; a replica imports `scoring` long before anything builds the settings.
Each case runs in a new interpreter, as a worker would.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

PROBE = """
import json, sys
{before}
import scoring._kernels, features._kernels
print(json.dumps([scoring._kernels.path_length_sums_serial._cache._cache_path,
                  features._kernels.user_window_counts._cache._cache_path]))
"""


def _cache_paths(env: dict[str, str], before: str = "") -> list[Path]:
    clean = {k: v for k, v in os.environ.items()
             if k not in ("NUMBA_CACHE_DIR", "FRAUD_DATA_DIR", "FRAUD_CONFIG_FILE")}
    result = subprocess.run([sys.executable, "-c", PROBE.format(before=before)], cwd=REPO,
                            env=clean | env, capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    return [Path(p) for p in json.loads(result.stdout.strip().splitlines()[-1])]


def test_a_fresh_process_importing_the_kernels_caches_under_fraud_data_dir(tmp_path):
    for path in _cache_paths({"FRAUD_DATA_DIR": str(tmp_path)}):
        assert path.is_relative_to(tmp_path / "cache" / "numba"), path


def test_numba_imported_before_the_kernels_still_caches_under_the_data_dir(tmp_path):
    # Another library (shap, Ray Data) may import numba first: its config is read again.
    for path in _cache_paths({"FRAUD_DATA_DIR": str(tmp_path)}, before="import numba"):
        assert path.is_relative_to(tmp_path / "cache" / "numba"), path


def test_the_data_dir_of_the_config_file_counts_and_an_explicit_numba_cache_dir_wins(tmp_path):
    config = tmp_path / "fraud.yaml"
    config.write_text(f"data_dir: {tmp_path / 'from-yaml'}\n")
    for path in _cache_paths({"FRAUD_CONFIG_FILE": str(config)}):
        assert path.is_relative_to(tmp_path / "from-yaml" / "cache" / "numba"), path
    explicit = tmp_path / "explicit"
    for path in _cache_paths({"FRAUD_CONFIG_FILE": str(config), "NUMBA_CACHE_DIR": str(explicit)}):
        assert path.is_relative_to(explicit), path
