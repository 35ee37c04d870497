"""PostgreSQL down and a replica killed while /predict records: nothing lost, nothing doubled."""

from __future__ import annotations

import time
import uuid
from datetime import UTC, datetime, timedelta

import httpx
import pytest
import ray
from sqlalchemy import text

from cluster.dev import ensure_servers, stop_servers


def _ingress_replicas() -> list[str]:
    return [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
            if "ScoringIngress" in a["name"]]


@pytest.mark.slow
def test_audit_survives_postgres_outage_and_replica_kill(live_app, engine):
    api = httpx.Client(base_url=live_app["api_url"], headers=live_app["headers"], timeout=60)
    tag = uuid.uuid4().hex[:8]
    now = datetime.now(UTC) - timedelta(minutes=10)
    bodies = [{"transaction_id": f"out-{tag}-{i}", "user_id": f"out-{tag}-{i % 7}", "amount": 10.0 + i,
               "merchant": "m-out", "country": "FR", "timestamp": (now + timedelta(seconds=i)).isoformat()}
              for i in range(40)]
    stop_servers(only="postgres")
    try:
        for body in bodies[:30]:
            r = api.post("/predict", json=body)
            assert r.status_code == 200, r.text  # scoring goes on without the database
        health = api.get("/health").json()
        assert health["audit_backlog"] >= 30
        # One id, one payload while the database is down too: the spool judges.
        other = api.post("/predict", json=bodies[0] | {"amount": 999.0})
        assert other.status_code == 409, other.text
        again = api.post("/predict", json=bodies[0])
        assert again.status_code == 200 and again.json()["stored"] is True, again.text

        # Kill the replica holding the spool; its replacement claims the spool file.
        name = _ingress_replicas()[0]
        ray.kill(ray.get_actor(name, namespace="serve"), no_restart=True)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if api.get("/health").json().get("audit_backlog", 0) >= 30:
                    break
            except (httpx.HTTPError, ValueError):
                pass
            time.sleep(0.5)
        for body in bodies[30:]:
            assert api.post("/predict", json=body).status_code == 200
    finally:
        ensure_servers()

    deadline = time.monotonic() + 60
    count = -1
    while time.monotonic() < deadline:
        with engine.connect() as conn:
            count = conn.execute(text("SELECT count(*) FROM audit_decisions WHERE transaction_id LIKE :p"),
                                 {"p": f"out-{tag}-%"}).scalar_one()
        if count == len(bodies) and api.get("/health").json()["audit_backlog"] == 0:
            break
        time.sleep(0.5)
    assert count == len(bodies)
    # Resending everything afterwards adds nothing.
    for body in bodies:
        assert api.post("/predict", json=body).json()["stored"] is True
