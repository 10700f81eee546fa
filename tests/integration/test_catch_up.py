"""Slots that pass while the master (and so the engine) is down, on real daemons.

Three jobs fire every 10 s with different ``catch_up`` policies. The test lets
each run once, stops the master for long enough that several slots pass,
starts it again and reads the store: which slots ran, with which trigger,
and which were recorded as missed. No slot may have two rows.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import yaml

from saltpeter.sandbox import Sandbox
from saltpeter.store import RunStore

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the sandbox runs jobs as root")

EVERY_10_S = {"sec": "*/10", "min": "*", "hour": "*", "dom": "*", "mon": "*", "dow": "*"}
OUTAGE_SECONDS = 45


@pytest.fixture(scope="module")
def jobs_dir(short_tmp_dir: Callable[[str], Path]) -> Path:
    directory = short_tmp_dir("jobs")
    common = {**EVERY_10_S, "targets": "minion-1", "target_type": "list", "command": "true"}
    jobs = {
        "catch_latest": {**common, "catch_up": "latest"},
        "catch_none": {**common, "catch_up": "none"},
        "catch_all": {**common, "catch_up": "all", "catch_up_limit": 2},
    }
    (directory / "jobs.yaml").write_text(yaml.safe_dump(jobs))
    return directory


def runs_of(sandbox: Sandbox, job: str) -> list[dict[str, Any]]:
    store = RunStore(sandbox.store_path, readonly=True)
    try:
        return store.runs(job, limit=1000)
    finally:
        store.close()


def wait_for(condition: Callable[[], bool], timeout: float, message: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out: {message}")
        time.sleep(0.5)


def slots(rows: list[dict[str, Any]], status: str, trigger: str | None = None) -> list[datetime]:
    return sorted(
        datetime.fromisoformat(row["scheduled_at"])
        for row in rows
        if row["status"] == status and (trigger is None or row["trigger"] == trigger)
    )


def test_policies_after_outage(sandbox: Sandbox) -> None:
    jobs = ("catch_latest", "catch_none", "catch_all")
    wait_for(
        lambda: all(
            any(row["status"] == "succeeded" for row in runs_of(sandbox, job)) for job in jobs
        ),
        60,
        "a first scheduled run of every job",
    )
    sandbox.stop_master()
    stopped = {job: max(row["scheduled_at"] for row in runs_of(sandbox, job)) for job in jobs}
    time.sleep(OUTAGE_SECONDS)
    sandbox.start_master()

    def caught_up(job: str) -> bool:
        return any(row["trigger"] == "catch_up" for row in runs_of(sandbox, job))

    wait_for(lambda: caught_up("catch_latest"), 90, "the catch-up run of catch_latest")
    wait_for(
        lambda: (
            len([row for row in runs_of(sandbox, "catch_all") if row["trigger"] == "catch_up"]) == 2
        ),
        90,
        "two catch-up runs of catch_all",
    )
    wait_for(
        lambda: any(row["status"] == "missed" for row in runs_of(sandbox, "catch_none")),
        90,
        "missed slots of catch_none",
    )

    for job in jobs:
        rows = [row for row in runs_of(sandbox, job) if row["scheduled_at"]]
        scheduled = [row["scheduled_at"] for row in rows]
        assert len(scheduled) == len(set(scheduled)), f"{job} has a slot twice"

    latest = runs_of(sandbox, "catch_latest")
    latest_missed = slots(latest, "missed")
    latest_caught = [
        datetime.fromisoformat(row["scheduled_at"])
        for row in latest
        if row["trigger"] == "catch_up"
    ]
    assert len(latest_caught) == 1
    assert len(latest_missed) >= 2
    assert all(slot < latest_caught[0] for slot in latest_missed)
    assert min(latest_missed) > datetime.fromisoformat(stopped["catch_latest"])

    none_rows = runs_of(sandbox, "catch_none")
    assert not [row for row in none_rows if row["trigger"] == "catch_up"]
    assert len(slots(none_rows, "missed")) >= 3

    all_rows = runs_of(sandbox, "catch_all")
    all_caught = sorted(
        datetime.fromisoformat(row["scheduled_at"])
        for row in all_rows
        if row["trigger"] == "catch_up"
    )
    all_missed = slots(all_rows, "missed")
    assert len(all_caught) == 2
    assert all(slot < all_caught[0] for slot in all_missed)
    assert len(all_missed) >= 1
