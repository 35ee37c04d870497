"""A Ray cluster of several nodes on this machine, started with `ray start` and stopped by
its own temp dir: never `ray stop`, which would stop every Ray on the machine.

Every port is chosen free, so the cluster keeps off the session's in-process Ray and
any other Ray running here.

`RayNodes(isolated=True)` starts each node in its own PID and mount namespace
(`unshare`, root only: see `isolation_refused`), its `ray start --block` the
namespace's first process: killing that process ends every Ray process of the node,
and a node can be given a private tmpfs over folders (`Node.private_dirs`), so that
it sees none of the files the other nodes write there. The nodes still share the
network (one loopback), as machines of a cluster share theirs.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from tests.ports import free_port

ROOT = Path(__file__).resolve().parents[1]

RAY = str(Path(sys.executable).with_name("ray"))
UNSHARE = ["unshare", "--pid", "--fork", "--mount-proc", "--kill-child=SIGKILL"]
# setpriv: `unshare` dies with the test process, and with it (--kill-child) the node's namespace.
DIE_WITH_PARENT = ["setpriv", "--pdeathsig", "SIGKILL", "--"]
START_TIMEOUT_S = 300


@dataclass(frozen=True)
class Node:
    """One node: its logical CPUs and custom resources, environment variables of its own
    (over the cluster's), and, isolated, the folders it gets a private tmpfs over (in
    order: a folder under an earlier one is made inside that one's tmpfs)."""

    num_cpus: int = 1
    resources: dict[str, float] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)
    private_dirs: tuple[str, ...] = ()


def isolation_refused() -> str | None:
    """None when this process may start isolated nodes; else why not (for a skip message)."""
    missing = [tool for tool in ("unshare", "setpriv") if shutil.which(tool) is None]
    if missing:
        return f"{' and '.join(missing)} (util-linux) not installed"
    probe = subprocess.run([*UNSHARE, "sh", "-c", "mount -t tmpfs tmpfs /tmp"],
                           capture_output=True, text=True, timeout=30, check=False)
    if probe.returncode != 0:
        return (f"PID and mount namespaces are not permitted here (`unshare --pid --mount` and "
                f"`mount -t tmpfs` need root; CI runs as root): {probe.stderr.strip()[:200]}")
    return None


class RayNodes:
    """`start_head()`, then `add_worker()` as often as needed; `stop()` ends them all.

    `RayNodes.started(...)` does both, and starts again from scratch when a node fails
    to come up: on a loaded machine a raylet sometimes exits because its agents took
    longer to start than it waits (about 20 s here).
    """

    @classmethod
    def started(cls, head_cpus: int = 1, workers: list[dict[str, float] | Node] | None = None,
                attempts: int = 3, env: dict[str, str] | None = None, *, head: Node | None = None,
                isolated: bool = False) -> RayNodes:
        """A head (`head`, else `head_cpus` CPUs) and one worker node per entry of `workers`
        (a Node, or the custom resources of a one-CPU node)."""
        head = head or Node(num_cpus=head_cpus)
        for attempt in range(1, attempts + 1):
            nodes = cls(isolated=isolated)
            if env is not None:
                nodes.env = env | {"RAY_AUTH_MODE": "disabled"}
            try:
                nodes.start_head(num_cpus=head.num_cpus, resources=head.resources, node=head)
                for worker in workers or []:
                    spec = worker if isinstance(worker, Node) else Node(resources=worker)
                    nodes.add_worker(num_cpus=spec.num_cpus, resources=spec.resources, node=spec)
                return nodes
            except RuntimeError:
                nodes.stop()
                if attempt == attempts:
                    raise
        raise AssertionError("unreachable")

    def __init__(self, isolated: bool = False) -> None:
        # Ray's socket paths must stay short: not under pytest's tmp_path.
        self.temp_dir = Path(f"/tmp/ray-{uuid.uuid4().hex[:6]}")
        self.gcs_port = free_port()
        self.dashboard_port = free_port()
        self.env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"RAY_AUTH_MODE": "disabled"}
        self.isolated = isolated
        self.namespaces: list[subprocess.Popen] = []  # isolated: one `unshare` per node, head first
        self.logs = Path(f"{self.temp_dir}.logs")  # beside the temp dir: seen from the host
        self.holds: list[str] = []  # empty folders on the host, mount points in the nodes' namespaces

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.gcs_port}"

    @property
    def dashboard(self) -> str:
        """The head's dashboard (isolated clusters only): `ray job submit`, `serve deploy`."""
        return f"http://127.0.0.1:{self.dashboard_port}"

    def start_head(self, num_cpus: int = 1, resources: dict[str, float] | None = None,
                   node: Node | None = None) -> None:
        dashboard = (["--include-dashboard", "true", "--dashboard-host", "127.0.0.1",
                      "--dashboard-port", str(self.dashboard_port)] if self.isolated
                     else ["--include-dashboard", "false"])
        self._start(["--head", "--port", str(self.gcs_port), *dashboard,
                     "--ray-client-server-port", str(free_port())], num_cpus, resources, node)

    def add_worker(self, num_cpus: int = 1, resources: dict[str, float] | None = None,
                   node: Node | None = None) -> None:
        self._start(["--address", self.address], num_cpus, resources, node)

    def _start(self, role: list[str], num_cpus: int, resources: dict[str, float] | None,
               node: Node | None) -> None:
        command = [RAY, "start", *role, "--num-cpus", str(num_cpus), "--disable-usage-stats",
                   "--temp-dir", str(self.temp_dir),
                   "--metrics-export-port", str(free_port()),
                   "--dashboard-agent-listen-port", str(free_port()),
                   "--dashboard-agent-grpc-port", str(free_port()),
                   "--runtime-env-agent-port", str(free_port())]
        if resources:
            command += ["--resources", json.dumps(resources)]
        env = self.env | (node.env if node else {})
        if self.isolated:
            self._start_isolated(command, env, node.private_dirs if node else ())
            return
        result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=START_TIMEOUT_S,
                                check=False)
        if result.returncode != 0:
            raise RuntimeError(f"`ray start` failed:\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}")

    def _start_isolated(self, command: list[str], env: dict[str, str], private_dirs: tuple[str, ...]) -> None:
        """`ray start --block` as the first process of new PID and mount namespaces, after
        mounting a tmpfs over each private folder; returns once the node is up."""
        mounts = _private_mounts(private_dirs, keep=(sys.prefix, str(ROOT)), holds=self.holds)
        self.logs.mkdir(parents=True, exist_ok=True)
        log_path = self.logs / f"node-{len(self.namespaces)}.log"
        with open(log_path, "wb") as log:
            proc = subprocess.Popen([*DIE_WITH_PARENT, *UNSHARE, "sh", "-c", mounts + 'exec "$@"', "sh", *command,
                                     "--block"],
                                    env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        self.namespaces.append(proc)
        deadline = time.monotonic() + START_TIMEOUT_S
        while b"Ray runtime started" not in log_path.read_bytes():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"`ray start` failed:\n{log_path.read_text(errors='replace')[-3000:]}")
            time.sleep(0.5)

    def namespace_pid(self, index: int) -> int:
        """The host pid of node `index`'s first process (0: the head), whose
        /proc/<pid>/root shows that node's files and /proc/<pid>/ns/pid its processes."""
        unshare = self.namespaces[index].pid
        for proc in Path("/proc").iterdir():
            try:
                # the field after the command name, which may hold spaces and parentheses
                if proc.name.isdigit() and int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1]) == unshare:
                    return int(proc.name)
            except (OSError, IndexError, ValueError):
                continue
        raise RuntimeError(f"node {index} has no first process (unshare pid {unshare})")

    def stop(self) -> None:
        """Ends the isolated nodes: SIGKILL to each namespace's first process ends every
        process in it, and `unshare` exits once it has reaped it, the namespace empty. Then
        signals the processes whose command line names this cluster's temp dir, and only them."""
        for proc in self.namespaces:
            if proc.poll() is None:
                try:
                    os.kill(self.namespace_pid(self.namespaces.index(proc)), signal.SIGKILL)
                except (RuntimeError, ProcessLookupError):
                    proc.kill()  # --kill-child: its first process goes with it
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
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
            shutil.rmtree(self.logs, ignore_errors=True)
        for hold in self.holds:
            with contextlib.suppress(OSError):
                os.rmdir(hold)

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


def _private_mounts(private_dirs: tuple[str, ...], keep: tuple[str, ...], holds: list[str]) -> str:
    """Shell commands that mount a tmpfs over each private folder, keeping visible the
    folders in `keep` that lie under one (the virtual environment and the repository:
    a clone under /tmp, as CI may make, would vanish under the node's private /tmp).
    Each kept folder is bound to a holding place first and bound back onto the tmpfs;
    the mounts live in the node's own mount namespace only. The holding places are
    appended to `holds` (for `stop` to remove)."""
    script = []
    for d in private_dirs:
        held = [k for k in dict.fromkeys(os.path.realpath(k) for k in keep)
                if Path(k).is_relative_to(os.path.realpath(d))]
        made = [tempfile.mkdtemp(prefix="ray-nodes-keep-", dir="/var/tmp") for _ in held]
        holds += made
        script += [f"mount --bind {shlex.quote(k)} {shlex.quote(h)}" for k, h in zip(held, made, strict=True)]
        script += [f"mkdir -p {shlex.quote(d)}", f"mount -t tmpfs tmpfs {shlex.quote(d)}"]
        script += [f"mkdir -p {shlex.quote(k)} && mount --bind {shlex.quote(h)} {shlex.quote(k)}"
                   for k, h in zip(held, made, strict=True)]
    return "".join(f"{c} && " for c in script)
