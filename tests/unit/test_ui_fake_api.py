"""A hand-written fake of the scoring application's HTTP API, for the UI tests.

It implements the contract the UI codes against (routes, shapes, status codes
and `{"detail": ...}` errors) with deterministic in-memory answers, so the UI
can be tested without Ray, PostgreSQL or a model. `FakeScoringApi.serve()`
runs it with uvicorn in a thread on a free 127.0.0.1 port; `python
tests/unit/test_ui_fake_api.py --port N` runs it alone (the browser test does).

The few tests at the bottom check the fake itself against the contract.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from typing import Annotated, Any, Literal

import uvicorn
from fastapi import FastAPI, Header, HTTPException, Query
from pydantic import BaseModel, Field

from cluster.store.audit import ALERT_WINDOW, alert_load
from tests.ports import free_port

THRESHOLD = 0.6
CONTAMINATION = 0.02
NO_MODEL_DETAIL = ("No active model: train one with `ray job submit -- python -m jobs.train`, "
                   "then activate it.")
FEATURES = ("amount_log", "amount_to_user_median", "is_new_merchant", "is_foreign_country",
            "hour_of_day")
# The auth header, at module level so that FastAPI resolves the annotation.
Key = Annotated[str | None, Header(alias="X-API-Key")]


class TransactionIn(BaseModel):
    user_id: str = Field(min_length=1, max_length=64)
    amount: float = Field(gt=0, le=1_000_000)
    merchant: str = Field(min_length=1, max_length=64)
    country: str = Field(pattern=r"^[A-Z]{2}$")
    timestamp: datetime
    transaction_id: str | None = Field(default=None, min_length=1, max_length=64)


def fake_prediction(tx: TransactionIn) -> dict[str, Any]:
    """Deterministic features, explanation and score of one transaction."""
    amount_log = math.log1p(tx.amount)
    features = {
        "amount_log": amount_log,
        "amount_to_user_median": tx.amount / 50.0,
        "is_new_merchant": float(not tx.merchant.startswith("m0")),
        "is_foreign_country": float(tx.country not in ("FR", "DE")),
        "hour_of_day": float(tx.timestamp.hour),
    }
    explanation = {
        "amount_log": 0.08 * (amount_log - 4.0),
        "amount_to_user_median": 0.05 * (features["amount_to_user_median"] - 1.0),
        "is_new_merchant": 0.12 * features["is_new_merchant"] - 0.02,
        "is_foreign_country": 0.15 * features["is_foreign_country"] - 0.03,
        "hour_of_day": -0.01 if 7 <= tx.timestamp.hour <= 22 else 0.04,
    }
    raw = sum(explanation.values())
    score = 1.0 / (1.0 + math.exp(-4.0 * raw))
    reasons = [f"{name} pushes towards anomaly" for name, value in
               sorted(explanation.items(), key=lambda kv: -kv[1]) if value > 0][:3]
    return {"risk_score": score, "anomaly": score > THRESHOLD, "features": features,
            "explanation": explanation, "reasons": reasons}


class FakeScoringApi:
    """The contract in memory. Flip `model_loaded` or set `api_key` to test errors."""

    def __init__(self, api_key: str | None = None, model_loaded: bool = True, seed_rows: int = 12):
        self.api_key = api_key
        self.model_loaded = model_loaded
        self.active: str | None = "v2"
        self.pinned: str | None = None
        self.history: list[dict[str, Any]] = []
        self.decisions: dict[str, dict[str, Any]] = {}
        self.payloads: dict[str, dict[str, Any]] = {}
        self.dead_letters = [
            {"id": 1, "payload": '{"user_id": "u1", "amount": "lots"}',
             "reason": "amount: Input should be a valid number", "source": "kafka",
             "position": "financial-transactions[0]@17", "created_at": "2025-01-01T10:00:00+00:00",
             "replayed_at": None},
            {"id": 2, "payload": "not json at all", "reason": "not valid JSON", "source": "kafka",
             "position": "financial-transactions[1]@3", "created_at": "2025-01-01T10:05:00+00:00",
             "replayed_at": None},
        ]
        now = datetime.now(timezone.utc).replace(microsecond=0)
        for i in range(seed_rows):
            tx = TransactionIn(user_id=f"u{i % 4:06d}", amount=3000.0 if i % 5 == 0 else 10.0 + 8 * i,
                               merchant=f"m{i % 3:05d}" if i % 5 else "zz-new",
                               country="FR" if i % 4 else "BR",
                               timestamp=now - timedelta(minutes=7 * i),
                               transaction_id=f"seed-{i:03d}")
            self._store(tx, "api" if i % 2 else "kafka")
        self.app = self._build_app()

    def _store(self, tx: TransactionIn, source: str) -> dict[str, Any]:
        answer = fake_prediction(tx)
        row = {"transaction_id": tx.transaction_id, "user_id": tx.user_id, "amount": tx.amount,
               "merchant": tx.merchant, "country": tx.country,
               "event_time": tx.timestamp.isoformat(), "features": answer["features"],
               "explanation": answer["explanation"], "risk_score": answer["risk_score"],
               "threshold": THRESHOLD, "anomaly": answer["anomaly"], "model_version": self.active,
               "reasons": answer["reasons"], "source": source,
               "kafka_topic": "financial-transactions" if source == "kafka" else None,
               "kafka_partition": 0 if source == "kafka" else None,
               "kafka_offset": len(self.decisions) if source == "kafka" else None,
               "scored_at": tx.timestamp.isoformat()}
        self.decisions[tx.transaction_id] = row
        self.payloads[tx.transaction_id] = tx.model_dump(mode="json")
        return row

    def last_hour(self) -> dict[str, Any]:
        """The alert load of the decisions scored in the last hour, as the API computes it."""
        since = datetime.now(timezone.utc) - ALERT_WINDOW
        recent = [r for r in self.decisions.values() if datetime.fromisoformat(r["scored_at"]) > since]
        return alert_load(len(recent), sum(r["anomaly"] for r in recent), CONTAMINATION)

    def flood(self, n: int) -> None:
        """Stores `n` anomalies scored now: an alert rate far above the budget."""
        for i in range(n):
            tx = TransactionIn(user_id=f"u{i:06d}", amount=9_000.0, merchant="zz-new", country="BR",
                               timestamp=datetime.now(timezone.utc),
                               transaction_id=f"flood-{i:04d}")
            self._store(tx, "kafka")["scored_at"] = datetime.now(timezone.utc).isoformat()

    def _build_app(self) -> FastAPI:
        app = FastAPI()

        def check_key(key: str | None) -> None:
            if self.api_key and key != self.api_key:
                raise HTTPException(401, "missing or wrong X-API-Key")

        @app.get("/health")
        def health() -> dict[str, Any]:
            warning = self.last_hour()["warning"]
            return {"status": "ok" if self.model_loaded else "degraded",
                    "model_loaded": self.model_loaded,
                    "model_version": self.active if self.model_loaded else None,
                    "online_state_ready": True, "audit_backlog": 0,
                    "warnings": [warning] if warning else []}

        @app.post("/predict")
        def predict(tx: TransactionIn, key: Key = None, dry_run: bool = True) -> dict[str, Any]:
            check_key(key)
            if not self.model_loaded or self.active is None:
                raise HTTPException(503, NO_MODEL_DETAIL)
            tx = tx.model_copy(update={"transaction_id": tx.transaction_id or uuid.uuid4().hex})
            if not dry_run:
                old = self.payloads.get(tx.transaction_id)
                if old is not None and old != tx.model_dump(mode="json"):
                    raise HTTPException(409, f"transaction {tx.transaction_id} already stored "
                                             "with another payload")
                self._store(tx, "api")
            answer = fake_prediction(tx)
            return {"transaction_id": tx.transaction_id, "threshold": THRESHOLD,
                    "model_version": self.active, "feature_set_version": "fs-test",
                    "dry_run": dry_run, **answer}

        @app.get("/transactions/{transaction_id}")
        def transaction(transaction_id: str, key: Key = None) -> dict[str, Any]:
            check_key(key)
            if transaction_id not in self.decisions:
                raise HTTPException(404, f"no decision stored for transaction {transaction_id}")
            return self.decisions[transaction_id]

        @app.get("/audit")
        def audit(key: Key = None, anomalies_only: bool = False, user_id: str | None = None,
                  source: Literal["api", "kafka"] | None = None, since: datetime | None = None,
                  until: datetime | None = None, limit: Annotated[int, Query(ge=1, le=500)] = 50,
                  offset: Annotated[int, Query(ge=0)] = 0) -> dict[str, Any]:
            check_key(key)
            rows = sorted(self.decisions.values(), key=lambda r: r["scored_at"], reverse=True)
            rows = [r for r in rows if (not anomalies_only or r["anomaly"])
                    and (not user_id or r["user_id"] == user_id)
                    and (not source or r["source"] == source)
                    and (since is None or datetime.fromisoformat(r["scored_at"]) >= since)
                    and (until is None or datetime.fromisoformat(r["scored_at"]) < until)]
            return {"items": rows[offset:offset + limit], "total": len(rows), "limit": limit,
                    "offset": offset}

        @app.get("/dead-letters")
        def dead_letters(key: Key = None, limit: int = 50, offset: int = 0,
                         reason: str | None = None) -> dict[str, Any]:
            check_key(key)
            items = [d for d in self.dead_letters if not reason or reason in d["reason"]]
            return {"items": items[offset:offset + limit], "total": len(items)}

        @app.get("/stats")
        def stats(key: Key = None) -> dict[str, Any]:
            check_key(key)
            rows = list(self.decisions.values())
            counts = [0] * 20
            per_hour: dict[tuple[str, str], int] = {}
            for r in rows:
                counts[min(int(r["risk_score"] * 20), 19)] += 1
                hour = r["scored_at"][:13] + ":00:00+00:00"
                per_hour[(r["source"], hour)] = per_hour.get((r["source"], hour), 0) + 1
            anomalies = sum(r["anomaly"] for r in rows)
            return {"total": len(rows), "anomalies": anomalies,
                    "alert_rate": anomalies / len(rows) if rows else 0.0,
                    "per_source": {s: sum(r["source"] == s for r in rows) for s in ("api", "kafka")},
                    "per_source_hour": [{"source": s, "hour": h, "count": n}
                                        for (s, h), n in sorted(per_hour.items())],
                    "score_histogram": {"edges": [i / 20 for i in range(21)], "counts": counts},
                    "threshold": THRESHOLD, "last_hour": self.last_hour()}

        @app.get("/users/recent")
        def users(key: Key = None) -> dict[str, Any]:
            check_key(key)
            return {"users": sorted({r["user_id"] for r in self.decisions.values()})}

        @app.get("/models")
        def models(key: Key = None) -> dict[str, Any]:
            check_key(key)
            return {"active": self.active, "pinned": self.pinned, "history": self.history,
                    "versions": [
                        {"version": v, "created_at": "2025-01-0%dT00:00:00+00:00" % (i + 1),
                         "status": "active" if v == self.active else "registered",
                         "metrics": {"auc": 0.9 + i / 100, "alert_rate": 0.02},
                         "parameters": {"n_estimators": 100}, "feature_set_version": "fs-test"}
                        for i, v in enumerate(("v1", "v2"))]}

        @app.post("/models/{version}/activate")
        def activate(version: str, key: Key = None) -> dict[str, Any]:
            check_key(key)
            if version not in ("v1", "v2"):
                raise HTTPException(404, f"unknown model version {version}")
            if self.pinned:
                raise HTTPException(409, f"the configuration pins version {self.pinned}")
            self.history.append({"version": version, "previous_version": self.active,
                                 "activated_by": "ui", "activated_at": "2025-01-03T00:00:00+00:00"})
            self.active = version
            return {"version": version, "status": "active"}

        return app

    @contextlib.contextmanager
    def serve(self) -> Iterator[str]:
        """Run in a uvicorn thread on a free port; yields the base URL; stops on exit."""
        port = free_port()
        server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=port,
                                               log_level="warning", lifespan="off"))
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        deadline = time.monotonic() + 20
        while not server.started:
            if time.monotonic() > deadline or not thread.is_alive():
                raise RuntimeError("the fake scoring API did not start")
            time.sleep(0.02)
        try:
            yield f"http://127.0.0.1:{port}"
        finally:
            server.should_exit = True
            thread.join(timeout=10)


# --- checks of the fake itself ---------------------------------------------------


def test_fake_prediction_is_deterministic_and_in_range():
    tx = TransactionIn(user_id="u1", amount=10_000, merchant="new", country="BR",
                       timestamp="2025-01-01T03:00:00Z")
    first, second = fake_prediction(tx), fake_prediction(tx)
    assert first == second
    assert 0 < first["risk_score"] <= 1 and first["anomaly"]
    assert set(first["explanation"]) == set(FEATURES)


def test_fake_seeds_both_sources():
    api = FakeScoringApi()
    assert {r["source"] for r in api.decisions.values()} == {"api", "kafka"}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Run the fake scoring API alone.")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--no-model", action="store_true")
    args = parser.parse_args()
    uvicorn.run(FakeScoringApi(model_loaded=not args.no_model).app, host="127.0.0.1",
                port=args.port, log_level="warning")
