"""Helpers for integration tests that deploy Saltpeter the Salt way: state trees,
pillar, state returns and Python environments for the install routes."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from saltpeter.sandbox import Sandbox

CHECKOUT = Path(__file__).resolve().parents[2]
# salt/ contains salt/saltpeter/, which Salt serves as the formula salt://saltpeter/.
STATE_TREE = CHECKOUT / "salt"
LOADER_DIRS = ("_engines", "_runners", "_modules", "_states")
SALT_SCRIPTS = ("salt", "salt-master", "salt-minion", "salt-run", "salt-key", "salt-call")


def write_pillar(pillar_root: Path, data: Mapping[str, Any]) -> None:
    """Write pillar ``data`` as saltpeter.sls, assigned to every minion by top.sls."""
    pillar_root.mkdir(parents=True, exist_ok=True)
    (pillar_root / "top.sls").write_text(yaml.safe_dump({"base": {"*": ["saltpeter"]}}))
    (pillar_root / "saltpeter.sls").write_text(yaml.safe_dump(dict(data)))


def state_results(returns: Mapping[str, object], minion: str) -> dict[str, dict[str, Any]]:
    """Return a minion's state results keyed by state ID, or fail with what it returned."""
    ret = returns.get(minion)
    assert isinstance(ret, dict), f"{minion} returned no state results: {ret!r}"
    return {value["__id__"]: value for value in ret.values()}


def apply_state(
    sandbox: Sandbox, minion: str, sls: str, *args: str, timeout: float = 120
) -> dict[str, dict[str, Any]]:
    """Run ``salt MINION state.apply SLS ARGS`` and return the results keyed by state ID."""
    returns = sandbox.salt(minion, "state.apply", sls, *args, "-t", str(timeout), timeout=timeout)
    return state_results(returns, minion)


def copy_checkout(destination: Path) -> Path:
    """Copy the loader modules and the package sources of this checkout to DESTINATION.

    The copy has no egg-info, so Python finds no installed distribution (and no
    ``salt.loader`` entry point) in it, as in a plain clone.
    """
    for name in LOADER_DIRS:
        shutil.copytree(CHECKOUT / name, destination / name, ignore=_ignore_build_files)
    shutil.copytree(
        STATE_TREE / "saltpeter", destination / "salt" / "saltpeter", ignore=_ignore_build_files
    )
    return destination


def _ignore_build_files(directory: str, names: list[str]) -> list[str]:
    return [name for name in names if name == "__pycache__" or name.endswith(".egg-info")]


def python_env(directory: Path, first_paths: list[Path]) -> Path:
    """Create a Python environment with Salt but without the saltpeter distribution.

    The environment is a virtual environment without pip whose site-packages
    lists FIRST_PATHS and then the site-packages of this test run's
    environment in a .pth file. Python processes .pth files only in its own
    site directories, so the editable install of saltpeter in this test run's
    environment, which is a .pth hook, stays invisible. Salt's scripts are
    written to its bin directory. Returns that bin directory.
    """
    subprocess.run(
        [sys.executable, "-m", "venv", "--without-pip", str(directory)],
        check=True,
        capture_output=True,
        timeout=120,
    )
    bin_dir = directory / "bin"
    python = bin_dir / "python"
    purelib = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout.strip()
    ours = sysconfig.get_paths()["purelib"]
    lines = [str(path) for path in first_paths] + [ours]
    (Path(purelib) / "salt_from_test_env.pth").write_text("\n".join(lines) + "\n")
    for script in SALT_SCRIPTS:
        # The same script as in this test run's environment, run by the new Python.
        ours_script = (Path(sys.executable).parent / script).read_text()
        body = ours_script.split("\n", 1)[1]
        path = bin_dir / script
        path.write_text(f"#!{python}\n{body}")
        path.chmod(0o755)
    return bin_dir


def run_python(bin_dir: Path, code: str, env: Mapping[str, str] | None = None) -> str:
    """Run CODE with the Python in BIN_DIR and return its stripped standard output."""
    result = subprocess.run(
        [str(bin_dir / "python"), "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, **(env or {})},
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()
