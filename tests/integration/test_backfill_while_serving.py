"""A backfill on the same Ray instance that is serving /predict: neither starves the other.

The session's Ray starts with an explicit logical CPU count (4, see tests/conftest.py):
the Serve replicas ask for fractions of a CPU, the backfill's actors for 0.5 each.
"""

from __future__ import annotations

import threading
import uuid
from datetime import UTC, datetime, timedelta

import httpx
import pyarrow.parquet as pq
import pytest

from jobs import backfill
from jobs.simulate import simulate, write

pytestmark = pytest.mark.slow


def test_backfill_runs_while_the_app_serves(live_app, tmp_path):
    history = tmp_path / "history.parquet"
    frame = simulate(users=80, days=10, seed=31)
    write(frame, history)
    output = tmp_path / "scored.parquet"
    statuses: list[int] = []
    done = threading.Event()

    def serve_traffic() -> None:
        with httpx.Client(base_url=live_app["api_url"], headers=live_app["headers"], timeout=60) as client:
            while not done.is_set():
                body = {"user_id": f"bf-{uuid.uuid4().hex[:6]}", "amount": 20.0, "merchant": "bf-shop",
                        "country": "NL", "timestamp": (datetime.now(UTC) - timedelta(seconds=5)).isoformat()}
                statuses.append(client.post("/predict", json=body, params={"dry_run": "true"}).status_code)

    traffic = threading.Thread(target=serve_traffic)
    traffic.start()
    try:
        code = backfill.main(["--input", str(history), "--output", str(output), "--actors", "2"])
    finally:
        done.set()
        traffic.join()
    assert code == 0
    assert pq.read_table(output).num_rows == len(frame)
    assert statuses and set(statuses) == {200}
