"""Both ways to install Saltpeter on a real master and real minions.

- A built wheel installed into Salt's Python: Salt finds the engine, runners,
  execution and state modules through the ``salt.loader`` entry point, and the
  master config names no ``*_dirs`` option.
- A checkout listed in the master's file_roots: ``saltutil.sync_all`` on the
  master and the minions copies the loader modules. The master imports the
  package from the checkout's salt/ directory on PYTHONPATH. The minions have
  no saltpeter package at all and run jobs with the wrapper that
  ``state.apply saltpeter`` deploys.

Each route runs its daemons with a Python environment of its own, in which this
test run's editable install of saltpeter is invisible (see saltenv.python_env).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from saltenv import CHECKOUT, copy_checkout, python_env, run_python, write_pillar

from saltpeter import wrapper
from saltpeter.sandbox import Sandbox

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="minions run as root")

SANDBOX_UP_TIMEOUT = 180.0
RESULT_TIMEOUT = 40.0
# Building the wheel installs the build backend into an isolated environment first.
WHEEL_BUILD_TIMEOUT = 300.0
DORMANT = {"sec": 0, "min": 0, "hour": 0, "dom": 1, "mon": 1, "dow": "*", "year": 2099}
JOBS = {
    "everywhere": {
        **DORMANT,
        "targets": "*",
        "command": 'echo "hello from $SP_MACHINE_ID"',
    }
}
MINIONS = ["minion-1", "minion-2"]


def write_jobs(directory: Path) -> Path:
    (directory / "jobs.yaml").write_text(yaml.safe_dump(JOBS))
    return directory


def run_job_everywhere(sandbox: Sandbox, events: Any) -> dict[str, Any]:
    result = sandbox.salt_run("saltpeter.run", "job=everywhere")
    assert isinstance(result, dict), result
    assert result.get("started") is True, result
    while True:
        data = events.wait(r"saltpeter/job/everywhere/complete", timeout=RESULT_TIMEOUT)
        if data["run_id"] == result["run_id"]:
            return data


def master_config(sandbox: Sandbox) -> dict[str, Any]:
    return yaml.safe_load(sandbox.master_config_file.read_text())


# -- pip install of a built wheel ------------------------------------------------


@pytest.fixture(scope="module")
def wheel_target(short_tmp_dir: Callable[[str], Path]) -> Path:
    """The saltpeter wheel built from this checkout, installed with pip --target."""
    source = copy_checkout(short_tmp_dir("src"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(CHECKOUT / name, source / name)
    wheels = short_tmp_dir("wheels")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(wheels), str(source)],
        check=True,
        capture_output=True,
        timeout=WHEEL_BUILD_TIMEOUT,
    )
    (wheel,) = wheels.glob("saltpeter-*.whl")
    target = short_tmp_dir("site")
    subprocess.run(
        [
            *(sys.executable, "-m", "pip", "install", "--no-deps", "-q"),
            *("--target", str(target), str(wheel)),
        ],
        check=True,
        capture_output=True,
        timeout=WHEEL_BUILD_TIMEOUT,
    )
    return target


@pytest.fixture(scope="module")
def wheel_bin(short_tmp_dir: Callable[[str], Path], wheel_target: Path) -> Path:
    return python_env(short_tmp_dir("venv"), [wheel_target])


@pytest.fixture(scope="module")
def wheel_sandbox(
    short_tmp_dir: Callable[[str], Path], wheel_bin: Path, wheel_target: Path
) -> Iterator[Sandbox]:
    installed_wrapper = str(wheel_target / "saltpeter" / "wrapper.py")
    running = Sandbox(short_tmp_dir("sb"))
    try:
        running.up(
            len(MINIONS),
            jobs_dir=write_jobs(short_tmp_dir("jobs")),
            timeout=SANDBOX_UP_TIMEOUT,
            settings={"default_wrapper_path": installed_wrapper},
            minion_extra={"saltpeter_wrapper_path": installed_wrapper},
            bin_dir=wheel_bin,
        )
        yield running
    finally:
        running.down()


class TestWheelInstall:
    def test_package_comes_from_wheel(self, wheel_bin: Path, wheel_target: Path) -> None:
        location = run_python(wheel_bin, "import saltpeter; print(saltpeter.__file__)")
        assert location == str(wheel_target / "saltpeter" / "__init__.py")

    def test_wheel_contains_formula(self, wheel_target: Path) -> None:
        package = wheel_target / "saltpeter"
        for name in ("init.sls", "master.sls", "files/saltpeter.conf.jinja", "wrapper.py"):
            assert (package / name).is_file(), name

    def test_entry_point_names_installed_modules(self, wheel_bin: Path, wheel_target: Path) -> None:
        code = (
            "import json; from importlib.metadata import entry_points; "
            "(point,) = entry_points(group='salt.loader', name='saltpeter'); "
            "print(json.dumps(point.load()()))"
        )
        dirs = json.loads(run_python(wheel_bin, code))
        assert dirs == {
            kind: [str(wheel_target / "saltpeter" / "_ext" / kind)]
            for kind in ("engines", "runners", "modules", "states")
        }

    def test_master_config_has_no_module_dirs(self, wheel_sandbox: Sandbox) -> None:
        config = master_config(wheel_sandbox)
        assert [key for key in config if key.endswith("_dirs")] == []

    def test_engine_runs_job_on_minions(self, wheel_sandbox: Sandbox, events: Any) -> None:
        data = run_job_everywhere(wheel_sandbox, events)
        assert data["retcodes"] == dict.fromkeys(MINIONS, 0)

    def test_runner_loaded(self, wheel_sandbox: Sandbox) -> None:
        result = wheel_sandbox.salt_run("saltpeter.validate")
        assert isinstance(result, dict), result
        assert result["valid"] is True

    def test_execution_module_loaded(self, wheel_sandbox: Sandbox) -> None:
        returns = wheel_sandbox.salt("*", "saltpeter.wrapper_version")
        assert returns == dict.fromkeys(MINIONS, wrapper.__version__)

    def test_state_module_loaded(self, wheel_sandbox: Sandbox) -> None:
        returns = wheel_sandbox.salt("minion-1", "sys.list_state_functions", "saltpeter")
        assert returns == {"minion-1": ["saltpeter.job_absent", "saltpeter.job_present"]}

    # The events fixture of conftest.py follows the fixture named "sandbox".
    @pytest.fixture
    def sandbox(self, wheel_sandbox: Sandbox) -> Sandbox:
        return wheel_sandbox


# -- a checkout in file_roots, synced -----------------------------------------------


@pytest.fixture(scope="module")
def checkout(short_tmp_dir: Callable[[str], Path]) -> Path:
    return copy_checkout(short_tmp_dir("checkout"))


@pytest.fixture(scope="module")
def bare_bin(short_tmp_dir: Callable[[str], Path]) -> Path:
    """A Python environment with Salt and no saltpeter package."""
    return python_env(short_tmp_dir("venv"), [])


@pytest.fixture(scope="module")
def deploy_dir(short_tmp_dir: Callable[[str], Path]) -> Path:
    return short_tmp_dir("deploy")


@pytest.fixture(scope="module")
def synced_sandbox(
    short_tmp_dir: Callable[[str], Path], checkout: Path, bare_bin: Path, deploy_dir: Path
) -> Iterator[Sandbox]:
    deployed_wrapper = str(deploy_dir / "bin" / "sp_wrapper.py")
    pillar = deploy_dir / "pillar"
    write_pillar(
        pillar,
        {
            "saltpeter": {
                "wrapper_path": deployed_wrapper,
                "wrapper_logdir": str(deploy_dir / "wrapper-logs"),
            }
        },
    )
    running = Sandbox(short_tmp_dir("sb"))
    try:
        running.up(
            len(MINIONS),
            jobs_dir=write_jobs(short_tmp_dir("jobs")),
            timeout=SANDBOX_UP_TIMEOUT,
            settings={
                "default_wrapper_path": deployed_wrapper,
                "default_wrapper_logdir": str(deploy_dir / "wrapper-logs"),
            },
            master_extra={
                # The checkout serves the loader modules (_engines/ ...) and, from
                # salt/, the formula as salt://saltpeter/.
                "file_roots": {"base": [str(checkout), str(checkout / "salt")]},
                "pillar_roots": {"base": [str(pillar)]},
            },
            minion_extra={"saltpeter_wrapper_path": deployed_wrapper},
            master_env={"PYTHONPATH": str(checkout / "salt")},
            bin_dir=bare_bin,
        )
        yield running
    finally:
        running.down()


@pytest.fixture(scope="module")
def restarted_master(synced_sandbox: Sandbox) -> Sandbox:
    """The synced sandbox after a master restart: the master starts engines only when
    it starts, so the synced engine runs from then on."""
    synced_sandbox.restart_master(timeout=SANDBOX_UP_TIMEOUT)
    return synced_sandbox


class TestSyncedCheckout:
    def test_minion_python_lacks_package(self, bare_bin: Path) -> None:
        found = run_python(
            bare_bin, "import importlib.util; print(importlib.util.find_spec('saltpeter'))"
        )
        assert found == "None"

    def test_master_sync_copies_engine_and_runner(self, synced_sandbox: Sandbox) -> None:
        synced = synced_sandbox.salt_run("saltutil.sync_all")
        assert isinstance(synced, dict), synced
        assert synced["engines"] == ["engines.saltpeter"]
        assert synced["runners"] == ["runners.saltpeter"]

    def test_minion_sync_copies_modules_and_states(self, synced_sandbox: Sandbox) -> None:
        returns = synced_sandbox.salt("*", "saltutil.sync_all")
        for minion in MINIONS:
            synced = returns[minion]
            assert isinstance(synced, dict), synced
            assert synced["modules"] == ["modules.saltpeter"]
            assert synced["states"] == ["states.saltpeter"]

    def test_state_apply_deploys_wrapper(self, synced_sandbox: Sandbox, deploy_dir: Path) -> None:
        returns = synced_sandbox.salt("*", "state.apply", "saltpeter", "-t", "120", timeout=150)
        for minion in MINIONS:
            results = returns[minion]
            assert isinstance(results, dict), results
            assert all(result["result"] is True for result in results.values()), results
        assert (deploy_dir / "bin" / "sp_wrapper.py").is_file()

    def test_engine_runs_job_after_master_restart(
        self, restarted_master: Sandbox, events: Any
    ) -> None:
        data = run_job_everywhere(restarted_master, events)
        assert data["retcodes"] == dict.fromkeys(MINIONS, 0)

    def test_running_uses_deployed_wrapper(self, synced_sandbox: Sandbox) -> None:
        returns = synced_sandbox.salt("*", "saltpeter.running")
        assert returns == {minion: [] for minion in MINIONS}

    def test_runner_imports_package_from_checkout(self, synced_sandbox: Sandbox) -> None:
        result = synced_sandbox.salt_run("saltpeter.validate")
        assert isinstance(result, dict), result
        assert result["valid"] is True

    # The events fixture of conftest.py follows the fixture named "sandbox".
    @pytest.fixture
    def sandbox(self, synced_sandbox: Sandbox) -> Sandbox:
        return synced_sandbox
