"""Compiled two-pointer window kernels over rows sorted by (key, timestamp, id).

Private: `features.transforms` is the public entry point. Inputs are sorted so
that all rows of one key are contiguous and in (timestamp, transaction_id)
order, with duplicate transaction ids already removed; row ``j < i`` of the same
key is then exactly "earlier than row i".
"""

from __future__ import annotations

import numpy as np
from numba import njit


@njit(cache=True, nogil=True)
def user_window_counts(group, ts, cents, merchant, country, n_merchants, n_countries,
                       w1h, w24h, w7d, w30d, retention):  # pragma: no cover - compiled
    n = ts.shape[0]
    v1h = np.zeros(n, np.int64)
    v24h = np.zeros(n, np.int64)
    n7 = np.zeros(n, np.int64)
    s7 = np.zeros(n, np.int64)
    n30 = np.zeros(n, np.int64)
    s30 = np.zeros(n, np.int64)
    gap = np.full(n, -1, np.int64)
    new_m = np.ones(n, np.int8)
    new_c = np.ones(n, np.int8)
    prefix = np.zeros(n + 1, np.int64)
    for i in range(n):
        prefix[i + 1] = prefix[i] + cents[i]
    seen_m_group = np.full(n_merchants, -1, np.int64)
    seen_m_ts = np.zeros(n_merchants, np.int64)
    seen_c_group = np.full(n_countries, -1, np.int64)
    seen_c_ts = np.zeros(n_countries, np.int64)
    l1 = l24 = l7 = l30 = lr = 0
    for i in range(n):
        g = group[i]
        if i == 0 or g != group[i - 1]:
            l1 = l24 = l7 = l30 = lr = i
        t = ts[i]
        while l1 < i and ts[l1] <= t - w1h:
            l1 += 1
        while l24 < i and ts[l24] <= t - w24h:
            l24 += 1
        while l7 < i and ts[l7] <= t - w7d:
            l7 += 1
        while l30 < i and ts[l30] <= t - w30d:
            l30 += 1
        while lr < i and ts[lr] <= t - retention:
            lr += 1
        v1h[i] = i - l1
        v24h[i] = i - l24
        n7[i] = i - l7
        s7[i] = prefix[i] - prefix[l7]
        n30[i] = i - l30
        s30[i] = prefix[i] - prefix[l30]
        if lr < i:
            gap[i] = t - ts[i - 1]
        m = merchant[i]
        if seen_m_group[m] == g and t - seen_m_ts[m] < retention:
            new_m[i] = 0
        seen_m_group[m] = g
        seen_m_ts[m] = t
        c = country[i]
        if seen_c_group[c] == g and t - seen_c_ts[c] < retention:
            new_c[i] = 0
        seen_c_group[c] = g
        seen_c_ts[c] = t
    return v1h, v24h, n7, s7, n30, s30, gap, new_m, new_c


@njit(cache=True, nogil=True)
def key_window_count(group, ts, window):  # pragma: no cover - compiled
    """Count of earlier rows of the same key within (t - window, t]."""
    n = ts.shape[0]
    out = np.zeros(n, np.int64)
    lo = 0
    for i in range(n):
        if i == 0 or group[i] != group[i - 1]:
            lo = i
        t = ts[i]
        while lo < i and ts[lo] <= t - window:
            lo += 1
        out[i] = i - lo
    return out
