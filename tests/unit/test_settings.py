"""Settings: YAML defaults, environment overrides, readable errors."""

from __future__ import annotations

import pytest

from configs.settings import Settings, SettingsError, load_settings


def test_defaults_come_from_yaml(monkeypatch):
    monkeypatch.delenv("FRAUD_KAFKA_TOPIC", raising=False)
    s = load_settings()
    assert s.kafka_topic == "financial-transactions"
    assert s.contamination == 0.02
    assert s.data_dir.is_absolute()


def test_environment_overrides_yaml(monkeypatch, tmp_path):
    monkeypatch.setenv("FRAUD_CONTAMINATION", "0.05")
    monkeypatch.setenv("DATABASE_URL", "postgresql://db.example/fraud")
    monkeypatch.setenv("FRAUD_DATA_DIR", str(tmp_path / "rel" / ".." / "d"))
    s = load_settings()
    assert s.contamination == 0.05
    assert s.database_url == "postgresql://db.example/fraud"
    assert s.data_dir == (tmp_path / "d").resolve()
    assert s.model_store == (s.data_dir / "models").as_uri()


def test_override_file(monkeypatch, tmp_path):
    cfg = tmp_path / "prod.yaml"
    cfg.write_text("kafka_topic: payments\nuser_state_shards: 8\n")
    monkeypatch.setenv("FRAUD_CONFIG_FILE", str(cfg))
    s = load_settings()
    assert (s.kafka_topic, s.user_state_shards) == ("payments", 8)


@pytest.mark.parametrize(
    ("env", "value", "named"),
    [
        ("FRAUD_CONTAMINATION", "0.9", "contamination"),
        ("FRAUD_EXPLAINER", "lime", "explainer"),
        ("FRAUD_LOG_LEVEL", "LOUD", "log_level"),
        ("FRAUD_USER_STATE_SHARDS", "0", "user_state_shards"),
    ],
)
def test_invalid_value_names_the_setting(monkeypatch, env, value, named):
    monkeypatch.setenv(env, value)
    with pytest.raises(SettingsError) as err:
        load_settings()
    message = str(err.value)
    assert named in message and env in message


def test_explainer_error_lists_allowed_values(monkeypatch):
    monkeypatch.setenv("FRAUD_EXPLAINER", "lime")
    with pytest.raises(SettingsError, match="compiled.*shap"):
        load_settings()


def test_unknown_yaml_key_is_refused(monkeypatch, tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("kafka_topik: x\n")
    monkeypatch.setenv("FRAUD_CONFIG_FILE", str(cfg))
    with pytest.raises(SettingsError, match="kafka_topik"):
        load_settings()


def test_settings_are_frozen():
    s = Settings()
    with pytest.raises(Exception):
        s.kafka_topic = "other"  # type: ignore[misc]


def test_api_key_is_secret(monkeypatch):
    monkeypatch.setenv("FRAUD_API_KEY", "hunter2")
    s = load_settings()
    assert "hunter2" not in repr(s) and s.api_key.get_secret_value() == "hunter2"
