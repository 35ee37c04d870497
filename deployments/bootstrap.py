"""What `serve run` does before deploying, so that a fresh machine just works.

1. No DATABASE_URL / KAFKA_BOOTSTRAP_SERVERS: start the embedded servers as
   `python -m cluster.dev up` would (recorded, so `down` stops them), and migrate.
2. No model registered and none pinned: train a bootstrap model on the sample in
   `data/`, register and activate it, and say so in the log.
3. An empty online state: warm it with the sample shifted in time to end now,
   so that the first scores of a demo are not all "new user" (the feature step
   does it, once its state has rebuilt: `warm_state`).

Steps 2 and 3 put a toy model and synthetic history into the database, which
suits the embedded one of a demo and never a real deployment's. `bootstrap` and
`warm_state` are therefore "auto" by default (None): on with the embedded
PostgreSQL, off when DATABASE_URL names a database; true or false decide
outright. The decision and its reason are logged at every start.
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

WARM_COLUMNS = ("transaction_id", "user_id", "amount", "merchant", "country", "timestamp")


def prepare(settings: Settings, args) -> bool:
    """Steps 1 and 2; returns whether the feature step warms an empty state (step 3),
    which it does once its state has rebuilt (`warm_state`)."""
    ensure_servers(settings)
    bootstrap = demo_step_enabled("bootstrap", args.bootstrap, settings)
    warm_state = demo_step_enabled("warm_state", args.warm_state, settings)
    registry = ModelRegistry(get_engine(settings))
    if args.model_version is None and registry.active() is None:
        if bootstrap:
            _train_bootstrap_model(settings, args.sample_path)
        else:
            log.warning("no model is registered and bootstrap is off: /predict answers 503 until one "
                        "is activated (`python -m jobs.train --input ... --activate`)")
    return warm_state


def demo_step_enabled(name: str, requested: bool | None, settings: Settings) -> bool:
    """Decide a demo step (`bootstrap`, `warm_state`) and log the decision with its reason.

    `requested` is the AppArgs value: None means auto, on only with the
    embedded PostgreSQL, since the step writes sample data into the database.
    """
    enabled, reason = decide_demo_step(requested, external_database=settings.database_url is not None)
    log.log(logging.WARNING if enabled and settings.database_url else logging.INFO,
            "%s is %s: %s", name, "on" if enabled else "off", reason)
    return enabled


def decide_demo_step(requested: bool | None, *, external_database: bool) -> tuple[bool, str]:
    """Whether a step that writes sample data runs, and why (pure).

    >>> decide_demo_step(None, external_database=True)[0]
    False
    >>> decide_demo_step(None, external_database=False)[0]
    True
    >>> decide_demo_step(True, external_database=True)[0]
    True
    """
    if requested is None:
        if external_database:
            return False, ("auto, and DATABASE_URL is set (a real deployment): no sample data goes "
                           "into it; set it to true in serve_config.yaml to write it anyway")
        return True, "auto, with the embedded PostgreSQL (a demo): sample data goes into it"
    if requested and external_database:
        return True, "set to true: sample data goes into the database named by DATABASE_URL"
    return requested, f"set to {str(requested).lower()}"


def _train_bootstrap_model(settings: Settings, sample_path) -> None:
    from jobs.train import fit_and_register

    log.warning("no model is registered: training a bootstrap model on %s (train a real one with "
                "`python -m jobs.train --input ... --activate`)", sample_path)
    result = fit_and_register(pd.read_csv(sample_path), settings=settings, activate=True,
                              source=str(sample_path))
    log.warning("bootstrap model %s is active (metrics: %s)", result["version"], result["metrics"])


def warm_state(store, sample_path) -> None:
    """Records the sample, shifted to end a minute ago, into a ready `store` that holds
    no event (the ids are the sample's, prefixed: recording them twice counts once)."""
    if any(shard["events"] for shard in store.status()):
        return
    history = warm_history(pd.read_csv(sample_path), datetime.now(UTC))
    store.compute(history, record=True)
    log.info("warmed the online state with %d sample transactions", len(history))


def warm_history(sample: pd.DataFrame, now: datetime) -> pd.DataFrame:
    """The sample as the online state's history: its newest event a minute before `now`,
    ids prefixed with ``warm:`` so that they never clash with live ones (pure).

    `cluster.producer`'s simulated traffic is new purchases of the same customers,
    ending about now: the users it sends are known here, with their habits.

    >>> import pandas as pd
    >>> s = pd.DataFrame({"transaction_id": ["a"], "user_id": ["u"], "amount": [1.0], "merchant": ["m"],
    ...                   "country": ["FR"], "timestamp": ["2025-01-01T00:00:00Z"], "is_fraud": [0]})
    >>> h = warm_history(s, pd.Timestamp("2026-01-01T12:00:00Z"))
    >>> h["transaction_id"].tolist(), str(h["timestamp"].iloc[0]), list(h.columns) == list(WARM_COLUMNS)
    (['warm:a'], '2026-01-01 11:59:00+00:00', True)
    """
    history = sample[list(WARM_COLUMNS)].copy()
    ts = pd.to_datetime(history["timestamp"], utc=True)
    history["timestamp"] = ts + (pd.Timestamp(now) - pd.Timedelta(minutes=1) - ts.max())
    history["transaction_id"] = "warm:" + history["transaction_id"].astype(str)
    return history
