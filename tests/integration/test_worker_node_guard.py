"""A Ray worker node without DATABASE_URL / KAFKA_BOOTSTRAP_SERVERS never starts servers of
its own and fails naming the setting; a record from another host is refused inside Ray.

A real cluster of two nodes on this machine (`ray start --head`, then a worker with
the custom resource `worker`), each task given its own data directory, as nodes that
share no files would have. Kept in its own module, without `ray_local`: the driver
runs in a subprocess, since this process may already hold the session's Ray.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.ray_nodes import RayNodes

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]

DRIVER = r"""
import json, os, sys
import ray

address, private, foreign, shared = sys.argv[1:5]

def probe(data_dir, start=True):
    from cluster import dev
    from configs.settings import SettingsError, get_settings
    get_settings.cache_clear()
    result = {"node": dev.ray_node()}
    calls = {"database_url": dev.database_url, "kafka_bootstrap": dev.kafka_bootstrap}
    if start:  # the head may start servers: it is never asked to here
        calls["ensure_servers"] = lambda: dev.ensure_servers(migrate=False)
    for name, call in calls.items():
        try:
            value = call()
            result[name] = {"ok": value if isinstance(value, str) else "returned"}
        except SettingsError as exc:
            result[name] = {"error": str(exc)}
    result["files"] = sorted(str(p.relative_to(data_dir)) for p in __import__("pathlib").Path(data_dir).rglob("*"))
    return result

out = {}
os.environ["FRAUD_DATA_DIR"] = foreign
from cluster import dev
out["outside_ray"] = dev.database_url()  # outside Ray: the local machine, whatever the record says

ray.init(address=address, log_to_driver=False)
on_worker = ray.remote(num_cpus=0, resources={"worker": 1})(probe)
on_head = ray.remote(num_cpus=0, resources={dev.HEAD_NODE_RESOURCE: 0.01})(probe)
env = lambda d: {"env_vars": {"FRAUD_DATA_DIR": d}}
out["worker_private"] = ray.get(on_worker.options(runtime_env=env(private)).remote(private))
out["worker_foreign"] = ray.get(on_worker.options(runtime_env=env(foreign)).remote(foreign))
out["head_foreign"] = ray.get(on_head.options(runtime_env=env(foreign)).remote(foreign, start=False))
out["worker_shared"] = ray.get(on_worker.options(runtime_env=env(shared)).remote(shared))
print("RESULT " + json.dumps(out))
"""


def _records(data_dir: Path, host: str) -> None:
    """A record of both servers (stopped: pid 0) started on `host`."""
    run = data_dir / "run"
    run.mkdir(parents=True)
    (run / "servers.json").write_text(json.dumps({
        "postgres": {"name": "postgres", "pid": 0, "url": "postgresql+psycopg2://postgres@127.0.0.1:5999/fraud",
                     "port": 5999, "started_at": 0.0, "epoch": "", "host": host},
        "broker": {"name": "broker", "pid": 0, "url": "127.0.0.1:5998", "port": 5998,
                   "started_at": 0.0, "epoch": "e1", "host": host},
    }))


def test_a_worker_node_never_starts_servers_and_a_foreign_record_is_refused_in_ray(tmp_path):
    from cluster.dev import this_host

    private, foreign, shared = (tmp_path / n for n in ("private", "foreign", "shared"))
    private.mkdir()
    _records(foreign, "another-machine boot=0 net:[1]")
    _records(shared, this_host())  # both nodes here share this machine's loopback
    env = {k: v for k, v in RayNodes().env.items() if k not in ("DATABASE_URL", "KAFKA_BOOTSTRAP_SERVERS")}
    nodes = RayNodes.started(head_cpus=1, workers=[{"worker": 1}], env=env)
    try:
        result = subprocess.run([sys.executable, "-c", DRIVER, nodes.address, str(private), str(foreign),
                                 str(shared)], cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
                                check=False)
    finally:
        nodes.stop()
    line = next((x for x in result.stdout.splitlines() if x.startswith("RESULT ")), None)
    assert line, result.stdout[-3000:] + result.stderr[-3000:]
    out = json.loads(line.removeprefix("RESULT "))

    # A worker node with nothing recorded: each call names its setting, and nothing was started.
    worker = out["worker_private"]
    assert worker["node"][1] is False
    assert "DATABASE_URL is not set on Ray worker node" in worker["ensure_servers"]["error"]
    assert "DATABASE_URL" in worker["database_url"]["error"]
    assert "KAFKA_BOOTSTRAP_SERVERS" in worker["kafka_bootstrap"]["error"]
    assert not any(f.startswith("postgres") or f.endswith("servers.json") for f in worker["files"]), worker["files"]

    # A record from another host: refused inside Ray, on the head node as on a worker.
    head = out["head_foreign"]
    assert head["node"][1] is True
    for probe in (head, out["worker_foreign"]):
        assert "another-machine" in probe["database_url"]["error"]
        assert "DATABASE_URL" in probe["database_url"]["error"]
        assert "KAFKA_BOOTSTRAP_SERVERS" in probe["kafka_bootstrap"]["error"]
    assert "worker node" in out["worker_foreign"]["ensure_servers"]["error"]  # it would have to start them

    # Outside Ray the same record is the local machine's; a worker sharing this loopback uses it.
    assert out["outside_ray"].startswith("postgresql+psycopg2://postgres@127.0.0.1:5999/")
    assert out["worker_shared"]["database_url"]["ok"].endswith("@127.0.0.1:5999/fraud")
    assert out["worker_shared"]["kafka_bootstrap"]["ok"] == "127.0.0.1:5998"
