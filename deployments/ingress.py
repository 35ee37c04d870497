"""The HTTP API (FastAPI ingress) and the batch call used by the Kafka ingestion actors.

Concurrent /predict requests are gathered by a `LoadBatcher` (a batch forms
when a worker is free, so batches grow with the load and an idle service adds
no wait), and one chain of handle calls (feature -> model -> SHAP) carries a
whole batch; the chained
`DeploymentResponse`s are passed on without being awaited here, so the
intermediate arrays never travel back through this replica. Audit rows of a
batch are written in one idempotent insert (through the spool when PostgreSQL
is down).
"""


import asyncio
import logging
import time
import uuid
from collections import deque
from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Any, Literal

import numpy as np
from fastapi import FastAPI, HTTPException, Path, Query, Request
from fastapi.responses import JSONResponse
from pydantic import AfterValidator, BaseModel, Field
from ray import serve
from ray.serve.handle import DeploymentHandle
from sqlalchemy.exc import DBAPIError

from cluster.registry import ModelRegistry
from cluster.store.audit import (
    ALERT_QUERY_TIMEOUT_S,
    ALERT_RATE_UNKNOWN,
    AuditFilter,
    AuditRepository,
)
from cluster.store.db import get_engine
from cluster.store.spool import AuditSink, Spooled
from configs.errors import ConflictError, FraudScoringError, NotFoundError
from configs.settings import get_settings
from deployments.batching import LoadBatcher
from deployments.http_guard import Authorized, guard
from deployments.model_source import NO_MODEL_HINT
from deployments.reasons import build_reasons
from features.definitions import FEATURE_NAMES, FEATURE_SET_VERSION
from features.online import EventColumns
from features.schema import (
    MAX_ID_LENGTH,
    MAX_TRANSACTION_ID_LENGTH,
    TRANSACTION_ID_PATTERN,
    Transaction,
    payload_fingerprint,
    utc_datetime,
)

log = logging.getLogger("ray.serve")

DEFAULT_MAX_BATCH = 64
DEFAULT_CONCURRENT_BATCHES = 2


# --- API models -------------------------------------------------------------


class Prediction(BaseModel):
    transaction_id: str
    risk_score: float = Field(description="Isolation Forest anomaly score in (0, 1]; higher is riskier")
    anomaly: bool = Field(description="risk_score > threshold")
    threshold: float
    model_version: str
    feature_set_version: str
    explanation: dict[str, float] = Field(description="per feature; positive pushes towards anomaly")
    features: dict[str, float]
    reasons: list[str]
    dry_run: bool
    stored: bool = Field(False, description="true when this is the stored answer to a resent transaction")


class BatchRequest(BaseModel):
    transactions: list[Transaction]


class ItemError(BaseModel):
    """The answer for one item of /predict/batch that could not be scored or recorded."""

    index: int
    transaction_id: str
    status: int = Field(description="the HTTP status /predict would have answered for this item")
    detail: str


class BatchResponse(BaseModel):
    results: list[Prediction | ItemError] = Field(
        description="one per transaction, in order: its prediction, or why it has none")
    errors: int = Field(0, description="how many results are errors")


MAX_OFFSET = 10_000
TransactionIdPath = Annotated[str, Path(min_length=1, max_length=MAX_TRANSACTION_ID_LENGTH,
                                        pattern=TRANSACTION_ID_PATTERN)]
# Query text: bounded, and no NUL (PostgreSQL text cannot hold one).
_NO_NUL = r"^[^\x00]+$"
Limit = Annotated[int, Query(ge=1, le=500)]
TimeBound = Annotated[datetime | None, AfterValidator(lambda v: None if v is None else utc_datetime(v))]
Offset = Annotated[int, Query(ge=0, le=MAX_OFFSET, description=(
    f"at most {MAX_OFFSET}: narrow deeper pages with since/until or the filters"))]


@dataclass
class _Item:
    txn: Transaction
    dry_run: bool


@dataclass
class _Outcome:
    prediction: Prediction | None = None
    error: FraudScoringError | None = None


app = FastAPI(
    title="Fraud scoring API",
    description="Real-time risk scores for financial transactions, each with its explanation "
                "and an audit record.",
    version="0.1.0",
)


@app.exception_handler(FraudScoringError)
async def _project_error(request: Request, exc: FraudScoringError) -> JSONResponse:
    if exc.status_code >= 500:
        log.warning("%s %s answered %d: %s", request.method, request.url.path, exc.status_code, exc)
    return JSONResponse(status_code=exc.status_code, content={"detail": exc.public_detail()})


guard(app, lambda: get_settings().max_request_bytes)




# --- helpers ------------------------------------------------------------------
# Helpers come before the deployment: `serve.ingress` captures the app's routes
# (and the globals they use) when the class is decorated.



def _with_id(txn: Transaction) -> Transaction:
    """A request without transaction_id gets a new UUID."""
    if txn.transaction_id:
        return txn
    return txn.model_copy(update={"transaction_id": str(uuid.uuid4())})


def _decisions(result: dict[str, Any], txns: list[Transaction]) -> list[dict[str, Any]]:
    """Per transaction of a scored batch, the fields of its `Prediction` but `dry_run`,
    as plain Python values (built once per row: no validation, no copies)."""
    X, E = result["X"].tolist(), result["explanation"].tolist()
    risk, anomaly = result["risk_score"].tolist(), result["anomaly"].tolist()
    threshold, version = float(result["threshold"]), result["model_version"]
    out = []
    for k, txn in enumerate(txns):
        features = dict(zip(FEATURE_NAMES, X[k], strict=True))
        explanation = dict(zip(FEATURE_NAMES, E[k], strict=True))
        reasons = build_reasons(features, explanation,
                                {"amount": txn.amount, "merchant": txn.merchant, "country": txn.country})
        out.append({"transaction_id": txn.transaction_id, "risk_score": risk[k], "anomaly": anomaly[k],
                    "threshold": threshold, "model_version": version,
                    "feature_set_version": FEATURE_SET_VERSION, "explanation": explanation,
                    "features": features, "reasons": reasons})
    return out


def _audit_row(txn: Transaction, decision: dict[str, Any]) -> dict[str, Any]:
    """The audit columns of a decision; the caller adds `payload_hash` and `source`."""
    return {
        "transaction_id": txn.transaction_id,
        "user_id": txn.user_id, "amount": txn.amount, "merchant": txn.merchant,
        "country": txn.country, "event_time": txn.timestamp,
        "features": decision["features"], "feature_set_version": decision["feature_set_version"],
        "risk_score": decision["risk_score"], "threshold": decision["threshold"],
        "anomaly": decision["anomaly"], "explanation": decision["explanation"],
        "model_version": decision["model_version"], "reasons": decision["reasons"],
    }


def _stored_outcome(row: dict[str, Any], txn: Transaction) -> _Outcome:
    if row["payload_hash"] != payload_fingerprint(txn):
        return _Outcome(error=ConflictError(
            f"transaction_id {txn.transaction_id!r} was already recorded with another payload"))
    return _Outcome(prediction=Prediction(
        transaction_id=row["transaction_id"], risk_score=row["risk_score"], anomaly=row["anomaly"],
        threshold=row["threshold"], model_version=row["model_version"],
        feature_set_version=row["feature_set_version"], explanation=row["explanation"],
        features=row["features"], reasons=row["reasons"], dry_run=False, stored=True))


def _same_or_conflict(first: _Outcome, first_txn: Transaction, txn: Transaction) -> _Outcome:
    if payload_fingerprint(first_txn) != payload_fingerprint(txn):
        return _Outcome(error=ConflictError(
            f"transaction_id {txn.transaction_id!r} was sent twice with different payloads"))
    if first.prediction is None:
        return first
    return _Outcome(prediction=first.prediction.model_copy(update={"stored": True}))


def _project_cause(exc: BaseException) -> FraudScoringError | None:
    """The project's error a replica raised, without Ray's wrapping and traceback text."""
    cause = getattr(exc, "cause", None)  # RayTaskError keeps the replica's own exception
    if isinstance(cause, FraudScoringError):
        return cause
    if isinstance(exc, FraudScoringError) and cause is None:
        return exc
    return None


def _unexpected(exc: BaseException) -> FraudScoringError:
    """A 500 for one item, its traceback in the log under an id, no internals in the answer."""
    error_id = uuid.uuid4().hex[:12]
    log.error("unexpected error %s while scoring", error_id, exc_info=exc)
    error = FraudScoringError(f"{type(exc).__name__}: {exc}")
    error.public = f"internal error {error_id}: the service log has the details"
    return error


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    if isinstance(value, datetime):
        return value.isoformat()
    return value


@serve.deployment(ray_actor_options={"num_cpus": 0.2}, max_ongoing_requests=256,
                  health_check_period_s=10)
@serve.ingress(app)
class ScoringIngress:
    def __init__(self, features: DeploymentHandle, model: DeploymentHandle, shap: DeploymentHandle,
                 pinned_version: str | None = None) -> None:
        settings = get_settings()
        self.settings = settings
        # Handle calls over Serve's gRPC channel between replicas instead of the object
        # store: measured here, a chain of three hops took ~20 ms instead of ~29 ms.
        self.features, self.model, self.shap = (
            h.options(_by_reference=False) for h in (features, model, shap))
        self.pinned_version = pinned_version
        engine = get_engine(settings)
        self.audit = AuditRepository(engine)
        self.registry = ModelRegistry(engine)
        # Replays what a replaced replica left in its spool before serving.
        self.sink = AuditSink(self.audit, settings.spool_path, settings.audit_spool_max_rows)
        # Per-batch step times of the last batches, for GET /stats/latency.
        self.timings: deque[dict[str, float]] = deque(maxlen=2000)
        self.batcher: LoadBatcher[_Item, _Outcome] = LoadBatcher(
            self._process, DEFAULT_MAX_BATCH, DEFAULT_CONCURRENT_BATCHES)

    def reconfigure(self, config: dict[str, Any]) -> None:
        self.batcher.configure(int(config.get("max_batch_size", DEFAULT_MAX_BATCH)),
                               int(config.get("max_concurrent_batches", DEFAULT_CONCURRENT_BATCHES)))

    def __del__(self) -> None:
        sink = getattr(self, "sink", None)
        if sink is not None:
            sink.close()

    # --- scoring endpoints --------------------------------------------------

    @app.post("/predict", response_model=Prediction, dependencies=[Authorized])
    async def predict(self, txn: Transaction,
                      dry_run: Annotated[bool, Query(description="score without writing the audit or the state")] = False
                      ) -> Prediction:
        outcome = await self.batcher.submit(_Item(_with_id(txn), dry_run))
        if outcome.error is not None:
            raise outcome.error
        return outcome.prediction

    @app.post("/predict/batch", response_model=BatchResponse, dependencies=[Authorized])
    async def predict_batch(self, body: BatchRequest, dry_run: bool = False) -> BatchResponse:
        if len(body.transactions) > self.settings.max_batch_size:
            raise HTTPException(status_code=413, detail=(
                f"transactions: {len(body.transactions)} items is over the limit of "
                f"{self.settings.max_batch_size}"))
        items = [_Item(_with_id(t), dry_run) for t in body.transactions]
        outcomes = await self._process(items)
        # Each item answers on its own: one conflict does not hide the others' recorded answers.
        results: list[Prediction | ItemError] = [
            o.prediction if o.error is None else ItemError(
                index=k, transaction_id=it.txn.transaction_id, status=o.error.status_code,
                detail=o.error.public_detail())
            for k, (it, o) in enumerate(zip(items, outcomes, strict=True))]
        return BatchResponse(results=results, errors=sum(o.error is not None for o in outcomes))

    async def score_for_ingest(self, transactions: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """For the Kafka ingestion actors: records the state and returns, per transaction,
        its decision and audit row (without `payload_hash` and the Kafka columns, which
        the actor adds); writes nothing."""
        txns = [Transaction.model_validate(t) for t in transactions]
        result = await self._score([_Item(t, dry_run=False) for t in txns])
        return [decision | {"audit_row": _audit_row(txn, decision)}
                for txn, decision in zip(txns, _decisions(result, txns), strict=True)]

    # --- the pipeline -------------------------------------------------------

    async def _process(self, items: list[_Item]) -> list[_Outcome]:
        outcomes: list[_Outcome | None] = [None] * len(items)
        started = time.perf_counter()
        stored = await self._stored_answers([it for it in items if not it.dry_run])
        lookup_ms = (time.perf_counter() - started) * 1e3
        to_score: list[int] = []
        first_seen: dict[str, int] = {}
        for i, item in enumerate(items):
            tid = item.txn.transaction_id
            if not item.dry_run and tid in stored:
                outcomes[i] = _stored_outcome(stored[tid], item.txn)
            elif not item.dry_run and tid in first_seen:
                outcomes[i] = None  # the same id twice in one batch: answered below
            else:
                if not item.dry_run:
                    first_seen[tid] = i
                to_score.append(i)
        if to_score:
            await self._score_and_record(items, to_score, outcomes, lookup_ms)
        for i, item in enumerate(items):
            if outcomes[i] is None:  # duplicate id within the batch
                j = first_seen[item.txn.transaction_id]
                outcomes[i] = _same_or_conflict(outcomes[j], items[j].txn, item.txn)
        return outcomes

    async def _score_and_record(self, items: list[_Item], to_score: list[int],
                                outcomes: list[_Outcome | None], lookup_ms: float = 0.0) -> None:
        """Scores `items[to_score]` in one chain and audits them; fills their outcomes.

        When the chain fails for a reason that may lie in one item (not a 503), each
        item is scored alone, so that it answers on its own merits."""
        started = time.perf_counter()
        try:
            result = await self._score([items[i] for i in to_score])
        except Exception as exc:
            error = exc if isinstance(exc, FraudScoringError) else None
            if len(to_score) > 1 and (error is None or error.status_code < 500):
                for i in to_score:
                    await self._score_and_record(items, [i], outcomes)
                return
            error = error or _unexpected(exc)
            for i in to_score:
                outcomes[i] = _Outcome(error=error)
            return
        audit_rows = []
        decisions = _decisions(result, [items[i].txn for i in to_score])
        for i, decision in zip(to_score, decisions, strict=True):
            txn, dry_run = items[i].txn, items[i].dry_run
            # Fields built above from typed arrays: no second validation per row.
            outcomes[i] = _Outcome(prediction=Prediction.model_construct(**decision, dry_run=dry_run))
            if not dry_run:
                audit_rows.append(_audit_row(txn, decision) | {
                    "payload_hash": payload_fingerprint(txn), "source": "api"})
        chain_ms = (time.perf_counter() - started) * 1e3
        recorded = [i for i in to_score if not items[i].dry_run]
        if audit_rows:
            await self._record(audit_rows, recorded, items, outcomes)
        self.timings.append(result["timings"] | {
            "batch_size": len(to_score), "lookup_ms": lookup_ms, "chain_ms": chain_ms,
            "audit_ms": (time.perf_counter() - started) * 1e3 - chain_ms})

    async def _record(self, rows: list[dict[str, Any]], recorded: list[int], items: list[_Item],
                      outcomes: list[_Outcome | None]) -> None:
        """Audits the rows (or spools them while PostgreSQL is down). A batch that
        PostgreSQL refuses is written row by row: the row at fault answers 500, alone."""
        try:
            written = await asyncio.to_thread(self.sink.write, rows)
        except FraudScoringError as exc:  # the spool is full: 503 for each
            for i in recorded:
                outcomes[i] = _Outcome(error=exc)
            return
        except Exception as exc:
            if len(rows) == 1:
                outcomes[recorded[0]] = _Outcome(error=_unexpected(exc))
                return
            for row, i in zip(rows, recorded, strict=True):
                await self._record([row], [i], items, outcomes)
            return
        if isinstance(written, Spooled):  # PostgreSQL is down: this replica's spool judges
            for i in recorded:
                tid, mine = items[i].txn.transaction_id, outcomes[i].prediction
                if tid in written.conflicting:
                    outcomes[i] = _Outcome(error=ConflictError(
                        f"transaction_id {tid!r} was already recorded with another payload"))
                elif tid in written.repeated and mine is not None:
                    outcomes[i] = _Outcome(prediction=mine.model_copy(update={"stored": True}))
        elif written.duplicates:
            await self._settle_races(recorded, items, outcomes)

    async def _settle_races(self, recorded: list[int], items: list[_Item],
                            outcomes: list[_Outcome | None]) -> None:
        """Some ids were audited by another request between our look-up and our insert:
        the stored row is the answer (another payload under the id is a 409), so that
        what a client was told is what the audit holds."""
        try:
            rows = await asyncio.to_thread(self.audit.get_many,
                                           [items[i].txn.transaction_id for i in recorded])
        except DBAPIError as exc:
            for i in recorded:
                outcomes[i] = _Outcome(error=_unexpected(exc))
            return
        for i in recorded:
            row, mine = rows.get(items[i].txn.transaction_id), outcomes[i].prediction
            if row is None or mine is None:
                continue
            if (row["payload_hash"] != payload_fingerprint(items[i].txn) or row["risk_score"] != mine.risk_score
                    or row["features"] != mine.features or row["model_version"] != mine.model_version):
                outcomes[i] = _stored_outcome(row, items[i].txn)

    async def _score(self, items: list[_Item]) -> dict[str, Any]:
        rows = EventColumns.of([it.txn for it in items])
        record = [not it.dry_run for it in items]
        try:
            features = self.features.compute.remote(rows, record)
            scored = self.model.score.remote(features)
            return await self.shap.explain.remote(scored)
        except Exception as exc:
            cause = _project_cause(exc)
            if cause is not None:
                raise cause from None
            raise

    async def _stored_answers(self, items: list[_Item]) -> dict[str, dict[str, Any]]:
        """The audit rows of the ids already audited (empty when the database is down)."""
        ids = [it.txn.transaction_id for it in items]
        if not ids:
            return {}
        try:
            rows = await asyncio.to_thread(self.audit.get_many, ids)
        except DBAPIError:
            log.warning("audit database unavailable: resends cannot be recognised now; "
                        "the insert stays idempotent")
            return {}
        return rows

    # --- models -------------------------------------------------------------

    @app.get("/health")
    async def health(self) -> JSONResponse:
        served = await self.model.served.remote()
        model_version = served["model_version"]
        state_ready = await self.features.ready.remote()
        backlog = self.sink.backlog
        ok = model_version is not None and state_ready and backlog < self.settings.audit_spool_max_rows
        body = {
            "status": "ok" if ok else "degraded",
            "model_loaded": model_version is not None,
            "model_version": model_version,
            "online_state_ready": state_ready,
            "audit_backlog": backlog,
            "audit_backlog_limit": self.settings.audit_spool_max_rows,
        }
        if served.get("load_error"):  # a version that would not load; what is served instead
            body["model_load_error"] = served["load_error"]
        if model_version is None:
            body["detail"] = NO_MODEL_HINT
        try:  # warnings leave status and code alone: an alert flood is the team's overload, not an outage
            body["warnings"] = await asyncio.wait_for(asyncio.to_thread(
                self.audit.health_warnings, self.settings.contamination), ALERT_QUERY_TIMEOUT_S)
        except TimeoutError:
            body["warnings"] = [ALERT_RATE_UNKNOWN]
        return JSONResponse(status_code=200 if ok else 503, content=body)

    @app.get("/models", dependencies=[Authorized])
    async def models(self) -> dict[str, Any]:
        versions, history, active = await asyncio.gather(
            asyncio.to_thread(self.registry.list), asyncio.to_thread(self.registry.history),
            asyncio.to_thread(self.registry.active))
        return _jsonable({
            "active": active["version"] if active else None,
            "pinned": self.pinned_version,
            "served": (await self.model.served.remote())["model_version"],
            "versions": versions,
            "history": history,
        })

    @app.post("/models/{version}/activate", dependencies=[Authorized])
    async def activate(self, version: Annotated[str, Path(max_length=64, pattern=TRANSACTION_ID_PATTERN)],
                       request: Request) -> dict[str, Any]:
        if self.pinned_version:
            raise ConflictError(
                f"the configuration pins model {self.pinned_version}; remove `model_version` "
                f"from serve_config.yaml args to follow activations")
        row = await asyncio.to_thread(self.registry.activate, version,
                                      f"api@{request.client.host if request.client else 'unknown'}")
        return {"version": row["version"], "status": row["status"]}

    # --- read endpoints -----------------------------------------------------

    @app.get("/transactions/{transaction_id}", dependencies=[Authorized])
    async def transaction(self, transaction_id: TransactionIdPath) -> dict[str, Any]:
        row = await asyncio.to_thread(self.audit.get, transaction_id)
        if row is None:
            raise NotFoundError(f"transaction {transaction_id!r} has no stored decision")
        return _jsonable(row)

    @app.get("/audit", dependencies=[Authorized])
    async def audit_rows(
        self,
        anomalies_only: bool = False,
        user_id: Annotated[str | None, Query(min_length=1, max_length=MAX_ID_LENGTH, pattern=_NO_NUL)] = None,
        source: Literal["api", "kafka"] | None = None,
        since: TimeBound = None,
        until: TimeBound = None,
        limit: Limit = 50,
        offset: Offset = 0,
    ) -> dict[str, Any]:
        flt = AuditFilter(anomalies_only=anomalies_only, user_id=user_id, source=source, since=since, until=until)
        items, total = await asyncio.to_thread(self.audit.query, flt, limit, offset)
        return _jsonable({"items": items, "total": total, "limit": limit, "offset": offset})

    @app.get("/dead-letters", dependencies=[Authorized])
    async def dead_letters(self, limit: Limit = 50, offset: Offset = 0,
                           reason: Annotated[str | None, Query(
                               min_length=1, max_length=200, pattern=_NO_NUL,
                               description="part of the reason, matched literally")] = None) -> dict[str, Any]:
        items, total = await asyncio.to_thread(self.audit.dead_letters, limit, offset, reason)
        return _jsonable({"items": items, "total": total, "limit": limit, "offset": offset})

    @app.get("/stats", dependencies=[Authorized])
    async def stats(self, since: TimeBound = None, until: TimeBound = None) -> dict[str, Any]:
        stats = await asyncio.to_thread(self.audit.stats, AuditFilter(since=since, until=until),
                                        contamination=self.settings.contamination)
        served = await self.model.served.remote()
        return _jsonable(stats | served)

    @app.get("/stats/latency", dependencies=[Authorized])
    async def latency(self) -> dict[str, Any]:
        """Step times of recent batches: p50/p99 per step (ms: `lookup_ms` the audit
        look-up of resent ids, `chain_ms` the features -> model -> SHAP chain, of
        which each step's own time, `audit_ms` the audit write), the mean batch
        size, and the batching limits in force (`user_config`)."""
        rows = list(self.timings)
        limits = {"max_batch_size": self.batcher.max_batch_size,
                  "max_concurrent_batches": self.batcher.max_concurrent_batches}
        if not rows:
            return {"batches": 0, "limits": limits}
        out: dict[str, Any] = {"batches": len(rows), "limits": limits,
                               "mean_batch_size": float(np.mean([r["batch_size"] for r in rows]))}
        for key in ("lookup_ms", "features_ms", "model_ms", "shap_ms", "chain_ms", "audit_ms"):
            values = np.array([r.get(key, 0.0) for r in rows])
            out[key] = {"p50": float(np.percentile(values, 50)), "p99": float(np.percentile(values, 99))}
        return out

    @app.get("/users/recent", dependencies=[Authorized])
    async def recent_users(self, limit: Annotated[int, Query(ge=1, le=200)] = 20) -> dict[str, Any]:
        return {"users": await asyncio.to_thread(self.audit.recent_users, limit)}
