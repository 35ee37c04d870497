"""Plain-language reasons for a score, from the features that pushed it up the most."""

from __future__ import annotations

from collections.abc import Callable, Mapping

_SECONDS_PER_DAY = 86_400


def _fmt_seconds(s: float) -> str:
    if s < 120:
        return f"{s:.0f} seconds"
    if s < 7200:
        return f"{s / 60:.0f} minutes"
    if s < 2 * _SECONDS_PER_DAY:
        return f"{s / 3600:.1f} hours"
    return f"{s / _SECONDS_PER_DAY:.0f} days"


# One sentence per feature, given the feature values and the raw transaction.
_TEMPLATES: dict[str, Callable[[Mapping[str, float], Mapping], str]] = {
    "amount_log": lambda f, t: f"amount {t['amount']:.2f} is large compared with typical transactions",
    "transaction_hour": lambda f, t: f"made at {int(f['transaction_hour']):02d}:00 UTC, an unusual hour",
    "velocity_1h": lambda f, t: f"{int(f['velocity_1h'])} earlier transactions by this user in the last hour",
    "velocity_24h": lambda f, t: f"{int(f['velocity_24h'])} earlier transactions by this user in the last 24 hours",
    "amount_to_mean_7d": lambda f, t: f"amount is {f['amount_to_mean_7d']:.1f}x this user's 7-day average",
    "amount_to_mean_30d": lambda f, t: f"amount is {f['amount_to_mean_30d']:.1f}x this user's 30-day average",
    "seconds_since_prev": lambda f, t: f"{_fmt_seconds(f['seconds_since_prev'])} since this user's previous transaction",
    "is_new_merchant": lambda f, t: (
        f"first transaction of this user at merchant {t['merchant']} in the retained history"
        if f["is_new_merchant"] else f"merchant {t['merchant']} is familiar to this user"),
    "is_new_country": lambda f, t: (
        f"first transaction of this user from country {t['country']} in the retained history"
        if f["is_new_country"] else f"country {t['country']} is familiar to this user"),
    "merchant_volume_24h": lambda f, t: f"merchant {t['merchant']} had {int(f['merchant_volume_24h'])} transactions in the last 24 hours",
}


def build_reasons(features: Mapping[str, float], explanation: Mapping[str, float],
                  transaction: Mapping, top: int = 3) -> list[str]:
    """The `top` features pushing towards anomaly (positive explanation), most first."""
    pushing = sorted((v, k) for k, v in explanation.items() if v > 0)
    reasons = []
    for value, name in reversed(pushing[-top:]):
        template = _TEMPLATES.get(name)
        text = template(features, transaction) if template else f"{name} = {features.get(name)}"
        reasons.append(f"{text} (+{value:.3f})")
    return reasons or ["no feature pushes this transaction towards anomaly"]
