"""What `serve run` does before deploying, so that a fresh machine just works.

1. No DATABASE_URL / KAFKA_BOOTSTRAP_SERVERS: start the embedded servers as
   `python -m cluster.dev up` would (recorded, so `down` stops them), and migrate.
2. No model registered and none pinned: train a bootstrap model on the sample in
   `data/`, register and activate it, and say so in the log.
3. An empty online state: warm it with the sample shifted in time to end now,
   so that the first scores of a demo are not all "new user".
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime

import pandas as pd

from cluster.dev import ensure_servers
from cluster.registry import ModelRegistry
from cluster.store.db import get_engine
from configs.settings import Settings

log = logging.getLogger("ray.serve")


def prepare(settings: Settings, args) -> None:
    ensure_servers(settings)
    registry = ModelRegistry(get_engine(settings))
    if args.bootstrap and args.model_version is None and registry.active() is None:
        _train_bootstrap_model(settings, args.sample_path)
    if args.warm_state:
        _warm_state(settings, args.sample_path)


def _train_bootstrap_model(settings: Settings, sample_path) -> None:
    from jobs.train import fit_and_register

    log.warning("no model is registered: training a bootstrap model on %s (train a real one with "
                "`python -m jobs.train --input ... --activate`)", sample_path)
    result = fit_and_register(pd.read_csv(sample_path), settings=settings, activate=True,
                              source=str(sample_path))
    log.warning("bootstrap model %s is active (metrics: %s)", result["version"], result["metrics"])


def _warm_state(settings: Settings, sample_path) -> None:
    from features.online import OnlineFeatureStore

    store = OnlineFeatureStore.connect(settings)
    store.wait_ready(timeout=300)  # actors start slowly on a busy 2-core machine
    if any(shard["events"] for shard in store.status()):
        return
    sample = pd.read_csv(sample_path, usecols=["transaction_id", "user_id", "amount", "merchant",
                                               "country", "timestamp"])
    ts = pd.to_datetime(sample["timestamp"], utc=True)
    # Shift so the newest event is a minute ago; prefix ids so they never clash with live ones.
    sample["timestamp"] = ts + (pd.Timestamp(datetime.now(UTC)) - pd.Timedelta(minutes=1) - ts.max())
    sample["transaction_id"] = "warm:" + sample["transaction_id"].astype(str)
    store.compute(sample, record=True)
    log.info("warmed the online state with %d sample transactions", len(sample))
