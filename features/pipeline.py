"""Ray Data pipeline around the pure transforms of `features.transforms`.

`compute_features_dataset` runs `compute_user_features` on whole user buckets,
then `compute_merchant_features` on whole merchant buckets. Each bucket holds
every row of its users (merchants), so the result equals `compute_features` on
the whole frame exactly; only the row order differs.

The two repartitions are plain Ray tasks over Arrow tables in the object store,
not Ray Data's generic groupby shuffles (five to ten times slower here):

1. the input is materialised once; one task per input block splits it into
   ``buckets`` tables by user bucket;
2. ``buckets`` tasks each concatenate their pieces (in block order, so the
   rows keep their input order), append the user features, and split the
   result by merchant bucket;
3. ``buckets`` tasks each concatenate their pieces and append the merchant
   features; their tables are the blocks of the returned dataset.

Scaling: every row is copied a fixed number of times (two splits, two
concatenations), so the work is linear in the rows, and one task holds
about ``rows / buckets`` rows in memory (plus pandas copies of them). The
object store holds the input and the intermediate tables at once, about three
times the input at the peak: raise ``buckets`` for 10M rows and more so that
one bucket stays a few hundred MB.

Duplicates of a ``transaction_id`` are resolved as in `compute_features` (the
first copy wins, in the order of the materialised blocks of `ds`) as long as
the copies share their user id, which every copy of one event does.

Validation and rejects happen before, in the jobs (`features.schema.validate_frame`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import ray

from configs.errors import InvalidInputError
from features.transforms import compute_features, compute_merchant_features, compute_user_features

DEFAULT_BUCKETS = 8


def read_history(path: str | Path) -> ray.data.Dataset:
    """A dataset of transactions from a CSV or Parquet file, or a folder of them."""
    path = Path(path)
    if path.is_dir():
        suffixes = {p.suffix.lower() for p in path.rglob("*") if p.is_file() and not p.name.startswith((".", "_"))}
    elif path.is_file():
        suffixes = {path.suffix.lower()}
    else:
        raise InvalidInputError(f"path: {path} does not exist")
    if suffixes <= {".parquet", ".pq"} and suffixes:
        return ray.data.read_parquet(str(path))
    if suffixes <= {".csv"} and suffixes:
        return ray.data.read_csv(str(path))
    raise InvalidInputError(f"path: {path} must hold only .csv or only .parquet files, found {sorted(suffixes)}")


def bucket_of(keys: pa.Array | pa.ChunkedArray, buckets: int) -> np.ndarray:
    """Stable bucket of each key: the pandas hash of its text, modulo ``buckets``.

    The same key gets the same bucket in every process; each distinct key of a
    chunk is hashed once.
    """
    chunks = keys.chunks if isinstance(keys, pa.ChunkedArray) else [keys]
    parts = [np.empty(0, dtype=np.int64)]
    for chunk in chunks:
        encoded = pc.dictionary_encode(chunk, null_encoding="encode")
        text = pc.cast(encoded.dictionary, pa.string()).to_numpy(zero_copy_only=False)
        of_key = (pd.util.hash_array(text) % np.uint64(buckets)).astype(np.int64)
        parts.append(of_key[encoded.indices.to_numpy()])
    return np.concatenate(parts)


def _split(table: pa.Table, key: str, buckets: int) -> list[pa.Table] | pa.Table:
    """``table``'s rows by bucket of ``key``, each part in the input order.

    One part is returned bare: a task with ``num_returns=1`` returns one object.
    """
    if buckets == 1:
        return table
    bucket = bucket_of(table.column(key), buckets)
    return [table.take(np.flatnonzero(bucket == b)) for b in range(buckets)]


def _listed(refs: list[ray.ObjectRef] | ray.ObjectRef) -> list[ray.ObjectRef]:
    return refs if isinstance(refs, list) else [refs]


def _concat_to_pandas(parts: tuple[pa.Table, ...]) -> pd.DataFrame:
    return pa.concat_tables(parts, promote_options="permissive").to_pandas()


@ray.remote
def _split_by_user(table: pa.Table, buckets: int) -> list[pa.Table] | pa.Table:
    return _split(table, "user_id", buckets)


@ray.remote
def _user_bucket(buckets: int, *parts: pa.Table) -> list[pa.Table] | pa.Table:
    out = compute_user_features(_concat_to_pandas(parts))
    return _split(pa.Table.from_pandas(out, preserve_index=False), "merchant", buckets)


@ray.remote
def _merchant_bucket(*parts: pa.Table) -> pa.Table:
    return pa.Table.from_pandas(compute_merchant_features(_concat_to_pandas(parts)), preserve_index=False)


def compute_features_dataset(ds: ray.data.Dataset, buckets: int = DEFAULT_BUCKETS) -> ray.data.Dataset:
    """Every feature of `FEATURE_NAMES` appended to each row of `ds` (row order not kept).

    Runs `ds` (it is materialised); see the module docstring for how and at what cost.
    """
    if buckets < 1:
        raise InvalidInputError(f"buckets: must be >= 1, got {buckets}")
    blocks = ds.to_arrow_refs()
    if not blocks:
        return ds.map_batches(compute_features, batch_format="pandas")
    return ray.data.from_arrow_refs(compute_features_blocks(blocks, buckets))


def compute_features_blocks(blocks: list[ray.ObjectRef], buckets: int = DEFAULT_BUCKETS) -> list[ray.ObjectRef]:
    """`compute_features_dataset` on Arrow tables in the object store: returns at
    once ``buckets`` refs of Arrow tables, each ready when its bucket is (a
    caller can go on with the first while the others are computed)."""
    if buckets < 1:
        raise InvalidInputError(f"buckets: must be >= 1, got {buckets}")
    if not blocks:
        return []
    by_user = [_listed(_split_by_user.options(num_returns=buckets).remote(b, buckets)) for b in blocks]
    by_merchant = [_listed(_user_bucket.options(num_returns=buckets).remote(buckets, *(p[u] for p in by_user)))
                   for u in range(buckets)]
    return [_merchant_bucket.remote(*(parts[m] for parts in by_merchant)) for m in range(buckets)]
