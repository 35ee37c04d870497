"""Shared fixtures. Unit tests need none of these; integration tests start real
servers once per session (Ray, embedded PostgreSQL, the Tansu broker) in a
temporary data directory and stop them at the end."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

# Every test session gets its own data directory, set before anything reads settings.
_SESSION_DATA_DIR = Path(tempfile.mkdtemp(prefix="fraud-scoring-test-"))
os.environ.setdefault("FRAUD_DATA_DIR", str(_SESSION_DATA_DIR))
os.environ.setdefault("NUMBA_CACHE_DIR", str(_SESSION_DATA_DIR / "cache" / "numba"))
os.environ.pop("DATABASE_URL", None)
os.environ.pop("KAFKA_BOOTSTRAP_SERVERS", None)
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
# The whole suite runs with an API key, so that every path proves it sends one.
API_KEY = "test-key-0123456789"
os.environ.setdefault("FRAUD_API_KEY", API_KEY)


@pytest.fixture(scope="session")
def data_dir() -> Path:
    return Path(os.environ["FRAUD_DATA_DIR"])


@pytest.fixture(scope="session")
def ray_local():
    """A local Ray instance with an explicit logical CPU count, shared by the session."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"FRAUD_DATA_DIR": os.environ["FRAUD_DATA_DIR"]}})
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def servers(data_dir):
    """Embedded PostgreSQL and the Tansu broker, started once, migrated, stopped at the end."""
    from cluster.dev import ensure_servers, stop_servers
    from configs.settings import get_settings

    get_settings.cache_clear()
    urls = ensure_servers(get_settings())
    yield urls
    stop_servers(get_settings())


@pytest.fixture(scope="session")
def engine(servers):
    from cluster.store.db import engine_for

    eng = engine_for(servers["database_url"])
    yield eng
    eng.dispose()


@pytest.fixture
def unique_name(request):
    """A topic / group / prefix unique to one test."""
    import uuid

    return f"t-{request.node.name[:40]}-{uuid.uuid4().hex[:8]}".replace("[", "-").replace("]", "")


@pytest.fixture(scope="session")
def live_app(ray_local, servers):
    """The scoring application and the UI on a real Serve instance (bootstrap model included)."""
    import httpx
    from ray import serve

    from deployments.app import APP_NAME, build_app, build_ui_app

    from tests.ports import free_port

    port = free_port()
    api_url = f"http://127.0.0.1:{port}"
    serve.start(http_options={"host": "127.0.0.1", "port": port},
                logging_config={"enable_access_log": False})
    serve.run(build_app({}), name=APP_NAME, route_prefix="/")
    serve.run(build_ui_app({"api_url": api_url}), name="ui", route_prefix="/ui")
    health = httpx.get(f"{api_url}/health", timeout=30)
    assert health.status_code == 200, health.text
    yield {"api_url": api_url, "ui_url": f"{api_url}/ui", "api_key": os.environ["FRAUD_API_KEY"],
           "headers": {"X-API-Key": os.environ["FRAUD_API_KEY"]}}
    serve.shutdown()
