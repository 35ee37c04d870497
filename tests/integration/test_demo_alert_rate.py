"""The alert rate a new user meets out of the box, on the real system (issue #23 item 6).

`live_app` is what `serve run serve_config.yaml` starts on a fresh machine: the
bootstrap model trained on data/sample_transactions.csv and the online state
warmed with it. `python -m cluster.producer` with its defaults (only the count
and, to keep this test's rows apart, the topic are given) then sends simulated
traffic through Kafka and the ingestion actors into the audit. Before the fix
it simulated strangers: every first purchase of a user the state did not know
was an alert, 16-19% of the traffic.
"""

from __future__ import annotations

import time
import uuid
from datetime import UTC, datetime

import httpx
from sqlalchemy import text

from cluster.ingest import start_ingestion, stop_ingestion
from cluster.store.audit import (
    ALERT_BUDGET_PER_CONTAMINATION,
    ALERT_WARNING_PER_BUDGET,
    AuditRepository,
)
from configs.settings import get_settings, load_settings

COUNT = 3_000
DEADLINE_S = 300


def _audited(engine, topic: str) -> tuple[int, int]:
    with engine.connect() as conn:
        return tuple(conn.execute(text(
            "SELECT count(*), count(*) FILTER (WHERE anomaly) FROM audit_decisions WHERE kafka_topic = :t"),
            {"t": topic}).one())


def test_out_of_the_box_alert_rate_is_within_twice_the_contamination(live_app, engine, unique_name):
    from cluster import producer
    from deployments.app import APP_NAME

    settings = load_settings(kafka_topic=unique_name, kafka_dead_letter_topic=f"{unique_name}-dlq",
                             kafka_alerts_topic=f"{unique_name}-alerts", kafka_consumer_group=unique_name)
    ingestion = start_ingestion(settings, APP_NAME, 2)
    try:
        assert producer.main(["--count", str(COUNT), "--topic", unique_name]) == 0
        deadline = time.monotonic() + DEADLINE_S
        while _audited(engine, unique_name)[0] < COUNT and time.monotonic() < deadline:
            time.sleep(1)
    finally:
        stop_ingestion(ingestion)
    audited, anomalies = _audited(engine, unique_name)
    assert audited == COUNT
    contamination = get_settings().contamination
    assert anomalies / audited <= 2 * contamination, f"{anomalies} of {audited} transactions flagged"

    stats = httpx.get(live_app["api_url"] + "/stats", headers=live_app["headers"], timeout=30).json()
    last_hour = stats["last_hour"]
    assert last_hour["scored"] >= COUNT
    assert last_hour["budget"] == ALERT_BUDGET_PER_CONTAMINATION * contamination


def _flood(n: int, prefix: str) -> list[dict]:
    return [{
        "transaction_id": f"{prefix}{i:05d}", "payload_hash": "h" * 64, "reasons": ["flood"],
        "source": "api", "kafka_topic": None, "kafka_partition": None, "kafka_offset": None,
        "user_id": "flood", "amount": 9_999.0, "merchant": "m-flood", "country": "BR",
        "event_time": datetime.now(UTC), "features": {"amount_log": 9.2}, "feature_set_version": "fs-test",
        "risk_score": 0.9, "threshold": 0.6, "anomaly": True, "explanation": {"amount_log": 0.3},
        "model_version": "flood",
    } for i in range(n)]


def test_an_alert_flood_is_a_health_warning_not_an_outage(live_app, engine):
    """Above 2x the budget over the last hour: a warning in /health, same status and code;
    decisions scored longer than an hour ago no longer count."""
    api, headers = live_app["api_url"], live_app["headers"]
    before = httpx.get(api + "/health", timeout=30)
    load = httpx.get(api + "/stats", headers=headers, timeout=30).json()["last_hour"]
    warned_before = [w for w in before.json()["warnings"] if "alert rate" in w]
    # Enough anomalies to lift the last hour's rate well above the warning line.
    line = ALERT_WARNING_PER_BUDGET * ALERT_BUDGET_PER_CONTAMINATION * get_settings().contamination
    n = int((line * load["scored"] - load["anomalies"]) / (1 - line)) + 200
    prefix = f"flood-{uuid.uuid4().hex[:8]}-"
    repo = AuditRepository(engine)
    try:
        assert repo.write_decisions(_flood(n, prefix)).inserted == n
        flooded = httpx.get(api + "/health", timeout=30)
        assert flooded.status_code == before.status_code
        assert flooded.json()["status"] == before.json()["status"]
        [warning] = [w for w in flooded.json()["warnings"] if "alert rate" in w]
        assert "over the last hour" in warning and "alert budget" in warning
        with engine.begin() as conn:
            conn.execute(text("UPDATE audit_decisions SET scored_at = now() - interval '2 hours' "
                              "WHERE transaction_id LIKE :p"), {"p": prefix + "%"})
        after = httpx.get(api + "/stats", headers=headers, timeout=30).json()["last_hour"]
        assert (after["scored"], after["anomalies"]) == (load["scored"], load["anomalies"])
        warnings = httpx.get(api + "/health", timeout=30).json()["warnings"]
        assert [w for w in warnings if "alert rate" in w] == warned_before
    finally:
        with engine.begin() as conn:
            conn.execute(text("DELETE FROM audit_decisions WHERE transaction_id LIKE :p"), {"p": prefix + "%"})
