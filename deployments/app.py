"""The one place where deployments are bound into applications.

`serve_config.yaml` points each application's `import_path` at a builder here;
its `args` fill the typed `*Args` models below. How many replicas each step
runs, on which nodes (`ray_actor_options`: `num_cpus`, custom `resources`) and
how it autoscales are Serve's own per-deployment options, set in the
application's `deployments:` list by deployment name (FeatureStep, ModelStep,
ShapStep, ScoringIngress): nothing here binds them, so the file has the last word.

    scoring     deployments.app:build_app         /        feature -> model -> SHAP behind the API
    ingestion   deployments.app:build_ingest_app  /ingestion  Kafka consumer actors
    ui          deployments.app:build_ui_app      /ui      Gradio front end
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from ray.serve import Application

from configs.settings import get_settings

log = logging.getLogger("ray.serve")

APP_NAME = "fraud-scoring"
# Arguments that once set replica counts, and the deployment whose options replace each.
REMOVED_REPLICA_ARGS = {"feature_replicas": "FeatureStep", "model_replicas": "ModelStep",
                        "shap_replicas": "ShapStep", "ingress_replicas": "ScoringIngress"}
SAMPLE_PATH = Path(__file__).resolve().parent.parent / "data" / "sample_transactions.csv"


class AppArgs(BaseModel):
    """Arguments of the scoring application (`args:` in serve_config.yaml)."""

    model_config = ConfigDict(extra="forbid")

    model_version: str | None = Field(
        None, description="pin this model version; unset follows the registry's active version")
    # None is "auto": on with the embedded PostgreSQL, off with DATABASE_URL (deployments/bootstrap.py).
    bootstrap: bool | None = Field(
        None, description="when no model is registered, train one on the sample in data/ first; "
                          "null: only with the embedded database")
    warm_state: bool | None = Field(
        None, description="when the online state is empty, warm it with the sample shifted to end now; "
                          "null: only with the embedded database")
    sample_path: Path = SAMPLE_PATH
    model_poll_interval_s: float = Field(1.0, gt=0)
    online_state: Literal["in_process", "actors"] = Field(
        "in_process", description="in_process: the one FeatureStep replica holds the online state "
                                  "(no actor round trip a request); actors: the state actors, shared "
                                  "by several FeatureStep replicas (required for more than one)")

    @model_validator(mode="before")
    @classmethod
    def _no_replica_args(cls, values: object) -> object:
        # Removed in favour of Serve's own options: say where they went rather than "extra field".
        if isinstance(values, dict):
            for arg, deployment in REMOVED_REPLICA_ARGS.items():
                if arg in values:
                    raise ValueError(
                        f"{arg} is no longer an argument: set num_replicas (or autoscaling_config) "
                        f"under `deployments: - name: {deployment}` of this application in "
                        f"serve_config.yaml")
        return values


class IngestArgs(BaseModel):
    model_config = ConfigDict(extra="forbid")

    enabled: bool = True
    actors: int | None = Field(None, ge=0, description="consumer actors; unset uses settings.ingest_actors")


class UIArgs(BaseModel):
    model_config = ConfigDict(extra="forbid")

    api_url: str = "http://127.0.0.1:8000"


def build_app(args: dict | None = None) -> Application:
    from deployments.bootstrap import prepare
    from deployments.feature_step import FeatureStep
    from deployments.ingress import ScoringIngress
    from deployments.model_step import ModelStep
    from deployments.shap_step import ShapStep

    app_args = AppArgs.model_validate(args or {})
    warm = prepare(get_settings(), app_args)
    features = FeatureStep.bind(app_args.online_state, str(app_args.sample_path) if warm else None)
    model = ModelStep.bind(app_args.model_version, app_args.model_poll_interval_s)
    shap = ShapStep.bind(app_args.model_version)
    return ScoringIngress.bind(features, model, shap, app_args.model_version)


def build_ingest_app(args: dict | None = None) -> Application:
    from deployments.ingest_step import IngestSupervisor

    ingest_args = IngestArgs.model_validate(args or {})
    if ingest_args.enabled:
        from cluster.dev import ensure_servers

        # This application may be built before the scoring one, which also starts them.
        ensure_servers(get_settings())
    return IngestSupervisor.bind(APP_NAME, ingest_args.enabled, ingest_args.actors)


def build_ui_app(args: dict | None = None) -> Application:
    from deployments.ui import UIIngress

    ui_args = UIArgs.model_validate(args or {})
    return UIIngress.bind(ui_args.api_url)


def build_noop_app(args: dict | None = None) -> Application:
    """Benchmarks only: the same ingress machinery with no work behind it."""
    from deployments.noop import NoopIngress

    return NoopIngress.bind()
