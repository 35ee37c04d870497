"""The UI's client and handlers against the fake scoring API (no Ray, loopback only)."""

from __future__ import annotations

import pytest
from matplotlib.figure import Figure
from tests.ports import free_port
from tests.unit.test_ui_fake_api import NO_MODEL_DETAIL, THRESHOLD, FakeScoringApi

from deployments import ui
from deployments import ui_views as views
from deployments.ui_client import ScoringApiClient, ScoringApiError

TX = {"user_id": "u000001", "amount": 2500.0, "merchant": "shop-new", "country": "BR",
      "timestamp": "2025-03-01T02:30:00+00:00"}


@pytest.fixture(scope="module")
def fake():
    api = FakeScoringApi()
    with api.serve() as url:
        yield api, url


@pytest.fixture
def client(fake):
    api, url = fake
    api.model_loaded, api.pinned = True, None
    c = ScoringApiClient(url, timeout=10)
    yield c
    c.close()


@pytest.fixture
def unreachable():
    c = ScoringApiClient(f"http://127.0.0.1:{free_port()}", timeout=5)
    yield c
    c.close()


# --- the client's messages ------------------------------------------------------------


def test_unreachable_api_names_the_url(unreachable):
    with pytest.raises(ScoringApiError) as err:
        unreachable.health()
    assert str(err.value).startswith(f"The scoring API at {unreachable.base_url} is unreachable: ")
    assert err.value.status_code == 503


def test_422_names_the_fields(client):
    with pytest.raises(ScoringApiError) as err:
        client.predict({**TX, "amount": -1, "country": "Brazil"})
    message = str(err.value)
    assert err.value.status_code == 422
    assert message.startswith("Invalid input: ")
    assert "field amount: " in message and "field country: " in message
    assert "body" not in message


def test_503_gives_the_detail(fake, client):
    fake[0].model_loaded = False
    with pytest.raises(ScoringApiError) as err:
        client.predict(TX)
    assert str(err.value) == NO_MODEL_DETAIL and err.value.status_code == 503


def test_401_asks_for_the_key():
    api = FakeScoringApi(api_key="s3cret")
    with api.serve() as url:
        anonymous, keyed = ScoringApiClient(url), ScoringApiClient(url, api_key="s3cret")
        with pytest.raises(ScoringApiError, match="API key is missing or wrong"):
            anonymous.stats()
        assert keyed.stats()["threshold"] == THRESHOLD
        anonymous.close()
        keyed.close()


# --- the Score tab ----------------------------------------------------------------------


def test_score_shows_what_predict_answers(client):
    view = views.score_transaction(client, TX["user_id"], TX["amount"], TX["merchant"], TX["country"],
                                TX["timestamp"], "t-ui-1")
    expected = client.predict({**TX, "transaction_id": "t-ui-1"}, dry_run=True)
    assert view.message == ""
    assert view.score_text == f"{expected['risk_score']:.4f}"
    assert view.flag_text == ("ANOMALY" if expected["anomaly"] else "normal")
    assert view.threshold == THRESHOLD and view.model_version == expected["model_version"]
    assert view.reasons == expected["reasons"] and view.reasons
    assert isinstance(view.chart, Figure)
    assert view.dry_run is True
    html = views.score_html(view.score, view.threshold)
    assert view.score_text in html and views.flag_html(view.anomaly)


def test_shap_chart_sorted_by_size_and_signed(client):
    view = views.score_transaction(client, *TX.values())
    contributions = view.features["contribution"].tolist()
    assert contributions == sorted(contributions, key=abs, reverse=True)
    bars = view.chart.axes[0].patches
    assert [b.get_width() for b in bars] == pytest.approx(contributions)
    reds = [b.get_width() > 0 for b in bars]
    assert reds == [b.get_facecolor()[0] > 0.5 for b in bars]  # red towards anomaly


def test_dry_run_by_default_and_record_toggle(fake, client):
    api, _ = fake
    views.score_transaction(client, *TX.values(), "t-dry")
    assert "t-dry" not in api.decisions
    view = views.score_transaction(client, *TX.values(), "t-rec", record=True)
    assert view.dry_run is False and "t-rec" in api.decisions
    summary, row = views.lookup_transaction(client, "t-rec")
    assert row["transaction_id"] == "t-rec" and view.score_text in summary


def test_missing_fields_are_named_without_calling_the_api(unreachable):
    view = views.score_transaction(unreachable, "", None, "m1", "FR", None)
    assert view.message == "Invalid input: please fill in user id, amount."
    assert view.score is None and view.chart is None


def test_invalid_field_message_from_the_api(client):
    view = views.score_transaction(client, "u1", 10.0, "m1", "France", TX["timestamp"])
    assert view.message.startswith("Invalid input: field country: ")
    assert view.score is None


def test_unreachable_and_missing_model_messages(fake, client, unreachable):
    view = views.score_transaction(unreachable, *TX.values())
    assert "is unreachable" in view.message and view.chart is None
    fake[0].model_loaded = False
    assert views.score_transaction(client, *TX.values()).message == NO_MODEL_DETAIL
    assert "no model loaded" in views.health_markdown(client)
    assert "is unreachable" in views.health_markdown(unreachable)


def test_lookup_unknown_transaction(client):
    summary, row = views.lookup_transaction(client, "nope")
    assert row is None and "No stored decision for transaction `nope`" in summary


def test_recent_users(client, unreachable):
    users, problem = views.recent_users(client)
    assert "u000001" in users and problem == ""
    users, problem = views.recent_users(unreachable)
    assert users == [] and "unreachable" in problem


# --- the other tabs -------------------------------------------------------------------


def test_activity_rows_filters_and_charts(fake, client):
    api, _ = fake
    view = views.load_activity(client)
    assert view.message == "" and len(view.rows) == min(50, len(api.decisions))
    assert list(view.rows.columns) == views.AUDIT_COLUMNS
    assert isinstance(view.histogram, Figure) and isinstance(view.per_hour, Figure)
    threshold_lines = [line for line in view.histogram.axes[0].lines
                       if list(line.get_xdata()) == [THRESHOLD, THRESHOLD]]
    assert threshold_lines
    assert list(view.per_source.columns) == ["source", "transactions"]
    assert dict(zip(view.per_source["source"], view.per_source["transactions"], strict=True)) == {
        s: sum(r["source"] == s for r in api.decisions.values()) for s in ("api", "kafka")}
    assert "Last hour:" in view.summary and "budget of 4.00%" in view.summary
    assert "Warning" not in view.summary

    anomalies = views.load_activity(client, anomalies_only=True, source="kafka")
    expected = [r for r in api.decisions.values() if r["anomaly"] and r["source"] == "kafka"]
    assert len(anomalies.rows) == len(expected)
    assert set(anomalies.rows["source"]) <= {"kafka"}
    one_user = views.load_activity(client, user_id="u000001", time_range="last 7 days")
    assert set(one_user.rows["user_id"]) == {"u000001"}


def test_alert_rate_above_twice_the_budget_is_a_warning():
    """/health's warnings show in the banner, /stats' last hour in the activity summary."""
    api = FakeScoringApi()
    with api.serve() as url:
        flooded = ScoringApiClient(url, timeout=10)
        try:
            assert "Warning" not in views.health_markdown(flooded)
            api.flood(150)
            banner = views.health_markdown(flooded)
            assert "**Warning:** alert rate" in banner and "above 2x the alert budget of 4.0%" in banner
            assert "**Warning:** alert rate" in views.load_activity(flooded).summary
        finally:
            flooded.close()


def test_activity_tab_loads_when_opened(unreachable):
    """Opening the tab runs the same handler as its Refresh button, with the same outputs."""
    demo = ui.build_ui(unreachable)
    config = demo.get_config_file()
    by_id = {c["id"]: c for c in config["components"]}
    tab = next(c["id"] for c in config["components"]
               if c.get("type") == "tabitem" and c["props"].get("id") == "activity")
    refresh = next(c["id"] for c in config["components"] if c["props"].get("elem_id") == "activity-refresh")
    events = {(t[0], t[1]): d for d in config["dependencies"] for t in d["targets"]}
    opened, clicked = events[(tab, "select")], events[(refresh, "click")]
    assert opened["outputs"] == clicked["outputs"] and opened["inputs"] == clicked["inputs"]
    assert "audit-rows" in {by_id[o]["props"].get("elem_id") for o in opened["outputs"]}


def test_per_source_table_names_its_columns(unreachable):
    config = ui.build_ui(unreachable).get_config_file()
    [table] = [c for c in config["components"] if c["props"].get("elem_id") == "per-source"]
    assert table["props"]["value"]["headers"] == ["source", "transactions"]


def test_activity_bad_time_is_a_message(client):
    view = views.load_activity(client, since="yesterday-ish")
    assert view.message.startswith("Invalid input: field since: ") and view.rows.empty


def test_dead_letters(client):
    summary, rows = views.load_dead_letters(client)
    assert summary == "2 rejected messages." and len(rows) == 2
    summary, rows = views.load_dead_letters(client, reason="JSON")
    assert list(rows["position"]) == ["financial-transactions[1]@3"]


def test_models_and_activation(fake, client):
    api, _ = fake
    view = views.load_models(client)
    assert view.choices == ["v1", "v2"] and view.active == api.active
    assert {"auc", "alert_rate"} <= set(view.versions.columns)
    assert views.activate_model(client, "v1") == "Version `v1` is now active."
    assert api.active == "v1" and len(views.load_models(client).history) == 1
    api.pinned = "v1"
    message = views.activate_model(client, "v2")
    assert message.startswith("Could not activate `v2`: ") and "pins version v1" in message
    assert views.activate_model(client, "") == "Choose a version to activate."


# --- construction and auth -----------------------------------------------------------


def test_build_ui_needs_no_network(unreachable):
    demo = ui.build_ui(unreachable)
    assert demo.title == "Fraud scoring"


def test_mounted_ui_polls_its_queue_calmly(unreachable, monkeypatch):
    """Gradio's queue looks for work every 1 ms on Linux: idle, the UI used ~10% of a core."""
    from fastapi import FastAPI

    built = []
    real = ui.build_ui
    monkeypatch.setattr(ui, "build_ui", lambda c: built.append(real(c)) or built[-1])
    ui.mount_ui(FastAPI(), unreachable, None)
    queue = built[0]._queue
    assert (queue.sleep_when_free, queue.progress_update_sleep_when_free) == (0.05, 0.1)


def test_password_auth():
    assert ui.password_auth(None) is None
    check = ui.password_auth("s3cret")
    assert check("analyst", "s3cret") and not check("analyst", "wrong") and not check("a", None)


def test_format_score_and_request_body():
    assert views.format_score(0.5) == "0.5000" and views.format_score(0.123456) == "0.1235"
    body, problem = views.build_transaction(" u1 ", 3, "m1", "br", "", "")
    assert problem == "" and body["country"] == "BR" and body["user_id"] == "u1"
    assert "transaction_id" not in body and body["timestamp"]  # empty timestamp means now


def test_mounted_ui_asks_for_the_key_when_configured(unreachable):
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    with TestClient(ui.mount_ui(FastAPI(), unreachable, "k3y")) as http:
        assert http.get("/config").status_code == 401
        assert http.post("/login", data={"username": "analyst", "password": "bad"}).status_code == 400
        assert http.post("/login", data={"username": "analyst", "password": "k3y"}).is_success
        assert http.get("/config").status_code == 200
    with TestClient(ui.mount_ui(FastAPI(), unreachable, None)) as http:
        assert http.get("/config").status_code == 200
