"""Pure, vectorised offline feature transforms: ``DataFrame`` in, new ``DataFrame`` out.

Input columns: ``transaction_id, user_id, amount, merchant, country,
timestamp`` (already validated, see `features.schema.validate_frame`). The
output is a copy of the input, same index and row order, with the feature
columns appended in `FEATURE_NAMES` order.

`compute_user_features` needs all the rows of one user in the frame,
`compute_merchant_features` all the rows of one merchant; `compute_features`
does both. Rows sharing a ``transaction_id`` are one event delivered several
times: each copy gets the features of the first copy, and the event counts once.

The final float arithmetic lives in `assemble_user_features` and
`assemble_merchant_features`, which the online store calls too, so online and
offline values are bit-for-bit equal.

>>> import pandas as pd
>>> df = pd.DataFrame({"transaction_id": ["a", "b"], "user_id": ["u", "u"],
...                    "amount": [10.0, 30.0], "merchant": ["m", "m"], "country": ["FR", "FR"],
...                    "timestamp": pd.to_datetime(["2024-01-01T10:00", "2024-01-01T10:30"], utc=True)})
>>> out = compute_features(df)
>>> out[["velocity_1h", "amount_to_mean_7d", "seconds_since_prev", "is_new_merchant"]].values.tolist()
[[0.0, 1.0, 7776000.0, 1.0], [1.0, 3.0, 1800.0, 0.0]]
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from configs.errors import InvalidInputError
from features import _kernels
from features.definitions import (
    HOUR_NS,
    MERCHANT_FEATURES,
    RETENTION_NS,
    RETENTION_SECONDS,
    USER_FEATURES,
    WINDOW_1H_NS,
    WINDOW_7D_NS,
    WINDOW_24H_NS,
    WINDOW_30D_NS,
)

INPUT_COLUMNS = ("transaction_id", "user_id", "amount", "merchant", "country", "timestamp")


# --------------------------------------------------------------------------- shared math


def cents_of(amount: np.ndarray) -> np.ndarray:
    """Integer cents, ``round(amount * 100)`` half to even (equal to Python's `round`)."""
    return np.rint(np.asarray(amount, dtype=np.float64) * 100).astype(np.int64)


def _ratio(cents: np.ndarray, n: np.ndarray, total: np.ndarray) -> np.ndarray:
    num = (cents * n).astype(np.float64)
    den = np.where(total > 0, total, 1).astype(np.float64)
    return np.where(n > 0, num / den, 1.0)


def assemble_user_features(amount, ts_ns, cents, v1h, v24h, n7, s7, n30, s30, gap_ns,
                           new_merchant, new_country) -> np.ndarray:
    """The user features (`USER_FEATURES` order) from integer window aggregates.

    ``gap_ns`` is -1 when there is no previous event within the retention.
    """
    amount = np.asarray(amount, dtype=np.float64)
    ts_ns = np.asarray(ts_ns, dtype=np.int64)
    cents = np.asarray(cents, dtype=np.int64)
    gap_ns = np.asarray(gap_ns, dtype=np.int64)
    out = np.empty((len(amount), len(USER_FEATURES)), dtype=np.float64)
    out[:, 0] = np.log1p(amount)
    out[:, 1] = ((ts_ns // HOUR_NS) % 24).astype(np.float64)
    out[:, 2] = np.asarray(v1h, dtype=np.float64)
    out[:, 3] = np.asarray(v24h, dtype=np.float64)
    out[:, 4] = _ratio(cents, np.asarray(n7, dtype=np.int64), np.asarray(s7, dtype=np.int64))
    out[:, 5] = _ratio(cents, np.asarray(n30, dtype=np.int64), np.asarray(s30, dtype=np.int64))
    out[:, 6] = np.where(gap_ns >= 0, gap_ns.astype(np.float64) / 1e9, RETENTION_SECONDS)
    out[:, 7] = np.asarray(new_merchant, dtype=np.float64)
    out[:, 8] = np.asarray(new_country, dtype=np.float64)
    return out


def assemble_merchant_features(volume_24h) -> np.ndarray:
    """The merchant features (`MERCHANT_FEATURES` order) from integer counts."""
    return np.asarray(volume_24h, dtype=np.float64).reshape(-1, 1)


# --------------------------------------------------------------------------- inputs


def timestamps_to_ns(col: pd.Series) -> np.ndarray:
    """int64 nanoseconds since the epoch; naive values are UTC, strings are ISO 8601."""
    if isinstance(col.dtype, pd.DatetimeTZDtype):
        ts = col.dt.tz_convert("UTC")
    elif pd.api.types.is_datetime64_dtype(col.dtype):
        ts = col.dt.tz_localize("UTC")
    else:
        ts = pd.to_datetime(col, utc=True, format="ISO8601")
    return pd.DatetimeIndex(ts).as_unit("ns").asi8.copy()


def _check_columns(df: pd.DataFrame, needed: tuple[str, ...]) -> None:
    missing = [c for c in needed if c not in df.columns]
    if missing:
        raise InvalidInputError(f"missing columns: {', '.join(missing)}")


def _as_str(col: pd.Series) -> np.ndarray:
    return col.astype(str).to_numpy(dtype=object)


def _dedupe(tid: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """Row positions of first copies, and for every row the position among them (or None)."""
    codes, uniques = pd.factorize(tid)
    n = len(tid)
    if len(uniques) == n:
        return np.arange(n), None
    first = np.full(len(uniques), n, dtype=np.int64)
    np.minimum.at(first, codes, np.arange(n))
    keep = np.sort(first)
    position = np.empty(len(uniques), dtype=np.int64)
    position[codes[keep]] = np.arange(len(keep))
    return keep, position[codes]


def _sorted_order(key: np.ndarray, ts: np.ndarray, tid: np.ndarray) -> np.ndarray:
    """Positions sorted by (key, ts, tid); ids are compared only where (key, ts) tie."""
    order = np.lexsort((ts, key))
    k, t = key[order], ts[order]
    same = (k[1:] == k[:-1]) & (t[1:] == t[:-1])
    if not same.any():
        return order
    tie = np.zeros(len(order), dtype=bool)
    tie[1:] |= same
    tie[:-1] |= same
    rank = np.zeros(len(order), dtype=np.int64)
    tied = order[tie]
    rank[tied] = pd.factorize(tid[tied], sort=True)[0]
    return np.lexsort((rank, ts, key))


def _with_columns(df: pd.DataFrame, names: tuple[str, ...], values: np.ndarray) -> pd.DataFrame:
    out = df.copy(deep=False)
    for j, name in enumerate(names):
        out[name] = values[:, j]
    return out


# --------------------------------------------------------------------------- transforms


def compute_user_features(df: pd.DataFrame) -> pd.DataFrame:
    """Append the per-user features; needs all of each user's rows in `df`."""
    _check_columns(df, INPUT_COLUMNS)
    n = len(df)
    if n == 0:
        return _with_columns(df, USER_FEATURES, np.empty((0, len(USER_FEATURES))))
    tid_all = _as_str(df["transaction_id"])
    keep, back = _dedupe(tid_all)
    sub = df if back is None else df.iloc[keep]
    tid = tid_all[keep]
    ts = timestamps_to_ns(sub["timestamp"])
    amount = sub["amount"].to_numpy(dtype=np.float64)
    cents = cents_of(amount)
    user, _ = pd.factorize(sub["user_id"].to_numpy())
    merchant, merchants = pd.factorize(sub["merchant"].to_numpy())
    country, countries = pd.factorize(sub["country"].to_numpy())
    order = _sorted_order(user, ts, tid)
    parts = _kernels.user_window_counts(
        user[order], ts[order], cents[order], merchant[order], country[order],
        len(merchants), len(countries),
        WINDOW_1H_NS, WINDOW_24H_NS, WINDOW_7D_NS, WINDOW_30D_NS, RETENTION_NS)
    unsorted = []
    for p in parts:
        u = np.empty_like(p)
        u[order] = p
        unsorted.append(u)
    values = assemble_user_features(amount, ts, cents, *unsorted)
    if back is not None:
        values = values[back]
    return _with_columns(df, USER_FEATURES, values)


def compute_merchant_features(df: pd.DataFrame) -> pd.DataFrame:
    """Append the per-merchant features; needs all of each merchant's rows in `df`."""
    _check_columns(df, ("transaction_id", "merchant", "timestamp"))
    if len(df) == 0:
        return _with_columns(df, MERCHANT_FEATURES, np.empty((0, len(MERCHANT_FEATURES))))
    tid_all = _as_str(df["transaction_id"])
    keep, back = _dedupe(tid_all)
    sub = df if back is None else df.iloc[keep]
    tid = tid_all[keep]
    ts = timestamps_to_ns(sub["timestamp"])
    merchant, _ = pd.factorize(sub["merchant"].to_numpy())
    order = _sorted_order(merchant, ts, tid)
    counts = np.empty(len(order), dtype=np.int64)
    counts[order] = _kernels.key_window_count(merchant[order], ts[order], WINDOW_24H_NS)
    values = assemble_merchant_features(counts)
    if back is not None:
        values = values[back]
    return _with_columns(df, MERCHANT_FEATURES, values)


def compute_features(df: pd.DataFrame) -> pd.DataFrame:
    """Append every feature of `FEATURE_NAMES`, in order, to a copy of `df`."""
    return compute_merchant_features(compute_user_features(df))
