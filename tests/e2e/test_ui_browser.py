"""The UI in a real headless Chromium: fill the form, score, read the answer.

The displayed score must be the one the API's dry-run /predict gives for the
same transaction, to `SCORE_DECIMALS` decimals. A screenshot goes to
`artifacts/ui_score.png` (git-ignored).

`live_app` (tests/conftest.py) is the real Serve application with the UI at
/ui, running with an API key: the browser logs in with it first.
"""

from __future__ import annotations

import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "artifacts"
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
UI_TIMEOUT_MS = 60_000

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not CHROMIUM.exists(), reason=f"no Chromium at {CHROMIUM} (apt install chromium)"),
]


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True,
                                             args=CHROMIUM_ARGS)
        yield browser
        browser.close()


def _fill(page, elem_id: str, value: str) -> None:
    field = page.locator(f"#{elem_id} input, #{elem_id} textarea").first
    field.fill(value)
    field.press("Tab")  # a dropdown with a custom value commits it on blur


def test_score_in_the_browser_matches_predict(live_app, browser):
    from deployments.ui_views import SCORE_DECIMALS

    stamp = (datetime.now(timezone.utc) - timedelta(minutes=1)).replace(microsecond=0)
    tx = {"user_id": "u000002", "amount": 1234.5, "merchant": "e2e-shop", "country": "BR",
          "timestamp": stamp.isoformat(), "transaction_id": f"e2e-{int(time.time())}"}

    headers = live_app["headers"]
    # At least one recorded decision for the Recent activity tab to show.
    httpx.post(live_app["api_url"] + "/predict", headers=headers, timeout=30,
               json=tx | {"transaction_id": tx["transaction_id"] + "-rec"}).raise_for_status()
    page = browser.new_page(viewport={"width": 1400, "height": 1100})
    page.set_default_timeout(UI_TIMEOUT_MS)
    try:
        page.goto(live_app["ui_url"] + "/")
        # The page renders in JavaScript: wait for the form or, with an API key, the login.
        page.locator("#score-button, input[type=password]").first.wait_for()
        password = page.locator("input[type=password]")
        if password.count():  # Gradio auth: any user name, the API key as password
            page.locator("input[type=text]").first.fill("analyst")
            password.fill(live_app["api_key"])
            page.get_by_role("button", name="Login").click()
        page.locator("#score-button").wait_for()
        # the page load fills the timestamp with "now"; wait for it before overwriting
        page.wait_for_function(
            "() => { const e = document.querySelector('#timestamp textarea, #timestamp input');"
            " return e && e.value.length > 0; }")
        for elem_id, key in [("user-id", "user_id"), ("merchant", "merchant"),
                             ("country", "country"), ("timestamp", "timestamp"),
                             ("transaction-id", "transaction_id")]:
            _fill(page, elem_id, tx[key])
        _fill(page, "amount", str(tx["amount"]))
        page.locator("#score-button").click()

        score = page.locator("#risk-score .risk-score-value")
        score.wait_for()
        flag = page.locator("#anomaly-flag .anomaly-flag")
        flag.wait_for()
        chart = page.locator("#shap-chart img, #shap-chart canvas, #shap-chart svg").first
        chart.wait_for()

        expected = httpx.post(live_app["api_url"] + "/predict", params={"dry_run": "true"},
                              json=tx, headers=headers, timeout=30).raise_for_status().json()
        assert score.inner_text().strip() == f"{expected['risk_score']:.{SCORE_DECIMALS}f}"
        assert flag.inner_text().strip() == ("ANOMALY" if expected["anomaly"] else "normal")
        assert page.locator("#score-message").inner_text().strip() == ""
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "ui_score.png"), full_page=True)

        # Opening the tab loads it: no Refresh press.
        page.get_by_role("tab", name="Recent activity").click()
        page.locator("#activity-summary").get_by_text("matching").wait_for()
        assert "Last hour:" in page.locator("#activity-summary").inner_text()
        page_of_audit = httpx.get(live_app["api_url"] + "/audit", params={"limit": 50},
                                  headers=headers, timeout=30).raise_for_status().json()
        latest = page_of_audit["items"]
        assert latest, "the API has no audit rows to show"
        summary = page.locator("#activity-summary").inner_text()
        assert f"rows 1-{len(latest)} of {page_of_audit['total']} matching" in summary, summary
        # The newest row; lower ones of a long page are only drawn once the grid is scrolled.
        cell = page.locator("#audit-rows").get_by_text(latest[0]["transaction_id"], exact=True)
        cell.filter(visible=True).first.wait_for()  # the grid keeps hidden sizing copies
        assert page.locator("#score-histogram img, #score-histogram canvas").first.is_visible()
        columns = [h.strip() for h in page.locator("#per-source thead th").all_inner_texts() if h.strip()]
        assert columns[:2] == ["source", "transactions"], columns
        page.screenshot(path=str(ARTIFACTS / "ui_activity.png"), full_page=True)
    except Exception:
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "ui_failure.png"), full_page=True)
        raise
    finally:
        page.close()
