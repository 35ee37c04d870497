"""Feature throughput and latency, measured in one run on this machine.

- offline: rows/s of the Ray Data pipeline (`compute_features_dataset`) on
  N transactions of U users read from Parquet, after a small warm-up run, next
  to the in-process pandas/numba transform (`compute_features`);
- online: p50/p99 of one state read + update (one event per call, sequential)
  through the deployed state actors, after a warm-up.

    python -m benchmarks.bench_features [--rows 1000000] [--users 20000] [--calls 3000]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np
import pandas as pd


def synthetic(rows: int, users: int, merchants: int = 2_000, days: int = 60, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    start = pd.Timestamp("2024-01-01", tz="UTC")
    sec = np.sort(rng.integers(0, days * 86_400, rows))
    return pd.DataFrame({
        "transaction_id": pd.array([f"b-{i:09d}" for i in rng.permutation(rows)], dtype="str"),
        "user_id": pd.array([f"u{i:06d}" for i in rng.integers(0, users, rows)], dtype="str"),
        "amount": np.round(rng.lognormal(3.5, 1.2, rows), 2) + 0.01,
        "merchant": pd.array([f"m{i:05d}" for i in np.minimum(rng.zipf(1.4, rows), merchants)], dtype="str"),
        "country": pd.array(np.array(["FR", "DE", "US", "GB", "ES"])[rng.integers(0, 5, rows)], dtype="str"),
        "timestamp": start + pd.to_timedelta(sec, unit="s"),
    })


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--users", type=int, default=20_000)
    parser.add_argument("--buckets", type=int, default=4)
    parser.add_argument("--cpus", type=int, default=2)
    parser.add_argument("--calls", type=int, default=3_000)
    args = parser.parse_args(argv)

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray

    from configs.settings import load_settings
    from features.online import EmptyHistoryLoader, OnlineFeatureStore
    from features.pipeline import compute_features_dataset, read_history
    from features.schema import Transaction
    from features.transforms import compute_features

    df = synthetic(args.rows, args.users)
    compute_features(df.head(1_000))  # compile / load the numba kernels
    t = time.perf_counter()
    compute_features(df)
    pandas_rate = len(df) / (time.perf_counter() - t)
    print(f"offline pandas transform (1 process): {pandas_rate:,.0f} rows/s on {len(df):,} rows")

    ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    with tempfile.TemporaryDirectory() as tmp:
        warm, path = Path(tmp) / "warm.parquet", Path(tmp) / "history.parquet"
        df.head(20_000).to_parquet(warm)
        df.to_parquet(path)
        compute_features_dataset(read_history(warm), buckets=args.buckets).materialize()
        t = time.perf_counter()
        out = compute_features_dataset(read_history(path), buckets=args.buckets).materialize()
        elapsed = time.perf_counter() - t
    assert out.count() == len(df)
    ray_rate = len(df) / elapsed
    print(f"offline Ray Data pipeline ({args.cpus} CPUs, {args.buckets} buckets): {ray_rate:,.0f} rows/s "
          f"({elapsed:.1f} s; target >= 50,000; ratio to pandas {ray_rate / pandas_rate:.2f})")

    settings = load_settings()
    store = OnlineFeatureStore.connect(settings, namespace=f"bench-{uuid.uuid4().hex[:8]}", prefix="bench",
                                       loader=EmptyHistoryLoader())
    try:
        store.wait_ready(120)
        events = [Transaction.model_validate({**r, "timestamp": r["timestamp"].to_pydatetime()})
                  for r in df.head(args.calls * 2).to_dict("records")]
        for e in events[:args.calls]:  # warm-up, and some history per user
            store.compute([e], record=True)
        lat = []
        for e in events[args.calls:]:
            t = time.perf_counter()
            store.compute([e], record=True)
            lat.append(time.perf_counter() - t)
        ms = np.array(lat) * 1e3
        print(f"online read+update, 1 event/call, {len(ms)} calls: p50 {np.percentile(ms, 50):.2f} ms, "
              f"p99 {np.percentile(ms, 99):.2f} ms, max {ms.max():.2f} ms (target p99 < 2 ms)")
    finally:
        store.kill()
        ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    raise SystemExit(main())
