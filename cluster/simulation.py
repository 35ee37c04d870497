"""Labelled synthetic transactions for demos, tests and evaluation.

Legit behaviour is per user: a home country (and its UTC offset), a few
habitual merchants drawn from a shared pool with popularity skew, a daytime
rhythm, a log-normal amount distribution around a personal median and a
personal activity rate. Legit users also shop in short sessions, sometimes try
a new merchant and sometimes travel, so "new" or "fast" alone is no label.

Fraud (``is_fraud=1``; at most 2 % of rows) comes in five scenarios, each built
to move at least one behavioural, per-user, point-in-time feature strongly
while most fraudulent amounts stay inside the normal range of amounts:

- ``amount_outlier``: one purchase at a habitual merchant, 8-20x the user's
  median, yet below the 95th percentile of all legit amounts.
- ``account_takeover``: 3-8 purchases within 1-2 hours, about 5x the user's
  median, mostly at merchants new to the user.
- ``compromised_merchant``: a few unpopular merchants see a spike of purchases
  from users who never shopped there (a test charge, then a real one).
- ``night_activity``: a burst of 2-5 purchases at 1-5 a.m. local time.
- ``new_country``: 1-4 purchases from a country the user never used, at new
  merchants.

>>> df = simulate(users=50, days=10, seed=1)
>>> list(df.columns) == list(COLUMNS)
True
>>> bool(df["is_fraud"].mean() <= 0.02)
True

The job `python -m jobs.simulate` writes it to a file; `cluster.producer` sends
it to Kafka.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from configs.errors import InvalidInputError

logger = logging.getLogger(__name__)

COLUMNS = (
    "transaction_id", "user_id", "amount", "merchant", "country", "timestamp", "is_fraud", "scenario",
)
SCENARIOS = ("amount_outlier", "account_takeover", "compromised_merchant", "night_activity", "new_country")
NORMAL = "normal"
DEFAULT_START = "2025-01-01T00:00:00Z"
DEFAULT_FRAUD_RATE = 0.015
MAX_FRAUD_RATE = 0.02

# Share of fraudulent rows per scenario (same order as SCENARIOS).
SCENARIO_SHARES = np.array([0.12, 0.28, 0.20, 0.20, 0.20])

# Home countries (with UTC offsets in hours) and extra destinations for travel and fraud.
HOME_COUNTRIES = np.array(["DE", "FR", "GB", "ES", "IT", "NL", "PL", "SE", "PT", "IE", "BE", "AT", "GR", "RO"])
HOME_WEIGHTS = np.array([16, 14, 14, 10, 10, 6, 6, 4, 4, 3, 3, 3, 3, 4], dtype=float)
HOME_UTC_OFFSETS = np.array([1, 1, 0, 1, 1, 1, 1, 1, 0, 0, 1, 1, 2, 2])
OTHER_COUNTRIES = np.array(["US", "BR", "IN", "JP", "AU", "CA", "MX", "TR", "AE", "ZA", "NG", "CN", "TH", "RU"])
COUNTRIES = np.concatenate([HOME_COUNTRIES, OTHER_COUNTRIES])

# Relative activity per local hour 0..23: busy day, quiet 1-5 a.m.
HOURLY_WEIGHTS = np.array([
    1.0, 0.35, 0.15, 0.1, 0.12, 0.3, 0.8, 2.0, 3.5, 4.5, 5.0, 5.5,
    6.5, 6.0, 5.0, 5.0, 5.5, 6.5, 7.0, 6.5, 5.0, 3.5, 2.5, 1.6,
])

MERCHANT_ZIPF_EXPONENT = 0.9
HABITUAL_MERCHANTS = (2, 8)      # per-user count range, inclusive
MEDIAN_AMOUNT_RANGE = (5.0, 200.0)  # per-user median, log-uniform
AMOUNT_SIGMA_RANGE = (0.3, 0.6)     # per-user log-normal sigma
RATE_RANGE = (0.5, 6.0)             # per-user transactions per day, log-uniform
NEW_MERCHANT_PROB = 0.05            # legit purchase at a merchant outside the habitual set
SESSION_PROB = 0.12                 # legit purchase followed by another within minutes
SESSION_GAP_MINUTES = 12.0
TRAVELLER_PROB = 0.10               # users who take one trip abroad
TRIP_NEW_MERCHANT_PROB = 0.6
MIN_AMOUNT = 0.5
DAY = 86_400
HOUR = 3_600


@dataclass(frozen=True)
class _Users:
    """Per-user parameters, one array element per user."""

    home: np.ndarray          # index into COUNTRIES
    utc_offset: np.ndarray    # hours
    chrono_shift: np.ndarray  # hours added to the shared rhythm
    median: np.ndarray        # typical amount
    sigma: np.ndarray         # log-normal spread
    rate: np.ndarray          # transactions per day
    habitual: np.ndarray      # (users, HABITUAL_MERCHANTS[1]) merchant indices
    n_habitual: np.ndarray
    trip_start: np.ndarray    # seconds from start, -1 for no trip
    trip_end: np.ndarray
    trip_country: np.ndarray


def parse_start(start: str | pd.Timestamp | None) -> pd.Timestamp:
    """An ISO date or datetime as a UTC timestamp (naive means UTC).

    >>> parse_start("2024-03-01")
    Timestamp('2024-03-01 00:00:00+0000', tz='UTC')
    """
    try:
        ts = pd.Timestamp(DEFAULT_START if start is None else start)
    except (ValueError, TypeError) as e:
        raise InvalidInputError(f"start: not an ISO 8601 date or datetime: {start!r}") from e
    return ts.tz_localize("UTC") if ts.tzinfo is None else ts.tz_convert("UTC")


def simulate(
    users: int,
    days: int,
    seed: int,
    start: str | pd.Timestamp | None = None,
    fraud_rate: float = DEFAULT_FRAUD_RATE,
    population: tuple[int, int] | None = None,
) -> pd.DataFrame:
    """Labelled transactions of ``users`` users over ``days`` days from ``start``.

    Returns the columns ``COLUMNS`` sorted by timestamp; ``timestamp`` is tz-aware
    UTC (``datetime64[us, UTC]``, whole seconds), ``amount`` is rounded to cents. The same arguments give
    the same frame. ``fraud_rate`` is the share of fraudulent rows (0..0.02); it is
    never exceeded, is met closely for large runs, and every scenario appears once
    there are at least five fraudulent rows (about 350 rows in all at the default).

    ``population=(p_seed, p_days)`` draws new transactions (from ``seed``) of the
    users of ``simulate(users, p_days, p_seed)``: the same homes, habitual merchants,
    amounts, rates and trips (a trip on day 12 of that run falls on day 12 of this
    one). The demo's live traffic uses it to continue the sample's customers.
    """
    if users < 1:
        raise InvalidInputError(f"users: must be >= 1, got {users}")
    if days < 1:
        raise InvalidInputError(f"days: must be >= 1, got {days}")
    if not 0.0 <= fraud_rate <= MAX_FRAUD_RATE:
        raise InvalidInputError(f"fraud_rate: must be within [0, {MAX_FRAUD_RATE}], got {fraud_rate}")
    if seed < 0:
        raise InvalidInputError(f"seed: must be >= 0, got {seed}")
    if population is not None and (len(population) != 2 or population[0] < 0 or population[1] < 1):
        raise InvalidInputError(f"population: must be (seed >= 0, days >= 1), got {population!r}")
    start_ts = parse_start(start)
    rng = np.random.default_rng(seed)

    n_merchants = int(np.clip(users // 4, 60, 5_000))
    popularity = 1.0 / np.arange(1, n_merchants + 1) ** MERCHANT_ZIPF_EXPONENT
    popularity /= popularity.sum()
    span = days * DAY

    if population is None:
        u = _draw_users(rng, users, span, popularity)
    else:  # drawn as that run drew them (its span decides how many random numbers trips use)
        u = _draw_users(np.random.default_rng(population[0]), users, population[1] * DAY, popularity)
    legit = _draw_legit(rng, u, span, popularity)
    # Rounded down, so the share of fraudulent rows never exceeds fraud_rate.
    n_fraud = int(np.floor(fraud_rate / (1.0 - fraud_rate) * len(legit["user"])))
    fraud = _draw_fraud(rng, u, span, days, n_fraud, popularity, legit["amount"])

    parts = [legit, *fraud]
    user = np.concatenate([p["user"] for p in parts])
    t = np.concatenate([p["t"] for p in parts])
    amount = np.concatenate([p["amount"] for p in parts])
    merchant = np.concatenate([p["merchant"] for p in parts])
    country = np.concatenate([p["country"] for p in parts])
    scenario = np.concatenate([np.full(len(p["user"]), code, dtype=np.int8) for code, p in enumerate(parts)])

    order = np.lexsort((scenario, user, t))
    scenario = scenario[order]
    epoch = start_ts.floor("s").value // 1_000_000_000
    return pd.DataFrame({
        "transaction_id": pd.array(_transaction_ids(seed, len(order)), dtype="str"),
        "user_id": _names("u", users, 6).take(user[order]),
        "amount": np.round(np.maximum(amount[order], MIN_AMOUNT), 2),
        "merchant": _names("m", n_merchants, 5).take(merchant[order]),
        "country": pd.array(COUNTRIES, dtype="str").take(country[order]),
        "timestamp": pd.to_datetime((epoch + t[order]) * 1_000_000, unit="us", utc=True),
        "is_fraud": (scenario > 0).astype(np.int64),
        "scenario": pd.array([NORMAL, *SCENARIOS], dtype="str").take(scenario),
    })


def _transaction_ids(seed: int, n: int) -> pa.Array:
    """``sim-{seed}-{index:09d}`` for index 0..n-1."""
    digits = pc.utf8_lpad(pc.cast(pa.array(np.arange(n)), pa.string()), 9, "0")
    return pc.binary_join_element_wise(f"sim-{seed}-", digits, "")


def _names(prefix: str, count: int, width: int) -> pd.api.extensions.ExtensionArray:
    """``{prefix}{index:0{width}d}`` for index 0..count-1."""
    return pd.array(np.strings.add(prefix, np.strings.zfill(np.arange(count).astype(f"U{width}"), width)), dtype="str")


def _pick(rng: np.random.Generator, cdf: np.ndarray, size) -> np.ndarray:
    """Indices drawn with the probabilities whose cumulative sum is ``cdf``."""
    return np.minimum(np.searchsorted(cdf, rng.random(size), side="right"), len(cdf) - 1)


def _log_uniform(rng: np.random.Generator, bounds: tuple[float, float], size) -> np.ndarray:
    return np.exp(rng.uniform(np.log(bounds[0]), np.log(bounds[1]), size))


def _draw_users(rng: np.random.Generator, n: int, span: int, popularity: np.ndarray) -> _Users:
    home = _pick(rng, np.cumsum(HOME_WEIGHTS / HOME_WEIGHTS.sum()), n)
    k_max = HABITUAL_MERCHANTS[1]
    habitual = _pick(rng, np.cumsum(popularity), (n, k_max))
    travels = rng.random(n) < TRAVELLER_PROB
    trip_len = rng.integers(2, 8, n) * DAY
    trip_start = np.where(travels, rng.integers(0, max(span - 2 * DAY, 1), n), -1)
    # Trips go to another home country mostly, sometimes further away.
    trip_country = np.where(
        rng.random(n) < 0.7,
        (home + rng.integers(1, len(HOME_COUNTRIES), n)) % len(HOME_COUNTRIES),
        len(HOME_COUNTRIES) + rng.integers(0, len(OTHER_COUNTRIES), n),
    )
    return _Users(
        home=home,
        utc_offset=HOME_UTC_OFFSETS[home],
        chrono_shift=rng.integers(-1, 2, n),
        median=_log_uniform(rng, MEDIAN_AMOUNT_RANGE, n),
        sigma=rng.uniform(*AMOUNT_SIGMA_RANGE, n),
        rate=_log_uniform(rng, RATE_RANGE, n),
        habitual=habitual,
        n_habitual=rng.integers(HABITUAL_MERCHANTS[0], k_max + 1, n),
        trip_start=trip_start,
        trip_end=np.where(travels, trip_start + trip_len, -1),
        trip_country=trip_country,
    )


def _habitual_merchant(rng: np.random.Generator, u: _Users, user: np.ndarray) -> np.ndarray:
    """A habitual merchant of each user, the first ones preferred."""
    slot = np.floor(u.n_habitual[user] * rng.random(len(user)) ** 1.7).astype(np.int64)
    return u.habitual[user, slot]


def _local_daytime_seconds(rng: np.random.Generator, u: _Users, user: np.ndarray) -> np.ndarray:
    """Seconds after UTC midnight following each user's daily rhythm."""
    local_hour = _pick(rng, np.cumsum(HOURLY_WEIGHTS / HOURLY_WEIGHTS.sum()), len(user))
    utc_hour = local_hour + u.chrono_shift[user] - u.utc_offset[user]
    return utc_hour * HOUR + rng.integers(0, HOUR, len(user))


def _draw_legit(rng: np.random.Generator, u: _Users, span: int, popularity: np.ndarray) -> dict:
    n_users = len(u.median)
    days = span / DAY
    counts = rng.poisson(u.rate * days / (1.0 + SESSION_PROB))
    user = np.repeat(np.arange(n_users), counts)
    n = len(user)
    t = rng.integers(0, span // DAY, n) * DAY + _local_daytime_seconds(rng, u, user)

    # Short shopping sessions: a follow-up purchase minutes after some purchases.
    follow = rng.random(n) < SESSION_PROB
    t_follow = t[follow] + 60 + rng.exponential(SESSION_GAP_MINUTES * 60, follow.sum()).astype(np.int64)
    user = np.concatenate([user, user[follow]])
    t = np.mod(np.concatenate([t, t_follow]), span)
    n = len(user)

    merchant = _habitual_merchant(rng, u, user)
    new = rng.random(n) < NEW_MERCHANT_PROB
    merchant[new] = _pick(rng, np.cumsum(popularity), new.sum())

    country = u.home[user].copy()
    abroad = (t >= u.trip_start[user]) & (t < u.trip_end[user])
    country[abroad] = u.trip_country[user[abroad]]
    local_new = abroad & (rng.random(n) < TRIP_NEW_MERCHANT_PROB)
    merchant[local_new] = _pick(rng, np.cumsum(popularity), local_new.sum())

    amount = u.median[user] * np.exp(u.sigma[user] * rng.standard_normal(n))
    return {"user": user, "t": t, "amount": amount, "merchant": merchant, "country": country}


def _split_rows(rng: np.random.Generator, rows: int, size_range: tuple[int, int]) -> np.ndarray:
    """Incident sizes in ``size_range`` that add up to exactly ``rows``."""
    sizes = rng.integers(size_range[0], size_range[1] + 1, max(rows, 1))
    total = np.cumsum(sizes)
    k = int(np.searchsorted(total, rows))
    sizes = sizes[: k + 1].copy()
    sizes[-1] -= total[k] - rows
    return sizes[sizes > 0]


def _draw_fraud(
    rng: np.random.Generator,
    u: _Users,
    span: int,
    days: int,
    n_fraud: int,
    popularity: np.ndarray,
    legit_amount: np.ndarray,
) -> list[dict]:
    """One dict of rows per scenario, in the order of SCENARIOS."""
    rows = np.floor(n_fraud * SCENARIO_SHARES).astype(np.int64)
    if n_fraud >= len(SCENARIOS):
        rows = np.maximum(rows, 1)
    rows[np.argmax(SCENARIO_SHARES)] += n_fraud - rows.sum()
    n_users = len(u.median)
    # Fraud starts after some history exists, so trailing features have a baseline.
    history = min(7, days // 3) * DAY
    merchant_cdf = np.cumsum(popularity)
    p95 = float(np.quantile(legit_amount, 0.95)) if len(legit_amount) else MEDIAN_AMOUNT_RANGE[1]

    def burst(sizes: np.ndarray, victims: np.ndarray, t0: np.ndarray, window: np.ndarray) -> tuple:
        user = np.repeat(victims, sizes)
        first = np.repeat(np.cumsum(sizes) - sizes, sizes)
        position = np.arange(sizes.sum()) - first
        offsets = np.where(position == 0, 0, rng.uniform(0, 1, len(user)) * np.repeat(window, sizes))
        return user, np.mod(np.repeat(t0, sizes) + offsets.astype(np.int64), span), position

    def pick_victims(pool: np.ndarray, k: int) -> np.ndarray:
        """Distinct victims while the pool lasts, so one user's incidents rarely overlap."""
        return rng.choice(pool, k, replace=k > len(pool))

    def when(victims: np.ndarray, latest_offset: int) -> np.ndarray:
        return rng.integers(history, max(span - latest_offset, history + 1), len(victims))

    out = []

    # amount_outlier: one purchase far above the user's own typical, below the global 95th percentile.
    cheap = np.flatnonzero(u.median * 8 < 0.9 * p95)
    pool = cheap if len(cheap) else np.arange(n_users)
    victims = pick_victims(pool, rows[0])
    day = rng.integers(history // DAY, days, len(victims))
    t = np.mod(day * DAY + _local_daytime_seconds(rng, u, victims), span)
    factor = _log_uniform(rng, (8.0, 20.0), len(victims))
    amount = np.minimum(u.median[victims] * factor, 0.9 * p95 * rng.uniform(0.8, 1.0, len(victims)))
    out.append({"user": victims, "t": t, "amount": amount,
                "merchant": _habitual_merchant(rng, u, victims), "country": u.home[victims]})

    # account_takeover: 3-8 purchases within 1-2 hours, ~5x usual, mostly new merchants.
    sizes = _split_rows(rng, rows[1], (3, 8))
    victims = pick_victims(np.arange(n_users), len(sizes))
    window = rng.uniform(1, 2, len(sizes)) * HOUR
    user, t, _ = burst(sizes, victims, when(victims, 2 * HOUR), window)
    amount = 5.0 * u.median[user] * np.exp(0.25 * rng.standard_normal(len(user)))
    merchant = np.where(rng.random(len(user)) < 0.8, _pick(rng, merchant_cdf, len(user)),
                        _habitual_merchant(rng, u, user))
    out.append({"user": user, "t": t, "amount": amount, "merchant": merchant, "country": u.home[user]})

    # compromised_merchant: a spike at a few unpopular merchants, a test charge then a real one.
    sizes = _split_rows(rng, rows[2], (1, 2))
    n_bad = int(np.clip(round(rows[2] / 60), 1, 5))
    tail = np.arange(len(popularity) // 2, len(popularity))
    bad = rng.choice(tail, n_bad, replace=False)
    bad_start = rng.integers(history, max(span - 2 * DAY, history + 1), n_bad)
    which = rng.integers(0, n_bad, len(sizes))
    victims = pick_victims(np.arange(n_users), len(sizes))
    t0 = np.minimum(bad_start[which] + rng.integers(0, 2 * DAY, len(sizes)), span - HOUR)
    user, t, position = burst(sizes, victims, t0, rng.uniform(2, 15, len(sizes)) * 60)
    amount = np.where(position == 0, rng.uniform(3, 15, len(user)),
                      u.median[user] * _log_uniform(rng, (1.5, 4.0), len(user)))
    out.append({"user": user, "t": t, "amount": amount,
                "merchant": np.repeat(bad[which], sizes), "country": u.home[user]})

    # night_activity: 2-5 purchases at 1-5 a.m. local time within an hour.
    sizes = _split_rows(rng, rows[3], (2, 5))
    victims = pick_victims(np.arange(n_users), len(sizes))
    day = rng.integers(min(max(history // DAY, 1), days - 1), days, len(sizes))
    local = rng.integers(1 * HOUR, 4 * HOUR, len(sizes))
    t0 = day * DAY + local - u.utc_offset[victims] * HOUR
    user, t, _ = burst(sizes, victims, t0, np.full(len(sizes), HOUR))
    amount = u.median[user] * _log_uniform(rng, (1.0, 3.0), len(user))
    merchant = np.where(rng.random(len(user)) < 0.5, _pick(rng, merchant_cdf, len(user)),
                        _habitual_merchant(rng, u, user))
    out.append({"user": user, "t": t, "amount": amount, "merchant": merchant, "country": u.home[user]})

    # new_country: 1-4 purchases within a few hours from a country the user never used, new merchants.
    sizes = _split_rows(rng, rows[4], (1, 4))
    victims = pick_victims(np.arange(n_users), len(sizes))
    user, t, _ = burst(sizes, victims, when(victims, 3 * HOUR), rng.uniform(0.5, 3, len(sizes)) * HOUR)
    foreign = len(HOME_COUNTRIES) + rng.integers(0, len(OTHER_COUNTRIES), len(sizes))
    # Never the country of the user's own trip.
    foreign = np.where(foreign == u.trip_country[victims],
                       len(HOME_COUNTRIES) + (foreign - len(HOME_COUNTRIES) + 1) % len(OTHER_COUNTRIES), foreign)
    amount = u.median[user] * _log_uniform(rng, (1.5, 4.0), len(user))
    merchant = np.where(rng.random(len(user)) < 0.9, _pick(rng, merchant_cdf, len(user)),
                        _habitual_merchant(rng, u, user))
    out.append({"user": user, "t": t, "amount": amount, "merchant": merchant,
                "country": np.repeat(foreign, sizes)})
    return out
