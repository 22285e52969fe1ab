"""The README's two set-up commands (`make demo`, `make test`) and what the Makefile does for them.

`make -n` prints the recipe without running it, so these check the wiring (arguments passed through,
re-install only when pyproject.toml changed, the README's first commands) in milliseconds; CI's
`.ci/run` runs `make test` itself, and the fresh-clone run is in the README."""

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
MAKE = shutil.which("make")
pytestmark = pytest.mark.skipif(MAKE is None, reason="needs GNU make (the README's set-up uses it)")


# Run under `make test PYTEST_ARGS=...`, the outer make hands its command-line variables down through
# MAKEFLAGS, and the Makefile's `?=` variables read the environment: drop both for the Makefile's defaults.
CLEAN_ENV = {key: value for key, value in os.environ.items()
             if key not in {"MAKEFLAGS", "MFLAGS", "MAKELEVEL", "MAKEOVERRIDES",
                            "PYTHON", "VENV", "SECONDS", "PYTEST_ARGS", "PIP_FLAGS"}}


def dry_run(*args: str, cwd: Path = ROOT) -> str:
    done = subprocess.run([MAKE, "-n", "-f", str(ROOT / "Makefile"), *args], cwd=cwd, env=CLEAN_ENV,
                          capture_output=True, text=True, check=True)
    return done.stdout


def test_demo_runs_gpux_demo_for_the_seconds_given() -> None:
    assert ".venv/bin/gpux demo --seconds 60" in dry_run("demo")
    assert ".venv/bin/gpux demo --seconds 7" in dry_run("demo", "SECONDS=7")


def test_test_passes_pytest_args_through_and_checks_for_chromium() -> None:
    out = dry_run("test", "PYTEST_ARGS=tests/unit -q")
    assert ".venv/bin/python -m pytest tests/unit -q" in out
    assert "command -v chromium" in out and "apt-get install -y -qq chromium" in out


def test_the_virtualenv_is_reinstalled_only_when_pyproject_changes(tmp_path: Path) -> None:
    # A copy of the project's inputs with a virtualenv that is already installed (stamps present).
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    bin_dir = tmp_path / ".venv" / "bin"
    bin_dir.mkdir(parents=True)
    (bin_dir / "python").touch()
    for stamp in (".installed-run", ".installed-test"):
        (tmp_path / ".venv" / stamp).touch()
    old = (tmp_path / ".venv" / ".installed-run").stat().st_mtime - 100
    os.utime(tmp_path / "pyproject.toml", (old, old))

    assert "pip install" not in dry_run("demo", cwd=tmp_path)
    assert "pip install" not in dry_run("test", cwd=tmp_path)

    newer = old + 1000
    os.utime(tmp_path / "pyproject.toml", (newer, newer))
    assert ".venv/bin/pip install -q -e ." in dry_run("demo", cwd=tmp_path)
    assert ".venv/bin/pip install -q -e '.[test]'" in dry_run("test", cwd=tmp_path)


def test_a_fresh_checkout_creates_the_virtualenv_first(tmp_path: Path) -> None:
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    out = dry_run("test", cwd=tmp_path).splitlines()
    assert out[:2] == ["python3 -m venv .venv", ".venv/bin/pip install -q --upgrade pip"]
    assert out[2] == ".venv/bin/pip install -q -e '.[test]'"


def test_ci_runs_make_test() -> None:
    assert "exec make test" in (ROOT / ".ci" / "run").read_text()


def test_the_readmes_set_up_is_make_demo_and_make_test() -> None:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Install, run, test", 1)[1]
    first_block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    commands = [line.split("#", 1)[0].strip() for line in first_block.splitlines()]
    assert commands == ["make demo", "make test"]
