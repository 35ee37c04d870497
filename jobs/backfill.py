"""Score and explain a whole history with a registered model, in parallel.

    python -m jobs.backfill --input history.csv --output scores.parquet [--write-db]
    ray job submit --working-dir . -- python -m jobs.backfill --input /abs/h.parquet --output /abs/out

Ray Data reads and validates the history (rejects go to
``<output>.rejects.csv`` with their reason), computes the point-in-time
features with the ``features`` pipeline over the whole input, then scores and
explains every row in ``--actors`` actors that each load the model once from the
registry's artifact (its sha256 and feature-set version checked). The output is
a Parquet folder with the input columns, ``transaction_id`` (the input's, or
derived from the content so that a re-run gives the same ids), every feature,
``risk_score``, ``anomaly``, one ``shap_<feature>`` per feature (positive pushes
towards an anomaly, see `scoring.risk`) and ``model_version``. A re-run replaces
the output. ``--write-db`` also upserts the backfill scores table (idempotent
on (transaction_id, model_version)).

Each actor asks for ``ACTOR_CPUS`` logical CPUs, so a backfill can share a Ray
cluster with Serve without starving it; start such a cluster with an explicit
CPU count (`ray start --head --num-cpus 4`).
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from configs.errors import FraudScoringError, InvalidInputError, ModelUnavailableError
from configs.settings import Settings, SettingsError, get_settings
from jobs import _common

logger = logging.getLogger("jobs.backfill")

DEFAULT_BATCH_SIZE = 4096
DEFAULT_ACTORS = 2
ACTOR_CPUS = 0.5
DB_WRITER_CPUS = 0.25
DB_CHUNK_ROWS = 1000
SHAP_PREFIX = "shap_"
SCORE_COLUMNS = ("risk_score", "anomaly", "model_version")


def shap_column(feature: str) -> str:
    return SHAP_PREFIX + feature


def rejects_path_for(output: Path) -> Path:
    """``scores.parquet`` -> ``scores.rejects.csv`` beside it; ``out`` -> ``out.rejects.csv``."""
    stem = output.name[: -len(".parquet")] if output.name.lower().endswith(".parquet") else output.name
    return output.with_name(stem + ".rejects.csv")


class BackfillScorer:
    """A Ray Data callable class: loads the model once, scores and explains batches."""

    def __init__(self, artifact_path: str, sha256: str, feature_set_version: str, env: dict[str, str]):
        for key, value in env.items():
            os.environ.setdefault(key, value)
        from scoring.persistence import load_model

        self.forest = load_model(artifact_path, expected_sha256=sha256,
                                 expected_feature_set_version=feature_set_version)
        self.forest.warmup()
        self.names = list(self.forest.feature_names)

    def __call__(self, batch: Any) -> Any:
        """Arrow in, Arrow out: the input columns pass through untouched (a pandas
        batch converted every text column to Python objects and back)."""
        import pyarrow as pa

        from scoring.explain import score_and_explain

        X = np.column_stack([batch.column(name).to_numpy() for name in self.names]).astype(np.float64, copy=False)
        scored = score_and_explain(self.forest, X)
        out = batch.append_column("risk_score", pa.array(scored.risk_score))
        out = out.append_column("anomaly", pa.array(scored.anomaly))
        for j, name in enumerate(self.names):
            out = out.append_column(shap_column(name), pa.array(scored.explanation[:, j]))
        version = pa.array([scored.model_version], pa.string()).take(np.zeros(len(X), dtype=np.int64))
        return out.append_column("model_version", version)


class BackfillDbWriter:
    """A Ray Data callable class: upserts scored rows into the backfill scores table."""

    def __init__(self, database_url: str, feature_set_version: str, threshold: float,
                 feature_names: list[str]):
        from cluster.store.audit import AuditRepository
        from cluster.store.db import engine_for

        self.repo = AuditRepository(engine_for(database_url))
        self.feature_set_version = feature_set_version
        self.threshold = float(threshold)
        self.names = feature_names

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        inserted = duplicates = 0
        for start in range(0, len(batch), DB_CHUNK_ROWS):
            rows = self.rows(batch.iloc[start:start + DB_CHUNK_ROWS])
            result = self.repo.write_backfill(rows)
            inserted += result.inserted
            duplicates += result.duplicates
        return pd.DataFrame({"inserted": [inserted], "duplicates": [duplicates]})

    def rows(self, chunk: pd.DataFrame) -> list[dict[str, Any]]:
        features = chunk[self.names].to_numpy(dtype=np.float64)
        shap = chunk[[shap_column(n) for n in self.names]].to_numpy(dtype=np.float64)
        times = pd.to_datetime(chunk["timestamp"], utc=True)
        out = []
        for i, (tid, user, amount, merchant, country, ts, risk, anomaly, version) in enumerate(zip(
                chunk["transaction_id"], chunk["user_id"], chunk["amount"], chunk["merchant"],
                chunk["country"], times, chunk["risk_score"], chunk["anomaly"], chunk["model_version"])):
            out.append({
                "transaction_id": str(tid), "model_version": str(version), "user_id": str(user),
                "amount": float(amount), "merchant": str(merchant), "country": str(country),
                "event_time": ts.to_pydatetime(),
                "features": dict(zip(self.names, features[i].tolist())),
                "feature_set_version": self.feature_set_version,
                "risk_score": float(risk), "threshold": self.threshold, "anomaly": bool(anomaly),
                "explanation": dict(zip(self.names, shap[i].tolist())),
            })
        return out


def resolve_model(settings: Settings, wanted: str) -> tuple[dict[str, Any], Any]:
    """The registry row of ``wanted`` (a version or ``active``) and its verified model."""
    from cluster.registry import ModelRegistry
    from cluster.store.db import get_engine
    from features.definitions import FEATURE_SET_VERSION
    from scoring.persistence import load_model

    registry = ModelRegistry(get_engine(settings))
    if wanted == "active":
        row = registry.active()
        if row is None:
            raise ModelUnavailableError(
                "no active model: train one with `python -m jobs.train --input ... --activate` "
                "or pass --model-version")
    else:
        row = registry.get(wanted)
    # Checked here once so that a bad artifact stops the job with a clear message.
    forest = load_model(row["artifact_path"], expected_sha256=row["artifact_sha256"],
                        expected_feature_set_version=FEATURE_SET_VERSION)
    return row, forest


def prepare_output(output: Path) -> None:
    """Removes an earlier run's Parquet output; refuses to delete anything else."""
    if not output.exists():
        return
    if output.is_file():
        if output.suffix.lower() != ".parquet":
            raise InvalidInputError(f"output: {output} exists and is not a Parquet file")
        output.unlink()
        return
    others = [p for p in output.rglob("*") if p.is_file() and p.suffix.lower() != ".parquet"
              and not p.name.startswith((".", "_"))]
    if others:
        raise InvalidInputError(
            f"output: {output} holds files other than Parquet (e.g. {others[0].name}); "
            "choose an empty or new folder")
    shutil.rmtree(output)


def run(*, input_path: Path, output: Path, settings: Settings, model_version: str = "active",
        write_db: bool = False, batch_size: int = DEFAULT_BATCH_SIZE,
        actors: int = DEFAULT_ACTORS) -> dict[str, Any]:
    """The whole backfill; Ray must be initialised. Returns the summary."""
    import pyarrow.parquet as pq

    from cluster.dev import database_url, ensure_servers
    from features.definitions import FEATURE_NAMES, FEATURE_SET_VERSION

    if batch_size < 1:
        raise InvalidInputError(f"batch-size: must be >= 1, got {batch_size}")
    if actors < 1:
        raise InvalidInputError(f"actors: must be >= 1, got {actors}")
    began = time.perf_counter()
    ensure_servers(settings)
    row, forest = resolve_model(settings, model_version)
    # Compile the kernels into numba's cache here, once: on a cold cache every
    # scoring actor compiled them at the same time (~25 s of CPU each) while the
    # features ran on the same cores. On a warm cache this loads them (~0.5 s).
    forest.warmup()
    version = row["version"]
    logger.info("backfill with model %s (threshold %.4f) from %s", version, forest.threshold_, input_path)

    valid, rejects = _common.read_valid_history(input_path)
    rejects_path = _common.write_rejects(rejects, rejects_path_for(output))
    features = _common.features_dataset(valid)
    env = {k: v for k, v in (("FRAUD_DATA_DIR", str(settings.data_dir)),
                             ("NUMBA_CACHE_DIR", os.environ.get("NUMBA_CACHE_DIR", ""))) if v}
    scored = features.map_batches(
        BackfillScorer,
        fn_constructor_kwargs={"artifact_path": row["artifact_path"], "sha256": row["artifact_sha256"],
                               "feature_set_version": FEATURE_SET_VERSION, "env": env},
        batch_size=batch_size, batch_format="pyarrow", concurrency=actors, num_cpus=ACTOR_CPUS,
    )
    prepare_output(output)
    scored.write_parquet(str(output), ray_remote_args={"num_cpus": DB_WRITER_CPUS})
    anomaly = pq.read_table(str(output), columns=["anomaly"]).column("anomaly")
    rows_scored = len(anomaly)
    anomalies = int(np.asarray(anomaly.to_numpy(zero_copy_only=False), dtype=bool).sum())
    scoring_seconds = time.perf_counter() - began
    logger.info("scored %d rows (%d anomalies) in %.1fs -> %s", rows_scored, anomalies, scoring_seconds, output)

    summary: dict[str, Any] = {
        "model_version": version, "input": str(input_path), "output": str(output),
        "rows_scored": rows_scored, "rejects": len(rejects),
        "rejects_path": str(rejects_path) if rejects_path else None,
        "anomalies": anomalies, "threshold": forest.threshold_,
        "scoring_seconds": round(scoring_seconds, 3),
        "rows_per_second": round(rows_scored / scoring_seconds, 1) if scoring_seconds > 0 else None,
    }
    if write_db:
        import ray

        counts = ray.data.read_parquet(str(output)).map_batches(
            BackfillDbWriter,
            fn_constructor_kwargs={"database_url": database_url(settings),
                                   "feature_set_version": FEATURE_SET_VERSION,
                                   "threshold": forest.threshold_, "feature_names": list(FEATURE_NAMES)},
            batch_size=batch_size, batch_format="pandas", concurrency=actors, num_cpus=DB_WRITER_CPUS,
        ).to_pandas()
        summary["db_inserted"] = int(counts["inserted"].sum())
        summary["db_duplicates"] = int(counts["duplicates"].sum())
        logger.info("backfill scores table: %d new rows, %d already there",
                    summary["db_inserted"], summary["db_duplicates"])
    summary["seconds"] = round(time.perf_counter() - began, 3)
    return summary


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m jobs.backfill",
        description="Score and explain a whole transaction history with a registered model "
                    "(Ray Data, in parallel); write Parquet and optionally the backfill scores table. "
                    "Prints a JSON summary on stdout.",
    )
    p.add_argument("--input", required=True, type=Path,
                   help="history: a CSV or Parquet file, or a folder of them")
    p.add_argument("--output", required=True, type=Path,
                   help="Parquet output folder (replaced on a re-run); rejects go to "
                        "<output without .parquet>.rejects.csv beside it")
    p.add_argument("--model-version", default="active",
                   help="registered model version to use, or 'active' (default)")
    p.add_argument("--write-db", action="store_true",
                   help="also upsert the backfill scores table (idempotent per transaction and version)")
    p.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE,
                   help=f"rows per scoring batch (default {DEFAULT_BATCH_SIZE})")
    p.add_argument("--actors", type=int, default=DEFAULT_ACTORS,
                   help=f"scoring actors, each with {ACTOR_CPUS} logical CPU and the model loaded once "
                        f"(default {DEFAULT_ACTORS})")
    return p


def main(argv: list[str] | None = None) -> int:
    _common.configure_logging()
    args = _parser().parse_args(argv)
    try:
        settings = get_settings()
    except SettingsError as e:
        return _common.bad_input(str(e))
    try:
        _common.check_input(_common.absolute(args.input))
        _common.init_ray(settings)
        summary = run(input_path=_common.absolute(args.input), output=_common.absolute(args.output),
                      settings=settings, model_version=args.model_version, write_db=args.write_db,
                      batch_size=args.batch_size, actors=args.actors)
    except (InvalidInputError, FileNotFoundError) as e:
        return _common.bad_input(str(e))
    except FraudScoringError as e:
        logger.error("backfill failed: %s", e)
        return 1
    _common.print_result(summary)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
