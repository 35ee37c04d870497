"""Schema rules: each bad field is named with its rule; frames follow the same rules."""

from __future__ import annotations

import json
import math
from datetime import datetime, timedelta, timezone

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from configs.errors import InvalidInputError
from features.schema import (
    Transaction,
    _canonical,
    describe_validation_error,
    kafka_transaction_id,
    parse_transaction,
    payload_fingerprint,
    row_transaction_id,
    row_transaction_ids,
    validate_frame,
)

GOOD = {"user_id": "u1", "amount": 12.34, "merchant": "m1", "country": "fr",
        "timestamp": "2024-05-01T10:00:00", "transaction_id": "tx-1"}


def test_valid_transaction_is_normalised():
    t = parse_transaction(GOOD)
    assert t.country == "FR"
    assert t.timestamp == datetime(2024, 5, 1, 10, tzinfo=timezone.utc)
    assert t.amount_cents == 1234
    other = parse_transaction({**GOOD, "timestamp": "2024-05-01T12:00:00+02:00"})
    assert other.timestamp == t.timestamp
    assert parse_transaction({**GOOD, "timestamp": "2024-05-01T10:00:00Z"}).timestamp == t.timestamp


@pytest.mark.parametrize("field,value,rule", [
    ("amount", 0, "greater than 0"),
    ("amount", -5, "greater than 0"),
    ("amount", math.inf, "finite"),
    ("amount", math.nan, "finite"),
    ("amount", 0.001, "one cent"),
    ("amount", 2e6, "max_amount"),
    ("amount", 1.7976931348623157e308, "max_amount"),  # x100 is infinite: no OverflowError
    ("amount", "abc", "amount"),
    ("amount", True, "number"),
    ("country", "F", "two letters"),
    ("country", "FR1", "two letters"),
    ("country", "1R", "two letters"),
    ("country", 12, "two letters"),
    ("user_id", "", "at least 1"),
    ("user_id", "   ", "blank"),
    ("user_id", "u" * 65, "at most 64"),
    ("merchant", "", "at least 1"),
    ("merchant", "m" * 65, "at most 64"),
    ("user_id", "u\x001", "NUL"),  # PostgreSQL text cannot hold it: the audit row would fail
    ("merchant", "\x00", "NUL"),
    ("transaction_id", "a b", "pattern"),
    ("transaction_id", "x" * 129, "at most 128"),
    ("timestamp", "yesterday", "ISO 8601"),
    ("timestamp", 1700000000, "ISO 8601"),
    ("timestamp", (datetime.now(timezone.utc) + timedelta(hours=1)).isoformat(), "clock_skew"),
])
def test_each_bad_field_is_named_with_its_rule(field, value, rule):
    with pytest.raises(InvalidInputError) as info:
        parse_transaction({**GOOD, field: value})
    message = str(info.value)
    assert message.startswith(f"{field}: "), message
    assert rule in message, message
    assert info.value.status_code == 422


def test_describe_validation_error_lists_every_field():
    with pytest.raises(ValidationError) as info:
        Transaction.model_validate({**GOOD, "amount": -1, "country": "x"})
    text = describe_validation_error(info.value)
    assert "amount: must be greater than 0" in text and "country: must be two letters" in text


def test_missing_and_extra_fields_are_named():
    with pytest.raises(InvalidInputError, match="merchant: Field required"):
        parse_transaction({k: v for k, v in GOOD.items() if k != "merchant"})
    with pytest.raises(InvalidInputError, match="colour: Extra inputs"):
        parse_transaction({**GOOD, "colour": "red"})


def test_fingerprint_ignores_id_and_timezone_spelling_but_not_content():
    a = parse_transaction(GOOD)
    b = parse_transaction({**GOOD, "transaction_id": "other", "timestamp": "2024-05-01T11:00:00+01:00"})
    c = parse_transaction({**GOOD, "amount": 12.35})
    assert payload_fingerprint(a) == payload_fingerprint(b)
    assert payload_fingerprint(a) != payload_fingerprint(c)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(
    st.text(min_size=1, max_size=12),  # any unicode: quotes, backslashes, control characters
    st.floats(min_value=0.01, max_value=1e9, allow_nan=False, allow_infinity=False),
    st.text(min_size=1, max_size=12),
    st.sampled_from(["fr", "FR", "De", "us"]),
    st.integers(min_value=0, max_value=4_102_444_800 * 10**9),  # ns since 1970, to 2100
), min_size=1, max_size=20))
def test_vectorised_row_ids_equal_the_row_by_row_definition(rows):
    users, amounts, merchants, countries, ns = map(list, zip(*rows, strict=True))
    stamps = pd.Series(pd.to_datetime(ns, unit="ns", utc=True))
    expected = [row_transaction_id(u, a, m, c, t.to_pydatetime(warn=False))
                for u, a, m, c, t in zip(users, amounts, merchants, countries, stamps, strict=True)]
    got = row_transaction_ids(pd.Series(users), pd.Series(amounts), pd.Series(merchants),
                              pd.Series(countries), stamps)
    assert got == expected


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=12), st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=12),
       st.text(max_size=3), st.datetimes(timezones=st.timezones()))
def test_canonical_payload_is_the_json_dumps_definition(user, amount, merchant, country, ts):
    """Stored ids and payload hashes depend on these bytes: the direct construction
    must stay json.dumps's sorted, compact output."""
    body = {"user_id": user, "amount": float(amount), "merchant": merchant, "country": country,
            "timestamp": ts.astimezone(timezone.utc).isoformat(timespec="microseconds")}
    expected = json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
    assert _canonical(user, amount, merchant, country, ts) == expected


def test_derived_ids_and_hashes_do_not_change_across_versions():
    ts = datetime(2024, 5, 1, 10, tzinfo=timezone.utc)
    assert row_transaction_id("u1", 12.34, "m1", "FR", ts) == "row:206c25afd296280394c3d8b24c4a6bca7397f099"
    txn = parse_transaction({"user_id": "u1", "amount": 12.34, "merchant": "m1", "country": "FR",
                             "timestamp": "2024-05-01T10:00:00Z"})
    assert payload_fingerprint(txn) == "206c25afd296280394c3d8b24c4a6bca7397f09995e24b3de630d713ff516fa5"


def test_derived_ids_are_deterministic_and_valid():
    ts = datetime(2024, 5, 1, 10, tzinfo=timezone.utc)
    a = row_transaction_id("u1", 12.34, "m1", "FR", ts)
    assert a == row_transaction_id("u1", 12.34, "m1", "fr", ts.replace(tzinfo=None))
    assert a != row_transaction_id("u1", 12.35, "m1", "FR", ts)
    assert kafka_transaction_id("topic", 3, 42) == "kafka:topic:3:42"
    long_topic = "t" * 249  # Kafka's longest topic name
    for tid in (a, kafka_transaction_id("financial-transactions", 0, 7), kafka_transaction_id(long_topic, 99, 2**62),
                kafka_transaction_id(long_topic, 0, 1, epoch="0123456789ab")):
        parse_transaction({**GOOD, "transaction_id": tid})
    assert kafka_transaction_id(long_topic, 0, 1) != kafka_transaction_id(long_topic[:-1], 0, 1)


def test_validate_frame_applies_the_same_rules():
    rows = [
        GOOD,
        {**GOOD, "transaction_id": None},
        {**GOOD, "amount": -1.0},
        {**GOOD, "country": "FRA"},
        {**GOOD, "timestamp": "not a date"},
        {**GOOD, "user_id": ""},
        {**GOOD, "transaction_id": "bad id"},
        {**GOOD, "amount": float("nan"), "merchant": None},
        {**GOOD, "timestamp": (datetime.now(timezone.utc) + timedelta(days=1)).isoformat()},
        {**GOOD, "merchant": "m\x001"},
    ]
    df = pd.DataFrame(rows)
    valid, rejects = validate_frame(df)
    assert list(valid.index) == [0, 1]
    assert valid["country"].tolist() == ["FR", "FR"]
    assert str(valid["timestamp"].dtype) == "datetime64[ns, UTC]"
    assert valid.loc[1, "transaction_id"].startswith("row:")
    reasons = rejects["reason"].tolist()
    assert reasons[0].startswith("amount: must be greater than 0")
    assert reasons[1].startswith("country: ")
    assert reasons[2].startswith("timestamp: ")
    assert reasons[3].startswith("user_id: ")
    assert reasons[4].startswith("transaction_id: ")
    assert "merchant: " in reasons[5] and "amount: " in reasons[5]
    assert "max_clock_skew" in reasons[6]
    assert reasons[7] == "merchant: must not contain a NUL character"
    # Every valid row is also a valid `Transaction`, every reject is not.
    for row in valid.to_dict("records"):
        parse_transaction({**row, "timestamp": row["timestamp"].isoformat()})
    for row in df.loc[rejects.index].to_dict("records"):
        with pytest.raises(InvalidInputError):
            parse_transaction({k: v for k, v in row.items() if not (k == "transaction_id" and v is None)})


def test_validate_frame_names_missing_columns():
    with pytest.raises(InvalidInputError, match="missing columns: amount, country"):
        validate_frame(pd.DataFrame({"user_id": ["u"], "merchant": ["m"], "timestamp": ["2024-01-01"]}))


def test_validate_frame_keeps_datetime_columns():
    df = pd.DataFrame({**{k: [v] for k, v in GOOD.items()},
                       "timestamp": pd.to_datetime(["2024-05-01T10:00:00"])})
    valid, rejects = validate_frame(df)
    assert rejects.empty and valid["timestamp"].iloc[0] == pd.Timestamp("2024-05-01T10:00:00", tz="UTC")
    assert np.isfinite(valid["amount"]).all()


# --- keys as integers, and the accepted timestamp range (issue #22) -------------------

ORIGINAL_EXAMPLE = {"user_id": 101, "amount": 98000, "merchant": "CryptoX", "country": "SG",
                    "timestamp": "2024-11-21T10:16:30"}

OUT_OF_RANGE_TIMESTAMPS = [
    "0001-01-01T00:00:00+01:00",  # year 0 in UTC: OverflowError in datetime
    "9999-12-31T23:30:00-05:00",  # year 10000 in UTC
    "1600-01-01T00:00:00Z",  # before int64 nanoseconds begin (1677)
    "1969-12-31T23:59:59Z",
    "0001-01-01T00:00:00",
]


def test_the_original_apis_example_request_is_valid():
    t = parse_transaction(ORIGINAL_EXAMPLE)
    assert (t.user_id, t.merchant, t.amount) == ("101", "CryptoX", 98000.0)


def test_an_integer_key_is_the_same_key_as_its_decimal_text():
    as_int = parse_transaction({**GOOD, "user_id": 101, "merchant": 7})
    as_text = parse_transaction({**GOOD, "user_id": "101", "merchant": "7"})
    assert (as_int.user_id, as_int.merchant) == ("101", "7")
    assert payload_fingerprint(as_int) == payload_fingerprint(as_text)
    assert parse_transaction({**GOOD, "user_id": np.int64(-5)}).user_id == "-5"


@pytest.mark.parametrize("field", ["user_id", "merchant"])
@pytest.mark.parametrize("value", [101.0, 1e309, True, None, [101], {"id": 1}])
def test_a_key_that_is_not_text_or_an_integer_is_named(field, value):
    with pytest.raises(InvalidInputError) as info:
        parse_transaction({**GOOD, field: value})
    assert str(info.value).startswith(f"{field}: must be a string or an integer"), str(info.value)


def test_the_openapi_schema_says_a_key_may_be_an_integer():
    schema = Transaction.model_json_schema()["properties"]["user_id"]
    assert {"type": "integer"} in schema["anyOf"]


@pytest.mark.parametrize("value", OUT_OF_RANGE_TIMESTAMPS)
def test_a_timestamp_outside_the_accepted_range_is_named_not_an_overflow(value):
    with pytest.raises(InvalidInputError) as info:
        parse_transaction({**GOOD, "timestamp": value})
    assert str(info.value).startswith("timestamp: must not be before 1970-01-01T00:00:00Z"), str(info.value)


def test_the_epoch_itself_is_accepted():
    assert parse_transaction({**GOOD, "timestamp": "1970-01-01T00:00:00Z"}).timestamp_ns == 0


@pytest.mark.parametrize("strings", [True, False], ids=["iso-strings", "mixed-objects"])
def test_validate_frame_applies_the_same_key_and_range_rules(strings):
    rows = [ORIGINAL_EXAMPLE, {**GOOD, "user_id": 101}, {**GOOD, "user_id": 101.0},
            {**GOOD, "merchant": True}]
    rows += [{**GOOD, "timestamp": v} for v in OUT_OF_RANGE_TIMESTAMPS]
    if not strings:  # a datetime among the strings takes the row-by-row path
        rows.append({**GOOD, "timestamp": datetime(2024, 5, 1, tzinfo=timezone.utc)})
    valid, rejects = validate_frame(pd.DataFrame(rows))
    assert valid["user_id"].tolist()[:2] == ["101", "101"]
    assert valid.loc[0, "transaction_id"] == row_transaction_id(
        "101", 98000.0, "CryptoX", "SG", datetime(2024, 11, 21, 10, 16, 30, tzinfo=timezone.utc))
    reasons = rejects["reason"].tolist()
    assert reasons[0] == "user_id: must be a string or an integer"
    assert reasons[1] == "merchant: must be a string or an integer"
    assert reasons[2:] == ["timestamp: must not be before 1970-01-01T00:00:00Z"] * len(OUT_OF_RANGE_TIMESTAMPS)


def test_validate_frame_takes_integer_key_columns_as_text():
    df = pd.DataFrame({**{k: [v] for k, v in GOOD.items()}, "user_id": np.array([101], dtype=np.int64)})
    valid, rejects = validate_frame(df)
    assert rejects.empty and valid["user_id"].tolist() == ["101"]
    floats = pd.DataFrame({**{k: [v] for k, v in GOOD.items()}, "user_id": np.array([101.0])})
    assert validate_frame(floats)[1]["reason"].tolist() == ["user_id: must be a string or an integer"]


def test_validate_frame_refuses_datetime_columns_before_1970():
    df = pd.DataFrame({**{k: [v, v] for k, v in GOOD.items()},
                       "timestamp": pd.to_datetime(["1960-01-01", "2024-05-01"]).tz_localize("UTC")})
    valid, rejects = validate_frame(df)
    assert list(valid.index) == [1]
    assert rejects["reason"].tolist() == ["timestamp: must not be before 1970-01-01T00:00:00Z"]
