"""Ray Data pipeline around the pure transforms of `features.transforms`.

`compute_features_dataset` hash-partitions rows by user (``crc32(user_id) %
buckets``), runs the vectorised `compute_user_features` on each whole bucket,
then does the same by merchant for `compute_merchant_features`. Each bucket
holds every row of its users (merchants), so the result equals
`compute_features` on the whole frame exactly; only the row order differs.

Validation and rejects happen before, in the jobs (`features.schema.validate_frame`).
"""

from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import ray

from configs.errors import InvalidInputError
from features.transforms import compute_merchant_features, compute_user_features

DEFAULT_BUCKETS = 8
_USER_BUCKET = "_user_bucket"
_MERCHANT_BUCKET = "_merchant_bucket"


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


def bucket_of(keys: pd.Series, buckets: int) -> np.ndarray:
    """Stable bucket of each key: ``crc32(utf-8) % buckets``."""
    return np.fromiter((zlib.crc32(k.encode()) % buckets for k in keys.astype(str)),
                       dtype=np.int64, count=len(keys))


def _add_buckets(batch: pd.DataFrame, buckets: int) -> pd.DataFrame:
    batch = batch.copy(deep=False)
    batch[_USER_BUCKET] = bucket_of(batch["user_id"], buckets)
    batch[_MERCHANT_BUCKET] = bucket_of(batch["merchant"], buckets)
    return batch


def _user_group(batch: pd.DataFrame) -> pd.DataFrame:
    return compute_user_features(batch)


def _merchant_group(batch: pd.DataFrame) -> pd.DataFrame:
    return compute_merchant_features(batch).drop(columns=[_USER_BUCKET, _MERCHANT_BUCKET])


def compute_features_dataset(ds: ray.data.Dataset, buckets: int = DEFAULT_BUCKETS) -> ray.data.Dataset:
    """Every feature of `FEATURE_NAMES` appended to each row of `ds` (row order not kept)."""
    ds = ds.map_batches(_add_buckets, fn_kwargs={"buckets": buckets}, batch_format="pandas")
    ds = ds.groupby(_USER_BUCKET, num_partitions=buckets).map_groups(_user_group, batch_format="pandas")
    return ds.groupby(_MERCHANT_BUCKET, num_partitions=buckets).map_groups(_merchant_group, batch_format="pandas")
