"""/predict against a no-op FastAPI ingress in the same Serve instance, alternated in one run (#21).

    python benchmarks/bench_serve.py [--rounds 3] [--requests 600] [--idle-seconds 60]
                                     [--json PATH] [--config serve_config.yaml] [--env NAME=VALUE ...]

Starts the whole system the way a user does, `serve run` of the Serve config
(default serve_config.yaml: embedded PostgreSQL and broker, the scoring
application, Kafka ingestion, the UI) on a port of its own, in a temporary data
directory, with the no-op ingress of deployments/noop.py beside it at /noop.
Then it measures:

- the idle CPU of everything running (every Ray process, PostgreSQL, the
  broker) over a window with no traffic, per process, with psutil, and with
  pidstat when it is installed;
- at least 3 rounds; in each, at 1, 8 and 32 concurrent clients, the no-op and
  /predict one after the other (which goes first alternates round by round, so
  both see the same minutes of a machine shared with other work): 1-client
  p50, 8-client p99, 32-client throughput, errors;
- per round the ratios issue #21 sets targets for, and their medians and ranges;
- the per-step breakdown of /predict batches (GET /stats/latency);
- the load average at the start, after each round and at the end.

It prints the figures and writes them as JSON (--json) for the docs.
`--env` passes an environment variable to `serve run` (hence to every Ray
process), to measure one of Serve's knobs against a run without it.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import psutil
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

from benchmarks._datadir import own_data_dir, remove  # noqa: E402
from benchmarks._load import LoadResult, run_load  # noqa: E402

CONCURRENCY = (1, 8, 32)
BENCH_API_KEY = "bench-serve-key-0123456789"
# Issue #21's targets: (name, how it is computed, comparison, bound).
TARGETS = {
    "p50_at_1": ("/predict p50 at 1 client / no-op p50 at 1 client", "<=", 2.0),
    "p99_at_8": ("/predict p99 at 8 clients / no-op p99 at 8 clients", "<=", 3.0),
    "rps_at_32": ("/predict req/s at 32 clients / no-op req/s at 32 clients", ">=", 0.8),
    "noop_tail": ("no-op p99 at 8 clients / no-op p50 at 1 client", "<=", 4.0),
}
IDLE_TARGET_PCT = 10.0  # of one core


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Bodies:
    """Request bodies, a new index for every request of the run: 400 users, 150 merchants."""

    def __init__(self) -> None:
        self.next = 0

    def __call__(self, i: int) -> dict:
        k = self.next
        self.next += 1
        now = datetime.now(UTC) - timedelta(seconds=1)
        return {"user_id": f"u{(k * 7919) % 400:06d}", "amount": round(5 + (k * 37) % 400 + 0.25, 2),
                "merchant": f"m{(k * 31) % 150:05d}", "country": "DE", "timestamp": now.isoformat()}


def _wait(url: str, proc: subprocess.Popen, log_path: Path, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"serve run exited ({proc.returncode}):\n{_tail(log_path)}")
        try:
            if httpx.get(url, timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise RuntimeError(f"{url} did not come up in {timeout:.0f}s:\n{_tail(log_path)}")


def _tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _bench_config(source: Path, port: int, target: Path) -> None:
    """`source` with its own port and the no-op application added at /noop."""
    config = yaml.safe_load(source.read_text())
    config.setdefault("http_options", {})["port"] = port
    config["applications"].append(
        {"name": "noop", "route_prefix": "/noop", "import_path": "deployments.app:build_noop_app"})
    target.write_text(yaml.safe_dump(config, sort_keys=False))


# --- idle CPU ---------------------------------------------------------------


def _label(p: psutil.Process) -> str:
    """A short name for a process: a Ray worker's title (ray::ServeReplica:app:Step),
    a Python script's file name, or an executable's name."""
    try:
        argv = p.cmdline()
    except psutil.Error:
        return "?"
    if not argv:
        return p.name()
    first = argv[0]
    if first.startswith("ray::"):
        return first.split()[0]
    if "python" in Path(first).name and len(argv) > 1:
        script = next((a for a in argv[1:] if a.endswith(".py")), None)
        if script:
            return Path(script).name
        if argv[1] == "-m" and len(argv) > 2:
            return argv[2]
    name = Path(first).name
    return "postgres" if name.startswith("postgres") else name


def _system(serve_pid: int, server_pids: list[int]) -> dict[int, psutil.Process]:
    """Every process of the running system: `serve run` and its descendants (every Ray
    process), and the embedded servers with theirs (PostgreSQL's backends)."""
    out: dict[int, psutil.Process] = {}
    for pid in [serve_pid, *server_pids]:
        try:
            root = psutil.Process(pid)
            for p in [root, *root.children(recursive=True)]:
                out[p.pid] = p
        except psutil.Error:
            continue
    return out


def _cpu_seconds(p: psutil.Process) -> float | None:
    try:
        t = p.cpu_times()
        return t.user + t.system
    except psutil.Error:
        return None


def _pidstat(pids: list[int], seconds: int, out: dict[str, Any]) -> None:
    """pidstat's average %CPU over the window, summed over `pids` (those it saw)."""
    try:
        text = subprocess.run(["pidstat", "-u", "-p", ",".join(map(str, pids)), str(seconds), "1"],
                              capture_output=True, text=True, timeout=seconds + 30).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        out["error"] = str(exc)
        return
    header, total, seen = None, 0.0, 0
    for line in text.splitlines():
        cols = line.split()
        if "%CPU" in cols:
            header = cols
        elif header and cols and cols[0] == "Average:" and len(cols) == len(header):
            total += float(cols[header.index("%CPU")])
            seen += 1
    out.update({"total_pct_of_one_core": total, "processes": seen})


def measure_idle(serve_pid: int, server_pids: list[int], seconds: int) -> dict[str, Any]:
    """CPU used by the whole system over `seconds` with no traffic, in % of one core:
    in total, per process label, and pidstat's total when pidstat is installed."""
    start = _system(serve_pid, server_pids)
    before = {pid: (p, _cpu_seconds(p)) for pid, p in start.items()}
    pidstat_out: dict[str, Any] = {}
    pidstat = None
    if subprocess.run(["which", "pidstat"], capture_output=True).returncode == 0:
        pidstat = threading.Thread(target=_pidstat, args=(list(start), seconds, pidstat_out))
        pidstat.start()
    t0 = time.monotonic()
    time.sleep(seconds)
    window = time.monotonic() - t0
    by_label: dict[str, float] = {}
    for pid, p in _system(serve_pid, server_pids).items():
        now = _cpu_seconds(p)
        if now is None:
            continue
        then = before.get(pid, (None, 0.0))[1] or 0.0  # a process started in the window: all of it
        by_label[_label(p)] = by_label.get(_label(p), 0.0) + max(now - then, 0.0)
    if pidstat is not None:
        pidstat.join()
    pct = {k: 100 * v / window for k, v in sorted(by_label.items(), key=lambda kv: -kv[1])}
    return {"seconds": window, "processes": len(start), "total_pct_of_one_core": sum(pct.values()),
            "by_process_pct_of_one_core": pct, "pidstat": pidstat_out or None,
            "loadavg": os.getloadavg()}


# --- load -------------------------------------------------------------------


def _round(urls: dict[str, str], bodies: Bodies, requests: int, noop_first: bool,
           headers: dict) -> dict[str, dict[int, LoadResult]]:
    order = ["noop", "predict"] if noop_first else ["predict", "noop"]
    out: dict[str, dict[int, LoadResult]] = {"noop": {}, "predict": {}}
    for c in CONCURRENCY:
        n = max(100, requests // 3) if c == 1 else requests
        for name in order:
            out[name][c] = run_load(urls[name], bodies, c, n, headers=headers)
            print("  " + out[name][c].row("no-op Serve endpoint" if name == "noop" else "/predict (all steps)"),
                  flush=True)
    return out


def _ratios(r: dict[str, dict[int, LoadResult]]) -> dict[str, float]:
    noop, ours = r["noop"], r["predict"]
    return {
        "p50_at_1": ours[1].pct(50) / noop[1].pct(50),
        "p99_at_8": ours[8].pct(99) / noop[8].pct(99),
        "rps_at_32": ours[32].rps / noop[32].rps,
        "noop_tail": noop[8].pct(99) / noop[1].pct(50),
    }


def _met(key: str, value: float) -> bool:
    _, op, bound = TARGETS[key]
    return value <= bound if op == "<=" else value >= bound


def _git_revision() -> str:
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                             text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "deployments", "features",
                                "benchmarks", "serve_config.yaml"], cwd=ROOT, capture_output=True,
                               text=True).stdout.strip()
        return rev + ("+changes" if dirty else "")
    except OSError:
        return "unknown"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="alternated rounds (at least 3)")
    parser.add_argument("--requests", type=int, default=600,
                        help="requests per measure at 8 and 32 clients (a third of it at 1)")
    parser.add_argument("--idle-seconds", type=int, default=60, help="idle CPU window")
    parser.add_argument("--config", type=Path, default=ROOT / "serve_config.yaml")
    parser.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                        help="an environment variable for `serve run` and every Ray process")
    parser.add_argument("--json", type=Path, help="write the figures here as JSON")
    args = parser.parse_args(argv)
    if args.rounds < 3:
        parser.error("--rounds: at least 3 (the ratios are medians of alternated rounds)")
    extra_env = dict(kv.split("=", 1) for kv in args.env)

    own_dir = own_data_dir("bench-serve-")  # before the settings are read
    os.environ.setdefault("FRAUD_API_KEY", BENCH_API_KEY)
    headers = {"X-API-Key": os.environ["FRAUD_API_KEY"]}

    from cluster.dev import ensure_servers, status, stop_servers
    from configs.settings import get_settings

    settings = get_settings()
    ensure_servers(settings)
    server_pids = [rec["pid"] for rec in status(settings)["servers"].values() if rec.get("pid")]
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    data_dir = Path(os.environ["FRAUD_DATA_DIR"])
    config_path = data_dir / "bench_serve_config.yaml"
    _bench_config(args.config, port, config_path)
    log_path = data_dir / "serve_run.log"
    loadavg_start = os.getloadavg()
    print(f"load average at start: {loadavg_start[0]:.2f} {loadavg_start[1]:.2f} {loadavg_start[2]:.2f} "
          f"on {os.cpu_count()} cores; env {extra_env or '{}'}", flush=True)
    serve_bin = Path(sys.executable).parent / "serve"
    with open(log_path, "w") as log_file:
        # Its own session, so that the whole tree it starts can be stopped by its group id.
        proc = subprocess.Popen([str(serve_bin), "run", str(config_path), "--address", "local"],
                                cwd=ROOT, env=os.environ | extra_env, stdout=log_file,
                                stderr=subprocess.STDOUT, start_new_session=True)
    report: dict[str, Any] = {}
    try:
        started = time.monotonic()
        _wait(f"{base}/health", proc, log_path)
        _wait(f"{base}/ui/", proc, log_path)
        urls = {"noop": f"{base}/noop/predict", "predict": f"{base}/predict"}
        bodies = Bodies()
        for url in urls.values():  # first requests pay for lazy set-up: not part of idle or rounds
            run_load(url, bodies, 4, 100, headers=headers)
        print(f"system up in {time.monotonic() - started:.0f}s; settling, then {args.idle_seconds}s idle",
              flush=True)
        time.sleep(10)
        idle = measure_idle(proc.pid, server_pids, args.idle_seconds)
        print(f"idle CPU of the whole system: {idle['total_pct_of_one_core']:.1f}% of one core over "
              f"{idle['seconds']:.0f}s ({idle['processes']} processes; target < {IDLE_TARGET_PCT:.0f}%)")
        if idle["pidstat"]:
            print(f"  pidstat: {idle['pidstat'].get('total_pct_of_one_core', float('nan')):.1f}% over "
                  f"{idle['pidstat'].get('processes')} processes")
        for label, pct in list(idle["by_process_pct_of_one_core"].items())[:12]:
            print(f"  {pct:6.2f}%  {label}")

        rounds = []
        for k in range(args.rounds):
            print(f"\nround {k + 1} ({'no-op' if k % 2 == 0 else '/predict'} first)", flush=True)
            r = _round(urls, bodies, args.requests, k % 2 == 0, headers)
            rounds.append({"results": {name: {c: res.summary() for c, res in per.items()}
                                       for name, per in r.items()},
                           "ratios": _ratios(r), "loadavg": os.getloadavg()})
            print("  ratios: " + "   ".join(f"{key} {v:.2f}" for key, v in rounds[-1]["ratios"].items()))

        breakdown = httpx.get(f"{base}/stats/latency", headers=headers, timeout=30).json()
        loadavg_end = os.getloadavg()
        medians: dict[str, dict[str, float]] = {}
        for name in ("noop", "predict"):
            for c in CONCURRENCY:
                for metric in ("rps", "p50_ms", "p99_ms"):
                    medians.setdefault(name, {})[f"{metric}_at_{c}"] = statistics.median(
                        r["results"][name][c][metric] for r in rounds)
        ratios = {}
        for key in TARGETS:
            values = [r["ratios"][key] for r in rounds]
            ratios[key] = {"median": statistics.median(values), "min": min(values), "max": max(values),
                           "target": f"{TARGETS[key][1]} {TARGETS[key][2]}",
                           "met": _met(key, statistics.median(values))}
        errors = {name: sum(r["results"][name][c]["errors"] for r in rounds for c in CONCURRENCY)
                  for name in ("noop", "predict")}

        print(f"\nmedians of {len(rounds)} alternated rounds      no-op      /predict")
        for c in CONCURRENCY:
            for metric, unit in (("p50_ms", "ms"), ("p99_ms", "ms"), ("rps", "req/s")):
                key = f"{metric}_at_{c}"
                print(f"  c={c:<3} {metric[:3]:<5} {medians['noop'][key]:10.1f} {medians['predict'][key]:12.1f} {unit}")
        print("\nratios (median of the rounds, [range]) against issue #21's targets:")
        for key, (what, op, bound) in TARGETS.items():
            q = ratios[key]
            print(f"  {what:<58} {q['median']:5.2f}x [{q['min']:.2f}-{q['max']:.2f}]  "
                  f"target {op} {bound}: {'met' if q['met'] else 'MISSED'}")
        print(f"  errors: no-op {errors['noop']}, /predict {errors['predict']}  (target 0)")
        print(f"  idle CPU: {idle['total_pct_of_one_core']:.1f}% of one core "
              f"(target < {IDLE_TARGET_PCT:.0f}%)")
        print("\nper-step time of /predict batches (ms, the ingress's last "
              f"{breakdown.get('batches', 0)} batches):")
        for key in ("features_ms", "model_ms", "shap_ms", "chain_ms", "audit_ms"):
            if key in breakdown:
                print(f"  {key:<12} p50 {breakdown[key]['p50']:7.2f}   p99 {breakdown[key]['p99']:7.2f}")
        if "mean_batch_size" in breakdown:
            print(f"  mean batch size {breakdown['mean_batch_size']:.1f}")
        print(f"\nload average: start {loadavg_start[0]:.2f}, end {loadavg_end[0]:.2f} "
              f"(1-minute; {os.cpu_count()} cores)")
        report = {
            "benchmark": "bench_serve", "when": datetime.now(UTC).isoformat(timespec="seconds"),
            "revision": _git_revision(), "cores": os.cpu_count(), "config": str(args.config),
            "env": extra_env, "requests": args.requests,
            "loadavg": {"start": loadavg_start, "end": loadavg_end,
                        "rounds": [r["loadavg"] for r in rounds]},
            "idle_cpu": idle, "idle_target_pct_of_one_core": IDLE_TARGET_PCT,
            "rounds": rounds, "medians": medians, "ratios": ratios, "errors": errors,
            "per_step_ms": breakdown,
        }
        if args.json:
            args.json.write_text(json.dumps(report, indent=2, default=str))
            print(f"wrote {args.json}")
    finally:
        proc.send_signal(signal.SIGINT)  # serve run shuts Serve and its Ray instance down
        try:
            proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        stop_servers(settings)
        remove(own_dir)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
