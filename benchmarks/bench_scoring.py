"""Compiled forest vs scikit-learn vs shap, measured in one run on one model.

Model: IsolationForest(n_estimators=100, max_samples=256) on 20,000 random rows
of 10 features (the project's feature count). Prints median wall and CPU
(process) times and ratios: single-row score, single-row SHAP, single-row
score + SHAP (`scoring.explain.score_and_explain`, what serving and the jobs
call; its ratio is against sklearn's single-row score, the issue's yardstick),
10,000-row batch score and SHAP, and SHAP of a 500-row ingestion batch. A
single row runs on the calling thread (numba's threads only serve batches of
64 rows and more), so its CPU and wall times agree. This machine's speed drifts
2x over seconds, so every measure is taken in turn, round by round, and the
single-row yardstick once more with the two sides alternated and a new row each
call (the ratio taken within each round).

    python benchmarks/bench_scoring.py [--repeats 7]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

# Run as a script or with -m from the repository root alike.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks._report import Report, add_json_option  # noqa: E402

MID_BATCH = 500  # a mid-sized batch, as one ingestion poll brings


def round_robin(fns: dict[str, tuple[Callable[[], object], int]], repeats: int) -> dict[str, tuple[float, float]]:
    """Median (wall, CPU) seconds per call of each fn, called `inner` times in a row;
    every repeat runs each fn once in turn, so that all see the same minutes of a
    machine whose speed drifts (2x over seconds here) and their ratios hold."""
    wall: dict[str, list[float]] = {k: [] for k in fns}
    cpu: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for key, (fn, inner) in fns.items():
            start, start_cpu = time.perf_counter(), time.process_time()
            for _ in range(inner):
                fn()
            wall[key].append((time.perf_counter() - start) / inner)
            cpu[key].append((time.process_time() - start_cpu) / inner)
    return {k: (statistics.median(wall[k]), statistics.median(cpu[k])) for k in fns}


def alternated(a: Callable[[int], object], b: Callable[[int], object], rounds: int,
               inner_a: int, inner_b: int) -> tuple[list[float], list[float]]:
    """Wall seconds per call of a and b, alternated round by round; fn(i) gets the call's index."""
    ta, tb = [], []
    for _ in range(rounds):
        for fn, inner, out in ((a, inner_a, ta), (b, inner_b, tb)):
            start = time.perf_counter()
            for i in range(inner):
                fn(i)
            out.append((time.perf_counter() - start) / inner)
    return ta, tb


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--batch", type=int, default=10_000)
    parser.add_argument("--threads", type=int, default=0,
                        help="numba threads (0: numba's default)")
    add_json_option(parser, __file__)
    args = parser.parse_args(argv)

    from configs import get_settings

    get_settings()  # points NUMBA_CACHE_DIR under the data dir before numba loads

    import shap
    from sklearn.ensemble import IsolationForest

    import numba

    from scoring.forest import CompiledForest
    from scoring.explain import score_and_explain

    if args.threads:
        numba.set_num_threads(args.threads)

    rng = np.random.default_rng(0)
    X_train = rng.normal(size=(20_000, 10)).astype(np.float32).astype(np.float64)
    X = rng.normal(size=(args.batch, 10)).astype(np.float32).astype(np.float64)
    row = X[:1]
    model = IsolationForest(n_estimators=100, max_samples=256, random_state=0).fit(X_train)
    forest = CompiledForest.from_sklearn(model, feature_set_version="bench")
    forest.warmup()
    explainer = shap.TreeExplainer(model)

    # exactness first: the same numbers, or the timings mean nothing
    assert np.allclose(forest.score_samples(X), model.score_samples(X), atol=1e-9, rtol=0)
    assert np.allclose(forest.shap_values(X[:200]), explainer.shap_values(X[:200]), atol=1e-6, rtol=0)

    r = args.repeats
    rows = [X[i:i + 1] for i in range(len(X))]
    sk_alt, cf_alt = alternated(lambda i: model.decision_function(rows[i]),
                                lambda i: score_and_explain(forest, rows[i]), 3 * r, 10, 100)
    timed = round_robin({
        "sk_row": (lambda: model.decision_function(row), 20),
        "cf_row": (lambda: forest.decision_function(row), 200),
        "shap_row": (lambda: explainer.shap_values(row), 20),
        "cf_shap_row": (lambda: forest.shap_values(row), 50),
        # what serving and the jobs call: one input check, score, threshold, SHAP
        "cf_both_row": (lambda: score_and_explain(forest, row), 50),
        "sk_batch": (lambda: model.decision_function(X), 1),
        "cf_batch": (lambda: forest.decision_function(X), 1),
        "cf_shap_batch": (lambda: forest.shap_values(X), 1),
        "cf_shap_mid": (lambda: forest.shap_values(X[:MID_BATCH]), 5),
    }, r)
    # shap's batches take seconds to minutes: fewer repeats, after the rest
    timed |= round_robin({
        "shap_batch": (lambda: explainer.shap_values(X), 1),
        "shap_mid": (lambda: explainer.shap_values(X[:MID_BATCH]), 1),
    }, max(1, r // 3))
    n = len(X)
    ms, us = 1e3, 1e6
    lines = [
        f"model: 100 trees, max_samples=256, 10 features, {forest.feature.shape[0]} nodes; "
        f"batch {n} rows; median of {r} repeats; numba threads {numba.get_num_threads()}",
    ]
    for kind, col in (("wall", 0), ("CPU", 1)):
        t = {k: v[col] for k, v in timed.items()}
        lines += [
            "",
            f"{kind + ' time':<32}{'sklearn/shap':>16}{'compiled':>14}{'ratio':>10}",
            f"{'single-row score (ms)':<32}{t['sk_row'] * ms:>16.3f}{t['cf_row'] * ms:>14.4f}"
            f"{t['sk_row'] / t['cf_row']:>9.0f}x",
            f"{'single-row SHAP (ms)':<32}{t['shap_row'] * ms:>16.3f}{t['cf_shap_row'] * ms:>14.4f}"
            f"{t['shap_row'] / t['cf_shap_row']:>9.1f}x",
            # the yardstick: sklearn's single-row decision_function, same run
            f"{'single-row score + SHAP (ms)':<32}{t['sk_row'] * ms:>16.3f}{t['cf_both_row'] * ms:>14.4f}"
            f"{t['sk_row'] / t['cf_both_row']:>9.0f}x",
            f"{'batch score (us/row)':<32}{t['sk_batch'] / n * us:>16.3f}{t['cf_batch'] / n * us:>14.3f}"
            f"{t['sk_batch'] / t['cf_batch']:>9.1f}x",
            f"{'batch SHAP (us/row)':<32}{t['shap_batch'] / n * us:>16.2f}"
            f"{t['cf_shap_batch'] / n * us:>14.2f}{t['shap_batch'] / t['cf_shap_batch']:>9.1f}x",
            f"{f'{MID_BATCH}-row SHAP (us/row)':<32}{t['shap_mid'] / MID_BATCH * us:>16.2f}"
            f"{t['cf_shap_mid'] / MID_BATCH * us:>14.2f}{t['shap_mid'] / t['cf_shap_mid']:>9.1f}x",
        ]
    ratios = [s_ / c_ for s_, c_ in zip(sk_alt, cf_alt, strict=True)]
    lines += ["", f"single-row score + SHAP against sklearn's single-row score, alternated in {len(ratios)} "
              f"rounds (a new row each call): compiled median {statistics.median(cf_alt) * ms:.4f} ms "
              f"(fastest round {min(cf_alt) * ms:.4f}), sklearn median {statistics.median(sk_alt) * ms:.3f} ms; "
              f"ratio median {statistics.median(ratios):.0f}x (rounds {min(ratios):.0f}-{max(ratios):.0f}x)"]
    lines += ["", "targets: single-row score + SHAP <= 0.2 ms and >= 50x sklearn's single-row score; "
              "batch SHAP >= 10x shap; batch score >= 1x sklearn"]
    sys.stdout.write("\n".join(lines) + "\n")

    t = {k: v[0] for k, v in timed.items()}
    both_ms, both_x = statistics.median(cf_alt) * ms, statistics.median(ratios)
    report = Report("bench_scoring.py")
    report.add("single-row score + SHAP (`score_and_explain`) vs sklearn's single-row score",
               f"{both_ms:.3f} ms, {both_x:.0f}x (rounds {min(ratios):.0f}-{max(ratios):.0f}x)",
               "<= 0.2 ms and >= 50x", both_ms <= 0.2 and both_x >= 50,
               f"alternated {len(ratios)} rounds, a new row each call")
    report.add("single-row score vs sklearn `decision_function`",
               f"{t['cf_row'] * ms:.4f} ms vs {t['sk_row'] * ms:.2f} ms, {t['sk_row'] / t['cf_row']:.0f}x",
               how=f"median of {r} round-robin repeats")
    report.add(f"batch SHAP per row vs `shap.TreeExplainer`, {n:,} rows",
               f"{t['cf_shap_batch'] / n * us:.1f} us vs {t['shap_batch'] / n * us:.0f} us, "
               f"{t['shap_batch'] / t['cf_shap_batch']:.0f}x", ">= 10x", t['shap_batch'] / t['cf_shap_batch'] >= 10,
               f"wall time, numba threads {numba.get_num_threads()}")
    report.add(f"{MID_BATCH}-row SHAP per row vs shap",
               f"{t['cf_shap_mid'] / MID_BATCH * us:.1f} us vs {t['shap_mid'] / MID_BATCH * us:.0f} us, "
               f"{t['shap_mid'] / t['cf_shap_mid']:.0f}x", how="an ingestion-sized batch")
    report.add(f"batch score per row vs sklearn, {n:,} rows",
               f"{t['cf_batch'] / n * us:.2f} us vs {t['sk_batch'] / n * us:.2f} us, "
               f"{t['sk_batch'] / t['cf_batch']:.1f}x", ">= 1x", t['sk_batch'] / t['cf_batch'] >= 1)
    report.write(args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
