"""`python -m cluster.ingest`: ingestion actors on a running Ray cluster, until Ctrl-C."""

from __future__ import annotations

import argparse
import logging
import signal
import threading

from cluster.ingest.actors import SCORING_APP, start_ingestion, stop_ingestion

log = logging.getLogger("cluster.ingest")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m cluster.ingest",
        description="Run Kafka ingestion actors on the running Ray cluster until Ctrl-C.")
    parser.add_argument("--actors", type=int, default=None, help="consumer actors (default: settings.ingest_actors)")
    parser.add_argument("--app", default=SCORING_APP, help="scoring application name (default: %(default)s)")
    parser.add_argument("--stop-timeout", type=float, default=30.0,
                        help="seconds a stopping actor may spend finishing its batch")
    args = parser.parse_args(argv)
    from configs.settings import get_settings

    settings = get_settings()
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import ray

    app_name = args.app
    n = settings.ingest_actors if args.actors is None else args.actors
    ray.init(address="auto", log_to_driver=False)
    ingestion = start_ingestion(settings, app_name, n)
    log.info("%d ingestion actors consume %s as group %s; Ctrl-C stops them", n,
             settings.kafka_topic, settings.kafka_consumer_group)
    done = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: done.set())
    while not done.wait(10.0):
        totals = ingestion.stats()
        log.info("scored %d, skipped %d, dead letters %d",
                 *(sum(s.get(k, 0) for s in totals) for k in ("scored", "skipped", "dead_letters")))
    log.info("stopping: finishing and committing in-flight batches")
    for s in stop_ingestion(ingestion, args.stop_timeout):
        log.info("actor stopped: %s", s)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
