"""Model activation and loading faults against the real registry (embedded PostgreSQL)
and real artifacts: an activation checks the artifact first and changes nothing when
it refuses; concurrent activations give one success and one 409, never a 500; a
replica that cannot load the wanted version keeps (or falls back to) one it can,
and says which version failed and why. The SHAP step also runs with
`FRAUD_EXPLAINER=shap` (no compiled kernels, no scikit-learn model)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from sqlalchemy import text

from cluster import registry as registry_module
from cluster.registry import ModelRegistry, load_artifact
from configs.errors import ConflictError, FraudScoringError, InvalidInputError, ModelUnavailableError
from features.definitions import FEATURE_SET_VERSION
from scoring.persistence import ARRAYS_FILE, METADATA_FILE, artifact_sha256


@pytest.fixture(scope="module")
def trained(servers, data_dir) -> dict[str, Any]:
    """One small model trained and registered by the training job's code (not active)."""
    from configs.settings import get_settings
    from jobs.simulate import simulate
    from jobs.train import fit_and_register

    result = fit_and_register(simulate(users=30, days=5, seed=3), settings=get_settings(),
                              n_estimators=10, seed=1, source="test_model_activation")
    return result


@pytest.fixture
def registry(engine) -> ModelRegistry:
    """The registry; the version active before the test is active again after it."""
    reg = ModelRegistry(engine)
    before = reg.active()
    yield reg
    if before is not None and (reg.active() or {}).get("version") != before["version"]:
        with contextlib.suppress(ConflictError):  # a failed test may have left it unloadable
            reg.activate(before["version"], activated_by="test-restore")


def _copy(registry: ModelRegistry, trained: dict[str, Any], tmp_path: Path, *,
          feature_set_version: str = FEATURE_SET_VERSION) -> tuple[str, Path]:
    """A new registered version whose artifact is a copy of the trained one."""
    version = f"v-test-{uuid.uuid4().hex[:10]}"
    directory = tmp_path / version
    shutil.copytree(trained["artifact_path"], directory)
    registry.register(version=version, parameters={"copy_of": trained["version"]},
                      feature_set_version=feature_set_version, data_fingerprint="f" * 64, metrics={},
                      artifact_path=str(directory), artifact_sha256=artifact_sha256(directory))
    return version, directory


def _tamper(directory: Path) -> bytes:
    """Changes the artifact after registration; returns the original bytes to restore."""
    original = (directory / METADATA_FILE).read_bytes()
    (directory / METADATA_FILE).write_bytes(original + b" ")
    return original


def _rewrite(directory: Path, registry: ModelRegistry, version: str, change) -> None:
    """Rewrites the artifact and its registered sha256 (the hash matches, the content is bad)."""
    change(directory)
    from sqlalchemy.orm import Session

    from cluster.store.models import ModelVersion

    with Session(registry.engine) as session, session.begin():
        session.get(ModelVersion, version).artifact_sha256 = artifact_sha256(directory)


def _other_feature_set(directory: Path) -> None:
    meta = json.loads((directory / METADATA_FILE).read_text())
    meta["feature_set_version"] = "fs-some-other"
    (directory / METADATA_FILE).write_text(json.dumps(meta))


def _cyclic_trees(directory: Path) -> None:
    with np.load(directory / ARRAYS_FILE, allow_pickle=False) as npz:
        arrays = {k: np.array(npz[k]) for k in npz.files}
    internal = np.nonzero(arrays["feature"] >= 0)[0]
    arrays["left"][internal[-1]] = 0  # a child pointing back at a root
    np.savez(directory / ARRAYS_FILE, **arrays)


def _state(registry: ModelRegistry) -> tuple:
    active = registry.active()
    return (active["version"] if active else None, len(registry.history()),
            sorted((r["version"], r["status"]) for r in registry.list()))


# ------------------------------------------------------------------ activation checks


@pytest.mark.parametrize("problem, expected", [
    ("sha256", "sha256 differs from the registered one"),
    ("missing", "artifact is missing, unreadable or malformed"),
    ("registered for another feature set", "was trained for feature set fs-some-other"),
    ("artifact of another feature set", f"feature set is not {FEATURE_SET_VERSION}"),
    ("inconsistent arrays", "tree arrays are inconsistent"),
])
def test_activation_refuses_an_artifact_that_cannot_be_served_and_changes_nothing(
        registry, trained, tmp_path, problem, expected):
    good, _ = _copy(registry, trained, tmp_path)
    registry.activate(good, activated_by="test")
    if problem == "registered for another feature set":
        bad, _ = _copy(registry, trained, tmp_path, feature_set_version="fs-some-other")
    else:
        bad, directory = _copy(registry, trained, tmp_path)
        if problem == "sha256":
            _tamper(directory)
        elif problem == "missing":
            shutil.rmtree(directory)
        elif problem == "artifact of another feature set":
            _rewrite(directory, registry, bad, _other_feature_set)
        else:
            _rewrite(directory, registry, bad, _cyclic_trees)
    before = _state(registry)
    with pytest.raises(ConflictError) as refused:
        registry.activate(bad, activated_by="test")
    message = str(refused.value)
    assert refused.value.status_code == 409
    assert bad in message and expected in message and f"{good} stays active" in message
    assert str(tmp_path) not in message  # no file paths reach clients
    assert _state(registry) == before
    assert registry.get(bad)["status"] == "candidate"


def test_activating_the_active_version_again_changes_nothing(registry, trained, tmp_path):
    version, _ = _copy(registry, trained, tmp_path)
    registry.activate(version, activated_by="test")
    before = _state(registry)
    assert registry.activate(version, activated_by="test")["status"] == "active"
    assert _state(registry) == before


# ------------------------------------------------------------------ concurrent activations


class _HeldCheck:
    """An artifact check that holds its activation (and the registry lock) until released."""

    def __init__(self, fail: bool = False) -> None:
        self.entered, self.release, self.fail = threading.Event(), threading.Event(), fail

    def __call__(self, row: dict[str, Any]) -> None:
        self.entered.set()
        assert self.release.wait(60)
        if self.fail:
            raise ModelUnavailableError(f"model {row['version']}: refused by the test")
        load_artifact(row)


def _waiting_for_the_lock(engine) -> bool:
    with engine.connect() as conn:
        return bool(conn.execute(text(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted")).scalar())


def _race(engine, first: str, second: str, held: _HeldCheck) -> tuple[Any, Any]:
    """`first` activates through a held check; `second`, started while it is held,
    waits for the lock; then `first` is released. Returns both outcomes."""
    outcomes: dict[str, Any] = {}

    def run(name: str, reg: ModelRegistry, version: str) -> None:
        try:
            outcomes[name] = reg.activate(version, activated_by=f"test-{name}")
        except Exception as exc:  # the outcome under test
            outcomes[name] = exc

    one = threading.Thread(target=run, args=("first", ModelRegistry(engine, check_artifact=held), first))
    one.start()
    assert held.entered.wait(30)
    two = threading.Thread(target=run, args=("second", ModelRegistry(engine), second))
    two.start()
    deadline = time.monotonic() + 30
    while not _waiting_for_the_lock(engine):
        assert time.monotonic() < deadline, "the second activation never waited for the first"
        time.sleep(0.05)
    held.release.set()
    one.join(60)
    two.join(60)
    return outcomes["first"], outcomes["second"]


def test_concurrent_activations_of_two_versions_give_one_success_and_one_409(registry, engine, trained, tmp_path):
    a, _ = _copy(registry, trained, tmp_path)
    b, _ = _copy(registry, trained, tmp_path)
    history = len(registry.history())
    first, second = _race(engine, a, b, _HeldCheck())
    assert isinstance(first, dict) and first["version"] == a
    assert isinstance(second, ConflictError), second
    assert b in str(second) and f"made {a} active" in str(second)
    assert registry.active()["version"] == a and registry.get(b)["status"] == "candidate"
    assert len(registry.history()) == history + 1


def test_concurrent_activations_of_one_version_both_succeed_once(registry, engine, trained, tmp_path):
    a, _ = _copy(registry, trained, tmp_path)
    history = len(registry.history())
    first, second = _race(engine, a, a, _HeldCheck())
    assert first["version"] == second["version"] == a and second["status"] == "active"
    assert registry.active()["version"] == a
    assert len(registry.history()) == history + 1  # one activation recorded, not two


def test_an_activation_that_waited_for_a_refused_one_goes_ahead(registry, engine, trained, tmp_path):
    a, _ = _copy(registry, trained, tmp_path)
    b, _ = _copy(registry, trained, tmp_path)
    first, second = _race(engine, a, b, _HeldCheck(fail=True))
    assert isinstance(first, ConflictError) and "refused by the test" in str(first)
    assert second["version"] == b and registry.active()["version"] == b


def test_an_activation_that_waits_too_long_gets_409(registry, engine, trained, tmp_path, monkeypatch):
    a, _ = _copy(registry, trained, tmp_path)
    b, _ = _copy(registry, trained, tmp_path)
    monkeypatch.setattr(registry_module, "ACTIVATION_LOCK_TIMEOUT_MS", 300)
    held = _HeldCheck()
    one = threading.Thread(target=ModelRegistry(engine, check_artifact=held).activate, args=(a, "test"))
    one.start()
    try:
        assert held.entered.wait(30)
        with pytest.raises(ConflictError, match="another activation still held the registry"):
            registry.activate(b, activated_by="test")
    finally:
        held.release.set()
        one.join(60)
    assert registry.active()["version"] == a


def test_activations_racing_freely_never_fail_otherwise_and_keep_the_registry_consistent(
        registry, engine, trained, tmp_path):
    versions = [_copy(registry, trained, tmp_path)[0] for _ in range(3)]
    history = len(registry.history())
    barrier = threading.Barrier(6)

    def activate(i: int) -> str:
        barrier.wait(30)
        try:
            return registry.activate(versions[i % 3], activated_by=f"racer-{i}")["version"]
        except FraudScoringError as exc:
            assert isinstance(exc, ConflictError), exc  # a 409, never another error
            return "409"

    for _ in range(3):
        with ThreadPoolExecutor(6) as pool:
            outcomes = list(pool.map(activate, range(6)))
        assert any(o != "409" for o in outcomes)
    entries = registry.history()[: len(registry.history()) - history][::-1]  # oldest first
    for earlier, later in zip(entries, entries[1:]):
        assert later["previous_version"] == earlier["version"]
    active = [r["version"] for r in registry.list() if r["status"] == "active"]
    assert active == [entries[-1]["version"]]


# ------------------------------------------------------------------ replicas


def _model_step(source) -> Any:
    from deployments.model_step import ModelStep

    step = ModelStep.func_or_class.__new__(ModelStep.func_or_class)
    return step, step.__init__(poll_interval_s=3600, source=source)


def _shap_step(source) -> Any:
    from deployments.shap_step import ShapStep

    step = ShapStep.func_or_class.__new__(ShapStep.func_or_class)
    return step, step.__init__(source=source)


def _source(registry: ModelRegistry, kernels: str, pinned: str | None = None):
    from deployments.model_source import ModelSource

    return ModelSource(pinned, kernels=kernels, registry=registry, retry_after_s=0.0)


@pytest.fixture
def shap_explainer_setting(monkeypatch):
    from configs.settings import get_settings

    monkeypatch.setenv("FRAUD_EXPLAINER", "shap")
    get_settings.cache_clear()
    assert get_settings().explainer == "shap"
    yield
    monkeypatch.delenv("FRAUD_EXPLAINER")
    get_settings.cache_clear()


def _batch(rows: int = 3) -> dict[str, Any]:
    from features.definitions import FEATURE_NAMES

    X = np.random.default_rng(0).normal(size=(rows, len(FEATURE_NAMES))).astype(np.float32)
    return {"X": X, "timings": {}}


def test_a_replica_starting_with_an_unloadable_active_version_serves_the_last_good_one(
        registry, trained, tmp_path, shap_explainer_setting):
    good, _ = _copy(registry, trained, tmp_path)
    broken, directory = _copy(registry, trained, tmp_path)
    registry.activate(good, activated_by="test")
    registry.activate(broken, activated_by="test")
    original = _tamper(directory)  # changed after its activation was checked

    async def scenario() -> None:
        model, started = _model_step(_source(registry, "score"))
        await started
        shap, started = _shap_step(_source(registry, "none"))
        await started
        try:
            served = model.served()
            assert served["model_version"] == good
            assert broken in served["load_error"] and "sha256" in served["load_error"]
            assert f"still serving {good}" in served["load_error"]
            # one request through both steps, explained by shap from the artifact's arrays
            assert list(shap.explainers) == [good]
            scored = await model.score(_batch())
            assert scored["model_version"] == good
            explained = await shap.explain(scored)
            forest = load_artifact(registry.get(good))
            phi = -explained["explanation"]  # shap's values: they add up to the path length
            np.testing.assert_allclose(phi.sum(axis=1), forest.mean_path_length(scored["X"]) - forest.expected_value,
                                       rtol=0, atol=1e-6)
            assert explained["timings"]["shap_ms"] >= 0
            # the artifact is repaired: the next poll serves the active version
            (directory / METADATA_FILE).write_bytes(original)
            await model._refresh()
            assert model.served()["model_version"] == broken and model.served()["load_error"] is None
            assert (await shap.explain(await model.score(_batch())))["model_version"] == broken
        finally:
            model._poller.cancel()

    asyncio.run(scenario())


def test_a_running_replica_keeps_its_model_when_the_new_active_one_cannot_be_loaded(
        registry, trained, tmp_path):
    good, _ = _copy(registry, trained, tmp_path)
    broken, directory = _copy(registry, trained, tmp_path)
    registry.activate(good, activated_by="test")

    async def scenario() -> None:
        model, started = _model_step(_source(registry, "score"))
        await started
        try:
            assert model.served() == {"model_version": good, "threshold": model.served()["threshold"],
                                      "load_error": None}
            registry.activate(broken, activated_by="test")
            shutil.rmtree(directory)  # e.g. a node that lacks the file
            await model._refresh()
            served = model.served()
            assert served["model_version"] == good
            assert broken in served["load_error"] and "missing, unreadable" in served["load_error"]
            assert (await model.score(_batch()))["model_version"] == good
        finally:
            model._poller.cancel()

    asyncio.run(scenario())


def test_a_replica_with_nothing_loadable_stays_up_and_answers_503_naming_the_version(
        registry, trained, tmp_path, shap_explainer_setting):
    broken, directory = _copy(registry, trained, tmp_path)
    _tamper(directory)

    async def scenario() -> None:
        # pinned: no other version may replace it
        model, started = _model_step(_source(registry, "score", pinned=broken))
        await started
        shap, started = _shap_step(_source(registry, "none", pinned=broken))
        await started
        try:
            assert model.served()["model_version"] is None
            assert broken in model.served()["load_error"] and "no model is served" in model.served()["load_error"]
            model.check_health()  # a restart would not repair the artifact: no crash loop
            with pytest.raises(ModelUnavailableError, match=f"model {broken}: its artifact's sha256"):
                await model.score(_batch())
            with pytest.raises(ModelUnavailableError, match=f"model {broken}: its artifact's sha256"):
                await shap.explain(_batch() | {"model_version": broken})
        finally:
            model._poller.cancel()

    asyncio.run(scenario())


@pytest.mark.parametrize("version", ["v\x00", "v" * 65, ""])
def test_a_malformed_version_is_refused_naming_the_field(registry, version):
    with pytest.raises(InvalidInputError, match="version: expected 1 to 64 characters"):
        registry.activate(version, activated_by="test")
    with pytest.raises(InvalidInputError, match="version: "):
        registry.get(version)
