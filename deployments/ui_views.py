"""The UI's handlers: a client and plain values in, a view (a dataclass or a
tuple: text, HTML, a data frame, a figure) out. They never raise: an error
becomes a message, so no traceback reaches the screen."""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

import matplotlib

matplotlib.use("Agg")  # before any figure: replicas and servers have no display
import pandas as pd  # noqa: E402
from deployments.ui_client import ScoringApiClient, ScoringApiError  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

log = logging.getLogger(__name__)



SCORE_DECIMALS = 4


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
