"""Settings never show a secret: not in their repr (which may reach a log), not in an error."""

from __future__ import annotations

import pytest

from configs.settings import SettingsError, load_settings

PASSWORD = "pw-5f3e9a1c"


def test_the_repr_of_settings_hides_the_database_url_and_the_api_key():
    settings = load_settings(database_url=f"postgresql+psycopg2://fraud:{PASSWORD}@db:5432/fraud",
                             api_key=PASSWORD)
    for text in (repr(settings), str(settings), f"{settings!r}"):
        assert PASSWORD not in text
    assert settings.database_url.endswith("@db:5432/fraud")  # still there for whoever needs it


@pytest.mark.parametrize("field", ["database_url", "api_key"])
def test_an_invalid_secret_setting_is_named_without_echoing_its_value(field):
    with pytest.raises(SettingsError) as caught:
        load_settings(**{field: {"password": PASSWORD}})
    message = str(caught.value)
    assert field in message and PASSWORD not in message
