"""The saltpeter.job_present and job_absent states run by a real minion against the
job directory of a real engine.

The minion finds the engine's config_dir in the master config, which the minion
option saltpeter_master_config names, so the states below pass no config_dir.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from saltenv import state_results

from saltpeter.sandbox import Sandbox

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="minions run as root")

SANDBOX_UP_TIMEOUT = 180.0
ENGINE_RELOAD_TIMEOUT = 20.0
SCHEDULE = ["min=0", "hour=3", "dom=*", "mon=*", "dow=*"]


@pytest.fixture(scope="module")
def sandbox(short_tmp_dir: Callable[[str], Path], jobs_dir: Path) -> Iterator[Sandbox]:
    root = short_tmp_dir("sb")
    running = Sandbox(root)
    try:
        running.up(
            1,
            jobs_dir=jobs_dir,
            timeout=SANDBOX_UP_TIMEOUT,
            minion_extra={"saltpeter_master_config": str(root / "master" / "master")},
        )
        yield running
    finally:
        running.down()


def single(sandbox: Sandbox, function: str, *args: str) -> dict[str, Any]:
    """Run ``salt minion-1 state.single FUNCTION ARGS`` and return the one state result."""
    returns = sandbox.salt("minion-1", "state.single", function, *args, "-t", "60", timeout=90)
    results = state_results(returns, "minion-1")
    assert len(results) == 1, results
    return next(iter(results.values()))


def job_present(sandbox: Sandbox, name: str, *args: str) -> dict[str, Any]:
    return single(
        sandbox,
        "saltpeter.job_present",
        f"name={name}",
        *SCHEDULE,
        "targets=minion-1",
        *args,
    )


def loaded_next_times(sandbox: Sandbox, job: str) -> list[str] | None:
    """Return the job's next fire time once the engine has stored the job, else None."""
    times = sandbox.salt_run("saltpeter.next", f"job={job}", "count=1")
    return times if isinstance(times, list) else None


def unknown_job_output(sandbox: Sandbox, job: str) -> str | None:
    """Return salt-run's output once it reports the job as unknown, else None."""
    output = sandbox.salt_run_raw("saltpeter.next", f"job={job}").stdout
    return output if f"unknown job {job!r}" in output else None


class TestJobPresent:
    def test_writes_job_to_engine_dir(self, sandbox: Sandbox, jobs_dir: Path) -> None:
        ret = job_present(sandbox, "nightly", "command=echo nightly")
        assert ret["result"] is True
        assert yaml.safe_load((jobs_dir / "nightly.yaml").read_text())["nightly"]["command"] == (
            "echo nightly"
        )

    def test_reports_diff(self, sandbox: Sandbox) -> None:
        ret = job_present(sandbox, "nightly", "command=echo changed")
        assert "+  command: echo changed" in ret["changes"]["diff"]

    def test_engine_loads_written_job(self, sandbox: Sandbox, wait_for: Any) -> None:
        times = wait_for(
            lambda: loaded_next_times(sandbox, "nightly"),
            ENGINE_RELOAD_TIMEOUT,
            "the engine to load job nightly",
        )
        assert times[0].endswith("T03:00:00+00:00")

    def test_second_run_changes_nothing(self, sandbox: Sandbox) -> None:
        ret = job_present(sandbox, "nightly", "command=echo changed")
        assert ret["result"] is True
        assert ret["changes"] == {}

    def test_test_mode_writes_nothing(self, sandbox: Sandbox, jobs_dir: Path) -> None:
        ret = job_present(sandbox, "dry", "command=echo dry", "test=True")
        assert ret["result"] is None, ret
        assert ret["comment"] == f"Job 'dry' would be written to {jobs_dir / 'dry.yaml'}."
        assert not (jobs_dir / "dry.yaml").exists()

    def test_invalid_definition_fails_with_engine_message(
        self, sandbox: Sandbox, jobs_dir: Path
    ) -> None:
        ret = job_present(sandbox, "broken", "command=echo broken", "timeout=-5")
        assert ret["result"] is False
        assert ret["comment"].startswith(f"job 'broken' in {jobs_dir / 'broken.yaml'}: ")
        assert "'timeout'" in ret["comment"]
        assert not (jobs_dir / "broken.yaml").exists()

    def test_env_mapping_written(self, sandbox: Sandbox, jobs_dir: Path) -> None:
        ret = job_present(sandbox, "with_env", "command=env", 'env={"GREETING": "hi"}', "mode=0600")
        assert ret["result"] is True
        written = yaml.safe_load((jobs_dir / "with_env.yaml").read_text())
        assert written["with_env"]["env"] == {"GREETING": "hi"}
        assert (jobs_dir / "with_env.yaml").stat().st_mode & 0o777 == 0o600


class TestJobAbsent:
    def test_removes_job_file(self, sandbox: Sandbox, jobs_dir: Path) -> None:
        ret = single(sandbox, "saltpeter.job_absent", "name=with_env")
        assert ret["result"] is True
        assert ret["changes"]["removed"] == str(jobs_dir / "with_env.yaml")
        assert not (jobs_dir / "with_env.yaml").exists()

    def test_test_mode_keeps_file(self, sandbox: Sandbox, jobs_dir: Path) -> None:
        ret = single(sandbox, "saltpeter.job_absent", "name=nightly", "test=True")
        assert ret["result"] is None
        assert (jobs_dir / "nightly.yaml").exists()

    def test_engine_drops_removed_job(self, sandbox: Sandbox, wait_for: Any) -> None:
        single(sandbox, "saltpeter.job_absent", "name=nightly")
        output = wait_for(
            lambda: unknown_job_output(sandbox, "nightly"),
            ENGINE_RELOAD_TIMEOUT,
            "the engine to drop job nightly",
        )
        assert "known jobs:" in output

    def test_already_absent_changes_nothing(self, sandbox: Sandbox) -> None:
        ret = single(sandbox, "saltpeter.job_absent", "name=nightly")
        assert ret["result"] is True
        assert ret["changes"] == {}
