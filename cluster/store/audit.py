"""Writes and reads of the audit trail: live decisions, backfill scores, dead letters.

Writes are batched and idempotent: `INSERT ... ON CONFLICT DO NOTHING` on the
transaction id, so writing the same batch twice leaves one row per transaction
and the caller learns how many rows were new.

A filter value PostgreSQL cannot take (a NUL character, a lone surrogate, an
offset beyond bigint) raises `InvalidInputError` naming the parameter, never a
driver error. A dead letter's payload may be any bytes: it is stored as text
safe to show plus, when that text is not exactly the original, the original
bytes (`payload_raw`), which a replay sends.
"""

from __future__ import annotations

import io
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import orjson
import psycopg2
from psycopg2.errors import UniqueViolation
from sqlalchemy import Engine, String, bindparam, func, select, update
from sqlalchemy import exc as sa_exc
from sqlalchemy.dialects.postgresql import ARRAY, JSONB, insert

from cluster.store.models import AuditDecision, BackfillScore, DeadLetter
from configs.errors import InvalidInputError

AUDIT_COLUMNS = tuple(c.name for c in AuditDecision.__table__.columns if c.name not in ("id", "scored_at"))
BACKFILL_COLUMNS = tuple(c.name for c in BackfillScore.__table__.columns if c.name != "scored_at")


# JSONB columns of the written tables, read from the models (encoded in `_copy_column`).
_JSON_COLUMNS = frozenset(c.name for table in (AuditDecision.__table__, BackfillScore.__table__)
                          for c in table.columns if isinstance(c.type, JSONB))
_INSERT_DEAD_LETTERS = (
    insert(DeadLetter).on_conflict_do_nothing(index_elements=["position"]).returning(DeadLetter.id)
)
_PAYLOAD_HASHES = select(AuditDecision.transaction_id, AuditDecision.payload_hash).where(
    AuditDecision.transaction_id == bindparam("ids", type_=ARRAY(String)).any_()
)


def database_unavailable(exc: BaseException) -> bool:
    """True when `exc` means PostgreSQL cannot be reached now (down, restarting, the
    connection dropped, the pool exhausted): worth retrying later as it is. The COPY
    path works on the DBAPI cursor, so its errors arrive unwrapped by SQLAlchemy."""
    if isinstance(exc, (psycopg2.OperationalError, psycopg2.InterfaceError, sa_exc.OperationalError,
                        sa_exc.InterfaceError, sa_exc.TimeoutError)):
        return True
    return isinstance(exc, sa_exc.DBAPIError) and exc.connection_invalidated


def refused_for_good(exc: BaseException) -> bool:
    """True when PostgreSQL refused the rows themselves (a value out of range, a NUL,
    a violated constraint, a missing column): sending them again cannot succeed."""
    return isinstance(exc, (psycopg2.DataError, psycopg2.IntegrityError, sa_exc.DataError,
                            sa_exc.IntegrityError, ValueError, TypeError))


@dataclass(frozen=True)
class WriteResult:
    inserted: int
    duplicates: int


@dataclass(frozen=True)
class AuditFilter:
    anomalies_only: bool = False
    user_id: str | None = None
    source: str | None = None
    since: datetime | None = None
    until: datetime | None = None


_MAX_BIGINT = 2**63 - 1

# The alert load a review team is staffed for, until review capacity
# (`review_capacity_per_day`, issue #23 item 2) replaces this rule: the budget is
# this multiple of the model's contamination (the share of its training history it
# flags), and /health warns when the alert rate of the last ALERT_WINDOW is above
# ALERT_WARNING_PER_BUDGET times the budget, over at least ALERT_WARNING_MIN_SCORED
# decisions (fewer are too few to call a rate).
ALERT_BUDGET_PER_CONTAMINATION = 2.0
ALERT_WARNING_PER_BUDGET = 2.0
ALERT_WINDOW = timedelta(hours=1)
ALERT_WARNING_MIN_SCORED = 100
ALERT_RATE_UNKNOWN = "alert rate of the last hour unknown: the audit database does not answer"
ALERT_QUERY_TIMEOUT_S = 2.0  # /health answers without the warning rather than wait longer


def alert_load(scored: int, anomalies: int, contamination: float) -> dict[str, Any]:
    """The alert rate of the last `ALERT_WINDOW` against the budget, with the warning
    /health gives (None when there is none).

    >>> load = alert_load(1_000, 95, contamination=0.02)
    >>> load["alert_rate"], round(load["budget"], 4), round(load["warning_above"], 4)
    (0.095, 0.04, 0.08)
    >>> load["warning"]
    'alert rate 9.5% over the last hour (95 of 1000 decisions) is above 2x the alert budget of 4.0%'
    >>> alert_load(1_000, 80, 0.02)["warning"], alert_load(99, 99, 0.02)["warning"]
    (None, None)
    """
    budget = ALERT_BUDGET_PER_CONTAMINATION * contamination
    warning_above = ALERT_WARNING_PER_BUDGET * budget
    rate = anomalies / scored if scored else 0.0
    warning = None
    if scored >= ALERT_WARNING_MIN_SCORED and rate > warning_above:
        warning = (f"alert rate {rate:.1%} over the last hour ({anomalies} of {scored} decisions) is above "
                   f"{ALERT_WARNING_PER_BUDGET:g}x the alert budget of {budget:.1%}")
    return {"window_seconds": int(ALERT_WINDOW.total_seconds()), "scored": scored, "anomalies": anomalies,
            "alert_rate": rate, "budget": budget, "warning_above": warning_above, "warning": warning}
# What a page of dead letters shows: every column but the raw bytes, which only a replay needs.
_DEAD_LETTER_COLUMNS = tuple(c for c in DeadLetter.__table__.columns if c.name != "payload_raw")


def _check_text(name: str, value: str | None) -> None:
    """A text parameter PostgreSQL can take; the driver would raise a bare error otherwise."""
    if value is None:
        return
    if "\x00" in value:
        raise InvalidInputError(f"{name}: must not contain a NUL character")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidInputError(f"{name}: must be valid Unicode text (has a lone surrogate)") from exc


def _check_page(limit: int, offset: int) -> None:
    if not 0 <= limit <= _MAX_BIGINT:
        raise InvalidInputError(f"limit: must be between 0 and {_MAX_BIGINT}")
    if not 0 <= offset <= _MAX_BIGINT:
        raise InvalidInputError(f"offset: must be between 0 and {_MAX_BIGINT}")


def display_text(value: bytes | str) -> str:
    """Text PostgreSQL accepts and a person can read: invalid UTF-8 and lone surrogates
    as backslash escapes (``\\xff``, ``\\udc80``), NUL as ``\\x00``. Where it is not the
    original exactly, a dead letter keeps the original too (`payload_raw`)."""
    if isinstance(value, str):
        value = value.encode("utf-8", errors="backslashreplace")
    return value.decode("utf-8", errors="backslashreplace").replace("\x00", "\\x00")


def _payload_columns(payload: bytes | bytearray | memoryview | str | None) -> tuple[str, bytes | None]:
    """A dead letter's (payload, payload_raw): the text to show, and the exact bytes
    when that text encoded as UTF-8 is not exactly them."""
    if payload is None:  # a message without a value: nothing to keep but its absence
        return "", None
    if isinstance(payload, str):
        raw = payload.encode("utf-8", errors="surrogatepass")  # lossless, even for lone surrogates
    elif isinstance(payload, bytes | bytearray | memoryview):
        raw = bytes(payload)
    else:
        raise TypeError(f"a dead letter's payload must be bytes or str, not {type(payload).__name__}")
    text = display_text(raw)
    return text, (None if text.encode("utf-8") == raw else raw)


def _check_columns(rows: Sequence[dict[str, Any]], expected: tuple[str, ...]) -> None:
    for row in rows:
        missing = set(expected) - set(row) - {"kafka_topic", "kafka_partition", "kafka_offset", "reasons"}
        if missing:
            raise ValueError(f"audit row for {row.get('transaction_id')!r} lacks {sorted(missing)}")


def _escape(text: str) -> str:
    """Backslash, tab, newline and carriage return escaped: the only characters
    COPY's text format treats specially."""
    return text.replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n").replace("\r", "\\r")


def _copy_column(values: list[Any], is_json: bool) -> list[str]:
    """One column's fields in COPY's text format (NULL as \\N), built a column at a
    time: a text column is searched for special characters once, as one string
    (16.9 us an audit row of 19 columns; field by field, 25.0)."""
    if is_json:
        # orjson: ~18x faster than json.dumps here; its output has no raw control characters
        return ["\\N" if v is None else orjson.dumps(v, option=orjson.OPT_SERIALIZE_NUMPY).decode()
                .replace("\\", "\\\\") for v in values]
    texts = ["" if v is None else v if isinstance(v, str) else str(v) for v in values]
    joined = "".join(texts)
    if "\\" in joined or "\t" in joined or "\n" in joined or "\r" in joined:
        texts = [_escape(t) for t in texts]
    return [t if v is not None else "\\N" for t, v in zip(texts, values, strict=True)]


def _copy_body(columns: tuple[str, ...], rows: Sequence[dict[str, Any]]) -> io.StringIO:
    fields = [_copy_column([row.get(c) for row in rows], c in _JSON_COLUMNS) for c in columns]
    return io.StringIO("".join("\t".join(line) + "\n" for line in zip(*fields)))


def _insert_new(engine: Engine, table: str, columns: tuple[str, ...], conflict: str,
                rows: Sequence[dict[str, Any]]) -> int:
    """Inserts the rows whose key is new, in one transaction; returns how many.

    The common case, every key new, is one ``COPY`` straight into the table:
    PostgreSQL spent 52-69 us of CPU an audit row that way against 68-99 us
    through a staging table. When a key exists already (a redelivery, a rerun)
    that ``COPY`` fails as a whole and the rows are streamed with ``COPY``
    into a temporary table (no defaults, no constraints), from which
    ``INSERT ... SELECT ... ON CONFLICT (conflict) DO NOTHING`` moves the new
    ones: the same idempotent insert as a multi-row ``VALUES`` without parsing
    and planning a statement with a literal per field, which was most of its
    cost (500 audit rows: 75 ms, of which 27 ms executing).
    """
    names = ", ".join(columns)
    body = _copy_body(columns, rows)
    try:
        with _transaction_cursor(engine) as cursor:
            cursor.copy_expert(f"COPY {table} ({names}) FROM STDIN", body)
        return len(rows)
    except UniqueViolation:
        body.seek(0)
    staging = f"{table}_incoming"
    with _transaction_cursor(engine) as cursor:
        cursor.execute(f"CREATE TEMPORARY TABLE {staging} ON COMMIT DROP AS "
                       f"SELECT {names} FROM {table} WITH NO DATA")
        cursor.copy_expert(f"COPY {staging} ({names}) FROM STDIN", body)
        cursor.execute(f"INSERT INTO {table} ({names}) SELECT {names} FROM {staging} "
                       f"ON CONFLICT ({conflict}) DO NOTHING")
        return cursor.rowcount


@contextmanager
def _transaction_cursor(engine: Engine) -> Iterator[Any]:
    """The DBAPI cursor (for COPY) inside one transaction, committed when the block ends."""
    with engine.begin() as conn:
        cursor = conn.connection.cursor()
        try:
            yield cursor
        finally:
            cursor.close()


class AuditRepository:
    def __init__(self, engine: Engine):
        self.engine = engine

    # --- live decisions ---------------------------------------------------

    def write_decisions(self, rows: Sequence[dict[str, Any]]) -> WriteResult:
        """Insert decisions in one statement; existing transaction ids are left alone."""
        if not rows:
            return WriteResult(0, 0)
        _check_columns(rows, AUDIT_COLUMNS)
        rows = [row if row.get("reasons") else {**row, "reasons": []} for row in rows]
        inserted = _insert_new(self.engine, "audit_decisions", AUDIT_COLUMNS, "transaction_id", rows)
        return WriteResult(inserted=inserted, duplicates=len(rows) - inserted)

    def payload_hashes(self, transaction_ids: Iterable[str]) -> dict[str, str]:
        """The stored payload hash of each id already audited (for conflict checks)."""
        ids = list(set(transaction_ids))
        for tid in ids:
            _check_text("transaction_id", tid)
        if not ids:
            return {}
        with self.engine.connect() as conn:
            return dict(conn.execute(_PAYLOAD_HASHES, {"ids": ids}).tuples().all())

    def get(self, transaction_id: str) -> dict[str, Any] | None:
        _check_text("transaction_id", transaction_id)
        with self.engine.connect() as conn:
            row = conn.execute(
                select(AuditDecision.__table__).where(AuditDecision.transaction_id == transaction_id)
            ).mappings().first()
        return None if row is None else _decision_dict(row)

    def get_many(self, transaction_ids: Iterable[str]) -> dict[str, dict[str, Any]]:
        ids = list(set(transaction_ids))
        for tid in ids:
            _check_text("transaction_id", tid)
        if not ids:
            return {}
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(AuditDecision.__table__).where(AuditDecision.transaction_id.in_(ids))
            ).mappings().all()
        return {r["transaction_id"]: _decision_dict(r) for r in rows}

    def query(self, filters: AuditFilter, limit: int = 50, offset: int = 0) -> tuple[list[dict[str, Any]], int]:
        """Newest first; returns (page, total matching)."""
        _check_page(limit, offset)
        conditions = _conditions(filters)
        stmt = select(AuditDecision.__table__).where(*conditions).order_by(
            AuditDecision.scored_at.desc(), AuditDecision.id.desc()
        ).limit(limit).offset(offset)
        with self.engine.connect() as conn:
            rows = conn.execute(stmt).mappings().all()
            total = conn.execute(select(func.count()).select_from(AuditDecision).where(*conditions)).scalar_one()
        return [_decision_dict(r) for r in rows], total

    def count(self) -> int:
        with self.engine.connect() as conn:
            return conn.execute(select(func.count()).select_from(AuditDecision)).scalar_one()

    def stats(self, filters: AuditFilter = AuditFilter(), bins: int = 20,
              contamination: float | None = None) -> dict[str, Any]:
        """Counts per source and hour, a risk-score histogram and the alert rate; with the
        model's `contamination`, also `last_hour`: the alert load against the budget
        (`alert_load`, whatever the filters)."""
        conditions = _conditions(filters)
        hour = func.date_trunc("hour", AuditDecision.scored_at)
        bucket = func.width_bucket(AuditDecision.risk_score, 0.0, 1.0, bins)
        with self.engine.connect() as conn:
            per_hour = conn.execute(
                select(AuditDecision.source, hour.label("hour"), func.count())
                .where(*conditions).group_by(AuditDecision.source, hour).order_by(hour)
            ).all()
            histogram = dict(conn.execute(
                select(bucket, func.count()).where(*conditions).group_by(bucket)
            ).tuples().all())
            total, alerts = conn.execute(
                select(func.count(), func.count().filter(AuditDecision.anomaly))
                .select_from(AuditDecision).where(*conditions)
            ).one()
        edges = [i / bins for i in range(bins + 1)]
        last_hour = {} if contamination is None else {"last_hour": self.alert_load(contamination)}
        return last_hour | {
            "total": total,
            "anomalies": alerts,
            "alert_rate": (alerts / total) if total else 0.0,
            "per_source_hour": [
                {"source": s, "hour": h.isoformat(), "count": c} for s, h, c in per_hour
            ],
            "per_source": _sum_by(per_hour, 0),
            "score_histogram": {
                "edges": edges,
                # width_bucket puts a score of exactly 1.0 in bin bins+1: fold it into the last.
                "counts": [histogram.get(i, 0) + (histogram.get(bins + 1, 0) if i == bins else 0)
                           for i in range(1, bins + 1)],
            },
        }

    def alert_load(self, contamination: float) -> dict[str, Any]:
        """`alert_load` of the decisions scored in the last `ALERT_WINDOW` (database clock)."""
        with self.engine.connect() as conn:
            scored, alerts = conn.execute(
                select(func.count(), func.count().filter(AuditDecision.anomaly)).select_from(AuditDecision)
                .where(AuditDecision.scored_at > func.now() - ALERT_WINDOW)
            ).one()
        return alert_load(scored, alerts, contamination)

    def health_warnings(self, contamination: float) -> list[str]:
        """What /health warns about; an unreachable database is a warning, not an error."""
        try:
            warning = self.alert_load(contamination)["warning"]
        except (sa_exc.SQLAlchemyError, psycopg2.Error) as exc:
            if not database_unavailable(exc):
                raise
            return [ALERT_RATE_UNKNOWN]
        return [warning] if warning else []

    def recent_users(self, limit: int = 20) -> list[str]:
        stmt = (
            select(AuditDecision.user_id, func.max(AuditDecision.scored_at).label("last"))
            .group_by(AuditDecision.user_id).order_by(func.max(AuditDecision.scored_at).desc()).limit(limit)
        )
        with self.engine.connect() as conn:
            return [r[0] for r in conn.execute(stmt).all()]

    # --- backfill ---------------------------------------------------------

    def write_backfill(self, rows: Sequence[dict[str, Any]]) -> WriteResult:
        if not rows:
            return WriteResult(0, 0)
        _check_columns(rows, BACKFILL_COLUMNS)
        inserted = _insert_new(self.engine, "backfill_scores", BACKFILL_COLUMNS,
                               "transaction_id, model_version", rows)
        return WriteResult(inserted=inserted, duplicates=len(rows) - inserted)

    def count_backfill(self, model_version: str | None = None) -> int:
        _check_text("model_version", model_version)
        stmt = select(func.count()).select_from(BackfillScore)
        if model_version:
            stmt = stmt.where(BackfillScore.model_version == model_version)
        with self.engine.connect() as conn:
            return conn.execute(stmt).scalar_one()

    # --- dead letters -----------------------------------------------------

    def write_dead_letters(self, rows: Sequence[dict[str, Any]]) -> WriteResult:
        """Rows: payload, reason, source, position (`topic[partition]@offset` or None).

        `payload` is the exact message value as ``bytes`` (any bytes: a NUL, invalid
        UTF-8), or ``str``, or None for a message without a value; see `display_text`
        and the `payload_raw` column. NUL and invalid text in the other columns are
        escaped the same way, so PostgreSQL never refuses a dead letter.
        """
        if not rows:
            return WriteResult(0, 0)
        values = []
        for r in rows:
            payload, payload_raw = _payload_columns(r["payload"])
            position = r.get("position")
            values.append({"payload": payload, "payload_raw": payload_raw,
                           "reason": display_text(str(r["reason"])), "source": display_text(str(r["source"])),
                           "position": None if position is None else display_text(str(position))})
        with self.engine.begin() as conn:
            inserted = len(conn.execute(_INSERT_DEAD_LETTERS, values).all())
        return WriteResult(inserted=inserted, duplicates=len(rows) - inserted)

    def dead_letters(self, limit: int = 50, offset: int = 0, reason: str | None = None,
                     include_replayed: bool = True, *,
                     include_raw: bool = False) -> tuple[list[dict[str, Any]], int]:
        """Newest first; returns (page, total matching). `reason` matches part of the
        reason, case-insensitively and literally (``%``, ``_`` and ``\\`` are no
        wildcards). Each row has `payload_escaped`: True when `payload` is an escaped
        rendering of bytes that were not valid text; `include_raw` adds `payload_raw`
        (bytes or None), what `cluster.deadletters` replays."""
        _check_page(limit, offset)
        _check_text("reason", reason)
        conditions = []
        if reason:
            conditions.append(DeadLetter.reason.icontains(reason, autoescape=True))
        if not include_replayed:
            conditions.append(DeadLetter.replayed_at.is_(None))
        columns = [*_DEAD_LETTER_COLUMNS, DeadLetter.payload_raw.is_not(None).label("payload_escaped")]
        if include_raw:
            columns.append(DeadLetter.payload_raw)
        stmt = (select(*columns).where(*conditions).order_by(DeadLetter.id.desc())
                .limit(limit).offset(offset))
        with self.engine.connect() as conn:
            rows = [dict(r) for r in conn.execute(stmt).mappings().all()]
            total = conn.execute(select(func.count()).select_from(DeadLetter).where(*conditions)).scalar_one()
        return rows, total

    def mark_replayed(self, ids: Sequence[int]) -> None:
        if ids:
            with self.engine.begin() as conn:
                conn.execute(update(DeadLetter).where(DeadLetter.id.in_(list(ids))).values(replayed_at=func.now()))


def _conditions(f: AuditFilter) -> list:
    _check_text("user_id", f.user_id)
    _check_text("source", f.source)
    out = []
    if f.anomalies_only:
        out.append(AuditDecision.anomaly.is_(True))
    if f.user_id:
        out.append(AuditDecision.user_id == f.user_id)
    if f.source:
        out.append(AuditDecision.source == f.source)
    if f.since:
        out.append(AuditDecision.event_time >= f.since)
    if f.until:
        out.append(AuditDecision.event_time < f.until)
    return out


def _sum_by(rows, index: int) -> dict[str, int]:
    out: dict[str, int] = {}
    for row in rows:
        out[row[index]] = out.get(row[index], 0) + row[-1]
    return out


def _decision_dict(mapping) -> dict[str, Any]:
    return dict(mapping)
