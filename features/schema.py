"""The transaction schema: one pydantic model for single records and the same
rules, vectorised, for data frames.

Rules (every error names the field and the rule):

- ``user_id``, ``merchant``: text, or an integer taken as its decimal text
  (``101`` and ``"101"`` are one key, online, offline and in the audit); not a
  float or a boolean; not blank, no NUL character (PostgreSQL text cannot hold
  one, so the audit row could not be written), at most 64 characters.
- ``amount``: a finite number, > 0, at least one cent once rounded to cents, at
  most ``settings.max_amount``. Money is compared and summed in integer cents
  (``amount_cents = round(amount * 100)``) so that sums are exact everywhere.
- ``country``: two letters A-Z (lower case is accepted and upper-cased).
- ``timestamp``: ISO 8601; naive means UTC; stored tz-aware in UTC; not before
  1970-01-01T00:00:00Z (``MIN_TIMESTAMP``: the state counts time in int64
  nanoseconds since the epoch, and no card transaction is older) and not later
  than now + ``settings.max_clock_skew_seconds``. The same range holds in the
  API, Kafka messages and job files.
- ``transaction_id``: optional, 1-128 characters of ``[A-Za-z0-9._:-]``.

>>> t = parse_transaction({"user_id": "u1", "amount": 12.5, "merchant": "m1",
...                        "country": "fr", "timestamp": "2024-05-01T10:00:00"})
>>> t.country, t.amount_cents, t.timestamp.isoformat()
('FR', 1250, '2024-05-01T10:00:00+00:00')
"""

from __future__ import annotations

import hashlib
import json
import json.encoder
import math
import re
from datetime import datetime, timedelta, timezone
from typing import Annotated, Any

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field, ValidationError, WithJsonSchema, field_validator

from configs.errors import InvalidInputError
from configs.settings import get_settings

MAX_ID_LENGTH = 64
MAX_TRANSACTION_ID_LENGTH = 128
TRANSACTION_ID_PATTERN = r"^[A-Za-z0-9._:-]+$"
COUNTRY_PATTERN = r"^[A-Z]{2}$"
REQUIRED_COLUMNS = ("user_id", "amount", "merchant", "country", "timestamp")
MIN_TIMESTAMP = datetime(1970, 1, 1, tzinfo=timezone.utc)
_MIN_TIMESTAMP_TEXT = "1970-01-01T00:00:00Z"
# What the API's schema says a key may be (the validator turns an integer into its text).
_KEY_JSON_SCHEMA = {"anyOf": [{"type": "string", "minLength": 1, "maxLength": 64},
                              {"type": "integer"}],
                    "description": "text, or an integer taken as its decimal text"}

_TRANSACTION_ID_RE = re.compile(TRANSACTION_ID_PATTERN)
_COUNTRY_RE = re.compile(COUNTRY_PATTERN)


def to_cents(amount: float) -> int:
    """Integer cents of an amount: ``round(amount * 100)`` (half to even, like numpy)."""
    return int(round(amount * 100))


class Transaction(BaseModel):
    """One card transaction as it reaches the API, Kafka or a job."""

    model_config = ConfigDict(frozen=True, extra="forbid", str_strip_whitespace=False)

    user_id: Annotated[str, WithJsonSchema(_KEY_JSON_SCHEMA)] = Field(min_length=1, max_length=MAX_ID_LENGTH)
    amount: float
    merchant: Annotated[str, WithJsonSchema(_KEY_JSON_SCHEMA)] = Field(min_length=1, max_length=MAX_ID_LENGTH)
    country: str
    timestamp: datetime
    transaction_id: str | None = Field(default=None, min_length=1,
                                       max_length=MAX_TRANSACTION_ID_LENGTH,
                                       pattern=TRANSACTION_ID_PATTERN)

    @field_validator("user_id", "merchant", mode="before")
    @classmethod
    def _key_text(cls, value: Any) -> Any:
        return key_text(value)

    @field_validator("user_id", "merchant")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be blank")
        if "\x00" in value:
            raise ValueError("must not contain a NUL character")
        return value

    @field_validator("amount", mode="before")
    @classmethod
    def _amount_is_number(cls, value: Any) -> Any:
        if isinstance(value, bool) or not isinstance(value, (int, float, str, np.number)):
            raise ValueError("must be a number")
        return value

    @field_validator("amount")
    @classmethod
    def _amount_rules(cls, value: float) -> float:
        if not math.isfinite(value):
            raise ValueError("must be finite")
        if value <= 0:
            raise ValueError("must be greater than 0")
        limit = get_settings().max_amount
        if value > limit:  # before cents: 1.7e308 * 100 is infinite
            raise ValueError(f"must be at most max_amount ({limit:g})")
        if to_cents(value) < 1:
            raise ValueError("must be at least one cent (0.01)")
        return float(value)

    @field_validator("country", mode="before")
    @classmethod
    def _country_rules(cls, value: Any) -> str:
        if not isinstance(value, str) or not _COUNTRY_RE.match(value.upper()):
            raise ValueError("must be two letters A-Z (ISO 3166-1 alpha-2)")
        return value.upper()

    @field_validator("timestamp", mode="before")
    @classmethod
    def _timestamp_is_iso(cls, value: Any) -> Any:
        if isinstance(value, pd.Timestamp):
            value = value.to_pydatetime()
        elif isinstance(value, str):
            try:
                value = datetime.fromisoformat(value[:-1] + "+00:00" if value.endswith("Z") else value)
            except ValueError:
                raise ValueError("must be an ISO 8601 date-time string") from None
        elif not isinstance(value, datetime):
            raise ValueError("must be an ISO 8601 date-time string")
        return _utc(value)

    @field_validator("timestamp")
    @classmethod
    def _timestamp_rules(cls, value: datetime) -> datetime:
        value = _utc(value)
        if value < MIN_TIMESTAMP:
            raise ValueError(f"must not be before {_MIN_TIMESTAMP_TEXT}")
        skew = get_settings().max_clock_skew_seconds
        if value > datetime.now(timezone.utc) + timedelta(seconds=skew):
            raise ValueError(f"must not be later than now + max_clock_skew_seconds ({skew} s)")
        return value

    @property
    def amount_cents(self) -> int:
        return to_cents(self.amount)

    @property
    def timestamp_ns(self) -> int:
        """Event time in integer nanoseconds since the Unix epoch (UTC)."""
        return datetime_to_ns(self.timestamp)


def key_text(value: Any) -> Any:
    """A user or merchant key as text: an integer becomes its decimal text, text stays;
    anything else (a float, a boolean, null, a list) raises naming what is allowed."""
    if isinstance(value, str):
        return value
    if isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_)):
        return str(int(value))
    raise ValueError(f"must be a string or an integer, got {_type_name(value)}")


def _type_name(value: Any) -> str:
    return {bool: "a boolean", float: "a number with a fraction or exponent", type(None): "null",
            list: "an array", dict: "an object"}.get(type(value), type(value).__name__)


def utc_datetime(value: datetime) -> datetime:
    """A query bound (since, until) in UTC; naive means UTC. PostgreSQL refuses some
    offsets datetime accepts (+23:37), and a date may leave datetime's range in UTC."""
    return _utc(value)


def _utc(value: datetime) -> datetime:
    """`value` in UTC (naive means UTC); a date that would leave datetime's range in
    UTC (year 1 east of Greenwich, year 9999 west of it) is refused, not an OverflowError."""
    if value.tzinfo is None:
        return value.replace(tzinfo=timezone.utc)
    try:
        return value.astimezone(timezone.utc)
    except OverflowError:
        raise ValueError(f"must not be before {_MIN_TIMESTAMP_TEXT} or in the future") from None


def datetime_to_ns(value: datetime) -> int:
    """Exact integer nanoseconds since the epoch of a tz-aware datetime."""
    delta = value - _EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1_000_000_000 + delta.microseconds * 1_000


_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


def describe_validation_error(exc: ValidationError) -> str:
    """``"field: rule; field: rule"`` for dead letters, reject files and logs."""
    parts = []
    for err in exc.errors():
        field = ".".join(str(p) for p in err["loc"]) or "transaction"
        msg = err["msg"].removeprefix("Value error, ")
        parts.append(f"{field}: {msg}")
    return "; ".join(parts)


def parse_transaction(data: dict[str, Any]) -> Transaction:
    """Validate one record; raise `InvalidInputError` whose message names each bad field."""
    if not isinstance(data, dict):
        raise InvalidInputError(f"transaction: must be an object, got {type(data).__name__}")
    try:
        return Transaction.model_validate(data)
    except ValidationError as exc:
        raise InvalidInputError(describe_validation_error(exc)) from exc


def _canonical_text(user_id: str, amount: float, merchant: str, country: str, utc_iso: str) -> str:
    """The canonical payload, byte for byte what
    ``json.dumps({...}, sort_keys=True, separators=(",", ":"))`` writes (stored ids
    and hashes depend on it), built directly: keys in sorted order, the float by
    ``repr`` and strings by json's C encoder, as json.dumps does; ~4x faster."""
    encode = json.encoder.encode_basestring_ascii
    return ('{"amount":' + repr(float(amount)) + ',"country":' + encode(country) + ',"merchant":'
            + encode(merchant) + ',"timestamp":' + encode(utc_iso) + ',"user_id":' + encode(user_id) + "}")


def _canonical(user_id: str, amount: float, merchant: str, country: str, timestamp: datetime) -> bytes:
    ts = timestamp.astimezone(timezone.utc).isoformat(timespec="microseconds")
    return _canonical_text(user_id, amount, merchant, country, ts).encode()


def payload_fingerprint(txn: Transaction) -> str:
    """sha256 of the canonical payload (everything but the id): detects one id, two payloads."""
    return hashlib.sha256(
        _canonical(txn.user_id, txn.amount, txn.merchant, txn.country, txn.timestamp)).hexdigest()


def row_transaction_id(user_id: str, amount: float, merchant: str, country: str,
                       timestamp: datetime) -> str:
    """A deterministic id from the content, for job rows that carry none.

    Two rows with identical content get the same id, i.e. count as one event.
    """
    if timestamp.tzinfo is None:
        timestamp = timestamp.replace(tzinfo=timezone.utc)
    digest = hashlib.sha256(_canonical(user_id, amount, merchant, country.upper(), timestamp))
    return "row:" + digest.hexdigest()[:40]


def row_transaction_ids(user_id: pd.Series, amount: pd.Series, merchant: pd.Series,
                        country: pd.Series, timestamp: pd.Series) -> list[str]:
    """`row_transaction_id` of every row of validated columns (``timestamp`` tz-aware).

    The same bytes are hashed without a datetime per row (24 us a row, which was
    most of a job's validation): timestamps as UTC microsecond ISO strings
    (nanoseconds truncated, as ``to_pydatetime``).
    """
    us = timestamp.dt.tz_convert("UTC").to_numpy(dtype="datetime64[ns]").astype("datetime64[us]")
    stamps = np.datetime_as_string(us, unit="us")
    sha256 = hashlib.sha256
    return [
        "row:" + sha256(_canonical_text(u, a, m, c.upper(), t + "+00:00").encode()).hexdigest()[:40]
        for u, a, m, c, t in zip(user_id.tolist(), amount.tolist(), merchant.tolist(), country.tolist(),
                                 stamps.tolist())
    ]


def kafka_transaction_id(topic: str, partition: int, offset: int, epoch: str | None = None) -> str:
    """``kafka:{topic}:{partition}:{offset}`` for messages that carry no id, plus
    ``:{epoch}`` when the broker's offsets start again at each of its starts (the
    embedded, memory-only one): a new message never takes an old message's id.
    (Kafka topic names hold no colon, so the parts cannot be confused.)"""
    tail = f":{int(partition)}:{int(offset)}" + ("" if epoch is None else f":{epoch}")
    if len(topic) + len(tail) + 6 > MAX_TRANSACTION_ID_LENGTH:  # topic names run to 249 characters
        topic = "sha256-" + hashlib.sha256(topic.encode()).hexdigest()[:32]
    return f"kafka:{topic}{tail}"


# ---------------------------------------------------------------------------
# Vectorised validation of data frames (jobs): the same rules as `Transaction`.


def validate_frame(df: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Split `df` into valid rows (normalised) and rejects with a ``reason`` column.

    Valid rows get: ``amount`` float64, ``country`` upper case, ``timestamp``
    ``datetime64[ns, UTC]``, ``transaction_id`` filled with `row_transaction_id`
    where missing. Rejects keep their original values plus ``reason``
    (``"field: rule; ..."``). Missing required columns raise `InvalidInputError`.
    """
    missing = [c for c in REQUIRED_COLUMNS if c not in df.columns]
    if missing:
        raise InvalidInputError(f"missing columns: {', '.join(missing)}")
    settings = get_settings()
    n = len(df)
    reasons = np.full(n, "", dtype=object)

    def flag(mask: np.ndarray, text: str) -> None:
        mask = np.asarray(mask, dtype=bool)
        if mask.any():
            reasons[mask] = np.where(reasons[mask] == "", text, reasons[mask] + "; " + text)

    keys = {}
    for name in ("user_id", "merchant"):
        text, is_key = _key_column(df[name])
        keys[name] = text
        flag(~is_key, f"{name}: must be a string or an integer")
        is_str = is_key
        flag(is_str & (text.str.strip().str.len() == 0).to_numpy(dtype=bool), f"{name}: must not be blank")
        flag(text.str.contains("\x00", regex=False).to_numpy(dtype=bool), f"{name}: must not contain a NUL character")
        flag((text.str.len() > MAX_ID_LENGTH).to_numpy(dtype=bool),
             f"{name}: must have at most {MAX_ID_LENGTH} characters")

    raw_amount = df["amount"]
    if raw_amount.dtype == bool:
        amount = np.full(n, np.nan)
    else:
        amount = pd.to_numeric(raw_amount, errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
    with np.errstate(invalid="ignore", over="ignore"):
        finite = np.isfinite(amount)
        flag(~finite, "amount: must be a finite number")
        flag(finite & (amount <= 0), "amount: must be greater than 0")
        flag(finite & (amount > 0) & (np.rint(amount * 100) < 1), "amount: must be at least one cent (0.01)")
        flag(finite & (amount > settings.max_amount),
             f"amount: must be at most max_amount ({settings.max_amount:g})")

    country = df["country"].where(_is_str(df["country"]), "").astype(str).str.upper()
    ok_country = country.str.fullmatch(COUNTRY_PATTERN).fillna(False).to_numpy(dtype=bool)
    flag(~ok_country, "country: must be two letters A-Z (ISO 3166-1 alpha-2)")

    ts, out_of_range = _parse_timestamps(df["timestamp"])
    bad_ts = ts.isna().to_numpy(dtype=bool)
    flag(bad_ts & ~out_of_range, "timestamp: must be an ISO 8601 date-time")
    limit = pd.Timestamp.now(tz="UTC") + pd.Timedelta(seconds=settings.max_clock_skew_seconds)
    flag(out_of_range, f"timestamp: must not be before {_MIN_TIMESTAMP_TEXT}")
    flag((~bad_ts) & (ts > limit).fillna(False).to_numpy(dtype=bool),
         f"timestamp: must not be later than now + max_clock_skew_seconds ({settings.max_clock_skew_seconds} s)")

    if "transaction_id" in df.columns:
        tid = df["transaction_id"]
        present = _is_str(tid) & (tid != "").fillna(False).to_numpy(dtype=bool)
        tid_text = tid.where(present, "").astype(str)
        flag(present & (tid_text.str.len() > MAX_TRANSACTION_ID_LENGTH).to_numpy(dtype=bool),
             f"transaction_id: must have at most {MAX_TRANSACTION_ID_LENGTH} characters")
        flag(present & ~tid_text.str.fullmatch(TRANSACTION_ID_PATTERN).fillna(False).to_numpy(dtype=bool),
             "transaction_id: must match [A-Za-z0-9._:-]+")
        not_str = ~tid.isna().to_numpy(dtype=bool) & ~present & ~(tid.map(lambda v: v == "").to_numpy(dtype=bool))
        flag(not_str, "transaction_id: must be a string")
    else:
        present = np.zeros(n, dtype=bool)

    ok = reasons == ""
    rejects = df.loc[~ok].copy()
    rejects["reason"] = reasons[~ok].astype(str)

    valid = df.loc[ok].copy()
    valid["user_id"] = keys["user_id"][ok]
    valid["merchant"] = keys["merchant"][ok]
    valid["amount"] = amount[ok]
    valid["country"] = country[ok].astype(str)
    valid["timestamp"] = ts[ok]
    ids = (df["transaction_id"].where(present, None)[ok] if "transaction_id" in df.columns
           else pd.Series([None] * int(ok.sum()), index=valid.index, dtype=object))
    need = ids.isna().to_numpy(dtype=bool)
    if need.any():
        sub = valid.loc[need]
        made = row_transaction_ids(sub["user_id"], sub["amount"], sub["merchant"], sub["country"],
                                   sub["timestamp"])
        ids = ids.astype(object)
        ids[need] = made
    valid["transaction_id"] = ids.astype(str)
    return valid, rejects


def _is_str(col: pd.Series) -> np.ndarray:
    """Which values are strings: a string dtype holds nothing else, so no per-value check."""
    if isinstance(col.dtype, pd.StringDtype):
        return col.notna().to_numpy(dtype=bool)
    return col.map(lambda v: isinstance(v, str), na_action=None).to_numpy(dtype=bool)


def _key_column(col: pd.Series) -> tuple[pd.Series, np.ndarray]:
    """A key column as text (integers as their decimal text, as `key_text`) and which
    values are keys at all; the others become "" and are rejected by the caller."""
    if pd.api.types.is_integer_dtype(col.dtype) and not pd.api.types.is_bool_dtype(col.dtype):
        return col.astype(str).astype(object), np.ones(len(col), dtype=bool)
    is_str = _is_str(col)
    if isinstance(col.dtype, pd.StringDtype) or is_str.all():
        return col.where(is_str, "").astype(str), is_str

    def one(v: Any) -> str | None:
        try:
            return key_text(v)
        except ValueError:
            return None

    text = col.map(one, na_action=None)
    is_key = text.notna().to_numpy(dtype=bool)
    return text.where(is_key, "").astype(str), is_key


def _parse_timestamps(col: pd.Series) -> tuple[pd.Series, np.ndarray]:
    """UTC ``datetime64[ns, UTC]``, and which values are dates outside the accepted
    range (before 1970, or beyond what int64 nanoseconds hold); those, and
    unparseable, numeric or missing values, become NaT."""
    if isinstance(col.dtype, pd.DatetimeTZDtype):
        return _in_range_ns(col.dt.tz_convert("UTC"))
    if pd.api.types.is_datetime64_dtype(col.dtype):
        return _in_range_ns(col.dt.tz_localize("UTC"))

    def one(v: Any) -> Any:
        if isinstance(v, (datetime, pd.Timestamp)) and not pd.isna(v):
            t = v
        elif isinstance(v, str):
            try:
                t = datetime.fromisoformat(v[:-1] + "+00:00" if v.endswith("Z") else v)
            except ValueError:
                return pd.NaT
        else:
            return pd.NaT
        try:
            t = pd.Timestamp(_utc(t))
        except (ValueError, OverflowError):  # beyond datetime's or pandas' range
            return _OUT_OF_RANGE
        return t if MIN_TIMESTAMP <= t <= _MAX_NS_TIMESTAMP else _OUT_OF_RANGE

    # Fast path: a column of ISO strings parses in one call.
    try:
        strings = col.map(lambda v: isinstance(v, str)).to_numpy(dtype=bool).all()
        if strings and len(col):
            return _in_range_ns(pd.to_datetime(col, utc=True, format="ISO8601"))
    except (ValueError, TypeError, OverflowError):
        pass
    values = [one(v) for v in col]
    out_of_range = np.array([v is _OUT_OF_RANGE for v in values], dtype=bool)
    values = [pd.NaT if v is _OUT_OF_RANGE else v for v in values]
    return pd.Series(values, index=col.index, dtype="datetime64[ns, UTC]"), out_of_range


_OUT_OF_RANGE = object()
_MAX_NS_TIMESTAMP = pd.Timestamp.max.tz_localize("UTC")


def _in_range_ns(ts: pd.Series) -> tuple[pd.Series, np.ndarray]:
    """``ts`` (any unit, UTC) in nanoseconds, with the dates outside [1970, 2262) as NaT."""
    out_of_range = ((ts < MIN_TIMESTAMP) | (ts > _MAX_NS_TIMESTAMP)).fillna(False).to_numpy(dtype=bool)
    if out_of_range.any():
        ts = ts.where(~out_of_range)
    return ts.dt.as_unit("ns"), out_of_range
