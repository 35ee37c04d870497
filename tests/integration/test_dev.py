"""`python -m cluster.dev up | status | down` on a data directory of its own."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys

import psycopg2
import pytest

from cluster.dev import broker_epoch, database_url, ensure_servers, status, stop_servers
from cluster.dev.records import _alive
from configs.settings import load_settings


def _dev(data_dir, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "KAFKA_BOOTSTRAP_SERVERS")}
    env["FRAUD_DATA_DIR"] = str(data_dir)
    return subprocess.run([sys.executable, "-m", "cluster.dev", *args], env=env,
                          capture_output=True, text=True, timeout=120)


def _pids(data_dir) -> dict[str, int]:
    records = json.loads((data_dir / "run" / "servers.json").read_text())
    return {name: rec["pid"] for name, rec in records.items()}


def _port(data_dir, name: str) -> int:
    return json.loads((data_dir / "run" / "servers.json").read_text())[name]["port"]


def _record_pid(data_dir, pid: int) -> None:
    """Records for both servers pointing at `pid`, as a reboot can leave them."""
    run = data_dir / "run"
    run.mkdir(parents=True, exist_ok=True)
    records = {name: {"name": name, "pid": pid, "url": "127.0.0.1:1", "port": 1}
               for name in ("postgres", "broker")}
    (run / "servers.json").write_text(json.dumps(records))


@pytest.fixture
def unrelated_process():
    """A live process that is not ours to stop: its pid is what a stale record may hold."""
    proc = subprocess.Popen(["sleep", "120"])
    yield proc
    proc.kill()
    proc.wait()


def test_up_is_idempotent_and_down_leaves_nothing(tmp_path):
    first = _dev(tmp_path, "up")
    assert first.returncode == 0, first.stderr
    pids = _pids(tmp_path)
    try:
        assert set(pids) == {"postgres", "broker"} and all(_alive(p) for p in pids.values())
        again = _dev(tmp_path, "up")
        assert again.returncode == 0, again.stderr
        assert _pids(tmp_path) == pids  # nothing started twice

        shown = _dev(tmp_path, "status")
        report = json.loads(shown.stdout)
        assert report["data_dir"] == str(tmp_path)
        assert all(s["running"] for s in report["servers"].values())

        # PostgreSQL wants the password from a file only its owner reads, and nothing prints it.
        password_file = tmp_path / "run" / "postgres.password"
        password = password_file.read_text().strip()
        assert len(password) >= 32
        assert stat.S_IMODE(password_file.stat().st_mode) == 0o600
        for output in (first, again, shown):
            assert password not in output.stdout + output.stderr
        port = _port(tmp_path, "postgres")
        with pytest.raises(psycopg2.OperationalError, match="password"):
            psycopg2.connect(host="127.0.0.1", port=port, user="postgres", dbname="fraud")
        with pytest.raises(psycopg2.OperationalError, match="password authentication failed"):
            psycopg2.connect(host="127.0.0.1", port=port, user="postgres", dbname="fraud",
                             password="not-" + password)
        url = database_url(load_settings(data_dir=tmp_path))
        assert password in url
        with psycopg2.connect(url.replace("postgresql+psycopg2", "postgresql")) as conn:
            assert conn.server_version > 0
    finally:
        down = _dev(tmp_path, "down")
    assert down.returncode == 0, down.stderr
    assert not any(_alive(p) for p in pids.values())
    # In process: the CLI's status would also wait ~30 s for its metrics from servers that are down.
    assert not any(s["running"] for s in status(load_settings(data_dir=tmp_path))["servers"].values())


def test_down_never_signals_a_pid_that_is_not_our_server(tmp_path, unrelated_process):
    _record_pid(tmp_path, unrelated_process.pid)

    report = status(load_settings(data_dir=tmp_path))  # the CLI's, without its metrics
    for server in report["servers"].values():
        assert server["running"] is False and "another process" in server["stale"]

    down = _dev(tmp_path, "down")
    assert down.returncode == 0, down.stderr
    assert unrelated_process.poll() is None, "down signalled a process it did not start"
    assert "stopped: nothing was running" in down.stdout
    assert "is not the server started here" in down.stderr

    # In process too, and the stale records are now marked stopped.
    _record_pid(tmp_path, unrelated_process.pid)
    assert stop_servers(load_settings(data_dir=tmp_path)) == []
    assert unrelated_process.poll() is None
    assert set(_pids(tmp_path).values()) == {0}


def test_stale_pid_file_is_survived(tmp_path, unrelated_process):
    run = tmp_path / "run"
    run.mkdir(parents=True)
    dead_pid = 2**22 - 7  # above the default pid_max: never a live process
    # One record's pid is gone; the other's now belongs to an unrelated process.
    stale = {name: {"name": name, "pid": pid, "url": "x", "port": 1}
             for name, pid in (("postgres", dead_pid), ("broker", unrelated_process.pid))}
    (run / "servers.json").write_text(json.dumps(stale))
    try:
        up = _dev(tmp_path, "up")
        assert up.returncode == 0, up.stderr
        pids = _pids(tmp_path)
        assert all(_alive(p) and p not in (dead_pid, unrelated_process.pid) for p in pids.values())
    finally:
        _dev(tmp_path, "down")
    assert not any(_alive(p) for p in pids.values())
    assert unrelated_process.poll() is None


def test_broker_epoch_is_stable_while_it_runs_and_new_at_each_start(tmp_path):
    settings = load_settings(data_dir=tmp_path)
    try:
        ensure_servers(settings, migrate=False)
        first = broker_epoch(settings)
        ensure_servers(settings, migrate=False)  # already running: the same broker
        assert broker_epoch(settings) == first
        assert stop_servers(settings, only="broker") == ["broker"]
        ensure_servers(settings, migrate=False)
        second = broker_epoch(settings)
        assert second and second != first

        # The broker itself reports the epoch, as its cluster id.
        from kafka.admin import KafkaAdminClient

        admin = KafkaAdminClient(bootstrap_servers=f"127.0.0.1:{_port(tmp_path, 'broker')}")
        try:
            assert admin.describe_cluster()["cluster_id"].endswith(second)
        finally:
            admin.close()
    finally:
        stop_servers(settings)


def test_a_data_dir_made_with_trust_auth_is_converted_at_its_next_start(tmp_path):
    """As an earlier version left it: pg_hba.conf trusting everyone, no password file."""
    settings = load_settings(data_dir=tmp_path)
    try:
        ensure_servers(settings, migrate=False)
        with psycopg2.connect(database_url(settings).replace("+psycopg2", "")) as conn, conn.cursor() as cur:
            cur.execute("CREATE TABLE kept (v int); INSERT INTO kept VALUES (42)")
        stop_servers(settings, only="postgres")
        (tmp_path / "postgres" / "pg_hba.conf").write_text("host all all 127.0.0.1/32 trust\n")
        (tmp_path / "run" / "postgres.password").unlink()

        ensure_servers(settings, migrate=False)
        password_file = tmp_path / "run" / "postgres.password"
        assert stat.S_IMODE(password_file.stat().st_mode) == 0o600
        port = _port(tmp_path, "postgres")
        with pytest.raises(psycopg2.OperationalError, match="password"):
            psycopg2.connect(host="127.0.0.1", port=port, user="postgres", dbname="fraud")
        with psycopg2.connect(database_url(settings).replace("+psycopg2", "")) as conn, conn.cursor() as cur:
            cur.execute("SELECT v FROM kept")
            assert cur.fetchall() == [(42,)]  # the data stays
    finally:
        stop_servers(settings)


def test_invalid_setting_stops_start_up(tmp_path):
    env = {**os.environ, "FRAUD_DATA_DIR": str(tmp_path), "FRAUD_CONTAMINATION": "2"}
    result = subprocess.run([sys.executable, "-m", "cluster.dev", "status"], env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "contamination" in result.stderr and "FRAUD_CONTAMINATION" in result.stderr
