"""Feature throughput and latency, measured in one run on this machine.

- offline: rows/s of the Ray Data pipeline (`compute_features_dataset` on the
  materialised Parquet read, then also counting the read) and of the
  in-process pandas/numba transform (`compute_features`) on the same N
  transactions of U users from `jobs.simulate`, each after a warm-up,
  alternated ``--repeat`` times; the median of each and their ratio;
- online: p50/p99 of one state read + update (one event per call, sequential)
  through the deployed state actors, after a warm-up; alternated call by call
  with the floor of that design on this machine: the same two parallel calls
  (a user shard, a merchant shard) to no-op actors with the same options.

Writes its figures as JSON too (`benchmarks/_report.py`).

    python benchmarks/bench_features.py [--rows 1000000] [--users 20000] [--repeat 3] [--calls 3000]
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks._report import Report, add_json_option

TARGET_ROWS_S = 50_000
TARGET_P99_MS = 2.0


def history(rows: int, users: int, seed: int = 0) -> pd.DataFrame:
    """The first ``rows`` transactions (in time) that `jobs.simulate` draws for ``users`` users."""
    from features.transforms import INPUT_COLUMNS
    from jobs.simulate import simulate

    days = max(1, math.ceil(rows / (2 * users)))  # about 2.2 transactions per user and day
    while len(df := simulate(users=users, days=days, seed=seed)) < rows:
        days *= 2
    return df.head(rows)[list(INPUT_COLUMNS)].reset_index(drop=True)


class NoopShard:
    """A state shard that does nothing: the cost of the call itself."""

    def compute(self, batch: dict, record: bool) -> np.ndarray:
        return np.zeros((len(batch["ts"]), 9), dtype=np.int64)


def _rates(label: str, rates: list[float]) -> str:
    return f"{label}: median {statistics.median(rates):,.0f} rows/s (runs: {', '.join(f'{r:,.0f}' for r in rates)})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--users", type=int, default=20_000)
    parser.add_argument("--buckets", type=int, default=None, help="default: the pipeline's DEFAULT_BUCKETS")
    parser.add_argument("--cpus", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--calls", type=int, default=3_000)
    add_json_option(parser, __file__)
    args = parser.parse_args(argv)

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray

    from configs.settings import load_settings
    from features.online import EmptyHistoryLoader, OnlineFeatureStore
    from features.pipeline import DEFAULT_BUCKETS, compute_features_dataset, read_history
    from features.schema import Transaction
    from features.transforms import compute_features

    buckets = args.buckets or DEFAULT_BUCKETS
    df = history(args.rows, args.users)
    compute_features(df.head(1_000))  # compile / load the numba kernels

    ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    pandas_rates, ray_rates, read_rates = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        warm, path = Path(tmp) / "warm.parquet", Path(tmp) / "history.parquet"
        df.head(20_000).to_parquet(warm)
        df.to_parquet(path)
        compute_features_dataset(read_history(warm), buckets=buckets).materialize()
        for _ in range(args.repeat):
            t = time.perf_counter()
            compute_features(df)
            pandas_rates.append(len(df) / (time.perf_counter() - t))
            t = time.perf_counter()
            ds = read_history(path).materialize()
            read = time.perf_counter() - t
            t = time.perf_counter()
            out = compute_features_dataset(ds, buckets=buckets).materialize()
            features = time.perf_counter() - t
            assert out.count() == len(df)
            ray_rates.append(len(df) / features)
            read_rates.append(len(df) / (read + features))
            del ds, out
    pandas_rate, ray_rate = statistics.median(pandas_rates), statistics.median(ray_rates)
    report = Report("bench_features.py")
    report.add(f"offline features, {len(df):,} rows, Ray Data pipeline vs pandas",
               f"{ray_rate:,.0f} rows/s (pandas in one process {pandas_rate:,.0f}, {ray_rate / pandas_rate:.2f}x); "
               f"{statistics.median(read_rates):,.0f} rows/s counting the Parquet read",
               f">= {TARGET_ROWS_S:,} rows/s", ray_rate >= TARGET_ROWS_S,
               f"{df['user_id'].nunique():,} users (jobs.simulate), {args.cpus} CPUs, {buckets} buckets; "
               f"median of {args.repeat} runs, the two alternated")
    print(f"offline, {len(df):,} transactions of {df['user_id'].nunique():,} users (jobs.simulate), "
          f"{args.repeat} alternated runs:")
    print("  " + _rates("pandas transform (1 process)", pandas_rates))
    print("  " + _rates(f"Ray Data pipeline ({args.cpus} CPUs, {buckets} buckets)", ray_rates)
          + "; target >= 50,000")
    print("  " + _rates("Ray Data pipeline with its Parquet read (read_history)", read_rates))
    print(f"  ratio Ray Data pipeline / pandas: {ray_rate / pandas_rate:.2f}")

    settings = load_settings()
    store = OnlineFeatureStore.connect(settings, namespace=f"bench-{uuid.uuid4().hex[:8]}", prefix="bench",
                                       loader=EmptyHistoryLoader())
    try:
        store.wait_ready(120)
        events = [Transaction.model_validate({**r, "timestamp": r["timestamp"].to_pydatetime()})
                  for r in df.head(args.calls * 2).to_dict("records")]
        for e in events[:args.calls]:  # warm-up, and some history per user
            store.compute([e], record=True)
        noop = [ray.remote(NoopShard).options(num_cpus=0, max_concurrency=8).remote() for _ in range(2)]
        payload = {"ts": [0], "tid": ["t"], "user": ["u"], "cents": [100], "merchant": ["m"], "country": ["FR"]}
        ray.get([a.compute.remote(payload, True) for a in noop])
        lat, floor = [], []
        for e in events[args.calls:]:
            t = time.perf_counter()
            store.compute([e], record=True)
            lat.append(time.perf_counter() - t)
            t = time.perf_counter()
            ray.get([a.compute.remote(payload, True) for a in noop])
            floor.append(time.perf_counter() - t)
        for label, values in (("online read+update", lat), ("floor: two no-op actor calls", floor)):
            ms = np.array(values) * 1e3
            print(f"{label}, 1 event/call, {len(ms)} calls: p50 {np.percentile(ms, 50):.2f} ms, "
                  f"p99 {np.percentile(ms, 99):.2f} ms, max {ms.max():.2f} ms")
        print(f"  ratio p99 state / floor: {np.percentile(lat, 99) / np.percentile(floor, 99):.2f}; "
              "target p99 < 2 ms")
        (p50, p99), (f50, f99) = (np.percentile(np.array(v) * 1e3, [50, 99]) for v in (lat, floor))
        report.add("online state read + update, through the state actors",
                   f"p50 {p50:.2f} ms, p99 {p99:.2f} ms; floor (two no-op actor calls) p50 {f50:.2f} ms, "
                   f"p99 {f99:.2f} ms", f"p99 < {TARGET_P99_MS:g} ms", bool(p99 < TARGET_P99_MS),
                   f"{len(lat):,} sequential calls of 1 event after {args.calls:,} warm-up calls, "
                   "alternated call by call with the floor")
    finally:
        store.kill()
        ray.shutdown()
    report.write(args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
