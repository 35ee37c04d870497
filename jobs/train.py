"""Train an Isolation Forest on transaction history, evaluate it, register it.

    python -m jobs.train --input data/sample_transactions.csv --activate
    ray job submit --working-dir . -- python -m jobs.train --input s3://bucket/history/

Steps: read the history with Ray Data (a CSV or Parquet file or folder, a
local path or a URI such as ``s3://bucket/history/``, read in the Ray tasks),
validate it (rejected rows go to ``rejects.csv`` beside the artifact, with the
reason), compute the point-in-time features with the ``features`` pipeline, fit
scikit-learn's IsolationForest on the feature matrix, compile it, evaluate it on
the labels when the input has ``is_fraud`` (the labels are never used to fit),
write the artifact and a model card beside it (``model_card.md``,
``model_card.json``, ``score_distribution.png``) to ``<model_store>/<version>/``
(see `scoring.store`), and register the version with the artifact's URI and
sha256 (``--activate`` makes it the active one). The result (version, metrics,
artifact URI) is printed as JSON on stdout; progress goes to stderr.

`fit_and_register` does the same in-process from a pandas frame, without Ray
(the Serve bootstrap trains on the sample with it).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from configs.errors import InvalidInputError
from configs.settings import Settings, SettingsError, get_settings
from jobs import _common

logger = logging.getLogger("jobs.train")

DEFAULT_N_ESTIMATORS = 100
DEFAULT_MAX_SAMPLES = 256
PRECISION_AT_K = 100
REJECTS_FILE = "rejects.csv"
CARD_MARKDOWN = "model_card.md"
CARD_JSON = "model_card.json"
CARD_PLOT = "score_distribution.png"


@dataclass(frozen=True)
class TrainingData:
    """The feature matrix and what evaluation and the fingerprint need, row-aligned."""

    X: np.ndarray  # (n, n_features) float64, columns in FEATURE_NAMES order
    transaction_ids: np.ndarray  # (n,) str
    is_fraud: np.ndarray | None  # (n,) bool, when labelled
    scenario: np.ndarray | None  # (n,) str, when the input names scenarios
    rejects: pd.DataFrame  # rejected input rows with a `reason` column

    @classmethod
    def from_features(cls, frame: pd.DataFrame, rejects: pd.DataFrame) -> TrainingData:
        from features.definitions import FEATURE_NAMES

        X = frame[list(FEATURE_NAMES)].to_numpy(dtype=np.float64)
        labels = None
        if "is_fraud" in frame.columns:
            raw = pd.to_numeric(frame["is_fraud"], errors="coerce")
            if raw.isna().any():
                raise InvalidInputError("is_fraud: expected 0/1 labels on every valid row")
            labels = raw.to_numpy() != 0
        scenario = frame["scenario"].astype(str).to_numpy() if "scenario" in frame.columns else None
        return cls(X=X, transaction_ids=frame["transaction_id"].astype(str).to_numpy(),
                   is_fraud=labels, scenario=scenario, rejects=rejects)


# ------------------------------------------------------------------ pure parts


def data_fingerprint(transaction_ids: np.ndarray) -> str:
    """sha256 over the sorted transaction ids, one per line, then the row count.

    The same rows in any order (or split into other files) give the same fingerprint.
    """
    ids = np.sort(np.asarray(transaction_ids, dtype=str))
    digest = hashlib.sha256()
    digest.update("\n".join(ids.tolist()).encode())
    digest.update(f"\nrows={ids.size}".encode())
    return digest.hexdigest()


def precision_at_k(risk: np.ndarray, is_fraud: np.ndarray, k: int) -> float | None:
    """Share of frauds among the k riskiest rows (ties broken by row order)."""
    k = min(int(k), risk.size)
    if k <= 0:
        return None
    top = np.argsort(-risk, kind="stable")[:k]
    return float(is_fraud[top].mean())


def evaluate(risk: np.ndarray, threshold: float, is_fraud: np.ndarray | None = None,
             scenario: np.ndarray | None = None) -> tuple[dict[str, Any], dict[str, float | None]]:
    """Metrics of risk scores, and the ROC AUC per fraud scenario.

    Unlabelled data gets the alert rate only. A scenario's AUC compares its
    frauds with all legit rows. Undefined values are None (JSON null).
    """
    from sklearn.metrics import average_precision_score, roc_auc_score

    from scoring.risk import is_anomaly

    alerts = is_anomaly(risk, threshold)
    metrics: dict[str, Any] = {
        "rows": int(risk.size),
        "threshold": float(threshold),
        "anomalies": int(alerts.sum()),
        "alert_rate": float(alerts.mean()) if risk.size else 0.0,
        "risk_score_mean": float(risk.mean()) if risk.size else None,
    }
    per_scenario: dict[str, float | None] = {}
    if is_fraud is None:
        return metrics, per_scenario
    frauds = int(is_fraud.sum())
    both = 0 < frauds < risk.size
    metrics.update({
        "frauds": frauds,
        "fraud_rate": float(is_fraud.mean()) if risk.size else 0.0,
        "roc_auc": float(roc_auc_score(is_fraud, risk)) if both else None,
        "average_precision": float(average_precision_score(is_fraud, risk)) if both else None,
        f"precision_at_{PRECISION_AT_K}": precision_at_k(risk, is_fraud, PRECISION_AT_K) if frauds else None,
        "precision_at_n_frauds": precision_at_k(risk, is_fraud, frauds) if frauds else None,
        "precision_at_threshold": float(is_fraud[alerts].mean()) if alerts.any() else None,
        "recall_at_threshold": float(alerts[is_fraud].mean()) if frauds else None,
    })
    if scenario is not None and both:
        legit = ~is_fraud
        for name in sorted(set(scenario[is_fraud].tolist())):
            mine = is_fraud & (scenario == name)
            keep = mine | legit
            per_scenario[name] = float(roc_auc_score(mine[keep], risk[keep]))
    metrics["per_scenario_roc_auc"] = per_scenario
    return metrics, per_scenario


def fit_forest(X: np.ndarray, *, n_estimators: int, max_samples: int, contamination: float,
               seed: int):
    """scikit-learn's IsolationForest fitted on ``X`` (the threshold at ``contamination``)."""
    from sklearn.ensemble import IsolationForest

    model = IsolationForest(n_estimators=n_estimators, max_samples=min(max_samples, len(X)),
                            contamination=contamination, random_state=seed, n_jobs=-1)
    return model.fit(X)


# ---------------------------------------------------------- model card


def write_model_card(directory: Path, card: dict[str, Any], risk: np.ndarray,
                     is_fraud: np.ndarray | None) -> None:
    """``model_card.json``, ``model_card.md`` and ``score_distribution.png`` in ``directory``."""
    (directory / CARD_JSON).write_text(json.dumps(card, indent=2, sort_keys=True, default=str) + "\n")
    _plot_scores(directory / CARD_PLOT, risk, is_fraud, card["metrics"]["threshold"])
    (directory / CARD_MARKDOWN).write_text(_card_markdown(card))


def _plot_scores(path: Path, risk: np.ndarray, is_fraud: np.ndarray | None, threshold: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    lo, hi = (float(risk.min()), float(risk.max())) if risk.size else (0.0, 1.0)
    bins = np.linspace(min(lo, threshold), max(hi, threshold), 61)
    if is_fraud is not None and is_fraud.any():
        ax.hist(risk[~is_fraud], bins=bins, density=True, alpha=0.6, label=f"legit ({int((~is_fraud).sum())})")
        ax.hist(risk[is_fraud], bins=bins, density=True, alpha=0.6, label=f"fraud ({int(is_fraud.sum())})")
        ax.set_ylabel("density (each class)")
    else:
        ax.hist(risk, bins=bins, alpha=0.8, label=f"all rows ({risk.size})")
        ax.set_ylabel("rows")
    ax.axvline(threshold, color="black", linestyle="--", label=f"threshold {threshold:.4f}")
    ax.set_xlabel("risk_score")
    ax.set_title("Risk scores of the training history")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _fmt(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def _card_markdown(card: dict[str, Any]) -> str:
    m = card["metrics"]
    lines = [
        f"# Model card: {card['version']}",
        "",
        "Unsupervised Isolation Forest over point-in-time behavioural features; "
        "labels, when present, are used for evaluation only (on the training history).",
        "",
        "## Data",
        "",
        f"- source: `{card['source'] or 'in-memory frame'}`",
        f"- rows used: {m['rows']}, rejected: {card['rejects']}"
        + (f" (see `{REJECTS_FILE}`)" if card["rejects"] else ""),
        f"- data fingerprint (sha256 of sorted transaction ids + row count): `{card['data_fingerprint']}`",
        f"- feature set: `{card['feature_set_version']}`: {', '.join(card['feature_names'])}",
        "",
        "## Parameters",
        "",
        *[f"- {k}: {_fmt(v)}" for k, v in sorted(card["parameters"].items())],
        "",
        "## Metrics",
        "",
        f"- threshold (risk_score above it is an anomaly): {_fmt(m['threshold'])}",
        f"- alert rate: {_fmt(m['alert_rate'])} ({m['anomalies']} rows)",
    ]
    if "roc_auc" in m:
        lines += [
            f"- frauds: {m['frauds']} ({_fmt(m['fraud_rate'])})",
            f"- ROC AUC: {_fmt(m['roc_auc'])}",
            f"- average precision: {_fmt(m['average_precision'])}",
            f"- precision at {PRECISION_AT_K}: {_fmt(m[f'precision_at_{PRECISION_AT_K}'])}",
            f"- precision at k = number of frauds: {_fmt(m['precision_at_n_frauds'])}",
            f"- precision / recall at the threshold: {_fmt(m['precision_at_threshold'])} / "
            f"{_fmt(m['recall_at_threshold'])}",
            "",
            "### ROC AUC per fraud scenario (its frauds vs all legit rows)",
            "",
            "| scenario | ROC AUC |",
            "|---|---|",
            *[f"| {k} | {_fmt(v)} |" for k, v in sorted(card["per_scenario_roc_auc"].items())],
        ]
    lines += [
        "",
        "## Artifact",
        "",
        f"- URI: `{card['artifact_uri']}`",
        f"- sha256: `{card['artifact_sha256']}`",
        "",
        f"![risk score distribution]({CARD_PLOT})",
        "",
    ]
    return "\n".join(lines)


# ------------------------------------------------------- fit, evaluate, register


def train_and_register(data: TrainingData, *, settings: Settings, n_estimators: int = DEFAULT_N_ESTIMATORS,
                       max_samples: int = DEFAULT_MAX_SAMPLES, contamination: float | None = None,
                       seed: int = 0, activate: bool = False, source: str = "",
                       model_store: str | None = None) -> dict[str, Any]:
    """Fits, compiles, evaluates, stores (with card and rejects) and registers one version.

    The files are written in a staging folder under this node's data directory,
    then copied to ``<model_store>/<version>/`` (default: the settings'
    `model_store`); the version is registered only once they are all there.
    Shared by the Ray job and `fit_and_register`; returns the job's result.
    """
    from cluster.dev import ensure_servers
    from cluster.registry import ModelRegistry, new_version_id
    from cluster.store.db import engine_for
    from features.definitions import FEATURE_NAMES, FEATURE_SET_VERSION
    from scoring.forest import CompiledForest
    from scoring.persistence import save_model
    from scoring.store import ArtifactStore, display_uri, is_remote, join_uri, local_path

    n = data.X.shape[0]
    if n < 2:
        raise InvalidInputError(f"input: at least 2 valid rows are needed to train, got {n}")
    if n_estimators < 1:
        raise InvalidInputError(f"n_estimators: must be >= 1, got {n_estimators}")
    if max_samples < 2:
        raise InvalidInputError(f"max_samples: must be >= 2, got {max_samples}")
    contamination = settings.contamination if contamination is None else float(contamination)
    if not 0.0 < contamination <= 0.5:
        raise InvalidInputError(f"contamination: must be in (0, 0.5], got {contamination}")

    version = new_version_id()
    began = time.perf_counter()
    model = fit_forest(data.X, n_estimators=n_estimators, max_samples=max_samples,
                       contamination=contamination, seed=seed)
    fit_seconds = time.perf_counter() - began
    forest = CompiledForest.from_sklearn(model, feature_names=list(FEATURE_NAMES),
                                         feature_set_version=FEATURE_SET_VERSION, model_version=version)
    logger.info("fitted %d trees on %d rows x %d features in %.1fs", n_estimators, n, data.X.shape[1],
                fit_seconds)

    risk = forest.risk_score(data.X)
    metrics, per_scenario = evaluate(risk, forest.threshold_, data.is_fraud, data.scenario)
    metrics["fit_seconds"] = round(fit_seconds, 3)
    metrics["rejects"] = len(data.rejects)
    logger.info("evaluation: %s", {k: v for k, v in metrics.items() if k != "per_scenario_roc_auc"})
    if per_scenario:
        logger.info("ROC AUC per scenario: %s", per_scenario)

    store = ArtifactStore(model_store or settings.model_store)
    fingerprint = data_fingerprint(data.transaction_ids)
    parameters = {
        "n_estimators": n_estimators, "max_samples": max_samples, "max_samples_used": forest.max_samples_,
        "contamination": contamination, "seed": seed, "source": source, "rows": n,
        "rejects": len(data.rejects), "algorithm": "sklearn.ensemble.IsolationForest",
    }
    card = {
        "version": version, "source": source, "parameters": parameters,
        "feature_set_version": FEATURE_SET_VERSION, "feature_names": list(FEATURE_NAMES),
        "data_fingerprint": fingerprint, "metrics": metrics, "per_scenario_roc_auc": per_scenario,
        "threshold": metrics["threshold"], "rejects": len(data.rejects),
        "artifact_uri": display_uri(store.artifact_uri(version)),
    }
    settings.cache_path.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f"train-{version}-", dir=settings.cache_path) as staging:
        directory = Path(staging)
        artifact = save_model(forest, directory)
        card["artifact_sha256"] = artifact.sha256
        rejects_file = _common.write_rejects(data.rejects, directory / REJECTS_FILE)
        write_model_card(directory, card, risk, data.is_fraud)
        artifact_uri = store.put(directory, version)

    urls = ensure_servers(settings)
    registry = ModelRegistry(engine_for(urls["database_url"]))
    registry.register(version=version, parameters=parameters, feature_set_version=FEATURE_SET_VERSION,
                      data_fingerprint=fingerprint, metrics=metrics, artifact_uri=artifact_uri,
                      artifact_sha256=artifact.sha256)
    if activate:
        registry.activate(version)
    logger.info("registered model %s%s at %s", version, " (active)" if activate else "",
                display_uri(artifact_uri))
    return {
        "version": version, "metrics": metrics, "artifact_uri": artifact_uri,
        # the local folder when the store is on this machine's filesystem
        "artifact_path": None if is_remote(artifact_uri) else str(local_path(artifact_uri)),
        "sha256": artifact.sha256, "active": activate, "data_fingerprint": fingerprint,
        "rejects": len(data.rejects),
        "rejects_path": join_uri(artifact_uri, REJECTS_FILE) if rejects_file else None,
        "model_card": {name: join_uri(artifact_uri, name) for name in (CARD_MARKDOWN, CARD_JSON, CARD_PLOT)},
    }


def fit_and_register(history: pd.DataFrame, *, settings: Settings, n_estimators: int = DEFAULT_N_ESTIMATORS,
                     max_samples: int = DEFAULT_MAX_SAMPLES, contamination: float | None = None,
                     seed: int = 0, activate: bool = False, source: str = "",
                     model_store: str | None = None) -> dict[str, Any]:
    """Trains on an in-memory history with the pure pandas features (no Ray).

    Returns {"version", "metrics", "artifact_uri", "sha256", ...}; raises
    InvalidInputError when required columns are missing.
    """
    from features.schema import validate_frame
    from features.transforms import compute_features

    _common.check_columns(history.columns, "history")
    valid, rejects = validate_frame(history)
    features = compute_features(valid)
    data = TrainingData.from_features(features, rejects)
    return train_and_register(data, settings=settings, n_estimators=n_estimators, max_samples=max_samples,
                              contamination=contamination, seed=seed, activate=activate, source=source,
                              model_store=model_store)


# ------------------------------------------------------------------- the job


def load_training_data(path: str | os.PathLike[str]) -> TrainingData:
    """Reads, validates and featurises ``path`` (a local path or a URI) with Ray Data;
    collects the matrix."""
    from features.definitions import FEATURE_NAMES

    valid, rejects = _common.read_valid_history(path)
    features = _common.features_dataset(valid)
    # Labels from the input's header: asking the dataset for its columns would run the pipeline.
    header = set(_common.input_columns(path))
    keep = list(FEATURE_NAMES) + ["transaction_id"] + [c for c in ("is_fraud", "scenario") if c in header]
    frame = features.select_columns(keep).to_pandas()
    return TrainingData.from_features(frame, rejects)


def _parser(settings_contamination: float | None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m jobs.train",
        description="Train an Isolation Forest on transaction history, evaluate it on the labels "
                    "when present, write a model card and register a new model version. "
                    "Prints the version and metrics as JSON on stdout.",
    )
    p.add_argument("--input", required=True,
                   help="history: a CSV or Parquet file, or a folder of them, a local path or a URI "
                        "(s3://bucket/history/, gs://..., abfs://..., hdfs://...); columns user_id, amount, "
                        "merchant, country, timestamp; optional transaction_id, is_fraud, scenario")
    p.add_argument("--model-store", "--model-dir", dest="model_store", default=None,
                   help="model store under which <version>/ is written: a URI (s3://bucket/models) or a "
                        "local folder (default: the model_store setting, FRAUD_MODEL_STORE, "
                        "file://<data_dir>/models); --model-dir is its deprecated name")
    p.add_argument("--n-estimators", type=int, default=DEFAULT_N_ESTIMATORS,
                   help=f"number of trees (default {DEFAULT_N_ESTIMATORS})")
    p.add_argument("--max-samples", type=int, default=DEFAULT_MAX_SAMPLES,
                   help=f"rows drawn to grow each tree (default {DEFAULT_MAX_SAMPLES})")
    p.add_argument("--contamination", type=float, default=None,
                   help="expected share of anomalies; sets the threshold (default: the settings' "
                        f"contamination{'' if settings_contamination is None else f', {settings_contamination}'})")
    p.add_argument("--seed", type=int, default=0, help="random seed of the forest (default 0)")
    p.add_argument("--activate", action="store_true",
                   help="make the new version the active one (default: registered as a candidate)")
    return p


def main(argv: list[str] | None = None) -> int:
    _common.configure_logging()
    try:
        settings = get_settings()
    except SettingsError as e:
        return _common.bad_input(str(e))
    args = _parser(settings.contamination).parse_args(argv)
    from scoring.store import display_uri  # after get_settings(): it imports numba

    began = time.perf_counter()
    try:
        path = _common.location(args.input)
        model_store = _model_store(args.model_store)
        _common.check_input(path)
        _common.init_ray(settings)
        data = load_training_data(path)
        logger.info("read %d valid rows and %d rejects from %s in %.1fs", data.X.shape[0],
                    len(data.rejects), display_uri(path), time.perf_counter() - began)
        result = train_and_register(data, settings=settings, n_estimators=args.n_estimators,
                                    max_samples=args.max_samples, contamination=args.contamination,
                                    seed=args.seed, activate=args.activate, source=display_uri(path),
                                    model_store=model_store)
    except Exception as e:  # noqa: BLE001 - failure() re-raises what it does not know
        return _common.failure(e, "training")
    result["seconds"] = round(time.perf_counter() - began, 3)
    _common.print_result(result)
    return 0


def _model_store(value: str | None) -> str | None:
    """The --model-store flag checked like the setting (no credentials in it)."""
    from configs.settings import model_store_uri

    if value is None:
        return None
    try:
        return model_store_uri(value, None, None)
    except ValueError as e:
        raise InvalidInputError(f"model-store: {e}") from None


if __name__ == "__main__":
    raise SystemExit(main())
