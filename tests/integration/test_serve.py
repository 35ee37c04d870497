"""The scoring application over HTTP on a real Serve instance, real PostgreSQL and state actors."""

from __future__ import annotations

import threading
import time
import uuid
from datetime import UTC, datetime, timedelta

import httpx
import numpy as np
import pandas as pd
import pytest
from sqlalchemy import text

from features.definitions import FEATURE_NAMES
from features.transforms import compute_features


def _txn(user: str | None = None, **overrides) -> dict:
    body = {
        "user_id": user or f"user-{uuid.uuid4().hex[:8]}",
        "amount": 42.5,
        "merchant": f"shop-{uuid.uuid4().hex[:6]}",
        "country": "DE",
        "timestamp": (datetime.now(UTC) - timedelta(minutes=5)).isoformat(),
    }
    return body | overrides


@pytest.fixture
def api(live_app):
    with httpx.Client(base_url=live_app["api_url"], headers=live_app["headers"], timeout=60) as client:
        yield client


def test_predict_answers_the_contract(api):
    r = api.post("/predict", json=_txn())
    assert r.status_code == 200, r.text
    body = r.json()
    assert 0 < body["risk_score"] <= 1
    assert body["anomaly"] == (body["risk_score"] > body["threshold"])
    assert list(body["explanation"]) == list(FEATURE_NAMES) == list(body["features"])
    assert body["model_version"] and body["reasons"] and uuid.UUID(body["transaction_id"])
    stored = api.get(f"/transactions/{body['transaction_id']}").json()
    assert stored["risk_score"] == body["risk_score"] and stored["source"] == "api"
    assert stored["explanation"] == body["explanation"]


def test_dry_run_writes_neither_audit_nor_state(api):
    user = f"dry-{uuid.uuid4().hex[:8]}"
    t0 = datetime.now(UTC) - timedelta(minutes=30)
    first = api.post("/predict", json=_txn(user, timestamp=t0.isoformat(),
                                           transaction_id=f"dry-a-{user}"), params={"dry_run": "true"}).json()
    assert first["dry_run"] is True
    assert api.get(f"/transactions/{first['transaction_id']}").status_code == 404
    later = _txn(user, timestamp=(t0 + timedelta(minutes=1)).isoformat())
    # Nothing was recorded: the next transaction still sees an empty history.
    second = api.post("/predict", json=later, params={"dry_run": "true"}).json()
    assert second["features"]["velocity_1h"] == 0
    api.post("/predict", json=_txn(user, timestamp=t0.isoformat()))
    third = api.post("/predict", json=later, params={"dry_run": "true"}).json()
    assert third["features"]["velocity_1h"] == 1


def test_resend_gets_stored_answer_and_other_payload_conflicts(api, engine):
    body = _txn(transaction_id=f"client-{uuid.uuid4()}")
    first = api.post("/predict", json=body).json()
    again = api.post("/predict", json=body)
    assert again.status_code == 200 and again.json()["stored"] is True
    assert again.json()["risk_score"] == first["risk_score"]
    conflict = api.post("/predict", json=body | {"amount": 43.0})
    assert conflict.status_code == 409 and "another payload" in conflict.json()["detail"]
    with engine.connect() as conn:
        n = conn.execute(text("SELECT count(*) FROM audit_decisions WHERE transaction_id = :t"),
                         {"t": body["transaction_id"]}).scalar_one()
    assert n == 1


@pytest.mark.parametrize(("field", "value"), [
    ("amount", -3), ("amount", "NaN"), ("country", "Germany"), ("timestamp", "yesterday"),
    ("user_id", ""), ("timestamp", (datetime.now(UTC) + timedelta(days=2)).isoformat()),
])
def test_invalid_fields_get_422_naming_the_field(api, field, value):
    r = api.post("/predict", json=_txn(**{field: value}))
    assert r.status_code == 422, r.text
    assert any(field in err["loc"] for err in r.json()["detail"])


def test_malformed_json_oversized_body_and_auth(api, live_app):
    bad = api.post("/predict", content=b"{not json", headers={"content-type": "application/json"})
    assert bad.status_code == 422
    huge = api.post("/predict", content=b"x" * 2_000_000, headers={"content-type": "application/json"})
    assert huge.status_code == 413 and "limit" in huge.json()["detail"]
    open_client = httpx.Client(base_url=live_app["api_url"], timeout=30)
    assert open_client.post("/predict", json=_txn()).status_code == 401
    assert open_client.get("/audit").status_code == 401
    assert open_client.get("/transactions/x").status_code == 401
    assert open_client.get("/health").status_code == 200
    assert open_client.get("/docs").status_code == 200
    assert "/predict" in open_client.get("/openapi.json").json()["paths"]


def test_batch_endpoint_and_limit(api):
    r = api.post("/predict/batch", json={"transactions": [_txn() for _ in range(5)]})
    assert r.status_code == 200 and len(r.json()["results"]) == 5
    too_many = api.post("/predict/batch", json={"transactions": [_txn() for _ in range(300)]})
    assert too_many.status_code == 413 and "transactions" in too_many.json()["detail"]


def test_stored_features_equal_offline_recomputation(api, engine):
    """Parity of the Serve path: what the audit stores is what the offline pipeline computes."""
    rng = np.random.default_rng(3)
    tag = uuid.uuid4().hex[:6]
    start = datetime.now(UTC) - timedelta(days=20)
    rows = []
    for i in range(400):
        rows.append({
            "transaction_id": f"par-{tag}-{i:04d}",
            "user_id": f"par-{tag}-u{rng.integers(0, 25)}",
            "amount": round(float(rng.lognormal(3, 1)) + 0.01, 2),
            "merchant": f"par-{tag}-m{rng.integers(0, 12)}",
            "country": str(rng.choice(["DE", "FR", "PL"])),
            "timestamp": (start + timedelta(minutes=int(rng.integers(0, 60 * 24 * 19)))).isoformat(),
        })
    rows.sort(key=lambda r: (r["timestamp"], r["transaction_id"]))
    for chunk in range(0, len(rows), 100):
        r = api.post("/predict/batch", json={"transactions": rows[chunk:chunk + 100]})
        assert r.status_code == 200, r.text
    offline = compute_features(pd.DataFrame(rows)).set_index("transaction_id")
    with engine.connect() as conn:
        stored = dict(conn.execute(text(
            "SELECT transaction_id, features FROM audit_decisions WHERE transaction_id LIKE :p"),
            {"p": f"par-{tag}-%"}).tuples().all())
    assert len(stored) == len(rows)
    for tid, features in stored.items():
        assert [features[f] for f in FEATURE_NAMES] == offline.loc[tid, list(FEATURE_NAMES)].tolist(), tid


def test_read_endpoints(api):
    user = f"reader-{uuid.uuid4().hex[:6]}"
    for _ in range(3):
        api.post("/predict", json=_txn(user))
    page = api.get("/audit", params={"user_id": user, "limit": 2}).json()
    assert page["total"] == 3 and len(page["items"]) == 2
    assert api.get("/audit", params={"user_id": user, "source": "kafka"}).json()["total"] == 0
    stats = api.get("/stats").json()
    assert stats["total"] >= 3 and len(stats["score_histogram"]["counts"]) == 20
    assert stats["threshold"] is not None
    models = api.get("/models").json()
    assert models["active"] == models["served"] and models["versions"]
    assert "items" in api.get("/dead-letters").json()
    assert user in api.get("/users/recent").json()["users"]
    assert api.get("/stats/latency").json()["batches"] >= 1
    assert api.get("/transactions/does-not-exist").status_code == 404


def test_activation_switches_model_without_failed_requests(api, live_app, servers):
    from configs.settings import get_settings
    from jobs.simulate import simulate
    from jobs.train import fit_and_register

    before = api.get("/models").json()["served"]
    history = simulate(users=60, days=10, seed=11)
    new = fit_and_register(history, settings=get_settings(), n_estimators=50, seed=5, source="test")
    failures, done = [], threading.Event()

    def hammer() -> None:
        with httpx.Client(base_url=live_app["api_url"], headers=live_app["headers"], timeout=60) as c:
            while not done.is_set():
                r = c.post("/predict", json=_txn(), params={"dry_run": "true"})
                if r.status_code != 200:
                    failures.append(r.status_code)

    workers = [threading.Thread(target=hammer) for _ in range(4)]
    for w in workers:
        w.start()
    try:
        time.sleep(1)
        assert api.post(f"/models/{new['version']}/activate").status_code == 200
        deadline = time.monotonic() + 30
        while api.get("/models").json()["served"] != new["version"] and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(1)
    finally:
        done.set()
        for w in workers:
            w.join()
    assert failures == []
    after = api.post("/predict", json=_txn(), params={"dry_run": "true"}).json()
    assert after["model_version"] == new["version"] != before
    api.post(f"/models/{before}/activate")  # leave the session's model as it was


def test_user_config_applies_live_through_reconfigure(api):
    """What Serve does with serve_config.yaml's `user_config`: call `reconfigure` on
    the running replicas (here through their handles, on the live application)."""
    from ray import serve

    from deployments.app import APP_NAME

    model_step = serve.get_deployment_handle("ModelStep", APP_NAME)
    ingress = serve.get_deployment_handle("ScoringIngress", APP_NAME)
    # an earlier test may just have activated another version: wait until it is served
    deadline = time.monotonic() + 30
    while (models := api.get("/models").json())["served"] != models["active"] and time.monotonic() < deadline:
        time.sleep(0.2)
    served = models["served"]
    base = api.post("/predict", json=_txn(), params={"dry_run": "true"}).json()
    assert base["model_version"] == served
    try:
        # an override for the served version: every score is above 0.0
        model_step.reconfigure.remote({"threshold_override": {"model_version": served, "threshold": 0.0}}).result()
        hit = api.post("/predict", json=_txn(), params={"dry_run": "true"}).json()
        assert hit["model_version"] == served and hit["threshold"] == 0.0 and hit["anomaly"] is True
        # an override for another version is ignored: the model's own threshold stays
        model_step.reconfigure.remote({"threshold_override": {"model_version": "v-other", "threshold": 0.0}}).result()
        other = api.post("/predict", json=_txn(), params={"dry_run": "true"}).json()
        assert other["model_version"] == served and other["threshold"] == base["threshold"] != 0.0
        assert other["anomaly"] == (other["risk_score"] > other["threshold"])

        ingress.reconfigure.remote({"max_batch_size": 3, "max_concurrent_batches": 1}).result()
        assert api.get("/stats/latency").json()["limits"] == {"max_batch_size": 3, "max_concurrent_batches": 1}
        with pytest.raises(ValueError, match="max_batch_size and max_concurrent_batches must be at least 1"):
            ingress.reconfigure.remote({"max_batch_size": 0}).result()
        assert api.get("/stats/latency").json()["limits"]["max_batch_size"] == 3  # a bad config changes nothing
    finally:
        model_step.reconfigure.remote({"threshold_override": None}).result()
        ingress.reconfigure.remote({"max_batch_size": 64, "max_concurrent_batches": 2}).result()
    assert api.post("/predict", json=_txn(), params={"dry_run": "true"}).json()["threshold"] == base["threshold"]
