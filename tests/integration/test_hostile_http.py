"""The API tried as a hostile client would (issue #22): every request answers on its
own merits, with a 4xx naming the problem, never a 500; what a client is told is
what the audit holds."""

from __future__ import annotations

import random
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta

import httpx
import pytest

ORIGINAL_EXAMPLE = {"user_id": 101, "amount": 98000, "merchant": "CryptoX", "country": "SG",
                    "timestamp": "2024-11-21T10:16:30"}


def _txn(**overrides) -> dict:
    body = {"user_id": f"user-{uuid.uuid4().hex[:8]}", "amount": 42.5,
            "merchant": f"shop-{uuid.uuid4().hex[:6]}", "country": "DE",
            "timestamp": (datetime.now(UTC) - timedelta(minutes=5)).isoformat()}
    return body | overrides


@pytest.fixture
def api(live_app):
    with httpx.Client(base_url=live_app["api_url"], headers=live_app["headers"], timeout=60) as client:
        yield client


def _post_all(api: httpx.Client, bodies: list[dict], path: str = "/predict") -> list[httpx.Response]:
    with ThreadPoolExecutor(len(bodies)) as pool:
        return list(pool.map(lambda b: api.post(path, json=b), bodies))


def test_the_original_apis_example_request_is_scored_and_audited(api):
    r = api.post("/predict", json=ORIGINAL_EXAMPLE)
    assert r.status_code == 200, r.text
    stored = api.get(f"/transactions/{r.json()['transaction_id']}").json()
    assert stored["user_id"] == "101" and stored["risk_score"] == r.json()["risk_score"]


def test_an_integer_user_id_and_its_text_are_one_user(api):
    user = random.randrange(10**12, 10**13)
    t0 = datetime.now(UTC) - timedelta(minutes=10)
    first = api.post("/predict", json=_txn(user_id=user, timestamp=t0.isoformat()))
    second = api.post("/predict", json=_txn(user_id=str(user), timestamp=(t0 + timedelta(minutes=1)).isoformat()))
    assert first.status_code == second.status_code == 200, (first.text, second.text)
    assert first.json()["features"]["velocity_1h"] == 0
    assert second.json()["features"]["velocity_1h"] == 1  # the integer's event counts for the text


def test_one_invalid_request_among_concurrent_ones_fails_alone(api):
    bodies = [_txn() for _ in range(20)] + [_txn(timestamp="1600-01-01T00:00:00Z")]
    responses = _post_all(api, bodies)
    assert [r.status_code for r in responses[:20]] == [200] * 20, [r.text for r in responses if r.status_code != 200]
    assert responses[20].status_code == 422
    assert "timestamp" in responses[20].text and "1970" in responses[20].text


def test_hostile_timestamps_are_422_naming_the_field(api):
    for value in ("0001-01-01T00:00:00+01:00", "9999-12-31T23:30:00-05:00", "1969-12-31T23:59:59Z"):
        r = api.post("/predict", json=_txn(timestamp=value))
        assert r.status_code == 422 and "timestamp" in r.text, (value, r.status_code, r.text)


def test_batch_answers_each_item_on_its_own(api):
    taken = _txn(transaction_id=f"taken-{uuid.uuid4().hex[:8]}")
    assert api.post("/predict", json=taken).status_code == 200
    items = [_txn(), taken | {"amount": 1.0}, _txn()]
    r = api.post("/predict/batch", json={"transactions": items})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["errors"] == 1
    ok_a, conflict, ok_b = body["results"]
    assert conflict["status"] == 409 and conflict["index"] == 1 and "another payload" in conflict["detail"]
    for ok in (ok_a, ok_b):
        assert api.get(f"/transactions/{ok['transaction_id']}").json()["risk_score"] == ok["risk_score"]
    assert api.get(f"/transactions/{taken['transaction_id']}").json()["amount"] == 42.5


def test_a_batch_with_an_invalid_item_records_nothing(api):
    good = _txn(transaction_id=f"b-{uuid.uuid4().hex[:8]}")
    r = api.post("/predict/batch", json={"transactions": [good, _txn(amount=-1)]})
    assert r.status_code == 422 and "transactions" in r.text and "amount" in r.text
    assert api.get(f"/transactions/{good['transaction_id']}").status_code == 404


def test_one_id_with_two_payloads_at_once_gets_one_200_and_one_409(api):
    for _ in range(5):
        tid = f"race-{uuid.uuid4().hex[:8]}"
        a, b = _txn(transaction_id=tid, amount=10.0), _txn(transaction_id=tid, amount=20.0)
        responses = _post_all(api, [a, b])
        codes = sorted(r.status_code for r in responses)
        assert codes == [200, 409], [r.text for r in responses]
        k = next(k for k, r in enumerate(responses) if r.status_code == 200)
        winner = responses[k].json()
        stored = api.get(f"/transactions/{tid}").json()
        assert stored["risk_score"] == winner["risk_score"] and stored["features"] == winner["features"]
        assert stored["amount"] == (a, b)[k]["amount"]


@pytest.mark.parametrize("path", [
    "/transactions/%00", "/transactions/" + "x" * 5000, "/audit?user_id=%00", "/audit?user_id=" + "u" * 5000,
    "/dead-letters?reason=%00", f"/audit?offset={2 ** 63}", "/audit?offset=10001", "/audit?limit=-1",
    f"/audit?limit={10 ** 20}", "/dead-letters?limit=0", "/audit?since=not-a-date",
    "/models/%00/activate",
])
def test_odd_paths_and_queries_are_422(api, path):
    method = api.post if path.endswith("/activate") else api.get
    r = method(path)
    assert r.status_code == 422, (path, r.status_code, r.text)


@pytest.mark.parametrize("query", ["since=0001-01-01T00:00:00%2B01:00", "until=9999-12-31T23:59:59-05:00",
                                   "reason=100%25_off", "user_id=%25"])
def test_extreme_but_valid_filters_answer_without_a_5xx(api, query):
    path = "/dead-letters" if query.startswith("reason") else "/audit"
    r = api.get(f"{path}?{query}")
    assert r.status_code < 500, (query, r.status_code, r.text)


def test_a_chunked_body_over_the_limit_is_413_before_parsing(live_app):
    limit = 1_048_576

    def chunks(total: int):
        sent = 0
        while sent < total:
            piece = b" " * min(65_536, total - sent)
            sent += len(piece)
            yield piece

    with httpx.Client(base_url=live_app["api_url"], timeout=60) as client:  # no API key: limit comes first
        big = client.post("/predict", content=chunks(limit + 65_536),
                          headers={"content-type": "application/json"})
        assert big.status_code == 413, big.text
        ui = client.post("/ui/gradio_api/queue/join", content=chunks(limit + 65_536))
        assert ui.status_code == 413, ui.text
    with httpx.Client(base_url=live_app["api_url"], headers=live_app["headers"], timeout=60) as client:
        small = client.post("/predict", content=iter([b'{"user_id": 1, ', b'"amount": 2, "merchant": "m", '
                                                      b'"country": "FR", "timestamp": "2024-01-01T00:00:00"}']),
                            headers={"content-type": "application/json"})
        assert small.status_code == 200, small.text


def test_an_announced_body_over_the_limit_is_413(live_app):
    with httpx.Client(base_url=live_app["api_url"], timeout=60) as client:
        r = client.post("/predict", content=b"{" + b" " * 1_048_576 + b"}",
                        headers={"content-type": "application/json"})
    assert r.status_code == 413 and "limit" in r.json()["detail"]


def test_ingestion_status_asks_for_the_key_and_shares_one_read(live_app):
    from ray import serve

    from deployments.app import build_ingest_app

    serve.run(build_ingest_app({"enabled": False}), name="ingestion-status", route_prefix="/ingestion")
    try:
        with httpx.Client(base_url=live_app["api_url"], timeout=60) as client:
            assert client.get("/ingestion/status").status_code == 401
            answers = _get_all(client, "/ingestion/status", live_app["headers"], 8)
        assert {r.status_code for r in answers} == {200}
        bodies = [r.json() for r in answers]
        assert len({b["at"] for b in bodies}) == 1  # eight callers, one read
        assert "lag" in bodies[0]["ingestion"] and "rows" in bodies[0]["audit"]
    finally:
        serve.delete("ingestion-status")


def _get_all(client: httpx.Client, path: str, headers: dict, n: int) -> list[httpx.Response]:
    with ThreadPoolExecutor(n) as pool:
        return list(pool.map(lambda _: client.get(path, headers=headers), range(n)))
