"""`python -m jobs.simulate`: labelled synthetic transactions (see
`cluster.simulation`) written to a CSV or Parquet file, local or on a URI."""

from __future__ import annotations

import argparse
import io
import logging
import os
import sys
import time
from pathlib import PurePosixPath
from urllib.parse import urlsplit

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv

from cluster.simulation import COLUMNS, DAY, DEFAULT_FRAUD_RATE, DEFAULT_START, MAX_FRAUD_RATE, SCENARIOS, simulate
from configs.errors import InvalidInputError

__all__ = ["COLUMNS", "SCENARIOS", "main", "simulate", "summarize", "write"]

logger = logging.getLogger(__name__)


def write(df: pd.DataFrame, path: str | os.PathLike[str]) -> None:
    """Write ``df`` as CSV or Parquet, chosen by the suffix of ``path``, a local path
    or a URI (``s3://bucket/history.parquet``; credentials from the storage client's
    environment variables).

    CSV holds ISO 8601 timestamps such as ``2025-01-01T08:30:00Z`` and amounts with
    two decimals; Parquet keeps the tz-aware UTC timestamp column. The same frame
    gives the same bytes wherever they go.
    """
    from scoring.store import filesystem_for, is_remote, storage_error, write_bytes

    name = urlsplit(str(path)).path if is_remote(path) else str(path)
    suffix = PurePosixPath(name).suffix.lower()
    if suffix not in (".csv", ".parquet"):
        raise InvalidInputError(f"out: suffix must be .csv or .parquet, got {suffix!r}")
    buffer = io.BytesIO()
    if suffix == ".parquet":
        df.to_parquet(buffer, index=False)
    else:
        table = pa.Table.from_pandas(df, preserve_index=False)
        table = table.set_column(table.schema.get_field_index("amount"), "amount", _format_cents(df["amount"]))
        table = table.set_column(table.schema.get_field_index("timestamp"), "timestamp",
                                 _format_iso(df["timestamp"]))
        # No value contains a delimiter or a quote, so nothing needs quoting.
        pa_csv.write_csv(table, buffer, pa_csv.WriteOptions(quoting_style="none", quoting_header="none"))
    try:
        fs, target = filesystem_for(path)
        write_bytes(fs, target, buffer.getvalue())
    except OSError as exc:
        raise storage_error(exc, path, "out") from exc


def _format_cents(amount: pd.Series) -> pa.Array:
    """Non-negative amounts as text with exactly two decimals (12.5 -> "12.50")."""
    units, cents = np.divmod(np.round(amount.to_numpy() * 100).astype(np.int64), 100)
    return pc.binary_join_element_wise(
        pc.cast(pa.array(units), pa.string()), pc.utf8_lpad(pc.cast(pa.array(cents), pa.string()), 2, "0"), ".")


def _format_iso(timestamp: pd.Series) -> pa.Array:
    """UTC timestamps as ``YYYY-MM-DDTHH:MM:SSZ``, built from a table of dates and one of times of day
    (formatting each row on its own is several times slower)."""
    seconds = timestamp.dt.tz_convert("UTC").dt.tz_localize(None).to_numpy("datetime64[s]").astype(np.int64)
    day, second_of_day = np.divmod(seconds, DAY)
    first = int(day.min()) if len(day) else 0
    dates = np.datetime_as_string(np.arange(first, int(day.max()) + 1 if len(day) else first).astype("datetime64[D]"))
    times = np.strings.slice(np.datetime_as_string(np.arange(DAY).astype("datetime64[s]")), 10, None)
    return pc.binary_join_element_wise(
        pa.array(dates).take(pa.array(day - first)), pa.array(times).take(pa.array(second_of_day)), "Z", "")


def summarize(df: pd.DataFrame) -> str:
    counts = df.loc[df["is_fraud"] == 1, "scenario"].value_counts()
    per_scenario = ", ".join(f"{s}={int(counts.get(s, 0))}" for s in SCENARIOS)
    fraud = int(df["is_fraud"].sum())
    return (f"rows={len(df)} users={df['user_id'].nunique()} fraud={fraud} "
            f"({fraud / max(len(df), 1):.2%}): {per_scenario}")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m jobs.simulate",
        description="Generate labelled synthetic transactions (columns: " + ", ".join(COLUMNS) + ").",
    )
    p.add_argument("--out", required=True,
                   help="output file, a local path or a URI (s3://bucket/history.parquet); .csv (ISO 8601 "
                        "UTC timestamps with 'Z') or .parquet (tz-aware UTC)")
    p.add_argument("--users", type=int, required=True, help="number of users (>= 1)")
    p.add_argument("--days", type=int, required=True, help="number of days covered (>= 1)")
    p.add_argument("--seed", type=int, required=True, help="random seed; the same seed gives the same bytes")
    p.add_argument("--start", default=DEFAULT_START,
                   help=f"first instant, ISO 8601 date or datetime, naive means UTC (default {DEFAULT_START})")
    p.add_argument("--fraud-rate", type=float, default=DEFAULT_FRAUD_RATE,
                   help=f"share of fraudulent rows, 0..{MAX_FRAUD_RATE} (default {DEFAULT_FRAUD_RATE})")
    return p


def main(argv: list[str] | None = None) -> int:
    from scoring.store import display_uri

    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    args = _parser().parse_args(argv)
    began = time.perf_counter()
    try:
        df = simulate(args.users, args.days, args.seed, start=args.start, fraud_rate=args.fraud_rate)
        generated = time.perf_counter() - began
        write(df, args.out)
    except (InvalidInputError, FileNotFoundError, PermissionError) as e:
        logger.error("simulate: %s", e)
        return 2
    except OSError as e:
        logger.error("simulate: %s", e)
        return 1
    logger.info("%s; generated in %.2fs, total %.2fs -> %s",
                summarize(df), generated, time.perf_counter() - began, display_uri(args.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
