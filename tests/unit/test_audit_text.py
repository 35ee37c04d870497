"""What the audit store turns untrusted text into before PostgreSQL sees it: a
dead letter's payload of any bytes, and filter values."""

from __future__ import annotations

import pytest

from cluster.deadletters import _key, _printable, original_payload
from cluster.store.audit import _check_text, _payload_columns, display_text
from configs.errors import InvalidInputError
from features.schema import parse_transaction


@pytest.mark.parametrize(("raw", "shown"), [
    (b"\x00", "\\x00"),
    (b"a\x00b\x00", "a\\x00b\\x00"),
    (b"\xff\xfe", "\\xff\\xfe"),
    (b"\xc3", "\\xc3"),  # a truncated two-byte sequence
    (b"\xed\xa0\x80", "\\xed\\xa0\\x80"),  # a UTF-8-encoded surrogate: not valid UTF-8
    ("lone \udc80".encode("utf-8", "surrogatepass"), "lone \\xed\\xb2\\x80"),
    ("\u20ac \u2028 \t\n".encode(), "\u20ac \u2028 \t\n"),  # valid text is left alone
])
def test_display_text_escapes_exactly_what_postgres_text_cannot_hold(raw, shown):
    assert display_text(raw) == shown
    text, kept = _payload_columns(raw)
    assert text == shown and "\x00" not in text
    text.encode("utf-8")  # storable: no lone surrogate left
    assert original_payload({"payload": text, "payload_raw": kept}) == raw


def test_the_original_bytes_are_kept_only_when_the_text_is_not_them():
    assert _payload_columns(b'{"a": "\\u0000"}') == ('{"a": "\\u0000"}', None)
    assert _payload_columns(b"\\x00") == ("\\x00", None)  # four characters, no NUL
    assert _payload_columns(b"\x00") == ("\\x00", b"\x00")  # the same text, another original
    assert _payload_columns(None) == ("", None)
    assert _payload_columns(bytearray(b"\xff")) == ("\\xff", b"\xff")
    with pytest.raises(TypeError, match="bytes or str"):
        _payload_columns(12)


def test_text_payloads_keep_nul_and_lone_surrogates():
    for value in ("a\x00b", "lone \ud800", "\udcff"):
        text, kept = _payload_columns(value)
        assert "\x00" not in text and text.encode("utf-8")
        assert original_payload({"payload": text, "payload_raw": kept}) == value.encode("utf-8", "surrogatepass")


@pytest.mark.parametrize(("value", "problem"), [("a\x00", "NUL"), ("\ud800", "surrogate")])
def test_a_filter_value_postgres_cannot_take_names_the_parameter(value, problem):
    with pytest.raises(InvalidInputError, match=f"^user_id: .*{problem}"):
        _check_text("user_id", value)
    _check_text("user_id", "ordinary % _ \\ text")
    _check_text("user_id", None)


def test_replay_keys_and_the_list_command_survive_hostile_payloads():
    assert _key(b'{"user_id": "u1"}') == b"u1" and _key(b'{"user_id": 101}') == b"101"
    assert _key(b"\xff\xfe") is None and _key(b"[" * 100_000) is None
    assert _key(b'{"user_id": "\\ud800"}') == b"\xed\xa0\x80"
    assert _printable("a\x1b[31m\x00\n\x85b") == "a\\x1b[31m\\x00\\x0a\\x85b"


def test_audit_rows_never_carry_a_nul_the_schema_let_through():
    """`write_decisions` gets its text from a validated Transaction: NUL is refused there,
    with the field named (item D of issue #22: confirmed, nothing to change)."""
    good = {"user_id": "u1", "amount": 1.0, "merchant": "m1", "country": "DE",
            "timestamp": "2025-01-01T00:00:00Z"}
    for field in ("user_id", "merchant", "country", "transaction_id"):
        with pytest.raises(InvalidInputError, match=f"^{field}: "):
            parse_transaction({**good, field: "A\x00"})
