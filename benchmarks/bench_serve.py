"""/predict against a no-op FastAPI ingress in the same Serve instance, alternated in one run (#21).

    python benchmarks/bench_serve.py [--rounds 3] [--requests 600] [--idle-seconds 60]
                                     [--json PATH] [--config serve_config.yaml] [--env NAME=VALUE ...]
                                     [--variant NAME=JSON ...]

Starts the whole system the way a user does, `serve run` of the Serve config
(default serve_config.yaml: embedded PostgreSQL and broker, the scoring
application, Kafka ingestion, the UI) on a port of its own, in a temporary data
directory, with the no-op ingress of deployments/noop.py beside it at /noop.
Then it measures:

- the idle CPU of everything running (every Ray process, PostgreSQL, the
  broker) over a window with no traffic, per process, with psutil, and with
  pidstat when it is installed;
- at least 3 rounds; in each, at 1, 8 and 32 concurrent clients, the no-op and
  /predict one after the other (which goes first turns round by round, so
  both see the same minutes of a machine shared with other work): 1-client
  p50, 8-client p99, 32-client throughput, errors;
- per round the ratios issue #21 sets targets for, and their medians and ranges;
- the per-step breakdown of /predict batches (GET /stats/latency);
- the load average at the start, after each round and at the end.

It prints the figures and writes them as JSON (--json) for the docs.

To measure a lever, `--variant NAME=JSON` deploys a copy of the scoring
application at /v-NAME with the JSON's `args`, `deployments` options,
`runtime_env` (a replica's RAY_SERVE_* settings) or `logging_config`, and measures it in
the same rounds, against the no-op and against /predict: on a machine whose
speed drifts, only figures taken side by side compare. `--env` passes an
environment variable to `serve run` (hence to every Ray process, the proxy
included), for what cannot be set per application; that needs a run of its own.
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
from benchmarks._report import Report, add_json_option  # noqa: E402

CONCURRENCY = (1, 8, 32)
SCORING_STEPS = ("ScoringIngress", "FeatureStep", "ModelStep", "ShapStep")
WARMUP = 20  # requests before each measure (their CPU is counted with the measure's)
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


def _bench_config(source: Path, port: int, target: Path, variants: dict[str, dict]) -> None:
    """`source` with its own port, the no-op application added at /noop, and per variant
    a copy of the scoring application at /v-NAME with the variant's `args` and
    `deployments` (options by deployment name) merged in and its other keys
    (`runtime_env`, `logging_config`) set; its
    steps ask for 0.01 logical CPU (a copy with the real shares does not fit on
    two cores beside the system; logical CPUs limit nothing at run time)."""
    config = yaml.safe_load(source.read_text())
    config.setdefault("http_options", {})["port"] = port
    scoring = next(a for a in config["applications"] if a["import_path"].endswith(":build_app"))
    for app in config["applications"]:
        if app["import_path"].endswith(":build_ui_app"):  # the UI calls this run's API
            app.setdefault("args", {})["api_url"] = f"http://127.0.0.1:{port}"
    for name, change in variants.items():
        copy = json.loads(json.dumps(scoring))
        copy.update(name=f"{scoring['name']}-{name}", route_prefix=f"/v-{name}")
        copy["args"] = (copy.get("args") or {}) | change.get("args", {})
        for key in set(change) - {"args", "deployments"}:  # runtime_env, logging_config, ...
            copy[key] = change[key]
        by_name = {d["name"]: d for d in copy.get("deployments", [])}
        for step in SCORING_STEPS:  # a logical CPU share small enough to fit beside the system
            by_name[step] = by_name.get(step, {"name": step}) | {"ray_actor_options": {"num_cpus": 0.01}}
        for d in change.get("deployments", []):
            by_name[d["name"]] = by_name.get(d["name"], {}) | d
        copy["deployments"] = list(by_name.values())
        config["applications"].append(copy)
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


def _snapshot(serve_pid: int, server_pids: list[int]) -> dict[int, tuple[str, float]]:
    """CPU seconds so far of every process of the system, with its label."""
    out = {}
    for pid, p in _system(serve_pid, server_pids).items():
        cpu = _cpu_seconds(p)
        if cpu is not None:
            out[pid] = (_label(p), cpu)
    return out


def _cpu_between(before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]]) -> dict[str, float]:
    """CPU seconds per label between two snapshots (a process started between them: all of it)."""
    by_label: dict[str, float] = {}
    for pid, (label, cpu) in after.items():
        then = before[pid][1] if pid in before else 0.0
        by_label[label] = by_label.get(label, 0.0) + max(cpu - then, 0.0)
    return dict(sorted(by_label.items(), key=lambda kv: -kv[1]))


def _benchmark_only(label: str, variants: dict[str, dict]) -> bool:
    """A process the benchmark added: the no-op's replica, a variant's replicas."""
    return ":noop:" in label or any(f"-{name}:" in label for name in variants)


def measure_idle(serve_pid: int, server_pids: list[int], seconds: int, variants: dict[str, dict]) -> dict[str, Any]:
    """CPU used with no traffic over `seconds`, in % of one core: by the system (every
    process of it; the no-op's and the variants' replicas are counted apart), per
    process label, and pidstat's total over the same processes when it is installed."""
    pids = list(_system(serve_pid, server_pids))
    before = _snapshot(serve_pid, server_pids)
    pidstat_out: dict[str, Any] = {}
    pidstat = None
    if subprocess.run(["which", "pidstat"], capture_output=True, check=False).returncode == 0:
        pidstat = threading.Thread(target=_pidstat, args=(pids, seconds, pidstat_out))
        pidstat.start()
    t0 = time.monotonic()
    time.sleep(seconds)
    window = time.monotonic() - t0
    pct = {k: 100 * v / window for k, v in _cpu_between(before, _snapshot(serve_pid, server_pids)).items()}
    if pidstat is not None:
        pidstat.join()
    return {"seconds": window, "processes": len(pids),
            "total_pct_of_one_core": sum(v for k, v in pct.items() if not _benchmark_only(k, variants)),
            "benchmark_apps_pct_of_one_core": sum(v for k, v in pct.items() if _benchmark_only(k, variants)),
            "by_process_pct_of_one_core": pct, "pidstat_all_processes": pidstat_out or None,
            "loadavg": os.getloadavg()}


# --- load -------------------------------------------------------------------


def _round(urls: dict[str, str], bodies: Bodies, requests: int, shift: int, headers: dict,
           snapshot) -> tuple[dict[str, dict[int, LoadResult]], dict[str, dict[int, dict[str, float]]]]:
    """Each target at 1, 8 and 32 clients, one after the other; the order turns by
    `shift` (the round's number), so that each goes first as often as the others.
    Also the system's CPU a request (ms, per process label) of each measure."""
    names = list(urls)
    order = names[shift % len(names):] + names[:shift % len(names)]
    out: dict[str, dict[int, LoadResult]] = {name: {} for name in names}
    cpu: dict[str, dict[int, dict[str, float]]] = {name: {} for name in names}
    for c in CONCURRENCY:
        n = max(100, requests // 3) if c == 1 else requests
        for name in order:
            before = snapshot()
            out[name][c] = run_load(urls[name], bodies, c, n, headers=headers, warmup=WARMUP)
            used = _cpu_between(before, snapshot())
            cpu[name][c] = {k: 1e3 * v / (n + WARMUP) for k, v in used.items() if v > 0}
            print("  " + out[name][c].row(_title(name))
                  + f"   CPU {sum(cpu[name][c].values()):5.1f} ms/request", flush=True)
    return out, cpu


def _title(name: str) -> str:
    return {"noop": "no-op Serve endpoint", "predict": "/predict (all steps)"}.get(name, f"/v-{name}/predict")


def _ratios(r: dict[str, dict[int, LoadResult]]) -> dict[str, dict[str, float]]:
    """Per scoring target, the ratios of issue #21 against the no-op (and the no-op's tail);
    per variant also its figures against /predict's."""
    noop = r["noop"]
    out: dict[str, dict[str, float]] = {}
    for name, ours in r.items():
        if name == "noop":
            continue
        out[name] = {
            "p50_at_1": ours[1].pct(50) / noop[1].pct(50),
            "p99_at_8": ours[8].pct(99) / noop[8].pct(99),
            "rps_at_32": ours[32].rps / noop[32].rps,
            "noop_tail": noop[8].pct(99) / noop[1].pct(50),
        }
        if name != "predict":
            main = r["predict"]
            out[name] |= {"vs_predict_p50_at_1": ours[1].pct(50) / main[1].pct(50),
                          "vs_predict_p99_at_8": ours[8].pct(99) / main[8].pct(99),
                          "vs_predict_rps_at_32": ours[32].rps / main[32].rps}
    return out


def _report(ratios: dict, medians: dict, errors: dict, idle: dict, breakdown: dict, rounds: int,
            requests: int) -> Report:
    """The rows of docs/performance.md: issue #21's ratios, errors, idle CPU, the steps."""
    report = Report("bench_serve.py")
    how = (f"serve run of serve_config.yaml with a no-op FastAPI ingress beside it; median of {rounds} "
           f"rounds alternating the no-op and /predict ({requests} requests at 8 and 32 clients, "
           f"{max(100, requests // 3)} at 1), [range of the rounds]")
    noop, ours = medians["noop"], medians["predict"]
    figures = {"p50_at_1": f"{ours['p50_ms_at_1']:.1f} vs {noop['p50_ms_at_1']:.1f} ms",
               "p99_at_8": f"{ours['p99_ms_at_8']:.0f} vs {noop['p99_ms_at_8']:.0f} ms",
               "rps_at_32": f"{ours['rps_at_32']:.1f} vs {noop['rps_at_32']:.1f} req/s",
               "noop_tail": f"{noop['p99_ms_at_8']:.0f} vs {noop['p50_ms_at_1']:.1f} ms"}
    for key, (what, op, bound) in TARGETS.items():
        q = ratios["predict"][key]
        report.add(what, f"{q['median']:.2f}x [{q['min']:.2f}-{q['max']:.2f}] ({figures[key]})",
                   f"{op} {bound}x", q["met"], how)
    total = sum(errors.values())
    report.add("errors over every round", ", ".join(f"{_title(n)} {e}" for n, e in errors.items()),
               "0", total == 0, how)
    report.add("idle CPU of the whole running system", f"{idle['total_pct_of_one_core']:.1f}% of one core",
               f"< {IDLE_TARGET_PCT:.0f}%", idle["total_pct_of_one_core"] < IDLE_TARGET_PCT,
               f"no traffic for {idle['seconds']:.0f}s: every Ray process, PostgreSQL, the broker "
               f"({idle['processes']} processes, psutil)")
    report.add("CPU of the whole system a request at 32 clients",
               f"/predict {medians['predict']['cpu_ms_per_request_at_32']:.1f} ms, no-op "
               f"{medians['noop']['cpu_ms_per_request_at_32']:.1f} ms",
               how="every process of the system (psutil) over each 32-client measure, divided by its "
                   "requests (the load generator excluded); median of the rounds")
    steps = breakdown["predict"]
    if steps.get("batches"):
        report.add("/predict batch, time per step (p50/p99 ms)",
                   ", ".join(f"{key[:-3]} {steps[key]['p50']:.1f}/{steps[key]['p99']:.0f}"
                             for key in ("lookup_ms", "features_ms", "model_ms", "shap_ms", "chain_ms",
                                         "audit_ms") if key in steps)
                   + f"; mean batch {steps['mean_batch_size']:.1f}",
                   how="GET /stats/latency after the rounds: the ingress's last batches (chain = the "
                       "three steps and their hops)")
    for name, q in ratios.items():
        if name != "predict":
            report.add(f"variant {name} against /predict",
                       f"p50 at 1: {q['vs_predict_p50_at_1']['median']:.2f}x, p99 at 8: "
                       f"{q['vs_predict_p99_at_8']['median']:.2f}x, req/s at 32: "
                       f"{q['vs_predict_rps_at_32']['median']:.2f}x", how=how)
    return report


def _met(key: str, value: float) -> bool:
    _, op, bound = TARGETS[key]
    return value <= bound if op == "<=" else value >= bound


def _stop_leftovers(session: int) -> None:
    """Stops what the run's session left running: Serve's HAProxy (RAY_SERVE_ENABLE_HA_PROXY)
    outlives `serve run`, holding its fixed ports (8404, 9101) against the next run."""
    for p in psutil.process_iter():
        try:
            if os.getsid(p.pid) == session:
                p.terminate()
        except (psutil.Error, OSError):
            continue


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
    parser.add_argument("--idle-only", action="store_true",
                        help="measure the idle CPU only (to compare settings that need a run each)")
    parser.add_argument("--config", type=Path, default=ROOT / "serve_config.yaml")
    parser.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                        help="an environment variable for `serve run` and every Ray process")
    parser.add_argument("--variant", action="append", default=[], metavar="NAME=JSON",
                        help="also deploy a copy of the scoring application at /v-NAME, with this "
                             "JSON's args, runtime_env and deployments merged in, and measure it in "
                             'the same rounds, e.g. actors=\'{"args": {"online_state": "actors"}}\'')
    add_json_option(parser, __file__)
    args = parser.parse_args(argv)
    variants = {}
    for spec in args.variant:
        name, _, change = spec.partition("=")
        if not name.isidentifier():
            parser.error(f"--variant {spec!r}: NAME must be a word")
        try:
            variants[name] = json.loads(change)
        except json.JSONDecodeError as exc:
            parser.error(f"--variant {name}: not JSON ({exc})")
    if args.rounds < 3 and not args.idle_only:
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
    _bench_config(args.config, port, config_path, variants)
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
    try:
        started = time.monotonic()
        _wait(f"{base}/health", proc, log_path)
        _wait(f"{base}/ui/", proc, log_path)
        urls = {"noop": f"{base}/noop/predict", "predict": f"{base}/predict"}
        prefixes = {"predict": base} | {name: f"{base}/v-{name}" for name in variants}
        for name, prefix in prefixes.items():
            _wait(f"{prefix}/health", proc, log_path)
            urls[name] = f"{prefix}/predict"
        bodies = Bodies()
        for url in urls.values():  # first requests pay for lazy set-up: not part of idle or rounds
            run_load(url, bodies, 4, 100, headers=headers)
        print(f"system up in {time.monotonic() - started:.0f}s; settling, then {args.idle_seconds}s idle",
              flush=True)
        time.sleep(10)
        idle = measure_idle(proc.pid, server_pids, args.idle_seconds, variants)
        print(f"idle CPU of the whole system: {idle['total_pct_of_one_core']:.1f}% of one core over "
              f"{idle['seconds']:.0f}s ({idle['processes']} processes; target < {IDLE_TARGET_PCT:.0f}%"
              f"{'; variants included' if variants else ''})")
        if idle["benchmark_apps_pct_of_one_core"]:
            print(f"  (and {idle['benchmark_apps_pct_of_one_core']:.1f}% in the benchmark's no-op and variants)")
        if idle["pidstat_all_processes"]:
            print(f"  pidstat, all {idle['pidstat_all_processes'].get('processes')} processes: "
                  f"{idle['pidstat_all_processes'].get('total_pct_of_one_core', float('nan')):.1f}%")
        for label, pct in list(idle["by_process_pct_of_one_core"].items())[:12]:
            print(f"  {pct:6.2f}%  {label}")
        if args.idle_only:
            if args.json:
                args.json.write_text(json.dumps({"idle_cpu": idle, "env": extra_env}, indent=2) + "\n")
            return 0

        rounds = []
        for k in range(args.rounds):
            print(f"\nround {k + 1}", flush=True)
            r, cpu = _round(urls, bodies, args.requests, k, headers,
                            lambda: _snapshot(proc.pid, server_pids))
            rounds.append({"results": {name: {c: res.summary() | {"cpu_ms_per_request": cpu[name][c]}
                                              for c, res in per.items()}
                                       for name, per in r.items()},
                           "ratios": _ratios(r), "loadavg": os.getloadavg()})
            for name, q in rounds[-1]["ratios"].items():
                print(f"  ratios {name}: " + "   ".join(f"{key} {v:.2f}" for key, v in q.items()))

        breakdown = {name: httpx.get(f"{prefix}/stats/latency", headers=headers, timeout=30).json()
                     for name, prefix in prefixes.items()}
        loadavg_end = os.getloadavg()
        medians = {name: {f"{metric}_at_{c}": statistics.median(r["results"][name][c][metric] for r in rounds)
                          for c in CONCURRENCY for metric in ("rps", "p50_ms", "p99_ms")}
                   for name in urls}
        cpu32 = {}  # CPU a request at 32 clients: the median of the rounds, in total and per process
        for name in urls:
            per_round = [r["results"][name][32]["cpu_ms_per_request"] for r in rounds]
            labels = {k for d in per_round for k in d}
            by_label = {k: statistics.median(d.get(k, 0.0) for d in per_round) for k in labels}
            cpu32[name] = {"total": statistics.median(sum(d.values()) for d in per_round),
                           "by_process": dict(sorted(by_label.items(), key=lambda kv: -kv[1]))}
            medians[name]["cpu_ms_per_request_at_32"] = cpu32[name]["total"]
        ratios: dict[str, dict[str, dict[str, Any]]] = {}
        for name in prefixes:
            for key in rounds[0]["ratios"][name]:
                values = [r["ratios"][name][key] for r in rounds]
                q = {"median": statistics.median(values), "min": min(values), "max": max(values)}
                if key in TARGETS:
                    q |= {"target": f"{TARGETS[key][1]} {TARGETS[key][2]}", "met": _met(key, q["median"])}
                ratios.setdefault(name, {})[key] = q
        errors = {name: sum(r["results"][name][c]["errors"] for r in rounds for c in CONCURRENCY)
                  for name in urls}

        names = list(urls)
        print(f"\nmedians of {len(rounds)} alternated rounds  " + "".join(f"{n:>14}" for n in names))
        for c in CONCURRENCY:
            for metric, unit in (("p50_ms", "ms"), ("p99_ms", "ms"), ("rps", "req/s")):
                key = f"{metric}_at_{c}"
                print(f"  c={c:<3} {metric[:3]:<5} {unit:<8}       " + "".join(f"{medians[n][key]:14.1f}" for n in names))
        for name in prefixes:
            print(f"\n{_title(name)}: ratios (median of the rounds, [range]) against issue #21's targets:")
            for key, q in ratios[name].items():
                what, op, bound = TARGETS.get(key, (key.replace("_", " "), "", ""))
                verdict = f"target {op} {bound}: {'met' if q['met'] else 'MISSED'}" if key in TARGETS else ""
                print(f"  {what:<58} {q['median']:5.2f}x [{q['min']:.2f}-{q['max']:.2f}]  {verdict}")
        print("\nerrors: " + ", ".join(f"{_title(n)} {e}" for n, e in errors.items()) + "  (target 0)")
        print(f"idle CPU: {idle['total_pct_of_one_core']:.1f}% of one core "
              f"(target < {IDLE_TARGET_PCT:.0f}%)")
        print("\nCPU a request at 32 clients (ms, all processes; median of the rounds), the largest:")
        for name in urls:
            top = list(cpu32[name]["by_process"].items())[:6]
            print(f"  {_title(name):<24} {cpu32[name]['total']:6.1f}: "
                  + ", ".join(f"{k} {v:.1f}" for k, v in top))
        for name, steps in breakdown.items():
            print(f"\nper-step time of {_title(name)} batches (ms, the ingress's last "
                  f"{steps.get('batches', 0)} batches):")
            for key in ("lookup_ms", "features_ms", "model_ms", "shap_ms", "chain_ms", "audit_ms"):
                if key in steps:
                    print(f"  {key:<12} p50 {steps[key]['p50']:7.2f}   p99 {steps[key]['p99']:7.2f}")
            if "mean_batch_size" in steps:
                print(f"  mean batch size {steps['mean_batch_size']:.1f}")
        print(f"\nload average: start {loadavg_start[0]:.2f}, end {loadavg_end[0]:.2f} "
              f"(1-minute; {os.cpu_count()} cores)")
        detail = {
            "benchmark": "bench_serve", "when": datetime.now(UTC).isoformat(timespec="seconds"),
            "revision": _git_revision(), "cores": os.cpu_count(), "config": str(args.config),
            "env": extra_env, "variants": variants, "requests": args.requests,
            "loadavg": {"start": loadavg_start, "end": loadavg_end,
                        "rounds": [r["loadavg"] for r in rounds]},
            "idle_cpu": idle, "idle_target_pct_of_one_core": IDLE_TARGET_PCT,
            "rounds": rounds, "medians": medians, "ratios": ratios, "errors": errors,
            "per_step_ms": breakdown, "cpu_ms_per_request_at_32": cpu32,
        }
        path = _report(ratios, medians, errors, idle, breakdown, len(rounds), args.requests).write(args.json)
        if path is not None:  # the rows for docs/performance.md, and everything measured beside them
            path.write_text(json.dumps(json.loads(path.read_text()) | {"detail": detail}, indent=2,
                                       default=str) + "\n")
            print(f"wrote {path}")
    finally:
        proc.send_signal(signal.SIGINT)  # serve run shuts Serve and its Ray instance down
        try:
            proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        _stop_leftovers(proc.pid)
        stop_servers(settings)
        remove(own_dir)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
