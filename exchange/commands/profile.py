"""Where the CLI finds the exchange and its key: a profile written by `gpux login` into a TOML file
(mode 0600, since it holds API keys), overridden by GPUX_URL / GPUX_API_KEY.

The file, `$GPUX_CONFIG`, else `$XDG_CONFIG_HOME/gpux/config.toml`, else `~/.config/gpux/config.toml`:

    default = "tenant"

    [profiles.tenant]
    url = "http://127.0.0.1:8000"
    key = "gpx_..."
"""
from __future__ import annotations

import fcntl
import json
import os
import stat
import tomllib
from collections.abc import Callable
from pathlib import Path

import msgspec

from exchange.core.structs import Struct

DEFAULT_PROFILE = "default"


class ProfileEntry(Struct, frozen=True, kw_only=True):
    url: str
    key: str


class Config(Struct, frozen=True, kw_only=True):
    default: str | None = None
    profiles: dict[str, ProfileEntry] = {}


class Profile(Struct, frozen=True, kw_only=True):
    """What a command connects with: the profile's name (None when only the environment gave it)."""
    name: str | None
    url: str
    key: str | None


class ProfileError(Exception):
    """No usable profile: not logged in, an unknown profile, or a config file that does not parse."""


def config_path(env: dict[str, str] | os._Environ[str] = os.environ) -> Path:
    if env.get("GPUX_CONFIG"):
        return Path(env["GPUX_CONFIG"])
    base = Path(env["XDG_CONFIG_HOME"]) if env.get("XDG_CONFIG_HOME") else Path.home() / ".config"
    return base / "gpux" / "config.toml"


def load_config(path: Path) -> Config:
    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError:
        return Config()
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ProfileError(f"{path}: {exc}") from None
    try:
        return msgspec.convert(raw, Config)
    except msgspec.ValidationError as exc:
        raise ProfileError(f"{path}: {exc}") from None


def is_private(path: Path) -> bool:
    """False when the group or others may read the file (its keys are as good as a password)."""
    try:
        return not path.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO)
    except FileNotFoundError:
        return True


def _toml(config: Config) -> str:
    # A JSON string is a valid TOML basic string (same escapes), so names and keys of any spelling
    # round-trip without a TOML writer.
    lines = ["# gpux profiles, written by `gpux login`. It holds API keys: keep it private (mode 0600).", ""]
    if config.default is not None:
        lines += [f"default = {json.dumps(config.default)}", ""]
    for name, entry in sorted(config.profiles.items()):
        lines += [f"[profiles.{json.dumps(name)}]", f"url = {json.dumps(entry.url)}", f"key = {json.dumps(entry.key)}",
                  ""]
    return "\n".join(lines)


def save_config(path: Path, config: Config) -> None:
    """Write atomically, created 0600 in a 0700 folder: no moment where another user can read it."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "w") as file:
            file.write(_toml(config))
            file.flush()
            os.fsync(file.fileno())
        os.chmod(tmp, 0o600)  # in case the file existed with wider permissions
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def update_config(path: Path, change: Callable[[Config], Config]) -> Config:
    """Read, change and write the file under an exclusive lock beside it, so that two `gpux login`
    runs at once (say, two profiles set up by one script) both land: neither overwrites the other's."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    lock_fd = os.open(path.with_name(f".{path.name}.lock"), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(lock_fd, fcntl.LOCK_EX)
        changed = change(load_config(path))
        save_config(path, changed)
        return changed
    finally:
        os.close(lock_fd)  # closing releases the lock


def with_profile(config: Config, name: str, url: str, key: str, make_default: bool) -> Config:
    profiles = {**config.profiles, name: ProfileEntry(url=url.rstrip("/"), key=key)}
    default = name if make_default or config.default is None else config.default
    return Config(default=default, profiles=profiles)


def without_profile(config: Config, name: str) -> Config:
    profiles = {k: v for k, v in config.profiles.items() if k != name}
    default = config.default if config.default != name else (min(profiles) if profiles else None)
    return Config(default=default, profiles=profiles)


def resolve(config: Config, name: str | None, env: dict[str, str] | os._Environ[str] = os.environ) -> Profile:
    """The profile named (or the file's default), with GPUX_URL and GPUX_API_KEY taking precedence
    field by field. With no profile at all, the environment alone must give the URL."""
    chosen = name or config.default or DEFAULT_PROFILE
    entry = config.profiles.get(chosen)
    if name is not None and entry is None:
        known = ", ".join(sorted(config.profiles)) or "none"
        raise ProfileError(f"no profile {name!r} (profiles: {known}); run `gpux login --profile {name} ...`")
    url = env.get("GPUX_URL") or (entry.url if entry else None)
    key = env.get("GPUX_API_KEY") or (entry.key if entry else None)
    if not url:
        raise ProfileError("not logged in: run `gpux login --url URL --key KEY`, or set GPUX_URL and GPUX_API_KEY")
    return Profile(name=chosen if entry else None, url=url.rstrip("/"), key=key)
