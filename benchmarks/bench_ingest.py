"""End-to-end Kafka ingestion throughput, beside the prototype's one-at-a-time consumer.

    python benchmarks/bench_ingest.py [--count M] [--actors N] [--baseline-sample K] [--scorer app|fake]

Starts embedded PostgreSQL and the broker in a temporary data directory, Ray,
and the scoring application; produces M simulated transactions to a fresh
topic (4 partitions) as fast as possible and measures the time from the first
message produced to the last audit row committed (every transaction with its
SHAP explanation and audit row). Then a baseline consumer does what the
original prototype did for K messages of another topic: one message at a time,
features in a one-row pandas frame, sklearn `decision_function`/`predict`,
`shap.TreeExplainer`, one database commit and one offset commit per message.
Both rates and their ratio are printed, and the CPU time the benchmark's
processes used during the pipeline's run (psutil), by process: this one and
what it started (Ray, the actors, the deployments), PostgreSQL and the broker;
other processes on the machine are not counted. Everything started is stopped.

`--poll-sizes 500,2000`, `--actor-counts 2,4`, `--overlap-compare` (an
actor scoring its next batch while auditing the previous one, or one batch at
a time) and `--state-compare` (the online state in the feature step, or in the
state actors: a second scoring application) then run the pipeline again with
each poll size, each number of actors, each overlap setting and each state in turn (`--rounds` times,
`--compare-count` transactions a leg, a fresh topic each), so that they are
compared in one run: this machine's speed swings 2-3x between minutes, and runs
minutes apart do not compare.

Writes its figures as JSON too (`benchmarks/_report.py`).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from benchmarks._datadir import own_data_dir, remove
from benchmarks._report import Report, add_json_option

os.environ.setdefault("RAY_AUTH_MODE", "disabled")

TARGET_RATE = 5_000
TARGET_RATIO = 100
POLL_S = 0.05  # how often the end of a run is looked for


class FakeScorer:
    """Answers like the scoring application without computing anything (pickled by value)."""

    def __call__(self, transactions: list[dict]) -> list[dict]:
        return [{"transaction_id": t["transaction_id"], "risk_score": 0.1, "anomaly": False, "threshold": 0.5,
                 "model_version": "fake", "reasons": [],
                 "audit_row": {"transaction_id": t["transaction_id"], "payload_hash": "", "user_id": t["user_id"],
                               "amount": t["amount"], "merchant": t["merchant"], "country": t["country"],
                               "event_time": t["timestamp"], "features": {}, "feature_set_version": "fake",
                               "risk_score": 0.1, "threshold": 0.5, "anomaly": False, "explanation": {},
                               "model_version": "fake", "reasons": []}}
                for t in transactions]


def _last_audit_id(engine) -> int:
    from sqlalchemy import text

    with engine.connect() as conn:
        return conn.execute(text("SELECT coalesce(max(id), 0) FROM audit_decisions")).scalar_one()


def _audited(engine, topic: str, after_id: int) -> int:
    """Audit rows of `topic` with an id above `after_id` (rows of earlier legs left out).
    A count scans the rows: `_wait_audited` runs it only near the end."""
    from sqlalchemy import text

    with engine.connect() as conn:
        return conn.execute(text("SELECT count(*) FROM audit_decisions WHERE id > :a AND kafka_topic = :t"),
                            {"a": after_id, "t": topic}).scalar_one()


def _wait_audited(engine, topic: str, after_id: int, count: int, timeout_s: float = 600) -> tuple[int, float]:
    """(rows audited, time the last one was seen). Polled every 50 ms on the highest
    id (one index entry), counted only once that says all may be there: counted
    every 50 ms, as before, the scans were active in pg_stat_activity about as
    often as the audit inserts they waited for. Ids are not dense (a failed
    COPY uses some up), so the count decides."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if _last_audit_id(engine) - after_id >= count:
            done = _audited(engine, topic, after_id)
            if done >= count:
                return done, time.time()
        time.sleep(POLL_S)
    return _audited(engine, topic, after_id), time.time()


def _cpu_seconds(roots: list[int]) -> dict[int, tuple[str, float]]:
    """CPU seconds (user + system) so far of the benchmark's processes, by pid, with
    a label: this process and what it started (Ray, its actors and deployments),
    and the servers `roots` names (PostgreSQL with its backends, the broker). Other
    processes are left out: on a shared machine they are someone else's."""
    import psutil

    procs: dict[int, psutil.Process] = {}
    for pid in [os.getpid(), *roots]:
        try:
            root = psutil.Process(pid)
            procs |= {p.pid: p for p in [root, *root.children(recursive=True)]}
        except psutil.Error:
            continue
    out = {}
    for pid, proc in procs.items():
        try:
            with proc.oneshot():
                times, cmd = proc.cpu_times(), proc.cmdline() or [proc.name() or "?"]
        except psutil.Error:  # ended meanwhile
            continue
        label = cmd[0] if cmd[0].startswith("ray::") else Path(cmd[0]).name
        if label.startswith("ray::"):
            label = label.split(".")[0].replace("ray::ServeReplica:", "")  # drop the method running now
        elif pid == os.getpid():
            label = "this benchmark (producer)"
        elif label.startswith("postgres"):
            label = "postgres"
        out[pid] = (label, times.user + times.system)
    return out


def _cpu_used(before: dict, after: dict) -> dict[str, float]:
    """CPU seconds by label between two `_cpu_seconds` snapshots. A process started
    in between (a PostgreSQL backend for a new connection, say) counts whole."""
    used: dict[str, float] = {}
    for pid, (label, cpu) in after.items():
        used[label] = used.get(label, 0.0) + cpu - (before[pid][1] if pid in before else 0.0)
    return used


def _cpu_lines(used: dict[str, float], seconds: float, transactions: int) -> list[str]:
    """Where the CPU went (`_cpu_used`), largest first."""
    total = sum(used.values())
    lines = [f"CPU over the run: {total:.1f} s of the {seconds * os.cpu_count():.1f} s {os.cpu_count()} cores offer "
             f"in {seconds:.1f} s = {total / transactions * 1e3:.2f} ms per transaction"]
    lines += [f"  {cpu:6.1f} s  {label}" for label, cpu in sorted(used.items(), key=lambda kv: -kv[1]) if cpu >= 0.1]
    return lines


def _pipeline(settings, engine, bootstrap: str, app_name: str, count: int, actors: int, scorer,
              server_pids: list[int]) -> dict:
    from cluster.ingest import start_ingestion, stop_ingestion
    from cluster.producer import ensure_topics, produce, simulated_transactions

    topic = settings.kafka_topic
    ensure_topics(bootstrap, [topic, settings.kafka_dead_letter_topic, settings.kafka_alerts_topic])
    # strangers over 3 days, the workload the figures were always measured on
    messages = simulated_transactions(count, seed=int(time.time()) % 100_000, days=3)
    for m in messages:
        m["transaction_id"] = f"{topic}:{m['transaction_id']}"
    ingestion = start_ingestion(settings, app_name, actors, scorer=scorer)
    try:
        # Let the group settle before the clock starts (a first join takes a few seconds).
        time.sleep(8)
        after_id = _last_audit_id(engine)
        cpu_before, cpu_clock = _cpu_seconds(server_pids), time.time()
        report = produce(bootstrap, topic, messages)
        produced_s = time.time() - report.first_sent_at
        done, last = _wait_audited(engine, topic, after_id, count)
        elapsed = last - report.first_sent_at
        used = _cpu_used(cpu_before, _cpu_seconds(server_pids))
        cpu = _cpu_lines(used, time.time() - cpu_clock, max(done, 1))
        cpu_ms = sum(used.values()) / max(done, 1) * 1e3
        stats = ingestion.stats()
    finally:
        stop_ingestion(ingestion)
    return {"count": count, "audited": done, "seconds": elapsed, "rate": done / elapsed,
            "produce_rate": report.sent / report.seconds, "produce_s": produced_s, "actors": stats, "cpu": cpu,
            "cpu_ms": cpu_ms}


def _compare(base_settings, engine, bootstrap: str, app_name: str, legs: list[tuple],
             rounds: int, count: int, scorer, server_pids: list[int]) -> tuple[list[str], dict[str, list[dict]]]:
    """The pipeline once per leg (label, settings changed, actors[, the scoring
    application's name]) in turn, `rounds` times, each leg on a fresh topic and
    consumer group: the lines to print, and the runs by leg."""
    from configs.settings import load_settings

    runs: dict[str, list[dict]] = {leg[0]: [] for leg in legs}
    for r in range(rounds):
        for i, (label, changed, actors, *app) in enumerate(legs):
            name = f"{base_settings.kafka_topic}-l{i}-r{r}"
            settings = load_settings(kafka_topic=name, kafka_dead_letter_topic=f"{name}-dlq",
                                     kafka_alerts_topic=f"{name}-alerts", kafka_consumer_group=name,
                                     **changed)
            runs[label].append(_pipeline(settings, engine, bootstrap, app[0] if app else app_name, count, actors,
                                         scorer, server_pids))
    lines = [f"alternated, {rounds} rounds of {count:,} transactions a leg:"]
    for label, done in runs.items():
        lines.append(f"  {label:>16}: " + ", ".join(f"{x['rate']:,.0f} tx/s ({x['cpu_ms']:.2f} ms CPU/tx)"
                                                    for x in done))
    return lines, runs


def _baseline(settings, engine, bootstrap: str, sample: int) -> dict:
    """The prototype's consumer: everything per message."""
    import numpy as np
    import pandas as pd
    import shap
    from kafka import KafkaConsumer, OffsetAndMetadata
    from sklearn.ensemble import IsolationForest
    from sqlalchemy import text

    from cluster.producer import ensure_topics, produce, simulated_transactions
    from features.definitions import FEATURE_NAMES

    try:
        from features.definitions import compute_features
    except ImportError:
        from features.transforms import compute_features

    history = pd.read_csv(ROOT / "data" / "sample_transactions.csv")
    X = compute_features(history)[list(FEATURE_NAMES)].to_numpy()
    model = IsolationForest(n_estimators=100, max_samples=256, contamination=0.02, random_state=0).fit(X)
    explainer = shap.TreeExplainer(model)
    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE IF NOT EXISTS prototype_audit (transaction_id text PRIMARY KEY, body jsonb)"))

    topic = f"bench-baseline-{uuid.uuid4().hex[:8]}"
    ensure_topics(bootstrap, [topic])
    messages = simulated_transactions(sample, seed=7, days=3)
    for m in messages:
        m["transaction_id"] = f"{topic}:{m['transaction_id']}"
    produce(bootstrap, topic, messages)
    consumer = KafkaConsumer(topic, bootstrap_servers=bootstrap, group_id=topic, enable_auto_commit=False,
                             auto_offset_reset="earliest", session_timeout_ms=6000, heartbeat_interval_ms=1000,
                             max_poll_records=1)
    done, started = 0, None
    try:
        while done < sample:
            for tp, records in consumer.poll(timeout_ms=1000, max_records=1).items():
                for r in records:
                    started = started or time.perf_counter()
                    body = json.loads(r.value)
                    frame = pd.DataFrame([body])
                    frame["timestamp"] = pd.to_datetime(frame["timestamp"], utc=True)
                    x = compute_features(frame)[list(FEATURE_NAMES)].to_numpy()
                    score = float(model.decision_function(x)[0])
                    flag = bool(model.predict(x)[0] == -1)
                    values = np.asarray(explainer.shap_values(x))[0]
                    result = {"score": score, "anomaly": flag,
                              "explanation": dict(zip(FEATURE_NAMES, map(float, values), strict=True))}
                    with engine.begin() as conn:  # one database commit per message
                        conn.execute(text("INSERT INTO prototype_audit VALUES (:t, CAST(:b AS jsonb)) "
                                          "ON CONFLICT DO NOTHING"),
                                     {"t": body["transaction_id"], "b": json.dumps(result)})
                    consumer.commit({tp: OffsetAndMetadata(r.offset + 1, "", -1)})  # one offset commit each
                    done += 1
        seconds = time.perf_counter() - started
    finally:
        consumer.close(autocommit=False)
    return {"count": done, "seconds": seconds, "rate": done / seconds}


def _ints(text: str) -> list[int]:
    """A comma-separated list of positive integers (argparse names the option on error)."""
    values = [int(x) for x in text.split(",") if x.strip()]
    if any(v < 1 for v in values):
        raise ValueError(text)
    return values


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=30_000, help="transactions through the pipeline")
    parser.add_argument("--actors", type=int, default=2, help="ingestion actors")
    parser.add_argument("--baseline-sample", type=int, default=200, help="messages through the baseline")
    parser.add_argument("--poll-sizes", type=_ints, default=[],
                        help="comma-separated ingest_poll_max_records values to compare afterwards, e.g. 500,2000")
    parser.add_argument("--actor-counts", type=_ints, default=[],
                        help="comma-separated numbers of ingestion actors to compare afterwards, e.g. 2,4")
    parser.add_argument("--overlap-compare", action="store_true",
                        help="compare afterwards ingest_overlap on and off")
    parser.add_argument("--state-compare", action="store_true",
                        help="also deploy the scoring application with online_state: actors and alternate "
                             "the pipeline between it and the default (the state in the feature step)")
    parser.add_argument("--rounds", type=int, default=2, help="alternations of the compared legs")
    parser.add_argument("--compare-count", type=int, default=20_000, help="transactions a compared leg")
    parser.add_argument("--scorer", choices=["app", "fake"], default="app",
                        help="fake: a trivial in-actor scorer, to measure the ingestion overhead alone")
    add_json_option(parser, __file__)
    args = parser.parse_args(argv)
    own_dir = own_data_dir("bench-ingest-")  # before the settings are read

    import ray
    from ray import serve

    from cluster.dev import ensure_servers, status, stop_servers
    from cluster.store.db import engine_for
    from configs.settings import get_settings, load_settings
    from deployments.app import APP_NAME

    base = get_settings()
    urls = ensure_servers(base)
    server_pids = [rec["pid"] for rec in status(base)["servers"].values() if rec.get("pid")]
    engine = engine_for(urls["database_url"])
    bootstrap = urls["kafka_bootstrap_servers"]
    name = f"bench-ingest-{uuid.uuid4().hex[:8]}"
    settings = load_settings(kafka_topic=name, kafka_dead_letter_topic=f"{name}-dlq",
                             kafka_alerts_topic=f"{name}-alerts", kafka_consumer_group=name)
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"FRAUD_DATA_DIR": os.environ["FRAUD_DATA_DIR"]}})
    try:
        scorer = None
        if args.scorer == "app":
            from deployments.app import build_app

            serve.start(http_options={"host": "127.0.0.1", "port": 0},
                        logging_config={"enable_access_log": False, "log_level": "WARNING"})
            serve.run(build_app({}), name=APP_NAME, route_prefix="/")
            if args.state_compare:
                serve.run(build_app({"online_state": "actors"}), name=f"{APP_NAME}-actors",
                          route_prefix="/actors")
        else:
            scorer = FakeScorer()
        ours = _pipeline(settings, engine, bootstrap, APP_NAME, args.count, args.actors, scorer, server_pids)
        print(f"pipeline ({args.scorer} scorer, {args.actors} actors): {ours['audited']} / {ours['count']} "
              f"audited in {ours['seconds']:.2f}s = {ours['rate']:,.0f} transactions/s end to end "
              f"(producer alone {ours['produce_rate']:,.0f}/s)", flush=True)
        for st in ours["actors"]:
            print(f"  actor {st.get('index')}: batches {st.get('batches')}, scored {st.get('scored')}, "
                  f"seconds per stage {st.get('seconds')}")
        print("\n".join(ours["cpu"]))
        base_r = _baseline(settings, engine, bootstrap, args.baseline_sample)
        print(f"baseline (one message at a time): {base_r['count']} in {base_r['seconds']:.2f}s "
              f"= {base_r['rate']:,.1f} transactions/s")
        ratio = ours["rate"] / base_r["rate"]
        print(f"\nratio: {ratio:,.1f}x the baseline")
        print(f"targets: >= {TARGET_RATE:,} transactions/s end to end ({'met' if ours['rate'] >= TARGET_RATE else 'NOT met'}), "
              f">= {TARGET_RATIO}x the baseline ({'met' if ratio >= TARGET_RATIO else 'NOT met'})", flush=True)
        report = _report(args, ours, base_r)
        legs = [(f"poll {n}", {"ingest_poll_max_records": n}, args.actors) for n in args.poll_sizes]
        legs += [(f"{n} actors", {}, n) for n in args.actor_counts]
        if args.overlap_compare:
            legs += [(f"overlap {on}", {"ingest_overlap": on}, args.actors) for on in (True, False)]
        if args.state_compare:
            legs += [("state in_process", {}, args.actors, APP_NAME),
                     ("state actors", {}, args.actors, f"{APP_NAME}-actors")]
        if legs:
            lines, runs = _compare(settings, engine, bootstrap, APP_NAME, legs, args.rounds,
                                   args.compare_count, scorer, server_pids)
            print("\n".join(lines))
            report.add(f"{' vs '.join(runs)}, alternated",
                       "; ".join(f"{label} {statistics.median(x['rate'] for x in done):,.0f} tx/s "
                                 f"({statistics.median(x['cpu_ms'] for x in done):.2f} ms CPU/tx)"
                                 for label, done in runs.items()),
                       how=f"median of {args.rounds} rounds of {args.compare_count:,} transactions a leg, "
                           f"{args.scorer} scorer, a fresh topic each")
        report.write(args.json)
    finally:
        serve.shutdown()
        ray.shutdown()
        engine.dispose()
        stop_servers(base)
        remove(own_dir)
    return 0


def _report(args, ours: dict, baseline: dict) -> Report:
    """The figures of the main run; with the fake scorer they are the ingestion's
    overhead alone, to which the targets do not apply."""
    report = Report("bench_ingest.py")
    rate, ratio = ours["rate"], ours["rate"] / baseline["rate"]
    # a run that timed out says so, and meets no target
    short = "" if ours["audited"] >= ours["count"] else f" (only {ours['audited']:,} of {ours['count']:,} audited)"
    complete = not short
    how = (f"{ours['count']:,} transactions produced at once to 4 partitions, {args.actors} ingestion actors, "
           "first message produced to last audit row committed; CPU of its processes and the servers (psutil)")
    if args.scorer == "fake":
        report.add("Kafka end to end, a trivial in-actor scorer (the ingestion's overhead)",
                   f"{rate:,.0f} tx/s, {ours['cpu_ms']:.2f} ms of CPU a transaction{short}", how=how)
        return report
    report.add("Kafka end to end, scored and audited with SHAP",
               f"{rate:,.0f} tx/s, {ours['cpu_ms']:.2f} ms of CPU a transaction{short}",
               f">= {TARGET_RATE:,} tx/s", complete and rate >= TARGET_RATE, how)
    report.add("Kafka end to end vs the one-at-a-time consumer",
               f"{ratio:,.0f}x ({rate:,.0f} vs {baseline['rate']:,.1f} tx/s){short}",
               f">= {TARGET_RATIO}x", complete and ratio >= TARGET_RATIO,
               f"the prototype's consumer on {baseline['count']:,} messages in the same run "
               "(sklearn, shap, one commit each)")
    return report


if __name__ == "__main__":
    raise SystemExit(main())
