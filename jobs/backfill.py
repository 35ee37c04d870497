"""Score and explain a whole history with a registered model, in parallel.

    python -m jobs.backfill --input history.csv --output scores.parquet [--write-db]
    ray job submit --working-dir . -- python -m jobs.backfill --input s3://b/history/ --output s3://b/scored/

Ray tasks read and validate the history in blocks (a CSV file is cut at line
ends, so one file is read on every core; rejects go to ``<output>.rejects.csv``
beside the output, with their reason and, for a malformed line, its line
number), the ``features`` pipeline computes the point-in-time features over the
whole input in buckets, and ``--actors`` actors score, explain and write every
row. The actors start with the read, each loading the model once from the model
store through its node's cache (its sha256 and feature-set version checked);
each takes a bucket of features as soon as it is ready and writes its scored
rows itself while the other buckets are still computed. Input and output are
local paths or URIs (``s3://``, ``gs://``, ...), read and written by the Ray
tasks and actors where they run. The output is
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
import time
from collections import deque
from pathlib import PurePosixPath
from typing import Any

import numpy as np
import pandas as pd

from configs.errors import InvalidInputError, ModelUnavailableError
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
# Buckets queued per scoring actor: one being scored, one ready, so that an actor
# never waits for the driver between two.
PARTS_PER_ACTOR = 2


def shap_column(feature: str) -> str:
    return SHAP_PREFIX + feature


def rejects_path_for(output: str | os.PathLike[str]) -> str:
    """``scores.parquet`` -> ``scores.rejects.csv`` beside it; ``out`` -> ``out.rejects.csv``;
    ``s3://b/scored/`` -> ``s3://b/scored.rejects.csv`` (a URI keeps its query)."""
    from urllib.parse import urlsplit, urlunsplit

    from scoring.store import is_remote

    output = _common.location(output)
    if is_remote(output):
        parts = urlsplit(output)
        return urlunsplit(parts._replace(path=_rejects_name(parts.path)))
    return _rejects_name(output)


def _rejects_name(path: str) -> str:
    name = PurePosixPath(path).name
    stem = name[: -len(".parquet")] if name.lower().endswith(".parquet") else name
    return str(PurePosixPath(path).with_name(stem + ".rejects.csv"))


class BackfillScorer:
    """A scoring actor (and a Ray Data callable class): loads the model once, through the
    cache of the node it runs on, and scores and explains batches.

    Nothing of the driver's node travels with it: its data directory (model and numba
    caches) and settings are those of its own node's environment, as for every Ray
    worker (a path of the driver's may not exist on another node, or be another's)."""

    def __init__(self, artifact_uri: str, sha256: str, feature_set_version: str):
        from configs.settings import get_settings
        from scoring.store import load_model_from_store

        self.forest = load_model_from_store(artifact_uri, sha256=sha256,
                                            feature_set_version=feature_set_version,
                                            cache_dir=get_settings().model_cache_path)
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

    def score_and_write(self, features: Any, output: str, name: str, batch_size: int) -> tuple[int, int]:
        """Scores ``features`` (an Arrow table) in batches of ``batch_size`` rows and writes
        them as the Parquet file ``name`` in the folder ``output`` (a local path or a URI,
        written with this node's credentials). Returns (rows, anomalies)."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        from scoring.store import filesystem_for, storage_error

        if features.num_rows == 0:
            return 0, 0
        scored = pa.concat_tables([self(features.slice(start, batch_size))
                                   for start in range(0, features.num_rows, batch_size)])
        fs, folder = filesystem_for(output)
        try:
            pq.write_table(scored, f"{folder}/{name}", filesystem=fs)
        except OSError as exc:
            raise storage_error(exc, output, "output") from exc
        return scored.num_rows, int(np.count_nonzero(scored.column("anomaly").to_numpy()))


class BackfillDbWriter:
    """A Ray Data callable class: upserts scored rows into the backfill scores table.

    The database URL is resolved on the writer's own node (DATABASE_URL there, or the
    embedded server's record on the machine that started it; a worker node without
    DATABASE_URL refuses, naming it): the driver's URL may name its own 127.0.0.1."""

    def __init__(self, feature_set_version: str, threshold: float, feature_names: list[str]):
        from cluster.dev import database_url
        from cluster.store.audit import AuditRepository
        from cluster.store.db import engine_for

        self.repo = AuditRepository(engine_for(database_url()))
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
    from cluster.registry import ModelRegistry, load_artifact
    from cluster.store.db import get_engine

    registry = ModelRegistry(get_engine(settings))
    if wanted == "active":
        row = registry.active()
        if row is None:
            raise ModelUnavailableError(
                "no active model: train one with `python -m jobs.train --input ... --activate` "
                "or pass --model-version")
    else:
        row = registry.get(wanted)
    # Checked here once so that a bad artifact stops the job with a clear message
    # (the full cause is logged); this also fills the driver node's cache.
    return row, load_artifact(row)


def prepare_output(output: str | os.PathLike[str]) -> None:
    """Removes an earlier run's Parquet output (a local path or a URI); refuses to
    delete anything else."""
    import pyarrow.fs as pafs

    from scoring.store import display_uri, filesystem_for, storage_error

    output = _common.location(output)
    fs, path = filesystem_for(output)
    try:
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.NotFound:
            return
        if info.type == pafs.FileType.File:
            if PurePosixPath(path).suffix.lower() != ".parquet":
                raise InvalidInputError(f"output: {display_uri(output)} exists and is not a Parquet file")
            fs.delete_file(path)
            return
        found = fs.get_file_info(pafs.FileSelector(path, recursive=True))
        others = [i for i in found if i.type == pafs.FileType.File and i.extension.lower() != "parquet"
                  and not i.base_name.startswith((".", "_"))]
        if others:
            raise InvalidInputError(
                f"output: {display_uri(output)} holds files other than Parquet (e.g. {others[0].base_name}); "
                "choose an empty or new folder")
        fs.delete_dir(path)
    except OSError as exc:
        raise storage_error(exc, output, "output") from exc


def _write_with_storage_errors(write: Any, output: str) -> Any:
    """Runs the pipeline's write and returns its result; a storage error from a write
    task names the output. (An input error raised by a read task already names its input.)"""
    from scoring.store import storage_error

    try:
        return write()
    except Exception as exc:
        cause = _common.unwrap(exc)
        if isinstance(cause, OSError) and not getattr(cause, "storage_uri", None):
            raise storage_error(cause, output, "output") from exc
        raise


def run(*, input_path: str | os.PathLike[str], output: str | os.PathLike[str], settings: Settings,
        model_version: str = "active", write_db: bool = False, batch_size: int = DEFAULT_BATCH_SIZE,
        actors: int = DEFAULT_ACTORS) -> dict[str, Any]:
    """The whole backfill; Ray must be initialised. ``input_path`` and ``output`` are
    local paths or URIs. Returns the summary."""
    import ray

    from cluster.dev import ensure_servers
    from cluster.registry import artifact_uri_of
    from features.definitions import FEATURE_NAMES, FEATURE_SET_VERSION
    from features.pipeline import compute_features_blocks
    from scoring.store import display_uri, filesystem_for, storage_error

    if batch_size < 1:
        raise InvalidInputError(f"batch-size: must be >= 1, got {batch_size}")
    if actors < 1:
        raise InvalidInputError(f"actors: must be >= 1, got {actors}")
    input_path, output = _common.location(input_path), _common.location(output)
    began = time.perf_counter()
    # The read tasks start now: they need no model, and the job waits for them last.
    reading = _common.HistoryRead(input_path)
    ensure_servers(settings)
    row, forest = resolve_model(settings, model_version)
    version = row["version"]
    logger.info("backfill with model %s (threshold %.4f) from %s", version, forest.threshold_,
                display_uri(input_path))
    # Compile the kernels into numba's cache here, once: on a cold cache every
    # scoring actor compiled them at the same time (~25 s of CPU each) while the
    # features ran on the same cores. On a warm cache this loads them (~0.5 s).
    forest.warmup()
    # The actors load the model while the history is read.
    scorer = ray.remote(BackfillScorer).options(num_cpus=ACTOR_CPUS, max_restarts=1, max_task_retries=1)
    scorers = [scorer.remote(artifact_uri_of(row), row["artifact_sha256"], FEATURE_SET_VERSION)
               for _ in range(actors)]
    try:
        history = reading.result()
        rejects = history.rejects
        rejects_path = _common.write_rejects(rejects, rejects_path_for(output))
        parts = compute_features_blocks(history.valid)
        prepare_output(output)
        fs, out_path = filesystem_for(output)
        try:
            fs.create_dir(out_path, recursive=True)
        except OSError as exc:
            raise storage_error(exc, output, "output") from exc
        written = _write_with_storage_errors(lambda: _score_parts(scorers, parts, output, batch_size), output)
    finally:
        for actor in scorers:
            ray.kill(actor)
    rows_scored = sum(rows for rows, _ in written)
    anomalies = sum(flagged for _, flagged in written)
    scoring_seconds = time.perf_counter() - began
    logger.info("scored %d rows (%d anomalies) in %.1fs -> %s", rows_scored, anomalies, scoring_seconds,
                display_uri(output))

    summary: dict[str, Any] = {
        "model_version": version, "input": display_uri(input_path), "output": display_uri(output),
        "rows_scored": rows_scored, "rejects": len(rejects),
        "rejects_path": display_uri(rejects_path) if rejects_path else None,
        "anomalies": anomalies, "threshold": forest.threshold_,
        "scoring_seconds": round(scoring_seconds, 3),
        "rows_per_second": round(rows_scored / scoring_seconds, 1) if scoring_seconds > 0 else None,
    }
    if write_db:
        import ray

        counts = ray.data.read_parquet(out_path, filesystem=fs).map_batches(
            BackfillDbWriter,
            fn_constructor_kwargs={"feature_set_version": FEATURE_SET_VERSION,
                                   "threshold": forest.threshold_, "feature_names": list(FEATURE_NAMES)},
            batch_size=batch_size, batch_format="pandas", concurrency=actors, num_cpus=DB_WRITER_CPUS,
        ).to_pandas()
        summary["db_inserted"] = int(counts["inserted"].sum())
        summary["db_duplicates"] = int(counts["duplicates"].sum())
        logger.info("backfill scores table: %d new rows, %d already there",
                    summary["db_inserted"], summary["db_duplicates"])
    summary["seconds"] = round(time.perf_counter() - began, 3)
    return summary


def _score_parts(scorers: list[Any], parts: list[Any], output: str, batch_size: int) -> list[tuple[int, int]]:
    """Gives each bucket of features, as soon as it is ready, to the scoring actor with
    the fewest queued, which writes it as ``part-<n>.parquet``; returns (rows, anomalies)
    of each."""
    import ray

    names = {ref: f"part-{n:05d}.parquet" for n, ref in enumerate(parts)}
    waiting, ready = list(parts), deque()
    running: dict[Any, int] = {}
    queued = [0] * len(scorers)
    written = []
    while waiting or ready or running:
        if waiting:
            now, waiting = ray.wait(waiting, num_returns=len(waiting), timeout=0, fetch_local=False)
            ready.extend(now)
        while ready and min(queued) < PARTS_PER_ACTOR:
            actor = queued.index(min(queued))
            part = ready.popleft()
            running[scorers[actor].score_and_write.remote(part, output, names[part], batch_size)] = actor
            queued[actor] += 1
        if running or waiting:
            finished, _ = ray.wait([*running, *waiting], num_returns=1, fetch_local=False)
            for ref in finished:
                if ref in running:
                    queued[running.pop(ref)] -= 1
                    written.append(ray.get(ref))
    return written


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m jobs.backfill",
        description="Score and explain a whole transaction history with a registered model "
                    "(Ray Data, in parallel); write Parquet and optionally the backfill scores table. "
                    "Prints a JSON summary on stdout.",
    )
    p.add_argument("--input", required=True,
                   help="history: a CSV or Parquet file, or a folder of them; a local path or a URI "
                        "(s3://bucket/history/, gs://..., abfs://..., hdfs://...)")
    p.add_argument("--output", required=True,
                   help="Parquet output folder, a local path or a URI (replaced on a re-run); rejects "
                        "go to <output without .parquet>.rejects.csv beside it")
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
        input_path, output = _common.location(args.input), _common.location(args.output)
        _common.check_input(input_path)
        _common.init_ray(settings)
        summary = run(input_path=input_path, output=output, settings=settings,
                      model_version=args.model_version, write_db=args.write_db,
                      batch_size=args.batch_size, actors=args.actors)
    except Exception as e:  # noqa: BLE001 - failure() re-raises what it does not know
        return _common.failure(e, "backfill")
    _common.print_result(summary)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
