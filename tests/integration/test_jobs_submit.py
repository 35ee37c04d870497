"""`jobs.train` submitted unchanged with `ray job submit` to a separate local Ray head.

Kept in its own module, without the `ray_local` fixture: this test starts (and
stops) its own head with `ray start`, which must not meet the in-process Ray.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from jobs.simulate import simulate, write
from tests.ports import free_port

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
RAY = str(Path(sys.executable).with_name("ray"))
SUBMIT_TIMEOUT_S = 900


def test_train_job_submitted_to_a_ray_head_registers_a_model(servers, engine, data_dir, tmp_path):
    from cluster.registry import ModelRegistry

    history = tmp_path / "history.parquet"
    write(simulate(users=60, days=10, seed=21), history)
    dashboard, gcs = free_port(), free_port()
    temp_dir = Path(f"/tmp/ray-{uuid.uuid4().hex[:6]}")  # Ray's socket paths must stay short
    env = dict(os.environ, RAY_AUTH_MODE="disabled")
    env.pop("RAY_ADDRESS", None)
    subprocess.run([RAY, "start", "--head", "--num-cpus", "4", "--disable-usage-stats",
                    "--include-dashboard", "true", "--dashboard-port", str(dashboard),
                    "--port", str(gcs), "--temp-dir", str(temp_dir),
                    # The session's in-process Ray may still run: keep off its default ports.
                    "--dashboard-agent-listen-port", str(free_port()),
                    "--ray-client-server-port", str(free_port()),
                    "--metrics-export-port", str(free_port())],
                   check=True, env=env, capture_output=True, timeout=300)
    try:
        runtime_env = {"env_vars": {"FRAUD_DATA_DIR": str(data_dir), "RAY_AUTH_MODE": "disabled"}}
        began = time.monotonic()
        command = [RAY, "job", "submit", "--address", f"http://127.0.0.1:{dashboard}",
                   "--working-dir", str(REPO), "--runtime-env-json", json.dumps(runtime_env), "--",
                   # the interpreter of this venv: `python` on PATH may be another one
                   sys.executable, "-m", "jobs.train", "--input", str(history), "--n-estimators", "20"]
        while True:  # the head's job agent takes a while to come up after `ray start`
            result = subprocess.run(command, env=env, capture_output=True, text=True,
                                    timeout=SUBMIT_TIMEOUT_S)
            if "No available agent" not in result.stderr or time.monotonic() - began > 180:
                break
            time.sleep(3)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        # `ray job submit` follows the job to its end: "Job '<id>' succeeded" (status SUCCEEDED).
        assert "succeeded" in (result.stdout + result.stderr).lower(), result.stdout[-3000:]
        assert time.monotonic() - began < SUBMIT_TIMEOUT_S
        version = next(v["version"] for v in ModelRegistry(engine).list()
                       if v["parameters"].get("source") == str(history))
        assert (Path(ModelRegistry(engine).get(version)["artifact_path"]) / "model_card.md").exists()
    finally:
        # Not `ray stop --force`: it would stop every Ray on the machine, other sessions' too.
        _stop_head(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _stop_head(temp_dir: Path) -> None:
    """Stops the processes of the head started with ``--temp-dir temp_dir``, and only them."""
    import signal

    def ours() -> list[int]:
        pids = []
        for proc in Path("/proc").iterdir():
            if proc.name.isdigit():
                try:
                    if str(temp_dir).encode() in (proc / "cmdline").read_bytes():
                        pids.append(int(proc.name))
                except OSError:
                    continue
        return pids

    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in ours():
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 15
        while ours() and time.monotonic() < deadline:
            time.sleep(0.2)
