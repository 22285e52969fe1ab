"""The CLI's profile file and option readers (exchange/commands/profile.py, terms.py)."""
from __future__ import annotations

import stat
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from exchange.commands.output import InputError
from exchange.commands.owner import total_earnings
from exchange.commands.profile import (Config, ProfileError, config_path, is_private, load_config, resolve,
                                       save_config, with_profile, without_profile)
from exchange.commands.terms import duration_s, moment
from exchange.hosts.schemas import HostEarnings


def test_a_saved_profile_is_private_and_reads_back(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "gpux" / "config.toml"
    config = with_profile(Config(), "tenant", "http://x:8000/", 'k"ey\\with\nodd', make_default=True)
    config = with_profile(config, "owner", "http://y", "k2", make_default=False)
    save_config(path, config)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert load_config(path) == config and config.default == "tenant"
    assert resolve(config, None, env={}).key == 'k"ey\\with\nodd'
    assert resolve(config, None, env={}).url == "http://x:8000"
    assert resolve(config, "owner", env={}).url == "http://y"


def test_a_wider_file_is_narrowed_on_save_and_flagged_on_read(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text("")
    path.chmod(0o644)
    assert not is_private(path)
    save_config(path, with_profile(Config(), "a", "http://a", "k", True))
    assert is_private(path)


def test_the_environment_overrides_the_file_field_by_field() -> None:
    config = with_profile(Config(), "default", "http://file", "file-key", True)
    assert resolve(config, None, env={"GPUX_API_KEY": "env-key"}).url == "http://file"
    assert resolve(config, None, env={"GPUX_API_KEY": "env-key"}).key == "env-key"
    assert resolve(config, None, env={"GPUX_URL": "http://env/"}).url == "http://env"
    assert resolve(Config(), None, env={"GPUX_URL": "http://env", "GPUX_API_KEY": "k"}).name is None


def test_no_profile_and_an_unknown_profile_are_errors(tmp_path: Path) -> None:
    with pytest.raises(ProfileError, match="not logged in"):
        resolve(Config(), None, env={})
    with pytest.raises(ProfileError, match="no profile 'x'"):
        resolve(with_profile(Config(), "a", "http://a", "k", True), "x", env={})
    bad = tmp_path / "bad.toml"
    bad.write_text("profiles = 3\n")
    with pytest.raises(ProfileError):
        load_config(bad)
    bad.write_text("[[[")
    with pytest.raises(ProfileError):
        load_config(bad)


def test_logout_moves_the_default_and_the_path_follows_the_environment(tmp_path: Path) -> None:
    config = with_profile(with_profile(Config(), "a", "http://a", "k", True), "b", "http://b", "k", False)
    assert without_profile(config, "a").default == "b" and without_profile(config, "b").default == "a"
    assert config_path({"GPUX_CONFIG": "/x/y.toml"}) == Path("/x/y.toml")
    assert config_path({"XDG_CONFIG_HOME": "/cfg"}) == Path("/cfg/gpux/config.toml")


def test_durations_and_times() -> None:
    assert [duration_s("d", t) for t in ("90", "90s", "30m", "4h", "2d")] == [90, 90, 1800, 14400, 172800]
    for bad in ("", "1.5h", "-3", "4w", "h", "1" * 10):
        with pytest.raises(InputError):
            duration_s("--duration", bad)
    now = datetime(2026, 1, 1, tzinfo=timezone.utc)
    assert moment("--until", "+2h", now) == now + timedelta(hours=2)
    assert moment("--until", "2026-01-02T00:00:00Z") == datetime(2026, 1, 2, tzinfo=timezone.utc)
    for bad in ("2026-01-02T00:00:00", "tomorrow", "+x"):
        with pytest.raises(InputError):
            moment("--until", bad, now)


def test_earnings_add_up_exactly() -> None:
    hosts = [HostEarnings(host_id=i, leases=i, billed_gpu_hours="0.1", charged="0.000001", fees="0.10",
                          earned="999999999999.999999" if i == 1 else "0.000001", energy_kwh="0.3") for i in (1, 2, 3)]
    total = total_earnings(hosts)
    assert (total.hosts, total.leases, total.charged, total.fees) == (3, 6, "0.000003", "0.30")
    assert total.earned == "1000000000000.000001" and total.billed_gpu_hours == "0.3" and total.energy_kwh == "0.9"


def test_logins_at_once_all_land(tmp_path: Path) -> None:
    """Twenty processes each save their own profile at the same moment: the lock keeps every one."""
    import subprocess
    import sys

    path = tmp_path / "config.toml"
    code = ("import sys; from pathlib import Path; from exchange.commands.profile import update_config, with_profile;"
            "update_config(Path(sys.argv[1]), lambda c: with_profile(c, sys.argv[2], 'http://x', 'k', False))")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(path), f"p{i}"]) for i in range(20)]
    assert [p.wait(60) for p in procs] == [0] * 20
    assert sorted(load_config(path).profiles) == sorted(f"p{i}" for i in range(20))
