from pathlib import Path

import pytest

from exchange.core.settings import Settings


def test_settings_read_from_environment() -> None:
    settings = Settings.from_env({"DATABASE_URL": "postgresql://x/y", "GPUX_HOME": "/data", "GPUX_TICK_S": "0.5",
                                  "GPUX_SETTLE_S": "30", "GPUX_FEE_BPS": "150", "GPUX_ADMIN_KEY": "k"})

    assert settings.database_url == "postgresql://x/y" and settings.home == Path("/data")
    assert (settings.tick_s, settings.settle_s, settings.fee_bps, settings.admin_key) == (0.5, 30.0, 150, "k")


def test_defaults_follow_the_spec() -> None:
    settings = Settings.from_env({})

    assert settings.database_url is None and settings.home == Path(".gpux")
    assert (settings.tick_s, settings.settle_s, settings.max_gang_gpus) == (2.0, 60.0, 1024)


@pytest.mark.parametrize("env", [{"GPUX_FEE_BPS": "10001"}, {"GPUX_TICK_S": "0"}, {"GPUX_MAX_GANG_GPUS": "0"}])
def test_bad_settings_are_refused(env: dict) -> None:
    with pytest.raises(ValueError):
        Settings.from_env(env)


def test_settings_are_frozen() -> None:
    with pytest.raises(AttributeError):
        Settings.from_env({}).tick_s = 9  # type: ignore[misc]
