"""Training time, backfill throughput (with SHAP), and the whole backfill command on a CSV.

    python benchmarks/bench_jobs.py [--users 20000] [--days 27] [--num-cpus 2] [--rounds 3]

1. Simulates the history (20k users x ~30 days, about 1,000,000 rows), trains on
   it with the job's code (Ray read and features, then fit, evaluate, register),
   backfills it with `jobs.backfill.run` in the script's own Ray (an explicit CPU
   count; numba's cache compiled first and timed apart, as after a machine's
   first run), and compares the backfill's rows/s with a single-process pandas +
   scikit-learn + shap loop measured on a 10,000-row sample.
2. The backfill as a new user runs it: `python -m jobs.backfill --input
   history.csv --output ...` on one CSV file of about 490,000 rows (10k users x
   22 days), in a process of its own that starts its own Ray (``RAY_ADDRESS=local``),
   timed from its start to its exit, numba's cache warm. Round by round it
   alternates (order swapped each round) with the steady state: `run` on the same
   rows as Parquet in the script's running Ray. Both see the same minutes of a
   machine whose speed drifts; the ratio is taken within each round.

Uses its own temporary data directory (and embedded PostgreSQL there), stopped
and removed at the end (``--keep`` keeps it). Prints one JSON document and
writes the figures as JSON (``--json``, default benchmarks/results/bench_jobs.json).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# Run as a script or with -m from the repository root alike.
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from benchmarks._report import Report, add_json_option

BASELINE_ROWS = 10_000
TARGET_BACKFILL_ROWS_PER_S = 20_000
TARGET_COMMAND_ROWS_PER_S = 15_000
TARGET_TRAIN_SECONDS = 120
TARGET_ROC_AUC = 0.93
COMMAND_TIMEOUT_S = 1800


def baseline_rate(history, seed: int) -> dict:
    """pandas features + sklearn scores + shap.TreeExplainer on a sample, one process."""
    import numpy as np
    import shap
    from sklearn.ensemble import IsolationForest

    from features.definitions import FEATURE_NAMES
    from features.schema import validate_frame
    from features.transforms import compute_features

    sample = history.iloc[:BASELINE_ROWS]
    fit_rows = compute_features(validate_frame(sample)[0])[list(FEATURE_NAMES)].to_numpy()
    model = IsolationForest(n_estimators=100, max_samples=256, contamination=0.02, random_state=seed).fit(fit_rows)
    explainer = shap.TreeExplainer(model)
    began = time.perf_counter()
    valid, _ = validate_frame(sample)
    X = compute_features(valid)[list(FEATURE_NAMES)].to_numpy()
    scores = -model.score_samples(X)
    values = explainer.shap_values(X, check_additivity=False)
    seconds = time.perf_counter() - began
    assert np.isfinite(scores).all() and values.shape == X.shape
    return {"rows": len(sample), "seconds": round(seconds, 3), "rows_per_second": round(len(sample) / seconds, 1)}


def whole_command(history_csv: Path, output: Path, actors: int) -> dict:
    """`python -m jobs.backfill` in a process of its own, with a Ray of its own; wall
    seconds from its start to its exit."""
    env = dict(os.environ, RAY_ADDRESS="local")  # its own Ray, as on a machine where none runs
    load = os.getloadavg()[0]
    began = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "jobs.backfill", "--input", str(history_csv), "--output", str(output),
         "--actors", str(actors)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S, check=False)
    seconds = time.perf_counter() - began
    if proc.returncode != 0:
        raise RuntimeError(f"jobs.backfill exited {proc.returncode}: {proc.stderr[-3000:]}")
    summary = json.loads(proc.stdout)
    rows = summary["rows_scored"] + summary["rejects"]
    return {"rows": rows, "seconds": round(seconds, 2), "rows_per_second": round(rows / seconds, 1),
            "load_1m_before": round(load, 2)}


def steady_state(history_parquet: Path, output: Path, settings, actors: int) -> dict:
    """`jobs.backfill.run` in this process's running Ray (its workers already started)."""
    from jobs import backfill

    load = os.getloadavg()[0]
    began = time.perf_counter()
    summary = backfill.run(input_path=history_parquet, output=output, settings=settings, actors=actors)
    seconds = time.perf_counter() - began
    rows = summary["rows_scored"] + summary["rejects"]
    return {"rows": rows, "seconds": round(seconds, 2), "rows_per_second": round(rows / seconds, 1),
            "load_1m_before": round(load, 2)}


def _spread(values: list[float]) -> str:
    return f"median {statistics.median(values):,.0f} (rounds {min(values):,.0f}-{max(values):,.0f})"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--users", type=int, default=20_000, help="simulated users (default 20000)")
    p.add_argument("--days", type=int, default=27, help="simulated days (default 27: about 1M rows)")
    p.add_argument("--csv-users", type=int, default=10_000,
                   help="users of the whole-command CSV history (default 10000)")
    p.add_argument("--csv-days", type=int, default=22, help="days of the CSV history (default 22: about 490k rows)")
    p.add_argument("--rounds", type=int, default=3,
                   help="rounds alternating the whole command and the steady state (default 3)")
    p.add_argument("--seed", type=int, default=7, help="simulation and forest seed (default 7)")
    p.add_argument("--num-cpus", type=int, default=2, help="logical CPUs of the in-process Ray (default 2)")
    p.add_argument("--actors", type=int, default=2, help="backfill scoring actors (default 2)")
    p.add_argument("--keep", action="store_true",
                   help="keep the temporary folder (history, scores, data directory); removed by default")
    add_json_option(p, __file__)
    args = p.parse_args(argv)

    tmp = Path(tempfile.mkdtemp(prefix="bench-jobs-"))
    os.environ["FRAUD_DATA_DIR"] = str(tmp / "data")
    os.environ.setdefault("NUMBA_CACHE_DIR", str(tmp / "data" / "cache" / "numba"))
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.pop("DATABASE_URL", None)
    os.environ.pop("KAFKA_BOOTSTRAP_SERVERS", None)

    import ray

    from cluster.dev import stop_servers
    from configs.settings import get_settings
    from jobs import _common, backfill, train
    from jobs.simulate import simulate, write

    _common.configure_logging("WARNING")
    settings = get_settings()
    report: dict = {"machine_cpus": os.cpu_count(), "ray_num_cpus": args.num_cpus,
                    "load_average_at_start": os.getloadavg()}
    figures = Report("bench_jobs.py")
    began = time.perf_counter()
    history = simulate(users=args.users, days=args.days, seed=args.seed)
    path = tmp / "history.parquet"
    write(history, path)
    report["rows"] = len(history)
    report["simulate_seconds"] = round(time.perf_counter() - began, 2)
    print(f"simulated {len(history)} rows", file=sys.stderr)
    csv_history = simulate(users=args.csv_users, days=args.csv_days, seed=args.seed + 1)
    csv_path, csv_parquet = tmp / "history-csv" / "history.csv", tmp / "history-csv" / "history.parquet"
    csv_path.parent.mkdir()
    write(csv_history, csv_path)
    write(csv_history, csv_parquet)

    report["baseline_single_process"] = baseline_rate(history, args.seed)
    print(f"baseline: {report['baseline_single_process']}", file=sys.stderr)

    ray.init(num_cpus=args.num_cpus, include_dashboard=False,
             runtime_env={"env_vars": {"FRAUD_DATA_DIR": os.environ["FRAUD_DATA_DIR"],
                                       "NUMBA_CACHE_DIR": os.environ["NUMBA_CACHE_DIR"]}})
    try:
        began = time.perf_counter()
        data = train.load_training_data(path)
        read_seconds = time.perf_counter() - began
        result = train.train_and_register(data, settings=settings, seed=args.seed, activate=True,
                                          source=str(path))
        m = result["metrics"]
        report["train"] = {
            "seconds_total": round(time.perf_counter() - began, 2),
            "seconds_read_validate_features": round(read_seconds, 2),
            "seconds_fit": m["fit_seconds"],
            "target_seconds": TARGET_TRAIN_SECONDS,
        }
        report["quality"] = {k: m.get(k) for k in (
            "roc_auc", "average_precision", "precision_at_100", "precision_at_n_frauds",
            "alert_rate", "threshold", "frauds", "per_scenario_roc_auc")}
        report["quality"]["target_roc_auc"] = TARGET_ROC_AUC
        weak = {k: v for k, v in (m.get("per_scenario_roc_auc") or {}).items()
                if v is not None and v < TARGET_ROC_AUC}
        report["quality"]["scenarios_below_target"] = weak
        print(f"train: {report['train']}", file=sys.stderr)

        # numba compiles the kernels once per machine into its cache (the data
        # directory); time that apart, so that the backfill is timed as every run
        # after the first one on a machine finds it.
        began = time.perf_counter()
        backfill.resolve_model(settings, "active")[1].warmup()
        report["numba_compile_seconds_once_per_machine"] = round(time.perf_counter() - began, 2)
        summary = backfill.run(input_path=path, output=tmp / "scores.parquet", settings=settings,
                               actors=args.actors)
        report["backfill"] = {
            "rows": summary["rows_scored"], "seconds": summary["scoring_seconds"],
            "rows_per_second": summary["rows_per_second"], "anomalies": summary["anomalies"],
            "target_rows_per_second": TARGET_BACKFILL_ROWS_PER_S,
        }
        report["speedup_vs_single_process"] = round(
            summary["rows_per_second"] / report["baseline_single_process"]["rows_per_second"], 1)
        print(f"backfill: {report['backfill']}", file=sys.stderr)

        # The whole command against the steady state, alternated round by round.
        command: list[dict] = []
        steady: list[dict] = []
        for r in range(args.rounds):
            legs = [("steady", steady), ("command", command)]
            for leg, out in legs if r % 2 == 0 else legs[::-1]:
                if leg == "steady":
                    out.append(steady_state(csv_parquet, tmp / "scores-steady.parquet", settings, args.actors))
                else:
                    out.append(whole_command(csv_path, tmp / "scores-command.parquet", args.actors))
                print(f"round {r + 1} {leg}: {out[-1]}", file=sys.stderr)
        command_rates = [c["rows_per_second"] for c in command]
        steady_rates = [s["rows_per_second"] for s in steady]
        ratios = [c / s for c, s in zip(command_rates, steady_rates, strict=True)]
        report["whole_command_csv"] = {
            "rows": command[0]["rows"], "rounds": command, "steady_state_parquet_rounds": steady,
            "rows_per_second_median": statistics.median(command_rates),
            "steady_state_rows_per_second_median": statistics.median(steady_rates),
            "ratio_median": round(statistics.median(ratios), 3),
            "target_rows_per_second": TARGET_COMMAND_ROWS_PER_S,
        }
    finally:
        ray.shutdown()
        stop_servers(settings)
        if args.keep:
            print(f"kept {tmp}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    report["load_average_at_end"] = os.getloadavg()

    train_s, auc = report["train"]["seconds_total"], report["quality"]["roc_auc"]
    figures.add(f"training, {len(history):,} rows (read, validate, features, fit, evaluate, register)",
                f"{train_s:,.0f} s (fit {report['train']['seconds_fit']:,.0f} s)", f"<= {TARGET_TRAIN_SECONDS} s",
                train_s <= TARGET_TRAIN_SECONDS, f"`jobs.train` code in a running Ray of {args.num_cpus} CPUs")
    figures.add("model quality on the simulated labels", f"ROC AUC {auc:.3f}", f">= {TARGET_ROC_AUC}",
                auc is not None and auc >= TARGET_ROC_AUC,
                f"weak scenarios: {', '.join(weak) or 'none'}")
    bf = report["backfill"]
    figures.add(f"backfill with SHAP, {bf['rows']:,} rows of Parquet, in a running Ray",
                f"{bf['rows_per_second']:,.0f} rows/s, {report['speedup_vs_single_process']}x a single "
                "pandas + sklearn + shap process", f">= {TARGET_BACKFILL_ROWS_PER_S:,} rows/s",
                bf["rows_per_second"] >= TARGET_BACKFILL_ROWS_PER_S,
                f"`jobs.backfill.run`, {args.actors} actors, {args.num_cpus} CPUs, numba cache warm")
    wc = report["whole_command_csv"]
    loads = [c["load_1m_before"] for c in command] + [s["load_1m_before"] for s in steady]
    figures.add(f"whole backfill command on one CSV file, {wc['rows']:,} rows",
                f"{_spread(command_rates)} rows/s; steady state on the same rows as Parquet "
                f"{_spread(steady_rates)} rows/s; ratio {wc['ratio_median']:.2f} "
                f"(rounds {min(ratios):.2f}-{max(ratios):.2f})",
                f">= {TARGET_COMMAND_ROWS_PER_S:,} rows/s", wc["rows_per_second_median"] >= TARGET_COMMAND_ROWS_PER_S,
                f"`python -m jobs.backfill --input history.csv` starting its own Ray, start to exit, numba cache "
                f"warm; {args.rounds} rounds alternated with `run` in a running Ray; load {min(loads):.1f}-"
                f"{max(loads):.1f}")
    figures.write(args.json)
    print(json.dumps(report, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
