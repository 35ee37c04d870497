"""The Gradio front end: score a transaction, read the audit trail, manage models.

Everything goes through the scoring application's HTTP API (never the
database), so the UI runs the same inside Serve and alone:

    serve run serve_config.yaml                      # UI at http://127.0.0.1:8000/ui
    python -m deployments.ui --api-url http://127.0.0.1:8000 [--port 7860]

Three layers, each usable on its own:

- `ScoringApiClient` (`deployments.ui_client`): a typed httpx client; every failure becomes a
  `ScoringApiError` whose message is meant for a person (unreachable API,
  refused key, 422 naming the field, the 503 detail that says how to train a
  model).
- Handler functions (`deployments.ui_views`: `score_transaction`, `lookup_transaction`,
  `load_activity`, `load_dead_letters`, `load_models`, `activate_model`, ...):
  client and plain values in, a view (dataclass or tuple) out. They never
  raise: an error becomes a message, so no traceback reaches the screen.
- `build_ui(client)`: pure construction of the `gr.Blocks`, no network call
  until a page is opened.

Authentication: when `FRAUD_API_KEY` is set, the UI asks for it at login (any
user name, the API key as password) and sends it as `X-API-Key` to the API.
"""

from __future__ import annotations

import argparse
import hmac
import logging
from collections.abc import Callable
from typing import Any

import gradio as gr
import matplotlib

matplotlib.use("Agg")  # before any figure: replicas and servers have no display
import pandas as pd  # noqa: E402
from deployments.ui_client import ScoringApiClient  # noqa: E402
from deployments.ui_views import (  # noqa: E402
    AUDIT_COLUMNS,
    DEAD_LETTER_COLUMNS,
    DEFAULT_TRANSACTION,
    PER_SOURCE_COLUMNS,
    TIME_RANGES,
    _now_iso,
    activate_model,
    flag_html,
    health_markdown,
    load_activity,
    load_dead_letters,
    load_models,
    lookup_transaction,
    recent_users,
    score_html,
    score_transaction,
)
from fastapi import FastAPI  # noqa: E402
from ray import serve  # noqa: E402

log = logging.getLogger(__name__)


def _message(text: str) -> str:
    return f"**{text}**" if text else ""


def build_ui(client: ScoringApiClient) -> gr.Blocks:
    """Construct the Blocks; no network call happens here, only when a page loads."""
    with gr.Blocks(title="Fraud scoring", analytics_enabled=False) as demo:
        gr.Markdown("# Real-time fraud scoring")
        health = gr.Markdown(elem_id="api-health")
        with gr.Tabs():
            with gr.Tab("Score", id="score"):
                with gr.Row():
                    with gr.Column(scale=1):
                        user_id = gr.Dropdown(label="User id", choices=[],
                                              value=DEFAULT_TRANSACTION["user_id"],
                                              allow_custom_value=True, elem_id="user-id",
                                              info="type one, or pick a recent user")
                        amount = gr.Number(label="Amount", value=DEFAULT_TRANSACTION["amount"],
                                           minimum=0, elem_id="amount")
                        merchant = gr.Textbox(label="Merchant", elem_id="merchant",
                                              value=DEFAULT_TRANSACTION["merchant"])
                        country = gr.Textbox(label="Country (2 letters)", max_length=2,
                                             value=DEFAULT_TRANSACTION["country"], elem_id="country")
                        timestamp = gr.Textbox(label="Timestamp (ISO 8601, UTC if no offset)",
                                               elem_id="timestamp",
                                               info="empty means now")
                        transaction_id = gr.Textbox(label="Transaction id (optional)",
                                                    elem_id="transaction-id",
                                                    info="empty: the API assigns one")
                        record = gr.Checkbox(label="Record the transaction (off = dry run)",
                                             value=False, elem_id="record")
                        with gr.Row():
                            now_button = gr.Button("Now", size="sm")
                            users_button = gr.Button("Refresh users", size="sm")
                            score_button = gr.Button("Score", variant="primary",
                                                     elem_id="score-button")
                    with gr.Column(scale=2):
                        score_message = gr.Markdown(elem_id="score-message")
                        score_box = gr.HTML(score_html(None, None), elem_id="risk-score")
                        flag = gr.HTML(elem_id="anomaly-flag")
                        summary = gr.Markdown(elem_id="score-summary")
                        chart = gr.Plot(label="SHAP contributions", elem_id="shap-chart",
                                        format="png")
                        reasons = gr.Markdown(elem_id="reasons")
                        with gr.Accordion("Feature values", open=False):
                            features = gr.Dataframe(interactive=False, elem_id="features")
                with gr.Row():
                    lookup_id = gr.Textbox(label="Look up a stored decision by transaction id",
                                           elem_id="lookup-id", scale=3)
                    lookup_button = gr.Button("Look up", scale=1, elem_id="lookup-button")
                lookup_summary = gr.Markdown(elem_id="lookup-summary")
                lookup_json = gr.JSON(label="Stored decision", elem_id="lookup-json")

            with gr.Tab("Recent activity", id="activity") as activity_tab:
                with gr.Row():
                    anomalies_only = gr.Checkbox(label="Anomalies only", value=False)
                    audit_user = gr.Textbox(label="User id", placeholder="any")
                    source = gr.Dropdown(label="Source", choices=["all", "api", "kafka"],
                                         value="all")
                    time_range = gr.Dropdown(label="Time range", choices=list(TIME_RANGES),
                                             value="all time")
                with gr.Row():
                    since = gr.Textbox(label="Since (ISO, overrides the range)", placeholder="")
                    until = gr.Textbox(label="Until (ISO)", placeholder="")
                    limit = gr.Number(label="Rows", value=50, minimum=1, maximum=500, precision=0)
                    offset = gr.Number(label="Offset", value=0, minimum=0, precision=0)
                    activity_button = gr.Button("Refresh", variant="primary",
                                                elem_id="activity-refresh")
                activity_message = gr.Markdown(elem_id="activity-message")
                activity_summary = gr.Markdown(elem_id="activity-summary")
                audit_rows = gr.Dataframe(interactive=False, elem_id="audit-rows",
                                          headers=AUDIT_COLUMNS)
                with gr.Row():
                    histogram = gr.Plot(label="Score distribution", format="png",
                                        elem_id="score-histogram")
                    per_hour = gr.Plot(label="Per hour", format="png", elem_id="per-hour")
                per_source = gr.Dataframe(label="Transactions per source", interactive=False,
                                          elem_id="per-source", headers=PER_SOURCE_COLUMNS)

            with gr.Tab("Dead letters", id="dead-letters"):
                with gr.Row():
                    dl_reason = gr.Textbox(label="Reason contains", placeholder="any")
                    dl_limit = gr.Number(label="Rows", value=50, minimum=1, maximum=500,
                                         precision=0)
                    dl_offset = gr.Number(label="Offset", value=0, minimum=0, precision=0)
                    dl_button = gr.Button("Refresh", variant="primary")
                dl_summary = gr.Markdown()
                dl_rows = gr.Dataframe(interactive=False, headers=DEAD_LETTER_COLUMNS,
                                       elem_id="dead-letters")

            with gr.Tab("Models", id="models"):
                models_message = gr.Markdown(elem_id="models-message")
                versions = gr.Dataframe(label="Versions", interactive=False, elem_id="versions")
                history = gr.Dataframe(label="Activation history", interactive=False)
                with gr.Row():
                    version_choice = gr.Dropdown(label="Version", choices=[],
                                                 allow_custom_value=True)
                    activate_button = gr.Button("Activate", variant="stop")
                    models_button = gr.Button("Refresh")
                activate_message = gr.Markdown(elem_id="activate-message")

        # --- wiring: thin adapters from views to component values ---------------

        def on_score(*values: Any) -> tuple[Any, ...]:
            view = score_transaction(client, *values)
            return (_message(view.message), score_html(view.score, view.threshold),
                    flag_html(view.anomaly), view.summary_markdown(), view.chart,
                    view.reasons_markdown(), view.features,
                    view.transaction_id if view.transaction_id and not view.dry_run
                    else gr.skip())

        score_button.click(
            on_score, [user_id, amount, merchant, country, timestamp, transaction_id, record],
            [score_message, score_box, flag, summary, chart, reasons, features, lookup_id])

        def on_users(current: str | None) -> tuple[Any, str]:
            users, problem = recent_users(client)
            return gr.Dropdown(choices=users, value=current), _message(problem)

        users_button.click(on_users, [user_id], [user_id, score_message])
        now_button.click(_now_iso, None, [timestamp])

        lookup_button.click(lambda tid: lookup_transaction(client, tid), [lookup_id],
                            [lookup_summary, lookup_json])
        lookup_id.submit(lambda tid: lookup_transaction(client, tid), [lookup_id],
                         [lookup_summary, lookup_json])

        def on_activity(*values: Any) -> tuple[Any, ...]:
            view = load_activity(client, *values)
            return (_message(view.message), view.summary, view.rows, view.histogram,
                    view.per_hour, view.per_source)

        activity_inputs = [anomalies_only, audit_user, source, time_range, since, until, limit, offset]
        activity_outputs = [activity_message, activity_summary, audit_rows, histogram, per_hour, per_source]
        activity_button.click(on_activity, activity_inputs, activity_outputs)
        activity_tab.select(on_activity, activity_inputs, activity_outputs)  # loads when opened

        def on_dead_letters(reason: str, lim: float, off: float) -> tuple[str, pd.DataFrame]:
            text, frame = load_dead_letters(client, reason, lim, off)
            return text, frame

        dl_button.click(on_dead_letters, [dl_reason, dl_limit, dl_offset], [dl_summary, dl_rows])

        def on_models() -> tuple[Any, ...]:
            view = load_models(client)
            return (view.message, view.versions, view.history,
                    gr.Dropdown(choices=view.choices, value=view.active))

        models_button.click(on_models, None, [models_message, versions, history, version_choice])

        def on_activate(version: str) -> tuple[Any, ...]:
            return (activate_model(client, version), *on_models())

        activate_button.click(on_activate, [version_choice],
                              [activate_message, models_message, versions, history,
                               version_choice])

        def on_load(current: str | None) -> tuple[Any, ...]:
            users, _ = recent_users(client)
            return health_markdown(client), gr.Dropdown(choices=users, value=current), _now_iso()

        demo.load(on_load, [user_id], [health, user_id, timestamp])
    return demo


def password_auth(api_key: str | None) -> Callable[[str, str], bool] | None:
    """Gradio auth when a key is configured: any user name, the API key as password."""
    if not api_key:
        return None
    expected = api_key.encode()
    return lambda _username, password: hmac.compare_digest((password or "").encode(), expected)


def _configured_api_key() -> str | None:
    from configs.settings import get_settings

    key = get_settings().api_key
    return key.get_secret_value() if key else None


def mount_ui(app: FastAPI, client: ScoringApiClient, api_key: str | None,
             path: str = "/") -> FastAPI:
    """Mount the UI on `app` at `path`, with a login page when `api_key` is set."""
    from configs.settings import get_settings
    from deployments.http_guard import guard

    guard(app, lambda: get_settings().max_request_bytes)
    demo = build_ui(client)
    mounted = gr.mount_gradio_app(
        app, demo, path=path, auth=password_auth(api_key),
        auth_message="Enter the API key as password (any user name)." if api_key else None,
        show_error=False, footer_links=[])
    _calm_queue(demo)
    return mounted


# Seconds Gradio's event queue sleeps between looks for work, and between progress
# updates: its own values on Windows. On Linux it looks every 1 ms and 10 ms, and an
# idle UI used 8.7-12.3% of a core (1.0-1.6% now); a page used by hand does not notice 50 ms.
QUEUE_IDLE_SLEEP_S = 0.05


PROGRESS_IDLE_SLEEP_S = 0.1


def _calm_queue(demo: gr.Blocks) -> None:
    queue = getattr(demo, "_queue", None)  # not public API: checked, never assumed
    if queue is None or not hasattr(queue, "sleep_when_free"):
        log.warning("gradio's queue has no sleep_when_free: its idle polling is left as it is")
        return
    queue.sleep_when_free = QUEUE_IDLE_SLEEP_S
    queue.progress_update_sleep_when_free = PROGRESS_IDLE_SLEEP_S


fastapi_app = FastAPI(title="Fraud scoring UI", docs_url=None, redoc_url=None, openapi_url=None)


@serve.deployment(ray_actor_options={"num_cpus": 0.1})
@serve.ingress(fastapi_app)
class UIIngress:
    """The Gradio UI on its own route (the builder in `app.py` binds it with `api_url`).

    `serve.ingress` serves a copy of `fastapi_app` frozen at decoration time, so
    mounting on the module's `fastapi_app` in `__init__` would not reach the
    served app; and a Blocks built at import does not pickle. The Blocks is
    therefore built in the replica and mounted in `__serve_build_asgi_app__`,
    which Serve calls after `__init__` and whose answer it serves.
    """

    def __init__(self, api_url: str) -> None:
        self._api_key = _configured_api_key()
        self._client = ScoringApiClient(api_url, api_key=self._api_key)

    def __serve_build_asgi_app__(self) -> FastAPI:
        return mount_ui(self.app, self._client, self._api_key)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run the fraud scoring UI against a running API.")
    parser.add_argument("--api-url", default="http://127.0.0.1:8000",
                        help="base URL of the scoring API (default %(default)s)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=7860)
    args = parser.parse_args(argv)

    import uvicorn

    logging.basicConfig(level=logging.INFO)
    api_key = _configured_api_key()
    client = ScoringApiClient(args.api_url, api_key=api_key)
    app = mount_ui(FastAPI(title="Fraud scoring UI"), client, api_key)
    log.info("UI at http://%s:%d/ reading %s", args.host, args.port, args.api_url)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    client.close()
    return 0
