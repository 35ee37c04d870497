"""/predict against a no-op Serve endpoint and the original prototype, in one run.

    python benchmarks/bench_serve.py [--requests 1500]

Starts its own Ray (4 logical CPUs), embedded PostgreSQL and broker in a
temporary data directory, deploys the no-op app and the scoring app (every
step on the path: features with the state actors, score, SHAP, audit), runs the
prototype with uvicorn in a subprocess, and prints req/s, p50 and p99 at 1, 8
and 32 concurrent clients, the ratios, and a per-step breakdown of /predict.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

from benchmarks._datadir import own_data_dir, remove  # noqa: E402
from benchmarks._load import run_load  # noqa: E402

CONCURRENCY = (1, 8, 32)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _body(i: int) -> dict:
    now = datetime.now(UTC) - timedelta(seconds=1)
    return {"user_id": f"u{(i * 7919) % 400:06d}", "amount": round(5 + (i * 37) % 400 + 0.25, 2),
            "merchant": f"m{(i * 31) % 150:05d}", "country": "DE", "timestamp": now.isoformat()}


def _wait(url: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=2).status_code < 500:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{url} did not come up")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=1500, help="requests per run at 8 and 32 clients")
    args = parser.parse_args(argv)
    own_dir = own_data_dir("bench-serve-")  # before the settings are read

    import ray
    from ray import serve

    from cluster.dev import ensure_servers, stop_servers
    from configs.settings import get_settings
    from deployments.app import build_app, build_noop_app

    settings = get_settings()
    urls = ensure_servers(settings)
    port = _free_port()
    proto_port = _free_port()
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    proto = None
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port},
                    logging_config={"enable_access_log": False, "log_level": "WARNING"})
        serve.run(build_noop_app(), name="noop", route_prefix="/noop")
        serve.run(build_app({}), name="fraud-scoring", route_prefix="/")
        _wait(f"http://127.0.0.1:{port}/health")
        proto = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "benchmarks._prototype_app:app", "--port", str(proto_port),
             "--log-level", "warning", "--no-access-log"],
            cwd=ROOT, env=os.environ | {"PROTOTYPE_DATABASE_URL": urls["database_url"]},
        )
        _wait(f"http://127.0.0.1:{proto_port}/docs")

        targets = {
            "no-op Serve endpoint": f"http://127.0.0.1:{port}/noop/predict",
            "/predict (all steps)": f"http://127.0.0.1:{port}/predict",
            "prototype baseline": f"http://127.0.0.1:{proto_port}/predict",
        }
        results: dict[tuple[str, int], object] = {}
        for c in CONCURRENCY:
            total = max(200, args.requests // (3 if c == 1 else 1))
            for name, url in targets.items():
                n = total if name != "prototype baseline" else max(100, total // 5)
                results[name, c] = run_load(url, _body, c, n)
                print(results[name, c].row(name), flush=True)
        print()
        for c in CONCURRENCY:
            noop, ours, proto_r = (results[n, c] for n in targets)  # the order of `targets`
            print(f"c={c:<3} /predict vs no-op: {ours.rps / noop.rps:5.2f}x   "
                  f"/predict vs prototype: {ours.rps / proto_r.rps:6.2f}x")
        print("\ntargets: c=32 /predict >= 0.70x no-op and >= 3x prototype; c=1 p50 <= 15 ms; c=8 p99 < 150 ms")
        breakdown = httpx.get(f"http://127.0.0.1:{port}/stats/latency", timeout=10).json()
        print("\nper-step time of /predict batches (ms):")
        for key in ("features_ms", "model_ms", "shap_ms", "chain_ms", "audit_ms"):
            print(f"  {key:<12} p50 {breakdown[key]['p50']:7.2f}   p99 {breakdown[key]['p99']:7.2f}")
        print(f"  batches {breakdown['batches']}, mean batch size {breakdown['mean_batch_size']:.1f}")
    finally:
        if proto is not None:
            proto.terminate()
            proto.wait(timeout=10)
        serve.shutdown()
        ray.shutdown()
        stop_servers(settings)
        remove(own_dir)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
