"""EventColumns: validated transactions as columns, the online state's input between processes."""

from __future__ import annotations

import pickle
from dataclasses import fields
from datetime import datetime, timedelta, timezone

import numpy as np
import pandas as pd
import pytest

from configs.errors import InvalidInputError
from features.online import MAX_NS, MIN_NS, EventColumns, _event_columns, _event_time_ns
from features.schema import parse_transaction


def _txns(n: int = 5):
    return [parse_transaction({"transaction_id": f"t{i}", "user_id": f"u{i % 3}", "amount": 10.005 + i,
                               "merchant": f"m{i}", "country": "fr",
                               "timestamp": f"2024-03-01T10:00:0{i}+02:00"}) for i in range(n)]


def _assert_same(got: EventColumns, want: EventColumns) -> None:
    for f in fields(EventColumns):
        assert np.array_equal(np.asarray(getattr(got, f.name)), np.asarray(getattr(want, f.name))), f.name
    assert got.amount.dtype == np.float64 and got.ts.dtype == np.int64


def test_a_selection_reads_as_the_same_transactions_would():
    txns = _txns()
    sent = pickle.loads(pickle.dumps(EventColumns.of(txns)))
    got = _event_columns(sent.take([3, 0, 4]))
    _assert_same(got, _event_columns([txns[3], txns[0], txns[4]]))
    assert got.tid == ["t3", "t0", "t4"] and got.country[0] == "FR"
    assert got.ts[1] == txns[0].timestamp_ns == 1_709_280_000_000_000_000  # 08:00 UTC
    assert len(sent) == 5 and len(sent.take([])) == 0


def test_a_frame_reads_as_the_same_transactions_would():
    txns = _txns()
    frame = pd.DataFrame([t.model_dump() for t in txns])
    frame["country"] = frame["country"].str.lower()
    _assert_same(_event_columns(frame), EventColumns.of(txns))
    with pytest.raises(InvalidInputError, match="missing columns: merchant"):
        _event_columns(frame.drop(columns=["merchant"]))
    frame.loc[2, "transaction_id"] = None
    with pytest.raises(InvalidInputError, match="transaction_id"):
        _event_columns(frame)


def test_a_transaction_without_id_is_refused_by_name():
    txn = _txns(1)[0].model_copy(update={"transaction_id": None})
    with pytest.raises(InvalidInputError, match="transaction_id"):
        EventColumns.of([txn])


@pytest.mark.parametrize("when", [datetime(1600, 1, 1, tzinfo=timezone.utc),
                                  datetime(2300, 1, 1, tzinfo=timezone.utc),
                                  datetime(1, 1, 1, tzinfo=timezone(timedelta(hours=1)))])
def test_a_time_int64_nanoseconds_cannot_hold_is_refused_naming_timestamp(when):
    """Validation refuses these first; should one get past it (a model built without
    validation, a job's frame, a history row), the state names the field rather than
    raising OverflowError."""
    txns = _txns(3)
    txns[1] = txns[1].model_copy(update={"timestamp": when})
    with pytest.raises(InvalidInputError, match=r"^timestamp: transaction t1 is outside"):
        EventColumns.of(txns)
    frame = pd.DataFrame([t.model_dump() for t in txns])
    with pytest.raises(InvalidInputError, match="^timestamp: "):
        _event_columns(frame)
    frame["timestamp"] = [t.timestamp.isoformat() for t in txns]
    with pytest.raises(InvalidInputError, match="^timestamp: "):
        _event_columns(frame)
    with pytest.raises(InvalidInputError, match="^timestamp: .* is outside"):
        _event_time_ns(when)
    with pytest.raises(InvalidInputError, match="^timestamp: .* is outside"):
        _event_time_ns(when.replace(tzinfo=None))


def test_history_times_at_the_edges_of_int64_nanoseconds():
    assert _event_time_ns(MAX_NS) == MAX_NS and _event_time_ns(np.int64(MIN_NS)) == MIN_NS
    assert _event_time_ns(pd.Timestamp("2024-03-01T08:00:00Z")) == 1_709_280_000_000_000_000
    for bad in (MAX_NS + 1, MIN_NS - 1, 2**80):  # MIN_NS - 1 is pandas' NaT
        with pytest.raises(InvalidInputError, match="^timestamp: .* is outside"):
            _event_time_ns(bad)
    for missing in (None, pd.NaT):
        with pytest.raises(InvalidInputError, match="^timestamp: required"):
            _event_time_ns(missing)
    with pytest.raises(InvalidInputError, match="^timestamp: must be a date-time"):
        _event_time_ns("2024-03-01")


def test_a_frame_with_a_missing_timestamp_is_refused_not_read_as_1677():
    frame = pd.DataFrame([t.model_dump() for t in _txns(3)])
    frame["timestamp"] = pd.to_datetime(frame["timestamp"], utc=True)
    frame.loc[1, "timestamp"] = pd.NaT
    with pytest.raises(InvalidInputError, match="^timestamp: required"):
        _event_columns(frame)
