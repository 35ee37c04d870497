"""The model store and the jobs' URIs without a network: fsspec's in-memory
filesystem stands for a remote store (the same code path as any scheme pyarrow
lacks), a local folder for file://. The S3 path runs against a real S3 server in
tests/integration/test_jobs_s3.py."""

from __future__ import annotations

import logging
import uuid

import fsspec
import numpy as np
import pandas as pd
import pytest
from fsspec.implementations.memory import MemoryFileSystem
from pyarrow.fs import FileSelector

from configs.errors import IntegrityError, InvalidInputError, ModelUnavailableError
from configs.settings import SettingsError, load_settings
from features.definitions import FEATURE_NAMES, FEATURE_SET_VERSION
from jobs import _common, backfill, train
from scoring.forest import CompiledForest
from scoring.persistence import ARRAYS_FILE, METADATA_FILE, save_model
from scoring.store import (
    ArtifactStore,
    display_uri,
    fetch_artifact,
    filesystem_for,
    join_uri,
    load_model_from_store,
    normalize_uri,
    storage_error,
)

SECRET = "wJalrXUtnFEMI-K7MDENG-bPxRfiCYEXAMPLEKEY"


class DeniedFileSystem(MemoryFileSystem):
    """A store whose every read says the credentials are refused."""

    protocol = "denied"

    def info(self, path, **kwargs):
        raise PermissionError(f"AccessDenied for {path}")


fsspec.register_implementation("denied", DeniedFileSystem, clobber=True)


@pytest.fixture(scope="module")
def forest() -> CompiledForest:
    from sklearn.ensemble import IsolationForest

    X = np.random.default_rng(0).normal(size=(300, len(FEATURE_NAMES)))
    model = IsolationForest(n_estimators=5, max_samples=64, random_state=0).fit(X)
    return CompiledForest.from_sklearn(model, feature_names=list(FEATURE_NAMES),
                                       feature_set_version=FEATURE_SET_VERSION, model_version="v-unit")


@pytest.fixture
def stored(forest, tmp_path):
    """A model put into a fresh in-memory store: (artifact URI, sha256)."""
    staging = tmp_path / "staging"
    artifact = save_model(forest, staging)
    (staging / "model_card.md").write_text("# card\n")
    store = ArtifactStore(f"memory://bucket-{uuid.uuid4().hex[:8]}/models?region=eu-west-1")
    return store.put(staging, "v-unit"), artifact.sha256


def _memory_path(uri: str) -> str:
    return filesystem_for(uri)[1]


# ------------------------------------------------------------------ URIs


def test_display_uri_hides_user_information_and_query():
    assert display_uri(f"s3://AKIA:{SECRET}@bucket/models?session_token={SECRET}#x") == "s3://bucket/models"
    assert display_uri("hdfs://alice@namenode:8020/models") == "hdfs://namenode:8020/models"
    assert display_uri("/plain/path") == "/plain/path"


def test_a_plain_path_is_a_file_uri_and_joins_keep_the_store_options(tmp_path):
    assert normalize_uri(tmp_path / "a b") == (tmp_path / "a b").as_uri()
    assert normalize_uri("s3://bucket/models/") == "s3://bucket/models"
    assert join_uri("s3://bucket/models?region=eu-west-1", "v1", "model.json") == \
        "s3://bucket/models/v1/model.json?region=eu-west-1"


def test_storage_errors_name_the_uri_and_say_what_to_check():
    missing = storage_error(FileNotFoundError("nope"), "s3://bucket/h?region=x", "input")
    assert isinstance(missing, FileNotFoundError) and str(missing) == "input: s3://bucket/h does not exist"
    denied = storage_error(OSError("When reading key 'h': AWS Error ACCESS_DENIED during HeadObject"),
                           "s3://bucket/h", "input")
    assert isinstance(denied, PermissionError)
    assert "input: s3://bucket/h: access denied" in str(denied) and "AWS_ACCESS_KEY_ID" in str(denied)
    other = storage_error(OSError("connection refused"), "gs://b/x", "output")
    assert type(other) is OSError and str(other) == "output: gs://b/x: connection refused"


def test_an_unknown_scheme_is_refused_naming_it():
    with pytest.raises(InvalidInputError, match="nosuchscheme://"):
        filesystem_for("nosuchscheme://bucket/x")


# ------------------------------------------------------------- settings


def test_model_store_defaults_to_the_data_dir(monkeypatch, tmp_path):
    monkeypatch.delenv("FRAUD_MODEL_STORE", raising=False)
    monkeypatch.delenv("FRAUD_MODEL_DIR", raising=False)
    monkeypatch.setenv("FRAUD_DATA_DIR", str(tmp_path))
    s = load_settings()
    assert s.model_store == (tmp_path / "models").as_uri()
    assert s.model_cache_path == tmp_path / "cache" / "models"


def test_model_dir_is_a_deprecated_alias(monkeypatch, tmp_path, caplog):
    monkeypatch.delenv("FRAUD_MODEL_STORE", raising=False)
    monkeypatch.setenv("FRAUD_MODEL_DIR", str(tmp_path / "m"))
    with caplog.at_level(logging.WARNING):
        assert load_settings().model_store == (tmp_path / "m").as_uri()
    assert "deprecated" in caplog.text and "FRAUD_MODEL_STORE" in caplog.text
    monkeypatch.setenv("FRAUD_MODEL_STORE", "s3://bucket/models")
    with pytest.raises(SettingsError, match="not both"):
        load_settings()


@pytest.mark.parametrize("uri", [f"s3://AKIA:{SECRET}@bucket/models",
                                 f"s3://bucket/models?region=eu-west-1&secret_key={SECRET}",
                                 f"gs://bucket/models?access_token={SECRET}"])
def test_credentials_in_the_model_store_uri_are_refused_without_echoing_them(monkeypatch, uri):
    monkeypatch.delenv("FRAUD_MODEL_DIR", raising=False)
    monkeypatch.setenv("FRAUD_MODEL_STORE", uri)
    with pytest.raises(SettingsError) as err:
        load_settings()
    assert "FRAUD_MODEL_STORE" in str(err.value) and "environment variables" in str(err.value)
    assert SECRET not in str(err.value)


def test_store_options_that_are_not_secrets_are_kept(monkeypatch):
    monkeypatch.delenv("FRAUD_MODEL_DIR", raising=False)
    monkeypatch.setenv("FRAUD_MODEL_STORE", "s3://bucket/models/?region=eu-west-1")
    assert load_settings().model_store == "s3://bucket/models?region=eu-west-1"


# --------------------------------------------------- store and node cache


def test_put_writes_every_file_under_the_version(stored):
    uri, _ = stored
    fs, path = filesystem_for(uri)
    names = {info.base_name for info in fs.get_file_info(FileSelector(path))}
    assert names == {ARRAYS_FILE, METADATA_FILE, "model_card.md"}
    assert uri.endswith("/models/v-unit?region=eu-west-1")


def test_a_loader_with_an_empty_cache_fetches_verifies_and_keeps_a_copy(stored, forest, tmp_path):
    uri, sha = stored
    cache = tmp_path / "node-cache"
    loaded = load_model_from_store(uri, sha256=sha, feature_set_version=FEATURE_SET_VERSION, cache_dir=cache)
    X = np.random.default_rng(1).normal(size=(50, len(FEATURE_NAMES)))
    np.testing.assert_array_equal(loaded.risk_score(X), forest.risk_score(X))
    assert sorted(p.name for p in (cache / sha).iterdir()) == sorted([ARRAYS_FILE, METADATA_FILE])
    assert [p.name for p in cache.iterdir()] == [sha]  # no staging folder left behind
    # The copy serves later loads on this node: the store is not read again.
    MemoryFileSystem().rm(_memory_path(uri), recursive=True)
    load_model_from_store(uri, sha256=sha, feature_set_version=FEATURE_SET_VERSION, cache_dir=cache)


def test_a_tampered_object_is_refused_naming_both_sha256(stored, tmp_path):
    uri, sha = stored
    fs = MemoryFileSystem()
    path = f"{_memory_path(uri)}/{METADATA_FILE}"
    fs.pipe(path, fs.cat(path) + b" ")
    with pytest.raises(IntegrityError) as err:
        fetch_artifact(uri, sha, tmp_path / "cache")
    assert f"expected {sha}" in str(err.value) and "sha256 is " in str(err.value)
    assert "region" not in str(err.value)  # the URI as displayed
    assert not (tmp_path / "cache" / sha).exists()


def test_a_damaged_cached_copy_is_fetched_again(stored, tmp_path):
    uri, sha = stored
    cache = tmp_path / "cache"
    fetch_artifact(uri, sha, cache)
    (cache / sha / ARRAYS_FILE).write_bytes(b"garbage")
    assert fetch_artifact(uri, sha, cache) == cache / sha
    load_model_from_store(uri, sha256=sha, feature_set_version=FEATURE_SET_VERSION, cache_dir=cache)


def test_a_missing_object_names_the_uri_and_the_file(stored, tmp_path):
    uri, sha = stored
    MemoryFileSystem().rm(f"{_memory_path(uri)}/{ARRAYS_FILE}")
    with pytest.raises(ModelUnavailableError, match=f"{display_uri(uri)}: {ARRAYS_FILE} is missing"):
        fetch_artifact(uri, sha, tmp_path / "cache")


@pytest.mark.parametrize("sha", ["../../etc", "A" * 64, ""])
def test_a_registered_sha256_that_is_not_hex_is_refused_before_any_path_is_built(stored, tmp_path, sha):
    with pytest.raises(IntegrityError, match="64 lowercase hex"):
        fetch_artifact(stored[0], sha, tmp_path / "cache")


def test_a_file_store_is_read_in_place(forest, tmp_path):
    artifact = save_model(forest, tmp_path / "store" / "v1")
    uri = (tmp_path / "store" / "v1").as_uri()
    assert fetch_artifact(uri, artifact.sha256, tmp_path / "cache") == tmp_path / "store" / "v1"
    assert not (tmp_path / "cache").exists()


# ------------------------------------------------------- jobs on URIs


@pytest.mark.parametrize("job", [train, backfill])
def test_a_missing_input_uri_exits_2_naming_it(job, tmp_path, capsys):
    uri = f"memory://bucket-{uuid.uuid4().hex[:8]}/history/"
    argv = ["--input", uri] + (["--output", str(tmp_path / "o")] if job is backfill else [])
    assert job.main(argv) == 2
    err = capsys.readouterr().err
    assert f"input: {uri.rstrip('/')} does not exist" in err and "Traceback" not in err


def test_a_refused_input_exits_2_naming_it_and_what_to_check(capsys):
    assert train.main(["--input", "denied://bucket/history"]) == 2
    err = capsys.readouterr().err
    assert "input: denied://bucket/history: access denied" in err and "AWS_ACCESS_KEY_ID" in err


def test_the_header_of_an_input_uri_is_read_through_its_filesystem():
    root = f"memory://bucket-{uuid.uuid4().hex[:8]}/history"
    fs = MemoryFileSystem()
    frame = pd.DataFrame({"user_id": ["u"], "amount": [1.0], "merchant": ["m"], "country": ["FR"],
                          "timestamp": ["2025-01-01T00:00:00Z"]})
    fs.pipe(f"{root[len('memory://'):]}/part-0.csv", frame.to_csv(index=False).encode())
    fs.pipe(f"{root[len('memory://'):]}/_SUCCESS", b"")
    _common.check_input(root + "/")
    assert _common.input_columns(root) == list(frame.columns)
    with pytest.raises(InvalidInputError, match="missing columns: user_id"):
        fs.pipe(f"{root[len('memory://'):]}-bad/a.csv", b"amount\n1\n")
        _common.check_input(root + "-bad")


def test_rejects_go_beside_a_remote_output_and_an_earlier_file_goes_when_there_are_none():
    out = f"memory://bucket-{uuid.uuid4().hex[:8]}/scored"
    target = backfill.rejects_path_for(out)
    rejects = pd.DataFrame({"amount": ["-3"], "reason": ["amount: must be greater than 0"]})
    assert _common.write_rejects(rejects, target) == target
    fs, path = filesystem_for(target)
    assert pd.read_csv(fs.open_input_stream(path))["reason"].tolist() == ["amount: must be greater than 0"]
    assert _common.write_rejects(rejects.iloc[0:0], target) is None
    assert not MemoryFileSystem().exists(path)


def test_prepare_output_never_deletes_foreign_objects():
    out = f"memory://bucket-{uuid.uuid4().hex[:8]}/scored"
    fs = MemoryFileSystem()
    base = out[len("memory://"):]
    fs.pipe(f"{base}/part-0.parquet", b"x")
    fs.pipe(f"{base}/notes.txt", b"keep me")
    with pytest.raises(InvalidInputError, match="other than Parquet"):
        backfill.prepare_output(out)
    assert fs.exists(f"{base}/notes.txt")
    fs.rm(f"{base}/notes.txt")
    backfill.prepare_output(out)
    assert not fs.exists(f"{base}/part-0.parquet")


def test_simulate_writes_the_same_bytes_to_a_uri_as_to_a_file(tmp_path):
    from jobs.simulate import main

    uri = f"memory://bucket-{uuid.uuid4().hex[:8]}/history.csv"
    args = ["--users", "20", "--days", "3", "--seed", "4"]
    assert main(["--out", uri, *args]) == 0
    assert main(["--out", str(tmp_path / "history.csv"), *args]) == 0
    assert MemoryFileSystem().cat(uri[len("memory://"):]) == (tmp_path / "history.csv").read_bytes()


def test_a_storage_error_raised_in_a_ray_task_reaches_the_exit_code_unwrapped(capsys):
    from ray.exceptions import RayTaskError, UserCodeException

    _common.configure_logging()  # onto this test's stderr, as a job's main() does
    ours = storage_error(FileNotFoundError("gone"), "s3://bucket/history/part-1.parquet", "input")
    try:  # Ray Data raises UserCodeException from the UDF's error, in a RayTaskError
        raise UserCodeException("map_batches failed") from ours
    except UserCodeException as user_code:
        wrapped = RayTaskError("ReadFiles", "Traceback (most recent call last): ...", user_code)
    assert _common.unwrap(wrapped) is ours
    assert _common.failure(wrapped.as_instanceof_cause(), "backfill") == 2
    err = capsys.readouterr().err
    assert "input: s3://bucket/history/part-1.parquet does not exist" in err and "Traceback" not in err
    assert _common.unwrap(ours) is ours  # our own cause (pyarrow's error) is kept behind it
    # Across processes Ray Data appends its retry advice to the message: the URI's line is shown.
    ours.args = (f"{ours}\nFailed to apply UDF transform after 1/1 attempts",)
    assert _common.failure(RayTaskError("ReadFiles", "tb", ours).as_instanceof_cause(), "train") == 2
    assert capsys.readouterr().err.strip().endswith("error: input: s3://bucket/history/part-1.parquet does not exist")
