"""Two Ray nodes that share nothing but the network: jobs and the scoring application
on a cluster whose worker sees none of the head's files.

A Ray head and a Ray worker node on this machine, each in its own PID and mount
namespace (`tests.ray_nodes`, isolated); the worker has a private tmpfs over
/tmp, /dev/shm and its data directory, so nothing the head, this process or
PostgreSQL keeps there is visible to it, and nothing it writes is visible
outside. The code is the same on both, as an image would be (the editable
install in the venv). Everything else travels over the network: PostgreSQL and
the broker by URL (the session's servers), models and job data on S3 (moto's
server), settings in each node's environment.

- `ray job submit` trains from an s3:// Parquet history and backfills it to an
  s3:// output: every input row is in the output or the rejects, and the scores
  and explanations equal those computed here, in one process, from the same
  model and the offline features of the same rows.
- The scoring application (serve_config.yaml's, its steps placed by the same
  overrides as deploy/kuberay/rayservice.yaml: the ingress on the head, the
  feature, model and SHAP steps on the worker) answers /predict with the
  trained version; its features, scores and explanations equal those of one
  process on the same model and the same recorded history.
- The head offers no CPU, so every task and actor of the jobs runs on the
  worker; the worker writes nothing anyone else sees, and nothing under the
  head's paths in its own view (a path of the driver's reaching an actor).
- A copy of the application whose worker steps see no DATABASE_URL: each step
  fails at start naming the setting.
- Stopping kills each namespace's first process: no process is left in either.

Skipped, saying why, where namespaces are not permitted (they need root: CI runs
as root).
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import numpy as np
import pandas as pd
import pytest
import yaml

from jobs.simulate import simulate
from tests.ports import free_port
from tests.ray_nodes import RAY, Node, RayNodes, isolation_refused
from tests.s3_server import aws_env, create_bucket, start_moto, stop

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
SERVE = str(Path(sys.executable).with_name("serve"))
BUCKET = "two-nodes"
SECRET = f"s3cr3t-{uuid.uuid4().hex}"
BAD_AMOUNTS = {5: "-3", 9: "abc"}
JOB_TIMEOUT_S = 900
HEALTHY_TIMEOUT_S = 900
ONLINE_USERS = 6
# The head offers no CPU (`--num-cpus 0`, as KubeRay advises for a head): every task and
# actor of the jobs runs on the worker, the drivers, Serve's controller and proxy on the
# head. Steps placed as in deploy/kuberay/rayservice.yaml (one replica each: two cores
# here), the ingress with no CPU so that it fits on the head.
PLACEMENT = {
    "ScoringIngress": {"num_cpus": 0, "resources": {"head": 1}},
    "FeatureStep": {"num_cpus": 0.1, "resources": {"worker": 1}},
    "ModelStep": {"num_cpus": 0.2, "resources": {"worker": 1}},
    "ShapStep": {"num_cpus": 0.2, "resources": {"worker": 1}},
}
WORKER_STEPS = ("FeatureStep", "ModelStep", "ShapStep")
# A second copy of the application whose steps on the worker see no DATABASE_URL, as on
# a worker node whose environment lacks it (an empty value is unset for the settings).
NO_DATABASE_APP = "no-database"
NO_DATABASE_ENV = {"env_vars": {"DATABASE_URL": ""}}
NO_DATABASE_ERROR = "DATABASE_URL is not set on Ray worker node"
STEP_FAILED_TIMEOUT_S = 600
# Scores and explanations as computed here, to rounding: the kernels take another path
# for a batch under SHAP_VECTOR_ROWS rows (one walk per row, multiply-adds contracted),
# so a value depends on its batch's size in the last bit (seen: 2.2e-16). Features and
# anomaly flags are compared exactly.
ROUNDING = 1e-12


@pytest.fixture(scope="module")
def isolation():
    refused = isolation_refused()
    if refused:
        pytest.skip(f"two isolated Ray nodes cannot be started here: {refused}")


@pytest.fixture(scope="module")
def s3(isolation):
    proc, endpoint = start_moto()
    try:
        create_bucket(endpoint, SECRET, BUCKET)
        yield endpoint
    finally:
        stop(proc)


def _s3fs(endpoint: str):
    from pyarrow.fs import S3FileSystem

    env = aws_env(endpoint, SECRET)
    return S3FileSystem(endpoint_override=endpoint, region=env["AWS_REGION"],
                        access_key=env["AWS_ACCESS_KEY_ID"], secret_key=env["AWS_SECRET_ACCESS_KEY"])


def _history(endpoint: str, prefix: str) -> pd.DataFrame:
    """A labelled history ending yesterday, as two Parquet files under s3://<bucket>/<prefix>/,
    with two bad amounts (rejects)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    start = pd.Timestamp.now(tz="UTC").floor("D") - pd.Timedelta(days=10)
    df = simulate(users=60, days=10, seed=41, start=start).astype({"amount": str})
    for pos, value in BAD_AMOUNTS.items():
        df.iloc[pos, df.columns.get_loc("amount")] = value
    half = len(df) // 2
    for i, part in enumerate((df.iloc[:half], df.iloc[half:])):
        pq.write_table(pa.Table.from_pandas(part, preserve_index=False),
                       f"{BUCKET}/{prefix}/part-{i}.parquet", filesystem=_s3fs(endpoint))
    return df


def _submit(nodes: RayNodes, module: str, *args: str) -> str:
    """`ray job submit` of `python -m module args` to the head, the code that of the nodes
    (no working_dir: as a KubeRay RayJob runs the image's). Returns the job's output."""
    command = [RAY, "job", "submit", "--address", nodes.dashboard, "--", sys.executable, "-m", module, *args]
    began = time.monotonic()
    while True:  # the head's job agent takes a while to come up after `ray start`
        result = subprocess.run(command, env=nodes.env, capture_output=True, text=True,
                                timeout=JOB_TIMEOUT_S, check=False)
        if "No available agent" not in result.stderr or time.monotonic() - began > 300:
            break
        time.sleep(3)
    output = result.stdout + result.stderr
    assert result.returncode == 0 and "succeeded" in output.lower(), output[-6000:]
    return output


def _serve_config(port: int, version: str) -> dict:
    """serve_config.yaml's scoring application on one port of the head, pinned to
    `version`, its steps placed by custom resources."""
    shipped = yaml.safe_load((REPO / "serve_config.yaml").read_text())
    app = next(a for a in shipped["applications"] if a["name"] == "fraud-scoring")
    app["args"] = app["args"] | {"model_version": version, "bootstrap": False, "warm_state": False}
    options = {d["name"]: d for d in app.get("deployments", [])}
    for name, actor in PLACEMENT.items():
        options[name] = options.get(name, {"name": name}) | {"num_replicas": 1, "ray_actor_options": actor}
    app["deployments"] = list(options.values())
    no_database = copy.deepcopy(app) | {"name": NO_DATABASE_APP, "route_prefix": f"/{NO_DATABASE_APP}"}
    for step in no_database["deployments"]:
        if step["name"] in WORKER_STEPS:
            step["ray_actor_options"] |= {"runtime_env": NO_DATABASE_ENV}
    return {"proxy_location": "HeadOnly", "http_options": {"host": "127.0.0.1", "port": port},
            "logging_config": shipped.get("logging_config", {}), "applications": [app, no_database]}


def _wait_healthy(url: str, version: str) -> dict:
    deadline = time.monotonic() + HEALTHY_TIMEOUT_S
    last: object = None
    while time.monotonic() < deadline:
        try:
            response = httpx.get(f"{url}/health", timeout=30)
            last = response.text
            if response.status_code == 200 and response.json()["model_version"] == version:
                return response.json()
        except httpx.HTTPError as exc:
            last = exc
        time.sleep(3)
    raise AssertionError(f"the scoring application did not become healthy with {version}: {last}")


def _steps_settled(nodes: RayNodes, app: str) -> dict:
    """The worker steps of `app` (status, message) once each has failed or become healthy."""
    deadline = time.monotonic() + STEP_FAILED_TIMEOUT_S
    while True:
        details = httpx.get(f"{nodes.dashboard}/api/serve/applications/", timeout=30).json()
        deployments = details["applications"].get(app, {}).get("deployments", {})
        steps = {name: (d["status"], d.get("message", "")) for name, d in deployments.items() if name in WORKER_STEPS}
        settled = len(steps) == len(WORKER_STEPS) and all(
            status in ("DEPLOY_FAILED", "HEALTHY") for status, _ in steps.values())
        if settled or time.monotonic() > deadline:
            return steps
        time.sleep(3)


def _processes_in(pid_namespace_of: int) -> list[str]:
    """Command lines of the processes in the PID namespace of host pid `pid_namespace_of`."""
    wanted = os.readlink(f"/proc/{pid_namespace_of}/ns/pid")
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if os.readlink(proc / "ns" / "pid") == wanted:
                found.append((proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"))
        except OSError:
            continue
    return found


def _in_namespaces(namespaces: set[str]) -> list[int]:
    """Host pids of the processes left in these PID namespaces."""
    left = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and os.readlink(proc / "ns" / "pid") in namespaces:
                left.append(int(proc.name))
        except OSError:
            continue
    return left


def _files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")) if root.exists() else []


def _as_transactions(frame: pd.DataFrame) -> list[dict]:
    return [{"transaction_id": r.transaction_id, "user_id": r.user_id, "amount": float(r.amount),
             "merchant": r.merchant, "country": r.country, "timestamp": r.timestamp.isoformat()}
            for r in frame.itertuples()]


def _close(actual, expected) -> None:
    np.testing.assert_allclose(np.asarray(actual, dtype=np.float64), expected, rtol=0, atol=ROUNDING)


def _offline(rows: pd.DataFrame) -> pd.DataFrame:
    from features.transforms import compute_features

    return compute_features(rows.astype({"amount": float})).set_index("transaction_id")


def test_jobs_and_scoring_on_two_nodes_that_share_only_the_network(isolation, s3, servers, engine, data_dir,
                                                                   tmp_path, monkeypatch):
    from cluster.registry import ModelRegistry, artifact_uri_of
    from cluster.store.audit import AuditRepository
    from features.definitions import FEATURE_NAMES, FEATURE_SET_VERSION
    from scoring.explain import score_and_explain
    from scoring.store import load_model_from_store

    began = time.monotonic()
    run = uuid.uuid4().hex[:8]
    history = _history(s3, f"{run}/history")
    head_dir, worker_dir = tmp_path / "head", tmp_path / "worker"
    head_dir.mkdir()
    worker_dir.mkdir()
    settings = {"DATABASE_URL": servers["database_url"],
                "KAFKA_BOOTSTRAP_SERVERS": servers["kafka_bootstrap_servers"],
                "FRAUD_MODEL_STORE": f"s3://{BUCKET}/{run}/models", **aws_env(s3, SECRET)}
    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_ADDRESS", "FRAUD_DATA_DIR", "NUMBA_CACHE_DIR")} | settings
    nodes = RayNodes.started(
        env=env, isolated=True,
        # The head's numba cache is this process's, so that the kernels the jobs' drivers
        # compile there serve the expected values below (the head is not the isolated node).
        head=Node(num_cpus=0, resources={"head": 100},
                  env={"FRAUD_DATA_DIR": str(head_dir), "NUMBA_CACHE_DIR": os.environ["NUMBA_CACHE_DIR"]}),
        workers=[Node(num_cpus=2, resources={"worker": 100}, env={"FRAUD_DATA_DIR": str(worker_dir)},
                      private_dirs=("/tmp", "/dev/shm", str(worker_dir)))])
    timings = {"nodes": time.monotonic() - began}
    namespaces = {os.readlink(f"/proc/{nodes.namespace_pid(i)}/ns/pid") for i in (0, 1)}
    try:
        worker_pid = nodes.namespace_pid(1)
        worker_view = Path(f"/proc/{worker_pid}/root")
        worker_cache = worker_view / str(worker_dir).lstrip("/") / "cache" / "models"

        # --- jobs: train from S3, backfill from S3 to S3 ---------------------------------
        _submit(nodes, "jobs.train", "--input", f"s3://{BUCKET}/{run}/history/", "--n-estimators", "20")
        registry = ModelRegistry(engine)
        row = next(v for v in registry.list() if v["parameters"].get("source") == f"s3://{BUCKET}/{run}/history")
        version = row["version"]
        assert artifact_uri_of(row) == f"s3://{BUCKET}/{run}/models/{version}"
        timings["train"] = time.monotonic() - began
        _submit(nodes, "jobs.backfill", "--input", f"s3://{BUCKET}/{run}/history/",
                "--output", f"s3://{BUCKET}/{run}/scored/", "--model-version", version,
                "--actors", "1", "--batch-size", "300", "--write-db")
        timings["backfill"] = time.monotonic() - began
        # Its scoring actors ran on the worker, and fetched the model into its own cache.
        assert [p.name for p in worker_cache.iterdir()] == [row["artifact_sha256"]]

        # --- the scoring application, its steps on the worker ----------------------------
        port = free_port()
        config = tmp_path / "serve.yaml"
        config.write_text(yaml.safe_dump(_serve_config(port, version)))
        deployed = subprocess.run([SERVE, "deploy", str(config), "--address", nodes.dashboard], env=nodes.env,
                                  capture_output=True, text=True, timeout=300, check=False)
        assert deployed.returncode == 0, deployed.stdout[-3000:] + deployed.stderr[-3000:]
        url = f"http://127.0.0.1:{port}"
        _wait_healthy(url, version)
        timings["healthy"] = time.monotonic() - began

        # A history of a few users (ids and merchants of this run only) recorded in the
        # state, then one dry run each at a merchant of theirs: features, scores and
        # explanations as answered by the two nodes.
        valid = history.drop(index=list(BAD_AMOUNTS))
        users = valid["user_id"].drop_duplicates().iloc[:ONLINE_USERS]
        recorded = valid[valid["user_id"].isin(users)].copy()
        for column in ("transaction_id", "user_id", "merchant"):
            recorded[column] = f"{run}-" + recorded[column]
        headers = {"X-API-Key": os.environ["FRAUD_API_KEY"]}
        answers = []
        for start in range(0, len(recorded), 50):  # in event-time order, a batch at a time
            body = {"transactions": _as_transactions(recorded.iloc[start:start + 50])}
            response = httpx.post(f"{url}/predict/batch", json=body, headers=headers, timeout=120)
            assert response.status_code == 200, response.text
            answers += response.json()["results"]
        last = recorded.groupby("user_id").tail(1)
        probes = last.assign(transaction_id=[f"{run}-probe-{i}" for i in range(len(last))],
                             timestamp=pd.Timestamp.now(tz="UTC").floor("s"), amount="250.00")
        for probe in _as_transactions(probes):
            response = httpx.post(f"{url}/predict", params={"dry_run": "true"}, json=probe, headers=headers,
                                  timeout=120)
            assert response.status_code == 200, response.text
            answers.append(response.json())
        timings["online"] = time.monotonic() - began

        # A step on a worker node without DATABASE_URL fails at start, naming it (a worker
        # node never starts a PostgreSQL of its own).
        steps = _steps_settled(nodes, NO_DATABASE_APP)
        assert {step: status for step, (status, _) in steps.items()} == dict.fromkeys(WORKER_STEPS, "DEPLOY_FAILED")
        assert all(NO_DATABASE_ERROR in message for _, message in steps.values()), steps

        # Where each step ran: a process of the worker's namespace, or of the head's.
        on_worker = " ".join(_processes_in(worker_pid))
        on_head = " ".join(_processes_in(nodes.namespace_pid(0)))
        for step in WORKER_STEPS:
            assert f"ServeReplica:fraud-scoring:{step}" in on_worker, step
            assert f"ServeReplica:fraud-scoring:{step}" not in on_head, step
        assert "ServeReplica:fraud-scoring:ScoringIngress" in on_head
        # The worker wrote nothing outside its own view: not into its data directory as
        # the host sees it, nor under the head's (hidden from it: no process there may
        # use the driver's, as backfill actors once did for numba's cache).
        assert _files(worker_dir) == []
        for elsewhere in (head_dir, data_dir):  # the head's, and this process's (PostgreSQL's files)
            seen_there = worker_view / str(elsewhere).lstrip("/")
            assert not seen_there.exists(), f"the worker wrote under {elsewhere}: {_files(seen_there)[:20]}"
    finally:
        nodes.stop()
    timings["stopped"] = time.monotonic() - began
    assert _in_namespaces(namespaces) == []  # killing each first process ended all of the node's

    # --- expected values: one process, the same model, the same rows ---------------------
    for key, value in aws_env(s3, SECRET).items():
        monkeypatch.setenv(key, value)
    forest = load_model_from_store(artifact_uri_of(row), sha256=row["artifact_sha256"],
                                   feature_set_version=FEATURE_SET_VERSION, cache_dir=tmp_path / "here")
    names = list(FEATURE_NAMES)

    # The backfill: every input row scored or rejected, values as computed here.
    import pyarrow.parquet as pq

    scored = pq.read_table(f"{BUCKET}/{run}/scored", filesystem=_s3fs(s3)).to_pandas().set_index("transaction_id")
    with _s3fs(s3).open_input_stream(f"{BUCKET}/{run}/scored.rejects.csv") as fh:
        rejects = pd.read_csv(fh, dtype=str)
    assert sorted([*scored.index, *rejects["transaction_id"]]) == sorted(history["transaction_id"])
    assert scored.index.is_unique and set(rejects["amount"]) == set(BAD_AMOUNTS.values())
    assert (scored["model_version"] == version).all()
    assert AuditRepository(engine).count_backfill(version) == len(scored)  # --write-db, from both nodes
    offline = _offline(valid).loc[scored.index]
    np.testing.assert_array_equal(scored[names].to_numpy(np.float64), offline[names].to_numpy(np.float64))
    expected = score_and_explain(forest, offline[names].to_numpy(np.float64))
    _close(scored["risk_score"].to_numpy(), expected.risk_score)
    np.testing.assert_array_equal(scored["anomaly"].to_numpy(), expected.anomaly)
    _close(scored[[f"shap_{n}" for n in names]].to_numpy(), expected.explanation)

    # The scoring application: each recorded row's features as of its own time, each
    # probe's as of now over the whole recorded history; scores and explanations as here.
    assert len(answers) == len(recorded) + len(probes)
    assert all(a["model_version"] == version and a["feature_set_version"] == FEATURE_SET_VERSION
               for a in answers)
    each_probe = [_offline(pd.concat([recorded, probes.iloc[[i]]])).loc[[probes["transaction_id"].iloc[i]]]
                  for i in range(len(probes))]  # dry runs: none sees another
    want = pd.concat([_offline(recorded), *each_probe])
    got_X = np.array([[a["features"][n] for n in names] for a in answers])
    want_X = want.loc[[a["transaction_id"] for a in answers], names].to_numpy(np.float64)
    np.testing.assert_array_equal(got_X, want_X)
    expected = score_and_explain(forest, want_X)
    _close([a["risk_score"] for a in answers], expected.risk_score)
    np.testing.assert_array_equal([a["anomaly"] for a in answers], expected.anomaly)
    np.testing.assert_array_equal([a["threshold"] for a in answers], forest.threshold_)
    _close([[a["explanation"][n] for n in names] for a in answers], expected.explanation)
    print(f"two nodes: {json.dumps({k: round(v) for k, v in timings.items()})}", file=sys.stderr)
