"""The validate, history and maintenance runners and the minion-side execution module
functions (running, kill_local, wrapper_version), on a real master and real minions."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from saltpeter import wrapper
from saltpeter.sandbox import Sandbox

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="minions run as root")

SANDBOX_UP_TIMEOUT = 180.0
RESULT_TIMEOUT = 40.0
DORMANT = {"sec": 0, "min": 0, "hour": 0, "dom": 1, "mon": 1, "dow": "*", "year": 2099}
JOBS = {
    "mixed": {
        **DORMANT,
        "targets": "minion-1,minion-2",
        "target_type": "list",
        "command": 'if [ "$SP_MACHINE_ID" = minion-2 ]; then exit 3; fi; echo ok',
    },
    "sleeper": {
        **DORMANT,
        "targets": "minion-1",
        "target_type": "list",
        "command": "echo started; sleep 60",
    },
}


@pytest.fixture(scope="module")
def jobs_dir(short_tmp_dir: Callable[[str], Path]) -> Path:
    directory = short_tmp_dir("jobs")
    (directory / "jobs.yaml").write_text(yaml.safe_dump(JOBS))
    return directory


@pytest.fixture(scope="module")
def sandbox(short_tmp_dir: Callable[[str], Path], jobs_dir: Path) -> Iterator[Sandbox]:
    running = Sandbox(short_tmp_dir("sb"))
    try:
        running.up(2, jobs_dir=jobs_dir, timeout=SANDBOX_UP_TIMEOUT)
        yield running
    finally:
        running.down()


def run_now(sandbox: Sandbox, job: str) -> str:
    result = sandbox.salt_run("saltpeter.run", f"job={job}")
    assert isinstance(result, dict), result
    assert result.get("started") is True, result
    return str(result["run_id"])


def wait_complete(events: Any, job: str, run_id: str) -> dict[str, Any]:
    while True:
        data = events.wait(rf"saltpeter/job/{job}/complete", timeout=RESULT_TIMEOUT)
        if data["run_id"] == run_id:
            return data


class TestValidate:
    def test_engine_dir_is_valid(self, sandbox: Sandbox) -> None:
        result = sandbox.salt_run_raw("saltpeter.validate")
        assert result.returncode == 0, result.stdout
        assert '"valid": true' in result.stdout

    def test_invalid_dir_exits_1(self, sandbox: Sandbox, tmp_path: Path) -> None:
        (tmp_path / "bad.yaml").write_text(yaml.safe_dump({"bad": {**DORMANT, "targets": "*"}}))
        result = sandbox.salt_run_raw("saltpeter.validate", f"path={tmp_path}")
        assert result.returncode == 1, result.stdout
        assert f"job 'bad' in {tmp_path / 'bad.yaml'}: field 'command'" in result.stdout


class TestHistory:
    def test_lists_runs_newest_first_with_retcodes(self, sandbox: Sandbox, events: Any) -> None:
        first = run_now(sandbox, "mixed")
        wait_complete(events, "mixed", first)
        second = run_now(sandbox, "mixed")
        wait_complete(events, "mixed", second)
        history = sandbox.salt_run("saltpeter.history", "job=mixed", "limit=2")
        assert isinstance(history, list), history
        assert [run["run_id"] for run in history] == [second, first]
        assert history[0]["retcodes"] == {"minion-1": 0, "minion-2": 3}

    def test_unknown_job_fails(self, sandbox: Sandbox) -> None:
        result = sandbox.salt_run_raw("saltpeter.history", "job=nope")
        assert result.returncode != 0
        assert "unknown job 'nope'; known jobs: mixed, sleeper" in result.stdout


class TestMaintenance:
    def test_minion_left_out_of_runs(self, sandbox: Sandbox, events: Any) -> None:
        maintenance = sandbox.salt_run("saltpeter.maintenance", "add=minion-2")
        assert isinstance(maintenance, dict), maintenance
        assert maintenance["machines"] == ["minion-2"]
        # The engine re-reads the job directory within about 2 s; until then a run
        # still includes minion-2, and that run does not count.
        for _attempt in range(10):
            run_id = run_now(sandbox, "mixed")
            data = wait_complete(events, "mixed", run_id)
            if "minion-2" not in data["retcodes"]:
                break
        assert data["retcodes"] == {"minion-1": 0}

    def test_global_maintenance_skips_runs(self, sandbox: Sandbox, wait_for: Any) -> None:
        sandbox.salt_run("saltpeter.maintenance", "global=True")
        output = wait_for(
            lambda: skipped_output(sandbox, "mixed"), 20.0, "a run skipped for maintenance"
        )
        assert "did not start: maintenance" in output

    def test_clearing_shows_no_maintenance(self, sandbox: Sandbox) -> None:
        maintenance = sandbox.salt_run("saltpeter.maintenance", "global=False", "remove=minion-2")
        assert isinstance(maintenance, dict), maintenance
        assert maintenance["global"] is False
        assert maintenance["machines"] == []


def no_runs(sandbox: Sandbox) -> bool:
    return sandbox.salt("minion-1", "saltpeter.running") == {"minion-1": []}


def skipped_output(sandbox: Sandbox, job: str) -> str | None:
    output = sandbox.salt_run_raw("saltpeter.run", f"job={job}").stdout
    return output if "did not start" in output else None


class TestExecutionModule:
    def test_wrapper_version(self, sandbox: Sandbox) -> None:
        returns = sandbox.salt("*", "saltpeter.wrapper_version")
        assert returns == {"minion-1": wrapper.__version__, "minion-2": wrapper.__version__}

    def test_running_lists_run_in_flight(self, sandbox: Sandbox, events: Any) -> None:
        run_id = run_now(sandbox, "sleeper")
        events.wait(r"saltpeter/job/sleeper/minion-1/start", timeout=RESULT_TIMEOUT)
        returns = sandbox.salt("minion-1", "saltpeter.running")
        records = returns["minion-1"]
        assert isinstance(records, list), records
        assert [record["run"] for record in records] == [run_id]

    def test_kill_local_stops_run(self, sandbox: Sandbox, events: Any) -> None:
        records = sandbox.salt("minion-1", "saltpeter.running")["minion-1"]
        assert isinstance(records, list), records
        run_id = records[0]["run"]
        returns = sandbox.salt("minion-1", "saltpeter.kill_local", run_id)
        result = returns["minion-1"]
        assert isinstance(result, dict), result
        assert result["killed"] is True
        data = events.wait(r"saltpeter/job/sleeper/minion-1/complete", timeout=RESULT_TIMEOUT)
        assert data["reason"] == "killed"

    def test_running_empty_after_kill(self, sandbox: Sandbox, wait_for: Any) -> None:
        assert wait_for(lambda: no_runs(sandbox), 20.0, "the killed run's wrapper to exit")

    def test_kill_local_unknown_run_fails(self, sandbox: Sandbox) -> None:
        result = sandbox.salt_raw("minion-1", "saltpeter.kill_local", "no-such-run")
        assert '"killed": false' in result.stdout
        assert "no local record of run no-such-run" in result.stdout
