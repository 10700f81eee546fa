"""The reactor examples in docs/reactor/ acting on Saltpeter's events on a real master.

job_failed.sls fires ops/alert/saltpeter/<job> when a run fails on any minion;
job_skipped.sls appends a line to a log file on a minion for every skipped slot.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from saltenv import CHECKOUT

from saltpeter.sandbox import Sandbox

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="minions run as root")

SANDBOX_UP_TIMEOUT = 180.0
EVENT_TIMEOUT = 40.0
REACTOR_EXAMPLES = CHECKOUT / "docs" / "reactor"
SKIP_LOG_IN_EXAMPLE = "/var/log/saltpeter/skipped.log"
MINION_IN_EXAMPLE = "monitor.example.com"
DORMANT = {"sec": 0, "min": 0, "hour": 0, "dom": 1, "mon": 1, "dow": "*", "year": 2099}
JOBS = {
    "passing": {**DORMANT, "targets": "minion-1", "target_type": "list", "command": "true"},
    "failing": {
        **DORMANT,
        "targets": "minion-1",
        "target_type": "list",
        "command": "echo broken >&2; exit 2",
    },
    "exclusive": {
        **DORMANT,
        "targets": "minion-1",
        "target_type": "list",
        "command": "sleep 8",
    },
}


@pytest.fixture(scope="module")
def jobs_dir(short_tmp_dir: Callable[[str], Path]) -> Path:
    directory = short_tmp_dir("jobs")
    (directory / "jobs.yaml").write_text(yaml.safe_dump(JOBS))
    return directory


@pytest.fixture(scope="module")
def reactor_dir(short_tmp_dir: Callable[[str], Path]) -> Path:
    """The docs' reactor files, with the skip log moved into the test's folder and kept
    by minion-1."""
    directory = short_tmp_dir("reactor")
    (directory / "job_failed.sls").write_text((REACTOR_EXAMPLES / "job_failed.sls").read_text())
    skipped = (REACTOR_EXAMPLES / "job_skipped.sls").read_text()
    assert SKIP_LOG_IN_EXAMPLE in skipped
    assert MINION_IN_EXAMPLE in skipped
    skipped = skipped.replace(SKIP_LOG_IN_EXAMPLE, str(directory / "skipped.log"))
    (directory / "job_skipped.sls").write_text(skipped.replace(MINION_IN_EXAMPLE, "minion-1"))
    return directory


@pytest.fixture(scope="module")
def sandbox(
    short_tmp_dir: Callable[[str], Path], jobs_dir: Path, reactor_dir: Path
) -> Iterator[Sandbox]:
    running = Sandbox(short_tmp_dir("sb"))
    reactor = [
        {"saltpeter/job/*/complete": [str(reactor_dir / "job_failed.sls")]},
        {"saltpeter/job/*/skipped": [str(reactor_dir / "job_skipped.sls")]},
    ]
    try:
        running.up(
            1, jobs_dir=jobs_dir, timeout=SANDBOX_UP_TIMEOUT, master_extra={"reactor": reactor}
        )
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
        data = events.wait(rf"saltpeter/job/{job}/complete", timeout=EVENT_TIMEOUT)
        if data["run_id"] == run_id:
            return data


class TestFailureReactor:
    def test_failed_run_fires_alert(self, sandbox: Sandbox, events: Any) -> None:
        with sandbox.event_listener("ops/alert/saltpeter/") as alerts:
            passing = run_now(sandbox, "passing")
            wait_complete(events, "passing", passing)
            failing = run_now(sandbox, "failing")
            # The passing run completed first, so an alert for it would come first.
            alert = alerts.get(timeout=EVENT_TIMEOUT)
        assert alert is not None
        tag, data = alert
        assert tag == "ops/alert/saltpeter/failing"
        assert data["run_id"] == failing
        assert data["failed"] == {"minion-1": 2}


class TestSkippedReactor:
    def test_overlap_skip_is_logged(
        self, sandbox: Sandbox, reactor_dir: Path, wait_for: Any
    ) -> None:
        running = run_now(sandbox, "exclusive")
        second_request = sandbox.salt_run_raw("saltpeter.run", "job=exclusive")
        assert "did not start: overlap" in second_request.stdout
        log = reactor_dir / "skipped.log"
        text = wait_for(
            lambda: log.read_text() if log.exists() else None,
            EVENT_TIMEOUT,
            f"the skipped reactor to write {log}",
        )
        assert text.endswith(f" manual exclusive skipped: overlap {running}\n")
