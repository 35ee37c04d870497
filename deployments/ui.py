"""The Gradio front end: score a transaction, read the audit trail, manage models.

Everything goes through the scoring application's HTTP API (never the
database), so the UI runs the same inside Serve and alone:

    serve run serve_config.yaml                      # UI at http://127.0.0.1:8000/ui
    python -m deployments.ui --api-url http://127.0.0.1:8000 [--port 7860]

Three layers, each usable on its own:

- `ScoringApiClient`: a typed httpx client; every failure becomes a
  `ScoringApiError` whose message is meant for a person (unreachable API,
  refused key, 422 naming the field, the 503 detail that says how to train a
  model).
- Handler functions (`score_transaction`, `lookup_transaction`,
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
import json
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any
from urllib.parse import quote

import gradio as gr
import httpx
import matplotlib

matplotlib.use("Agg")  # before any figure: replicas and servers have no display
import pandas as pd  # noqa: E402
from fastapi import FastAPI  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from ray import serve  # noqa: E402

from configs.errors import FraudScoringError  # noqa: E402

log = logging.getLogger(__name__)

SCORE_DECIMALS = 4
DEFAULT_TIMEOUT_S = 30.0
AUDIT_COLUMNS = ["scored_at", "transaction_id", "user_id", "amount", "merchant", "country",
                 "risk_score", "anomaly", "model_version", "source"]
DEAD_LETTER_COLUMNS = ["id", "created_at", "source", "position", "reason", "payload", "replayed_at"]
PER_SOURCE_COLUMNS = ["source", "transactions"]
TIME_RANGES = {
    "all time": None,
    "last hour": timedelta(hours=1),
    "last 24 hours": timedelta(days=1),
    "last 7 days": timedelta(days=7),
}
DEFAULT_TRANSACTION = {"user_id": "u000001", "amount": 49.90, "merchant": "m00001", "country": "FR"}


def format_score(value: float) -> str:
    """The one textual form of a risk score, shared by the UI and its tests."""
    return f"{value:.{SCORE_DECIMALS}f}"


# --- HTTP client --------------------------------------------------------------


class ScoringApiError(FraudScoringError):
    """A call to the scoring API failed; `str(error)` is meant for the user.

    `status_code` is the API's answer, or 503 when it could not be reached.
    """

    def __init__(self, message: str, status_code: int = 503) -> None:
        super().__init__(message)
        self.status_code = status_code


def _describe_422(detail: Any) -> str:
    """FastAPI validation errors as `field amount: msg; field country: msg`."""
    if not isinstance(detail, list):
        return f"Invalid input: {detail}"
    parts = []
    for item in detail:
        if not isinstance(item, dict):
            parts.append(str(item))
            continue
        loc = [str(p) for p in item.get("loc", []) if p not in ("body", "query", "path")]
        name = ".".join(loc) or "request"
        parts.append(f"field {name}: {item.get('msg', 'invalid value')}")
    return "Invalid input: " + "; ".join(parts)


class ScoringApiClient:
    """Typed access to the scoring application's HTTP API (see the module docstring)."""

    def __init__(self, base_url: str, api_key: str | None = None,
                 timeout: float = DEFAULT_TIMEOUT_S) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        headers = {"X-API-Key": api_key} if api_key else {}
        self._http = httpx.Client(base_url=self.base_url, headers=headers, timeout=timeout)

    def close(self) -> None:
        self._http.close()

    def _request(self, method: str, path: str, *, params: dict[str, Any] | None = None,
                 body: dict[str, Any] | None = None) -> Any:
        if params:
            params = {k: v for k, v in params.items() if v is not None and v != ""}
        try:
            response = self._http.request(method, path, params=params, json=body)
        except httpx.TimeoutException as exc:
            raise ScoringApiError(
                f"The scoring API at {self.base_url} did not answer within {self.timeout:g} s "
                f"({type(exc).__name__})") from exc
        except httpx.TransportError as exc:
            raise ScoringApiError(
                f"The scoring API at {self.base_url} is unreachable: {exc or type(exc).__name__}"
            ) from exc
        if response.is_success:
            try:
                return response.json()
            except ValueError as exc:
                raise ScoringApiError(
                    f"The scoring API at {self.base_url} answered {method} {path} with "
                    f"something that is not JSON", 502) from exc
        raise ScoringApiError(self._error_message(response), response.status_code)

    def _error_message(self, response: httpx.Response) -> str:
        try:
            detail = response.json().get("detail", response.text)
        except (ValueError, AttributeError):
            detail = response.text[:300] or response.reason_phrase
        status = response.status_code
        if status == 401:
            return (f"The scoring API at {self.base_url} refused the request: the API key is "
                    f"missing or wrong (401). Set FRAUD_API_KEY for the UI.")
        if status == 422:
            return _describe_422(detail)
        if status == 413:
            return f"The request is too large (413): {detail}"
        if status in (404, 409, 503):
            return str(detail)
        return f"The scoring API answered {status}: {detail}"

    # One method per endpoint of the contract.

    def predict(self, transaction: dict[str, Any], dry_run: bool = True) -> dict[str, Any]:
        return self._request("POST", "/predict", params={"dry_run": str(dry_run).lower()},
                             body=transaction)

    def health(self) -> dict[str, Any]:
        return self._request("GET", "/health")

    def models(self) -> dict[str, Any]:
        return self._request("GET", "/models")

    def activate(self, version: str) -> dict[str, Any]:
        return self._request("POST", f"/models/{quote(version, safe='')}/activate")

    def transaction(self, transaction_id: str) -> dict[str, Any]:
        return self._request("GET", f"/transactions/{quote(transaction_id, safe='')}")

    def audit(self, *, anomalies_only: bool = False, user_id: str | None = None,
              source: str | None = None, since: str | None = None, until: str | None = None,
              limit: int = 50, offset: int = 0) -> dict[str, Any]:
        return self._request("GET", "/audit", params={
            "anomalies_only": str(bool(anomalies_only)).lower(), "user_id": user_id,
            "source": source, "since": since, "until": until, "limit": limit, "offset": offset})

    def dead_letters(self, *, limit: int = 50, offset: int = 0,
                     reason: str | None = None) -> dict[str, Any]:
        return self._request("GET", "/dead-letters",
                             params={"limit": limit, "offset": offset, "reason": reason})

    def stats(self) -> dict[str, Any]:
        return self._request("GET", "/stats")

    def recent_users(self) -> list[str]:
        return list(self._request("GET", "/users/recent").get("users", []))


# --- handlers: plain values in, views out, never raise -------------------------


def _error_text(exc: Exception) -> str:
    if isinstance(exc, ScoringApiError):
        return str(exc)
    log.exception("unexpected error in the UI")
    return f"Unexpected error ({type(exc).__name__}): {exc}"


def _now_iso() -> str:
    return datetime.now(timezone.utc).replace(microsecond=0).isoformat()


def _score_colour(score: float) -> str:
    """Green (0) through amber to red (1)."""
    stops = [(0.0, (46, 125, 50)), (0.5, (249, 168, 37)), (1.0, (198, 40, 40))]
    s = min(max(score, 0.0), 1.0)
    (x0, c0), (x1, c1) = (stops[0], stops[1]) if s <= 0.5 else (stops[1], stops[2])
    t = (s - x0) / (x1 - x0)
    return "#" + "".join(f"{round(a + (b - a) * t):02x}" for a, b in zip(c0, c1, strict=True))


def score_html(score: float | None, threshold: float | None) -> str:
    """The risk score in its colour, above a green-to-red scale with the threshold marked."""
    if score is None:
        return '<div class="risk-score-empty">No score yet.</div>'
    pct = min(max(score, 0.0), 1.0) * 100
    thr = "" if threshold is None else (
        f'<div title="threshold {format_score(threshold)}" style="position:absolute;top:-4px;'
        f'bottom:-4px;left:{threshold * 100:.2f}%;border-left:2px dashed #222"></div>')
    return (
        '<div style="font-size:2.4em;font-weight:700">'
        f'<span class="risk-score-value" style="color:{_score_colour(score)}">'
        f'{format_score(score)}</span></div>'
        '<div style="position:relative;height:14px;margin:6px 0;border-radius:7px;'
        'background:linear-gradient(90deg,#2e7d32,#f9a825,#c62828)">'
        f'<div style="position:absolute;top:-3px;bottom:-3px;left:calc({pct:.2f}% - 3px);width:6px;'
        'background:#111;border-radius:3px"></div>' + thr + '</div>'
        '<div style="display:flex;justify-content:space-between;font-size:0.8em">'
        f'<span>0 (normal)</span><span>threshold {"-" if threshold is None else format_score(threshold)}'
        '</span><span>1 (anomalous)</span></div>')


def flag_html(anomaly: bool | None) -> str:
    if anomaly is None:
        return ""
    if anomaly:
        return ('<span class="anomaly-flag" style="background:#c62828;color:white;padding:4px 10px;'
                'border-radius:4px;font-weight:700">ANOMALY</span>')
    return ('<span class="anomaly-flag" style="background:#2e7d32;color:white;padding:4px 10px;'
            'border-radius:4px;font-weight:700">normal</span>')


def shap_figure(explanation: dict[str, float], features: dict[str, float] | None = None) -> Figure:
    """Horizontal bars, largest |contribution| on top; red pushes towards anomaly."""
    items = sorted(explanation.items(), key=lambda kv: abs(kv[1]), reverse=True)
    features = features or {}
    labels = [f"{name} = {features[name]:.4g}" if isinstance(features.get(name), int | float)
              else name for name, _ in items]
    values = [value for _, value in items]
    fig = Figure(figsize=(7, 0.45 * max(len(items), 2) + 1.2), dpi=100)
    ax = fig.add_subplot()
    ax.barh(range(len(values)), values,
            color=["#c62828" if v > 0 else "#1565c0" for v in values])
    ax.set_yticks(range(len(values)), labels)
    ax.invert_yaxis()
    ax.axvline(0, color="#444", linewidth=0.8)
    ax.set_xlabel("SHAP contribution (positive = towards anomaly)")
    ax.set_title("Why this score")
    fig.tight_layout()
    return fig


def histogram_figure(stats: dict[str, Any]) -> Figure:
    hist = stats.get("score_histogram") or {}
    edges, counts = hist.get("edges") or [], hist.get("counts") or []
    fig = Figure(figsize=(7, 3.2), dpi=100)
    ax = fig.add_subplot()
    if len(edges) == len(counts) + 1 and counts:
        widths = [b - a for a, b in zip(edges[:-1], edges[1:], strict=True)]
        ax.bar(edges[:-1], counts, width=widths, align="edge", color="#5c6bc0", edgecolor="white")
    threshold = stats.get("threshold")
    if threshold is not None:
        ax.axvline(threshold, color="#c62828", linestyle="--",
                   label=f"threshold {format_score(threshold)}")
        ax.legend(loc="upper right")
    ax.set_xlim(0, 1)
    ax.set_xlabel("risk score")
    ax.set_ylabel("transactions")
    ax.set_title("Score distribution")
    fig.tight_layout()
    return fig


def per_hour_figure(stats: dict[str, Any]) -> Figure:
    rows = stats.get("per_source_hour") or []
    fig = Figure(figsize=(7, 3.2), dpi=100)
    ax = fig.add_subplot()
    if rows:
        frame = pd.DataFrame(rows)
        frame["hour"] = pd.to_datetime(frame["hour"], utc=True, errors="coerce")
        table = frame.pivot_table(index="hour", columns="source", values="count",
                                  aggfunc="sum", fill_value=0).sort_index()
        bottom = [0] * len(table)
        positions = list(range(len(table)))
        for source in table.columns:
            counts = table[source].tolist()
            ax.bar(positions, counts, bottom=bottom, label=str(source))
            bottom = [b + c for b, c in zip(bottom, counts, strict=True)]
        ax.set_xticks(positions, [h.strftime("%m-%d %H:00") if not pd.isna(h) else "?"
                                  for h in table.index], rotation=60, fontsize=7)
        ax.legend(loc="upper left")
    else:
        ax.text(0.5, 0.5, "no transactions yet", ha="center", va="center", transform=ax.transAxes)
    ax.set_ylabel("transactions")
    ax.set_title("Transactions per hour and source")
    fig.tight_layout()
    return fig


@dataclass
class ScoreView:
    """What the Score button shows; `message` is empty on success."""

    message: str = ""
    transaction_id: str | None = None
    score: float | None = None
    anomaly: bool | None = None
    threshold: float | None = None
    model_version: str | None = None
    feature_set_version: str | None = None
    dry_run: bool | None = None
    chart: Figure | None = None
    reasons: list[str] = field(default_factory=list)
    features: pd.DataFrame = field(
        default_factory=lambda: pd.DataFrame(columns=["feature", "value", "contribution"]))

    @property
    def score_text(self) -> str:
        return "" if self.score is None else format_score(self.score)

    @property
    def flag_text(self) -> str:
        return "" if self.anomaly is None else ("ANOMALY" if self.anomaly else "normal")

    def summary_markdown(self) -> str:
        if self.score is None:
            return ""
        mode = "dry run, not recorded" if self.dry_run else "recorded in the audit trail"
        return (f"**Anomaly:** {self.flag_text} &nbsp; **Threshold:** {format_score(self.threshold or 0)}"
                f" &nbsp; **Model:** `{self.model_version}` (features `{self.feature_set_version}`)"
                f"<br>**Transaction:** `{self.transaction_id}` ({mode})")

    def reasons_markdown(self) -> str:
        if not self.reasons:
            return "" if self.score is None else "_No reasons given._"
        return "\n".join(f"- {reason}" for reason in self.reasons)


def build_transaction(user_id: str | None, amount: float | None, merchant: str | None,
                      country: str | None, timestamp: str | None,
                      transaction_id: str | None) -> tuple[dict[str, Any] | None, str]:
    """The request body from the form, or `(None, message)` for what cannot be sent at all.

    Rules (amount range, country code, clock skew) are the API's: it answers 422
    naming the field, and that message is shown as is.
    """
    missing = [name for name, value in (("user id", user_id), ("merchant", merchant),
                                        ("country", country)) if not (value or "").strip()]
    if amount is None or (isinstance(amount, float) and math.isnan(amount)):
        missing.append("amount")
    if missing:
        return None, "Invalid input: please fill in " + ", ".join(missing) + "."
    body: dict[str, Any] = {
        "user_id": user_id.strip(), "amount": float(amount), "merchant": merchant.strip(),
        "country": country.strip().upper(), "timestamp": (timestamp or "").strip() or _now_iso(),
    }
    if (transaction_id or "").strip():
        body["transaction_id"] = transaction_id.strip()
    return body, ""


def score_transaction(client: ScoringApiClient, user_id: str | None, amount: float | None,
                      merchant: str | None, country: str | None, timestamp: str | None,
                      transaction_id: str | None = None, record: bool = False) -> ScoreView:
    body, problem = build_transaction(user_id, amount, merchant, country, timestamp, transaction_id)
    if body is None:
        return ScoreView(message=problem)
    try:
        answer = client.predict(body, dry_run=not record)
        explanation = {k: float(v) for k, v in (answer.get("explanation") or {}).items()}
        features = answer.get("features") or {}
        table = pd.DataFrame(
            [(name, features.get(name), value) for name, value in
             sorted(explanation.items(), key=lambda kv: abs(kv[1]), reverse=True)],
            columns=["feature", "value", "contribution"])
        return ScoreView(
            transaction_id=answer["transaction_id"], score=float(answer["risk_score"]),
            anomaly=bool(answer["anomaly"]), threshold=float(answer["threshold"]),
            model_version=answer.get("model_version"),
            feature_set_version=answer.get("feature_set_version"),
            dry_run=bool(answer.get("dry_run", not record)),
            chart=shap_figure(explanation, features), reasons=list(answer.get("reasons") or []),
            features=table)
    except Exception as exc:  # noqa: BLE001 - the UI boundary: show, never raise
        return ScoreView(message=_error_text(exc))


def health_markdown(client: ScoringApiClient) -> str:
    try:
        health = client.health()
    except Exception as exc:  # noqa: BLE001
        return f"**Scoring API:** {_error_text(exc)}"
    if not health.get("model_loaded"):
        return (f"**Scoring API** at {client.base_url}: status {health.get('status')}, "
                "**no model loaded** - scoring answers 503 until a model is trained and activated "
                "(see the Models tab).")
    text = (f"**Scoring API** at {client.base_url}: {health.get('status')}, model "
            f"`{health.get('model_version')}`, online state "
            f"{'ready' if health.get('online_state_ready') else 'warming up'}, audit backlog "
            f"{health.get('audit_backlog', 0)}")
    return text + warnings_markdown(health.get("warnings") or [])


def warnings_markdown(warnings: list[str]) -> str:
    """The API's warnings (/health), one line each, or nothing."""
    return "".join(f"<br>**Warning:** {w}" for w in warnings)


def last_hour_text(stats: dict[str, Any]) -> str:
    """The alert load of the last hour against the budget (/stats `last_hour`), or nothing."""
    load = stats.get("last_hour")
    if not load:
        return ""
    text = (f" Last hour: {load.get('scored', 0)} scored, {load.get('anomalies', 0)} anomalies, alert rate "
            f"{100 * float(load.get('alert_rate') or 0):.2f}% against a budget of "
            f"{100 * float(load.get('budget') or 0):.2f}%.")
    return text + warnings_markdown([load["warning"]] if load.get("warning") else [])


def recent_users(client: ScoringApiClient) -> tuple[list[str], str]:
    try:
        return client.recent_users(), ""
    except Exception as exc:  # noqa: BLE001
        return [], f"Recent users unavailable: {_error_text(exc)}"


def lookup_transaction(client: ScoringApiClient, transaction_id: str | None
                       ) -> tuple[str, dict[str, Any] | None]:
    """(summary markdown, the stored decision or None)."""
    tid = (transaction_id or "").strip()
    if not tid:
        return "Enter a transaction id.", None
    try:
        row = client.transaction(tid)
    except ScoringApiError as exc:
        if exc.status_code == 404:
            return f"No stored decision for transaction `{tid}`: {exc}", None
        return _error_text(exc), None
    except Exception as exc:  # noqa: BLE001
        return _error_text(exc), None
    flag = "ANOMALY" if row.get("anomaly") else "normal"
    where = row.get("source", "?")
    if row.get("kafka_topic"):
        where += f" {row['kafka_topic']}[{row.get('kafka_partition')}]@{row.get('kafka_offset')}"
    return (f"**{tid}**: risk score {format_score(float(row['risk_score']))} ({flag}, threshold "
            f"{format_score(float(row['threshold']))}), model `{row.get('model_version')}`, "
            f"from {where}, scored at {row.get('scored_at')}"), row


@dataclass
class ActivityView:
    message: str
    rows: pd.DataFrame
    summary: str = ""
    histogram: Figure | None = None
    per_source: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=PER_SOURCE_COLUMNS))
    per_hour: Figure | None = None


def _time_window(time_range: str | None, since: str | None, until: str | None
                 ) -> tuple[str | None, str | None]:
    """Explicit since/until win; otherwise the named range ending now."""
    since, until = (since or "").strip() or None, (until or "").strip() or None
    delta = TIME_RANGES.get(time_range or "all time")
    if since is None and delta is not None:
        since = (datetime.now(timezone.utc) - delta).replace(microsecond=0).isoformat()
    return since, until


def audit_frame(items: list[dict[str, Any]]) -> pd.DataFrame:
    frame = pd.DataFrame(items, columns=AUDIT_COLUMNS)
    if not frame.empty:
        frame["risk_score"] = [format_score(float(s)) for s in frame["risk_score"]]
    return frame


def load_activity(client: ScoringApiClient, anomalies_only: bool = False,
                  user_id: str | None = None, source: str | None = "all",
                  time_range: str | None = "all time", since: str | None = None,
                  until: str | None = None, limit: float | None = 50,
                  offset: float | None = 0) -> ActivityView:
    try:
        since, until = _time_window(time_range, since, until)
        page = client.audit(anomalies_only=bool(anomalies_only), user_id=(user_id or "").strip(),
                            source=None if source in (None, "", "all") else source,
                            since=since, until=until, limit=int(limit or 50),
                            offset=int(offset or 0))
        stats = client.stats()
    except Exception as exc:  # noqa: BLE001
        return ActivityView(message=_error_text(exc), rows=audit_frame([]))
    items = page.get("items") or []
    start = page.get("offset", 0)
    shown = f"rows {start + 1}-{start + len(items)}" if items else "no rows"
    per_source = pd.DataFrame(sorted((stats.get("per_source") or {}).items()),
                              columns=PER_SOURCE_COLUMNS)
    summary = (f"Audit: {shown} of {page.get('total', 0)} matching. All time: "
               f"{stats.get('total', 0)} scored, {stats.get('anomalies', 0)} anomalies "
               f"(alert rate {100 * float(stats.get('alert_rate') or 0):.2f}%)." + last_hour_text(stats))
    return ActivityView(message="", rows=audit_frame(items), summary=summary,
                        histogram=histogram_figure(stats), per_source=per_source,
                        per_hour=per_hour_figure(stats))


def load_dead_letters(client: ScoringApiClient, reason: str | None = None,
                      limit: float | None = 50, offset: float | None = 0
                      ) -> tuple[str, pd.DataFrame]:
    try:
        page = client.dead_letters(limit=int(limit or 50), offset=int(offset or 0),
                                   reason=(reason or "").strip())
    except Exception as exc:  # noqa: BLE001
        return _error_text(exc), pd.DataFrame(columns=DEAD_LETTER_COLUMNS)
    items = []
    for item in page.get("items") or []:
        payload = item.get("payload")
        text = payload if isinstance(payload, str) else json.dumps(payload, default=str)
        items.append({**item, "payload": text if len(text) <= 200 else text[:200] + "..."})
    return (f"{page.get('total', len(items))} rejected messages.",
            pd.DataFrame(items, columns=DEAD_LETTER_COLUMNS))


@dataclass
class ModelsView:
    message: str
    versions: pd.DataFrame
    history: pd.DataFrame
    choices: list[str] = field(default_factory=list)
    active: str | None = None


def load_models(client: ScoringApiClient) -> ModelsView:
    empty_history = pd.DataFrame(columns=["activated_at", "version", "previous_version",
                                          "activated_by"])
    try:
        answer = client.models()
    except Exception as exc:  # noqa: BLE001
        return ModelsView(_error_text(exc), pd.DataFrame(columns=["version"]), empty_history)
    versions = answer.get("versions") or []
    metric_names = sorted({name for v in versions for name in (v.get("metrics") or {})})
    rows = []
    for v in versions:
        row = {"version": v.get("version"), "status": v.get("status"),
               "created_at": v.get("created_at"), "feature_set_version": v.get("feature_set_version")}
        for name in metric_names:
            value = (v.get("metrics") or {}).get(name)
            row[name] = round(value, 4) if isinstance(value, float) else value
        row["parameters"] = json.dumps(v.get("parameters") or {}, default=str)
        rows.append(row)
    active, pinned = answer.get("active"), answer.get("pinned")
    if not versions:
        message = ("No model is registered yet: train one (see the README, `jobs.train`), "
                   "then activate it here.")
    else:
        message = f"Active version: `{active or 'none'}`" + (
            f"; pinned by the configuration to `{pinned}` (activation is refused while pinned)"
            if pinned else "")
    history = pd.DataFrame(answer.get("history") or [], columns=empty_history.columns)
    return ModelsView(message, pd.DataFrame(rows), history,
                      [str(v.get("version")) for v in versions], active)


def activate_model(client: ScoringApiClient, version: str | None) -> str:
    if not (version or "").strip():
        return "Choose a version to activate."
    try:
        answer = client.activate(version.strip())
    except Exception as exc:  # noqa: BLE001
        return f"Could not activate `{version}`: {_error_text(exc)}"
    return f"Version `{answer.get('version', version)}` is now {answer.get('status', 'active')}."


# --- the Gradio application ----------------------------------------------------


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


# --- Ray Serve ------------------------------------------------------------------

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


# --- standalone -----------------------------------------------------------------


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


if __name__ == "__main__":
    raise SystemExit(main())
