"""The ordered feature names, what each one means, and the feature-set version.

All features are point in time. For an event at event time ``t`` with id
``i``, "earlier" means strictly earlier in the order ``(timestamp,
transaction_id)``; a window ``w`` is the interval ``(t - w, t]`` of event time
intersected with "earlier". Every value is float64 and never NaN; each feature
has a cold-start value used when the user (or merchant) has no earlier event in
the window. Money is handled in integer cents, so that the sums behind the
ratios are exact and equal online and offline.

`FEATURE_SET_VERSION` is derived from a canonical description of these
definitions (names, docstrings, windows, cold starts): change one and the
version changes, and a model trained on other features refuses to load.
"""

from __future__ import annotations

import hashlib
import json

HOUR_NS = 3_600 * 1_000_000_000
DAY_NS = 24 * HOUR_NS

# Windows, in integer nanoseconds of event time.
WINDOW_1H_NS = HOUR_NS
WINDOW_24H_NS = DAY_NS
WINDOW_7D_NS = 7 * DAY_NS
WINDOW_30D_NS = 30 * DAY_NS
# How far back "new merchant", "new country" and "previous event" look. It is
# part of the feature definitions (and of the version); the online state keeps
# `max(settings.history_retention_days, RETENTION_DAYS)` days plus a grace day.
RETENTION_DAYS = 90
RETENTION_NS = RETENTION_DAYS * DAY_NS
RETENTION_SECONDS = float(RETENTION_DAYS * 86_400)

FEATURE_DOCS: dict[str, str] = {
    "amount_log": "log1p(amount), amount in currency units; unitless.",
    "transaction_hour": "UTC hour of the event time, 0-23; hours.",
    "velocity_1h": "Count of the user's earlier events in the last hour; events.",
    "velocity_24h": "Count of the user's earlier events in the last 24 hours; events.",
    "amount_to_mean_7d": (
        "amount_cents / mean(amount_cents of the user's earlier events in 7 days), computed as "
        "float(amount_cents * n) / float(sum_cents); ratio; cold start 1.0."),
    "amount_to_mean_30d": (
        "amount_cents / mean(amount_cents of the user's earlier events in 30 days), computed as "
        "float(amount_cents * n) / float(sum_cents); ratio; cold start 1.0."),
    "seconds_since_prev": (
        "Seconds since the user's previous event within the retention window; seconds; "
        "cold start = retention in seconds."),
    "is_new_merchant": (
        "1.0 if the merchant is absent from the user's earlier events within the retention "
        "window, else 0.0; flag."),
    "is_new_country": (
        "1.0 if the country is absent from the user's earlier events within the retention "
        "window, else 0.0; flag."),
    "merchant_volume_24h": (
        "Count of earlier events at the same merchant, all users, in the last 24 hours; events."),
}

FEATURE_NAMES: tuple[str, ...] = tuple(FEATURE_DOCS)

# Value when no earlier event exists in the window.
COLD_START: dict[str, float] = {
    "velocity_1h": 0.0,
    "velocity_24h": 0.0,
    "amount_to_mean_7d": 1.0,
    "amount_to_mean_30d": 1.0,
    "seconds_since_prev": RETENTION_SECONDS,
    "is_new_merchant": 1.0,
    "is_new_country": 1.0,
    "merchant_volume_24h": 0.0,
}

# Features that need all the rows of one user together, and of one merchant.
USER_FEATURES: tuple[str, ...] = FEATURE_NAMES[:-1]
MERCHANT_FEATURES: tuple[str, ...] = FEATURE_NAMES[-1:]

# Bump when the code computing a feature changes without its description changing.
IMPLEMENTATION_REVISION = 1


def describe_definitions() -> dict:
    """The canonical description the version is derived from."""
    return {
        "names": list(FEATURE_NAMES),
        "docs": FEATURE_DOCS,
        "cold_start": COLD_START,
        "windows_ns": {"1h": WINDOW_1H_NS, "24h": WINDOW_24H_NS, "7d": WINDOW_7D_NS,
                       "30d": WINDOW_30D_NS, "retention": RETENTION_NS},
        "order": "(timestamp, transaction_id) strictly before; windows (t - w, t]",
        "money": "integer cents = round(amount * 100)",
        "dtype": "float64",
        "revision": IMPLEMENTATION_REVISION,
    }


def feature_set_version(description: dict | None = None) -> str:
    """``"fs-"`` + the first 12 hex digits of sha256 of the canonical JSON description."""
    text = json.dumps(description or describe_definitions(), sort_keys=True, separators=(",", ":"))
    return "fs-" + hashlib.sha256(text.encode()).hexdigest()[:12]


FEATURE_SET_VERSION = feature_set_version()
