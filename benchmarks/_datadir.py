"""A benchmark's data directory: its own temporary one unless FRAUD_DATA_DIR is
set, removed when the benchmark ends (a run left about 250 MB in /tmp)."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path


def own_data_dir(prefix: str) -> Path | None:
    """Points FRAUD_DATA_DIR at a new temporary folder and returns it; None when
    the caller set FRAUD_DATA_DIR (that folder is the caller's to keep)."""
    if os.environ.get("FRAUD_DATA_DIR"):
        return None
    path = Path(tempfile.mkdtemp(prefix=prefix))
    os.environ["FRAUD_DATA_DIR"] = str(path)
    return path


def remove(path: Path | None) -> None:
    """Removes a folder `own_data_dir` made; call after the servers in it stopped."""
    if path is not None:
        shutil.rmtree(path, ignore_errors=True)
