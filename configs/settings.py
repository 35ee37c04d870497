"""Settings of the whole system, in one typed, frozen model.

Precedence: environment variables > the YAML file named by `FRAUD_CONFIG_FILE`
> `configs/defaults.yaml` > the field defaults below. Every environment variable
is the field name upper-cased with the `FRAUD_` prefix, except the two
standard connection strings `DATABASE_URL` and `KAFKA_BOOTSTRAP_SERVERS`.

`get_settings()` is cached rather than an import-time global, so that Ray
workers can import this module before their environment is complete.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import sys
from pathlib import Path
from typing import Any, Literal
from urllib.parse import parse_qsl, urlsplit, urlunsplit

import yaml
from pydantic import AliasChoices, Field, SecretStr, ValidationError, ValidationInfo, field_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

DEFAULTS_FILE = Path(__file__).with_name("defaults.yaml")
ENV_PREFIX = "FRAUD_"


def default_data_dir() -> Path:
    """A per-user folder, the same from every working directory."""
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "fraud-scoring"


class SettingsError(RuntimeError):
    """A setting has an invalid value; the message names it and what is allowed."""


# Query options of a store URI that would carry a secret (pyarrow reads access_key,
# secret_key, session_token from the query): credentials belong in the environment.
_SECRET_OPTION = re.compile(r"secret|password|token|credential|access_key|account_key|sas|sig", re.I)
# Settings whose rejected value is never echoed in an error: it may hold a secret.
_NOT_ECHOED = frozenset({"model_store", "database_url", "api_key"})


def model_store_uri(value: Any, model_dir: Path | None, data_dir: Path | None) -> str:
    """The model store as a URI: a plain path becomes file://; unset means the deprecated
    `model_dir` when set, else `<data_dir>/models`. Refuses a password or a secret option
    in the URI (credentials come from the storage client's own environment variables)."""
    text = "" if value is None else str(value).strip()
    if not text:
        if model_dir is not None:
            logging.getLogger(__name__).warning(
                "FRAUD_MODEL_DIR (model_dir) is deprecated: set FRAUD_MODEL_STORE=%s instead",
                model_dir.as_uri())
            return model_dir.as_uri()
        return ((data_dir or default_data_dir()).expanduser().resolve() / "models").as_uri()
    if model_dir is not None:
        raise ValueError("set either model_store or the deprecated model_dir (FRAUD_MODEL_DIR), not both")
    if "://" not in text:
        return Path(text).expanduser().resolve().as_uri()
    parts = urlsplit(text)
    if not re.fullmatch(r"[a-z][a-z0-9+.-]*", parts.scheme):
        raise ValueError("expected a URI such as s3://bucket/prefix or file:///path, or a plain path")
    hint = ("credentials come from the storage client's own environment variables "
            "(AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, GOOGLE_APPLICATION_CREDENTIALS, "
            "AZURE_STORAGE_ACCOUNT_KEY, ...), never from model_store")
    if parts.password is not None:
        raise ValueError(f"the URI holds a password: {hint}")
    secret = sorted({key for key, _ in parse_qsl(parts.query) if _SECRET_OPTION.search(key)})
    if secret:
        raise ValueError(f"the URI's query names {', '.join(secret)}: {hint}")
    path = parts.path.rstrip("/")
    return urlunsplit(parts._replace(path=path)) if path else text


class _YamlSource(PydanticBaseSettingsSource):
    """Reads `defaults.yaml`, then the file named by FRAUD_CONFIG_FILE on top."""

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        raise NotImplementedError  # __call__ is used instead

    def __call__(self) -> dict[str, Any]:
        return _yaml_values()


def _yaml_values() -> dict[str, Any]:
    """`defaults.yaml`, then the file named by FRAUD_CONFIG_FILE on top."""
    values: dict[str, Any] = {}
    paths = [DEFAULTS_FILE]
    extra = os.environ.get(ENV_PREFIX + "CONFIG_FILE")
    if extra:
        paths.append(Path(extra))
    for path in paths:
        loaded = yaml.safe_load(path.read_text()) or {}
        if not isinstance(loaded, dict):
            raise SettingsError(f"{path}: expected a mapping of setting names to values")
        values.update(loaded)
    return values


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        frozen=True,
        extra="forbid",
        populate_by_name=True,
    )

    # Where everything the system keeps lives: database files, pids, models, caches.
    data_dir: Path = Field(default_factory=default_data_dir)
    # Connection strings: unset means "start the embedded server". repr=False: the
    # database URL may hold a password, and a Settings object may reach a log.
    database_url: str | None = Field(
        default=None, validation_alias=AliasChoices("DATABASE_URL", "database_url"), repr=False
    )
    kafka_bootstrap_servers: str | None = Field(
        default=None,
        validation_alias=AliasChoices("KAFKA_BOOTSTRAP_SERVERS", "kafka_bootstrap_servers"),
    )
    kafka_topic: str = "financial-transactions"
    kafka_dead_letter_topic: str = "financial-transactions-dlq"
    kafka_alerts_topic: str = "financial-alerts"
    kafka_consumer_group: str = "fraud-scoring-ingest"
    # Deprecated (FRAUD_MODEL_DIR): a local folder for the model store; use model_store.
    model_dir: Path | None = None
    # Where trained models, their cards and plots are kept: a URI (file://, s3://, gs://,
    # abfs://, hdfs://, ...) or a plain path; unset means file://<data_dir>/models.
    # Credentials come from the storage client's own variables (AWS_ACCESS_KEY_ID, ...),
    # never from this URI: a password or secret in it is refused.
    model_store: str = Field(default="", validate_default=True)
    contamination: float = Field(default=0.02, gt=0.0, le=0.5)
    explainer: Literal["compiled", "shap"] = "compiled"
    api_key: SecretStr | None = None
    # Transaction validation.
    max_amount: float = Field(default=1_000_000.0, gt=0)
    max_clock_skew_seconds: int = Field(default=300, ge=0)
    history_retention_days: int = Field(default=90, ge=1)
    # Online state.
    user_state_shards: int = Field(default=2, ge=1, le=256)
    merchant_state_shards: int = Field(default=1, ge=1, le=256)
    # Serving and ingestion.
    max_batch_size: int = Field(default=256, ge=1, le=10_000)
    max_request_bytes: int = Field(default=1_048_576, ge=1024)
    audit_spool_max_rows: int = Field(default=100_000, ge=1)
    ingest_actors: int = Field(default=2, ge=0, le=64)
    ingest_poll_max_records: int = Field(default=2000, ge=1)
    # Score an actor's next batch while its previous one is audited (false: one at a time).
    ingest_overlap: bool = True
    max_message_bytes: int = Field(default=16_384, ge=256)
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"

    @field_validator("data_dir", "model_dir")
    @classmethod
    def _absolute(cls, value: Path | None) -> Path | None:
        # Never relative to the working directory: `ray job submit --working-dir .`
        # runs in a temporary copy of the tree.
        return None if value is None else value.expanduser().resolve()

    @field_validator("model_store", mode="before")
    @classmethod
    def _model_store_uri(cls, value: Any, info: ValidationInfo) -> str:
        return model_store_uri(value, info.data.get("model_dir"), info.data.get("data_dir"))

    @field_validator("database_url", "kafka_bootstrap_servers", "api_key", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: Any) -> Any:
        return None if value == "" else value

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, env_settings, _YamlSource(settings_cls))

    # Derived locations, all under data_dir.
    @property
    def model_cache_path(self) -> Path:
        """This node's copies of models fetched from a remote model store, by sha256."""
        return self.cache_path / "models"

    @property
    def run_path(self) -> Path:
        return self.data_dir / "run"

    @property
    def postgres_path(self) -> Path:
        return self.data_dir / "postgres"

    @property
    def spool_path(self) -> Path:
        return self.data_dir / "spool"

    @property
    def cache_path(self) -> Path:
        return self.data_dir / "cache"


def load_settings(**overrides: Any) -> Settings:
    """Build settings, turning a validation error into one readable message."""
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            name = ".".join(str(p) for p in err["loc"]) or "settings"
            env = "DATABASE_URL" if name == "database_url" else (
                "KAFKA_BOOTSTRAP_SERVERS" if name == "kafka_bootstrap_servers"
                else ENV_PREFIX + name.upper()
            )
            got = "" if name in _NOT_ECHOED else f" (got {err.get('input')!r})"
            problems.append(f"setting {name} ({env}): {err['msg']}{got}")
        raise SettingsError("invalid settings:\n  " + "\n  ".join(problems)) from None


@functools.cache
def get_settings() -> Settings:
    settings = load_settings()
    configure_numba_cache(settings.data_dir)
    return settings


def data_dir_from_environment() -> Path:
    """The data directory as `get_settings()` resolves it, without building the other settings:
    FRAUD_DATA_DIR, else `data_dir` in the YAML files, else the per-user default."""
    value = os.environ.get(ENV_PREFIX + "DATA_DIR")
    if value is None:
        value = _yaml_values().get("data_dir")
    return default_data_dir() if value is None else Path(value).expanduser().resolve()


def configure_numba_cache(data_dir: Path | None = None) -> None:
    """Point numba's on-disk cache at `<data_dir>/cache/numba`, unless NUMBA_CACHE_DIR is set.

    numba fixes a cached function's folder when `@njit(cache=True)` runs, i.e. when
    a kernel module is imported, so `scoring` and `features` call this before they
    import numba: in a Ray worker that is before any settings exist. The folder is
    this node's own, never the source tree (read-only in an image, or a job's
    temporary working_dir).
    """
    if os.environ.get("NUMBA_CACHE_DIR"):
        return
    if data_dir is None:
        try:
            data_dir = data_dir_from_environment()
        except (OSError, yaml.YAMLError, SettingsError):
            return  # a broken config file: get_settings() reports it, with its name
    os.environ["NUMBA_CACHE_DIR"] = str(data_dir / "cache" / "numba")
    config = sys.modules.get("numba.core.config")
    if config is not None:  # numba was imported earlier (by another library): re-read the variable
        config.reload_config()
