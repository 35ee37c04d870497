"""A Ray cluster of several nodes on this machine, started with `ray start` and stopped by
its own temp dir: never `ray stop`, which would stop every Ray on the machine.

Every port is chosen free, so the cluster keeps off the session's in-process Ray and
any other Ray running here.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

from tests.ports import free_port

RAY = str(Path(sys.executable).with_name("ray"))


class RayNodes:
    """`start_head()`, then `add_worker()` as often as needed; `stop()` ends them all.

    `RayNodes.started(...)` does both, and starts again from scratch when a node fails
    to come up: on a loaded machine a raylet sometimes exits because its agents took
    longer to start than it waits (about 20 s here).
    """

    @classmethod
    def started(cls, head_cpus: int = 1, workers: list[dict[str, float]] | None = None,
                attempts: int = 3, env: dict[str, str] | None = None) -> RayNodes:
        """A head and one worker node per entry of `workers` (its custom resources)."""
        for attempt in range(1, attempts + 1):
            nodes = cls()
            if env is not None:
                nodes.env = env | {"RAY_AUTH_MODE": "disabled"}
            try:
                nodes.start_head(num_cpus=head_cpus)
                for resources in workers or []:
                    nodes.add_worker(num_cpus=1, resources=resources)
                return nodes
            except RuntimeError:
                nodes.stop()
                if attempt == attempts:
                    raise
        raise AssertionError("unreachable")

    def __init__(self) -> None:
        # Ray's socket paths must stay short: not under pytest's tmp_path.
        self.temp_dir = Path(f"/tmp/ray-{uuid.uuid4().hex[:6]}")
        self.gcs_port = free_port()
        self.env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"RAY_AUTH_MODE": "disabled"}

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.gcs_port}"

    def start_head(self, num_cpus: int = 1, resources: dict[str, float] | None = None) -> None:
        self._start(["--head", "--port", str(self.gcs_port), "--include-dashboard", "false",
                     "--ray-client-server-port", str(free_port())], num_cpus, resources)

    def add_worker(self, num_cpus: int = 1, resources: dict[str, float] | None = None) -> None:
        self._start(["--address", self.address], num_cpus, resources)

    def _start(self, role: list[str], num_cpus: int, resources: dict[str, float] | None) -> None:
        command = [RAY, "start", *role, "--num-cpus", str(num_cpus), "--disable-usage-stats",
                   "--temp-dir", str(self.temp_dir),
                   "--metrics-export-port", str(free_port()),
                   "--dashboard-agent-listen-port", str(free_port()),
                   "--dashboard-agent-grpc-port", str(free_port()),
                   "--runtime-env-agent-port", str(free_port())]
        if resources:
            command += ["--resources", json.dumps(resources)]
        result = subprocess.run(command, env=self.env, capture_output=True, text=True, timeout=300,
                                check=False)
        if result.returncode != 0:
            raise RuntimeError(f"`ray start` failed:\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}")

    def stop(self) -> None:
        """Signals the processes whose command line names this cluster's temp dir, and only them."""
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in self._pids():
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + 15
            while self._pids() and time.monotonic() < deadline:
                time.sleep(0.2)
        if not self._pids():
            shutil.rmtree(self.temp_dir, ignore_errors=True)

    def _pids(self) -> list[int]:
        marker = str(self.temp_dir).encode()
        pids = []
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit() or int(proc.name) == os.getpid():
                continue
            try:
                if marker in (proc / "cmdline").read_bytes():
                    pids.append(int(proc.name))
            except OSError:
                continue
        return pids
