"""Run records shipped from the engine inside a real salt-master.

No Elasticsearch server can be installed here, so the engine ships to the
stand-in server from tests/unit/search_standin.py, which answers the bulk,
index-template and search endpoints as Elasticsearch documents them. The
stand-in runs on 127.0.0.1 in this test process. Everything else is real: the
master, the engine, three minions, wrappers and the official
``elasticsearch`` async client inside the engine.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import yaml

from saltpeter.sandbox import Sandbox

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit"))
from search_standin import SearchStandin

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the sandbox runs jobs as root")

EVERY_2_S = {"sec": "*/2", "min": "*", "hour": "*", "dom": "*", "mon": "*", "dow": "*"}
WAIT_SECONDS = 60.0


@pytest.fixture(scope="module")
def standin() -> Iterator[SearchStandin]:
    server = SearchStandin("elasticsearch")
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def jobs_dir(short_tmp_dir: Callable[[str], Path]) -> Path:
    directory = short_tmp_dir("jobs")
    jobs = {
        "ticker": {
            **EVERY_2_S,
            "targets": "minion-1",
            "target_type": "list",
            "command": 'echo "tick $SP_JOB_INSTANCE"',
            "env": {"SECRET_VALUE": "must-not-ship"},
        }
    }
    (directory / "ship.yaml").write_text(yaml.safe_dump(jobs))
    return directory


@pytest.fixture(scope="module")
def sandbox_settings(standin: SearchStandin) -> dict[str, object]:
    return {"elasticsearch": standin.url, "elasticsearch_index": "sp"}


def wait_for(condition: Callable[[], Any], message: str) -> Any:
    deadline = time.monotonic() + WAIT_SECONDS
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out: {message}")
        time.sleep(0.5)


def results_of(standin: SearchStandin) -> list[dict[str, Any]]:
    return [
        doc.source
        for doc in standin.documents("sp-*")
        if doc.source["msg_type"] == "machine_result"
    ]


def test_results_arrive_with_output(sandbox: Sandbox, standin: SearchStandin) -> None:
    result = wait_for(lambda: results_of(standin), "a machine_result document")[0]
    assert result["job_name"] == "ticker"
    assert result["group"] == "ship"
    assert result["machine"] == "minion-1"
    assert result["return_code"] == 0
    assert result["output"] == f"tick {result['job_instance']}\n"
    assert standin.templates()
    for doc in standin.documents("sp-*"):
        assert "must-not-ship" not in str(doc.source)
        assert doc.index.startswith("sp-")


def test_hanging_cluster_does_not_delay_runs(sandbox: Sandbox, standin: SearchStandin) -> None:
    from saltpeter.store import RunStore

    standin.delay(40)
    hung_at = time.time()
    try:
        time.sleep(12)
        store = RunStore(sandbox.store_path, readonly=True)
        try:
            runs = store.runs("ticker", limit=50)
        finally:
            store.close()
        during = [
            run
            for run in runs
            if run["scheduled_at"]
            and datetime.fromisoformat(run["scheduled_at"]).timestamp() > hung_at
        ]
        assert len(during) >= 4, during
        for run in during:
            scheduled = datetime.fromisoformat(run["scheduled_at"])
            started = datetime.fromisoformat(run["started_at"])
            # A liveness bound, not a speed target: a blocked loop would lag by the 40 s hang.
            assert (started - scheduled).total_seconds() < 5
    finally:
        standin.clear_faults()
    last_run = during[-1]["run_id"]
    wait_for(
        lambda: any(doc["job_instance"] == last_run for doc in results_of(standin)),
        "the result of a run from the hang, delivered afterwards",
    )
    ids = [doc.id for doc in standin.documents("sp-*")]
    assert len(ids) == len(set(ids))
