"""The saltpeter formula applied by real minions: the wrapper on minions, the engine's
drop-in config and pillar jobs on the master.

The master's file_roots serve this checkout's salt/ directory, so salt://saltpeter/
is salt/saltpeter/. The minions share this machine's file system with the master,
so every path in the pillar points into the test's temporary folder.
"""

from __future__ import annotations

import filecmp
import os
import stat
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import salt.config
import yaml
from saltenv import STATE_TREE, apply_state, write_pillar

from saltpeter.engine import engine_options
from saltpeter.sandbox import WRAPPER_PATH, Sandbox

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="minions run as root")

SANDBOX_UP_TIMEOUT = 180.0
PILLAR_JOB = {
    "sec": "*/2",
    "min": "*",
    "hour": "*",
    "dom": "*",
    "mon": "*",
    "dow": "*",
    "targets": "minion-2",
    "target_type": "list",
    "command": "echo from pillar",
    "timeout": 60,
}
ENGINE = {"settings": {"machines_ws_port": 18889, "timezone": "Europe/Berlin"}}


@pytest.fixture(scope="module")
def deploy_dir(short_tmp_dir: Callable[[str], Path]) -> Path:
    return short_tmp_dir("deploy")


def pillar_data(deploy_dir: Path, jobs_dir: Path, **extra: Any) -> dict[str, Any]:
    saltpeter: dict[str, Any] = {
        "wrapper_path": str(deploy_dir / "bin" / "sp_wrapper.py"),
        "wrapper_logdir": str(deploy_dir / "wrapper-logs"),
        "config_dir": str(jobs_dir),
        "master_config_dir": str(deploy_dir / "master.d"),
        "engine": ENGINE,
        "jobs": {"pillar_tick": PILLAR_JOB},
    }
    saltpeter.update(extra)
    return {"saltpeter": saltpeter}


@pytest.fixture(scope="module")
def pillar_dir(deploy_dir: Path, jobs_dir: Path) -> Path:
    directory = deploy_dir / "pillar"
    write_pillar(directory, pillar_data(deploy_dir, jobs_dir))
    return directory


@pytest.fixture(scope="module")
def sandbox(
    short_tmp_dir: Callable[[str], Path], jobs_dir: Path, pillar_dir: Path
) -> Iterator[Sandbox]:
    running = Sandbox(short_tmp_dir("sb"))
    try:
        running.up(
            2,
            jobs_dir=jobs_dir,
            timeout=SANDBOX_UP_TIMEOUT,
            master_extra={
                "file_roots": {"base": [str(STATE_TREE)]},
                "pillar_roots": {"base": [str(pillar_dir)]},
            },
        )
        yield running
    finally:
        running.down()


def changed(results: dict[str, dict[str, Any]]) -> dict[str, object]:
    return {
        state_id: result["changes"] for state_id, result in results.items() if result["changes"]
    }


def failed(results: dict[str, dict[str, Any]]) -> dict[str, str]:
    return {
        state_id: result["comment"]
        for state_id, result in results.items()
        if result["result"] is not True
    }


class TestMinionFormula:
    def test_deploys_wrapper(self, sandbox: Sandbox, deploy_dir: Path) -> None:
        results = apply_state(sandbox, "minion-1", "saltpeter")
        assert failed(results) == {}
        deployed = deploy_dir / "bin" / "sp_wrapper.py"
        assert filecmp.cmp(deployed, WRAPPER_PATH, shallow=False)
        assert stat.S_IMODE(deployed.stat().st_mode) == 0o755

    def test_creates_wrapper_logdir(self, sandbox: Sandbox, deploy_dir: Path) -> None:
        assert (deploy_dir / "wrapper-logs").is_dir()

    def test_second_apply_changes_nothing(self, sandbox: Sandbox) -> None:
        results = apply_state(sandbox, "minion-1", "saltpeter")
        assert failed(results) == {}
        assert changed(results) == {}

    def test_test_mode_reports_without_writing(self, sandbox: Sandbox, deploy_dir: Path) -> None:
        deployed = deploy_dir / "bin" / "sp_wrapper.py"
        deployed.write_text(deployed.read_text() + "# local edit\n")
        results = apply_state(sandbox, "minion-1", "saltpeter", "test=True")
        assert results["saltpeter-wrapper"]["result"] is None
        assert "diff" in results["saltpeter-wrapper"]["changes"]
        assert deployed.read_text().endswith("# local edit\n")

    def test_apply_restores_changed_wrapper(self, sandbox: Sandbox, deploy_dir: Path) -> None:
        results = apply_state(sandbox, "minion-1", "saltpeter")
        assert "saltpeter-wrapper" in changed(results)
        assert filecmp.cmp(deploy_dir / "bin" / "sp_wrapper.py", WRAPPER_PATH, shallow=False)

    def test_deployed_wrapper_reports_version(self, sandbox: Sandbox, deploy_dir: Path) -> None:
        path = deploy_dir / "bin" / "sp_wrapper.py"
        returns = sandbox.salt("minion-1", "saltpeter.wrapper_version", f"wrapper_path={path}")
        assert returns == {"minion-1": "0.1.0"}


def read_drop_in(drop_in_dir: Path, tmp_path: Path) -> dict[str, Any]:
    """Return the saltpeter engine options of a master config that includes the drop-ins."""
    main = tmp_path / "master"
    main.write_text(
        yaml.safe_dump(
            {
                "root_dir": str(tmp_path / "root"),
                "default_include": f"{drop_in_dir}/*.conf",
                "engines": [{"stalekey": {}}],
            }
        )
    )
    return engine_options(salt.config.master_config(str(main)))


class TestMasterFormula:
    def test_apply_succeeds(self, sandbox: Sandbox) -> None:
        results = apply_state(sandbox, "minion-1", "saltpeter.master")
        assert failed(results) == {}

    def test_drop_in_configures_engine(
        self, sandbox: Sandbox, deploy_dir: Path, jobs_dir: Path, tmp_path: Path
    ) -> None:
        options = read_drop_in(deploy_dir / "master.d", tmp_path)
        assert options == {**ENGINE, "config_dir": str(jobs_dir)}

    def test_drop_in_replaces_engines_list(self, deploy_dir: Path, tmp_path: Path) -> None:
        text = (deploy_dir / "master.d" / "saltpeter.conf").read_text()
        engines = yaml.safe_load(text)["engines"]
        assert [next(iter(entry)) for entry in engines] == ["saltpeter"]

    def test_pillar_job_rendered(self, sandbox: Sandbox, jobs_dir: Path) -> None:
        written = yaml.safe_load((jobs_dir / "pillar_tick.yaml").read_text())
        assert written == {"pillar_tick": PILLAR_JOB}

    def test_pillar_job_runs_on_its_minions(self, sandbox: Sandbox, events: Any) -> None:
        data = events.wait(r"saltpeter/job/pillar_tick/complete", timeout=40)
        assert data["retcodes"] == {"minion-2": 0}

    def test_pillar_job_output_stored(self, sandbox: Sandbox) -> None:
        status = sandbox.salt_run("saltpeter.status", "job=pillar_tick")
        assert isinstance(status, dict), status
        results = status["state"]["pillar_tick"]["results"]
        assert list(results) == ["minion-2"]

    def test_second_apply_changes_nothing(self, sandbox: Sandbox) -> None:
        results = apply_state(sandbox, "minion-1", "saltpeter.master")
        assert failed(results) == {}
        assert changed(results) == {}

    def test_test_mode_reports_without_writing(self, sandbox: Sandbox, jobs_dir: Path) -> None:
        job_file = jobs_dir / "pillar_tick.yaml"
        job_file.unlink()
        results = apply_state(sandbox, "minion-1", "saltpeter.master", "test=True")
        assert results["saltpeter-job-pillar_tick"]["result"] is None
        assert results["saltpeter-job-pillar_tick"]["comment"].startswith(
            "Job 'pillar_tick' would be written to"
        )
        assert not job_file.exists()

    def test_invalid_pillar_job_fails_and_writes_nothing(
        self, sandbox: Sandbox, deploy_dir: Path, jobs_dir: Path, pillar_dir: Path
    ) -> None:
        broken = {**PILLAR_JOB, "hour": "25"}
        write_pillar(pillar_dir, pillar_data(deploy_dir, jobs_dir, jobs={"broken": broken}))
        results = apply_state(sandbox, "minion-1", "saltpeter.master")
        assert failed(results) == {
            "saltpeter-job-broken": f"job 'broken' in {jobs_dir / 'broken.yaml'}: field 'hour': "
            "25 is out of range 0-23"
        }
        assert not (jobs_dir / "broken.yaml").exists()

    def test_jobs_absent_removes_job_file(
        self, sandbox: Sandbox, deploy_dir: Path, jobs_dir: Path, pillar_dir: Path
    ) -> None:
        write_pillar(pillar_dir, pillar_data(deploy_dir, jobs_dir))
        apply_state(sandbox, "minion-1", "saltpeter.master")
        assert (jobs_dir / "pillar_tick.yaml").exists()
        write_pillar(
            pillar_dir, pillar_data(deploy_dir, jobs_dir, jobs={}, jobs_absent=["pillar_tick"])
        )
        results = apply_state(sandbox, "minion-1", "saltpeter.master")
        assert failed(results) == {}
        assert not (jobs_dir / "pillar_tick.yaml").exists()
