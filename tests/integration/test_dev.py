"""`python -m cluster.dev up | status | down` on a data directory of its own."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from cluster.dev import _alive


def _dev(data_dir, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "KAFKA_BOOTSTRAP_SERVERS")}
    env["FRAUD_DATA_DIR"] = str(data_dir)
    return subprocess.run([sys.executable, "-m", "cluster.dev", *args], env=env,
                          capture_output=True, text=True, timeout=120)


def _pids(data_dir) -> dict[str, int]:
    records = json.loads((data_dir / "run" / "servers.json").read_text())
    return {name: rec["pid"] for name, rec in records.items()}


def test_up_is_idempotent_and_down_leaves_nothing(tmp_path):
    first = _dev(tmp_path, "up")
    assert first.returncode == 0, first.stderr
    pids = _pids(tmp_path)
    try:
        assert set(pids) == {"postgres", "broker"} and all(_alive(p) for p in pids.values())
        again = _dev(tmp_path, "up")
        assert again.returncode == 0, again.stderr
        assert _pids(tmp_path) == pids  # nothing started twice

        report = json.loads(_dev(tmp_path, "status").stdout)
        assert report["data_dir"] == str(tmp_path)
        assert all(s["running"] for s in report["servers"].values())
    finally:
        down = _dev(tmp_path, "down")
    assert down.returncode == 0, down.stderr
    assert not any(_alive(p) for p in pids.values())
    assert "running\": true" not in _dev(tmp_path, "status").stdout


def test_stale_pid_file_is_survived(tmp_path):
    run = tmp_path / "run"
    run.mkdir(parents=True)
    dead_pid = 2**22 - 7  # above the default pid_max: never a live process
    stale = {name: {"name": name, "pid": dead_pid, "url": "x", "port": 1} for name in ("postgres", "broker")}
    (run / "servers.json").write_text(json.dumps(stale))
    try:
        up = _dev(tmp_path, "up")
        assert up.returncode == 0, up.stderr
        pids = _pids(tmp_path)
        assert all(_alive(p) and p != dead_pid for p in pids.values())
    finally:
        _dev(tmp_path, "down")
    assert not any(_alive(p) for p in pids.values())


def test_invalid_setting_stops_start_up(tmp_path):
    env = {**os.environ, "FRAUD_DATA_DIR": str(tmp_path), "FRAUD_CONTAMINATION": "2"}
    result = subprocess.run([sys.executable, "-m", "cluster.dev", "status"], env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "contamination" in result.stderr and "FRAUD_CONTAMINATION" in result.stderr
