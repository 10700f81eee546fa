"""Jobs run end to end on a real Salt master with the engine and three real minions.

Each test starts runs through the ``saltpeter.run`` runner (or lets the
schedule fire), follows them on the master's event bus, and reads results
from the engine's SQLite store.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from saltpeter.sandbox import Sandbox
from saltpeter.store import RunStore

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="jobs run as other users")

RESULT_TIMEOUT = 40.0

# A schedule that exists but does not fire while the tests run.
DORMANT = {"sec": 0, "min": 0, "hour": 0, "dom": 1, "mon": 1, "dow": "*", "year": 2099}

JOBS: dict[str, dict[str, Any]] = {
    "exit_codes": {
        **DORMANT,
        "targets": "*",
        "command": 'if [ "$SP_MACHINE_ID" = minion-2 ]; then echo "failing" >&2; exit 7; fi; '
        "echo fine",
    },
    "streaming": {
        **DORMANT,
        "targets": "minion-1",
        "target_type": "list",
        "command": "echo first; sleep 4; echo second",
    },
    "identity": {
        **DORMANT,
        "targets": "minion-1",
        "target_type": "list",
        "user": "nobody",
        "cwd": "/var/tmp",
        "env": {"GREETING": "hello there", "NUMBER": 42},
        "command": 'id -un; pwd; echo "$GREETING $NUMBER"; echo "home=$HOME"',
    },
    "too_slow": {
        **DORMANT,
        "targets": "minion-3",
        "target_type": "list",
        "timeout": 2,
        # The children ignore SIGTERM, so only the SIGKILL 5 s later stops them.
        "command": "echo started; trap '' TERM; sleep 300 & sleep 300",
    },
    "killable": {
        **DORMANT,
        "targets": "minion-2,minion-3",
        "target_type": "list",
        "command": "echo started; sleep 300 & sleep 300",
    },
    "lost": {
        **DORMANT,
        "targets": "minion-3",
        "target_type": "list",
        "command": "echo started; sleep 300",
    },
    "missing_wrapper": {
        **DORMANT,
        "targets": "minion-1",
        "target_type": "list",
        "wrapper_path": "/nonexistent/sp_wrapper.py",
        "command": "true",
    },
    "exclusive": {
        **DORMANT,
        "targets": "minion-1",
        "target_type": "list",
        "command": "sleep 6",
    },
    "overlapping": {
        **DORMANT,
        "targets": "minion-1",
        "target_type": "list",
        "allow_overlap": True,
        "command": "sleep 3",
    },
    "nowhere": {**DORMANT, "targets": "no-such-minion-*", "command": "true"},
    "pinned_to_three": {
        **DORMANT,
        "targets": "minion-3",
        "target_type": "list",
        "command": "echo hi",
    },
}

# hello_world and backup_databases, copied unchanged from the original
# Saltpeter's README, trailing whitespace included.
ORIGINAL_README_JOBS = Path(__file__).parent / "data" / "original_readme_jobs.yaml"


@pytest.fixture(scope="module")
def jobs_dir(short_tmp_dir: Callable[[str], Path]) -> Path:
    directory = short_tmp_dir("jobs")
    (directory / "jobs.yaml").write_text(yaml.safe_dump(JOBS))
    shutil.copy(ORIGINAL_README_JOBS, directory / "original.yaml")
    return directory


@pytest.fixture(scope="module")
def sandbox_settings() -> dict[str, object]:
    return {"launch_timeout": 10}


@pytest.fixture
def store(sandbox: Sandbox) -> Iterator[RunStore]:
    reader = RunStore(sandbox.store_path, readonly=True)
    yield reader
    reader.close()


def run_now(sandbox: Sandbox, job: str) -> dict[str, Any]:
    result = sandbox.salt_run("saltpeter.run", f"job={job}")
    assert isinstance(result, dict), result
    assert result.get("started") is True, result
    return result


def wait_run_complete(events: Any, job: str, run_id: str) -> dict[str, Any]:
    deadline = time.monotonic() + RESULT_TIMEOUT
    while True:
        data = events.wait(rf"saltpeter/job/{job}/complete", timeout=deadline - time.monotonic())
        if data["run_id"] == run_id:
            return data


def results(store: RunStore, run_id: str) -> dict[str, dict[str, Any]]:
    return store.results(run_id)


def job_processes(run_id: str) -> list[int]:
    """Return the PIDs of processes started for a run, found by SP_JOB_INSTANCE."""
    marker = f"SP_JOB_INSTANCE={run_id}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes()
        except OSError:
            continue
        if marker in environ.split(b"\0"):
            found.append(int(entry.name))
    return found


class TestExitCodes:
    def test_each_minion_keeps_its_own_code(self, sandbox, events, store) -> None:
        run_id = run_now(sandbox, "exit_codes")["run_id"]
        done = wait_run_complete(events, "exit_codes", run_id)
        assert done["retcodes"] == {"minion-1": 0, "minion-2": 7, "minion-3": 0}
        assert done["success"] is False
        minion_done = events.all(r"saltpeter/job/exit_codes/minion-\d/complete")
        by_minion = {data["minion"]: data for _, data in minion_done if data["run_id"] == run_id}
        assert by_minion["minion-2"]["retcode"] == 7
        assert by_minion["minion-2"]["output_tail"] == "failing\n"
        assert by_minion["minion-1"]["retcode"] == 0
        started = events.wait(r"saltpeter/job/exit_codes/start")
        assert started["run_id"] == run_id
        assert started["targets"] == ["minion-1", "minion-2", "minion-3"]
        stored = results(store, run_id)
        assert stored["minion-1"]["output"] == "fine\n"
        assert stored["minion-2"]["output"] == "failing\n"

    def test_timeout_gives_124_and_no_survivor(self, sandbox, events, store) -> None:
        run_id = run_now(sandbox, "too_slow")["run_id"]
        done = wait_run_complete(events, "too_slow", run_id)
        assert done["retcodes"] == {"minion-3": 124}
        assert results(store, run_id)["minion-3"]["reason"] == "timeout"
        assert job_processes(run_id) == []

    def test_kill_gives_143_and_no_survivor(self, sandbox, events, store, wait_for) -> None:
        run_id = run_now(sandbox, "killable")["run_id"]
        for minion in ("minion-2", "minion-3"):
            events.wait(rf"saltpeter/job/killable/{minion}/start")
        killed = sandbox.salt_run("saltpeter.kill", "job=killable")
        assert killed["signalled"] == {run_id: ["minion-2", "minion-3"]}
        done = wait_run_complete(events, "killable", run_id)
        assert done["retcodes"] == {"minion-2": 143, "minion-3": 143}
        assert results(store, run_id)["minion-2"]["reason"] == "killed"
        assert job_processes(run_id) == []

    def test_lost_wrapper_gives_253(self, sandbox, events, store) -> None:
        run_id = run_now(sandbox, "lost")["run_id"]
        events.wait(r"saltpeter/job/lost/minion-3/start")
        record = sandbox.layout.statedir("minion-3") / f"{run_id}.json"
        wrapper_pid = int(yaml.safe_load(record.read_text())["wrapper_pid"])
        command_pgid = int(yaml.safe_load(record.read_text())["pgid"])
        os.kill(wrapper_pid, signal.SIGKILL)
        try:
            done = wait_run_complete(events, "lost", run_id)
        finally:
            os.killpg(command_pgid, signal.SIGKILL)
        assert done["retcodes"] == {"minion-3": 253}
        result = results(store, run_id)["minion-3"]
        assert result["reason"] == "lost"
        assert "no heartbeat" in result["output"]

    def test_missing_wrapper_gives_255(self, sandbox, events, store) -> None:
        run_id = run_now(sandbox, "missing_wrapper")["run_id"]
        done = wait_run_complete(events, "missing_wrapper", run_id)
        assert done["retcodes"] == {"minion-1": 255}
        result = results(store, run_id)["minion-1"]
        assert result["reason"] == "launch_failed"
        assert "/nonexistent/sp_wrapper.py" in result["output"]


class TestExecution:
    def test_output_arrives_while_running(self, sandbox, events, store, wait_for) -> None:
        run_id = run_now(sandbox, "streaming")["run_id"]
        wait_for(
            lambda: results(store, run_id)["minion-1"]["output"] == "first\n",
            RESULT_TIMEOUT,
            "the first line in the store",
        )
        assert results(store, run_id)["minion-1"]["retcode"] is None
        wait_run_complete(events, "streaming", run_id)
        assert results(store, run_id)["minion-1"]["output"] == "first\nsecond\n"

    def test_user_cwd_and_env_take_effect(self, sandbox, events, store) -> None:
        run_id = run_now(sandbox, "identity")["run_id"]
        done = wait_run_complete(events, "identity", run_id)
        assert done["retcodes"] == {"minion-1": 0}
        lines = results(store, run_id)["minion-1"]["output"].splitlines()
        assert lines[0] == "nobody"
        assert lines[1] == "/var/tmp"
        assert lines[2] == "hello there 42"
        assert lines[3] == "home=/nonexistent"

    def test_env_values_stay_out_of_salt_job_cache(self, sandbox, events) -> None:
        run_id = run_now(sandbox, "identity")["run_id"]
        wait_run_complete(events, "identity", run_id)
        jobs_cache = sandbox.layout.cachedir / "jobs"
        for path in jobs_cache.rglob("*"):
            if path.is_file():
                content = path.read_bytes()
                assert b"hello there" not in content, path
                assert b"GREETING" not in content, path


class TestSkips:
    def test_overlap_is_skipped_and_announced(self, sandbox, events) -> None:
        first = run_now(sandbox, "exclusive")["run_id"]
        second = sandbox.salt_run_raw("saltpeter.run", "job=exclusive")
        assert second.returncode != 0
        assert "overlap" in second.stdout + second.stderr
        skipped = events.wait(r"saltpeter/job/exclusive/skipped")
        assert skipped["reason"] == "overlap"
        assert skipped["running"] == [first]
        wait_run_complete(events, "exclusive", first)

    def test_allow_overlap_starts_both(self, sandbox, events) -> None:
        first = run_now(sandbox, "overlapping")["run_id"]
        second = run_now(sandbox, "overlapping")["run_id"]
        assert first != second
        wait_run_complete(events, "overlapping", first)
        wait_run_complete(events, "overlapping", second)

    def test_no_targets_is_skipped(self, sandbox, events) -> None:
        outcome = sandbox.salt_run_raw("saltpeter.run", "job=nowhere")
        assert "no_targets" in outcome.stdout + outcome.stderr
        assert events.wait(r"saltpeter/job/nowhere/skipped")["reason"] == "no_targets"


class TestMaintenance:
    def test_machine_under_maintenance_is_left_out(
        self, sandbox, events, store, jobs_dir, wait_for
    ) -> None:
        maintenance = jobs_dir / "maintenance.yaml"
        maintenance.write_text("saltpeter_maintenance:\n  machines: [minion-2]\n")
        try:
            time.sleep(3)  # the engine re-reads the directory every second
            run_id = run_now(sandbox, "exit_codes")["run_id"]
            started = events.wait(r"saltpeter/job/exit_codes/start")
            assert started["targets"] == ["minion-1", "minion-3"]
            assert started["maintenance"] == ["minion-2"]
            done = wait_run_complete(events, "exit_codes", run_id)
            assert done["retcodes"] == {"minion-1": 0, "minion-3": 0}
            result = results(store, run_id)["minion-2"]
            assert result["state"] == "maintenance"
            assert result["output"] == "target under maintenance\n"
        finally:
            maintenance.unlink()
            time.sleep(3)

    def test_global_maintenance_starts_nothing(self, sandbox, events, jobs_dir) -> None:
        maintenance = jobs_dir / "maintenance.yaml"
        maintenance.write_text("saltpeter_maintenance:\n  global: true\n")
        try:
            time.sleep(3)
            outcome = sandbox.salt_run_raw("saltpeter.run", "job=exit_codes")
            assert "maintenance" in outcome.stdout + outcome.stderr
            skipped = events.wait(r"saltpeter/job/exit_codes/skipped")
            assert skipped["reason"] == "maintenance"
        finally:
            maintenance.unlink()
            time.sleep(3)


class TestHotReload:
    def test_added_changed_and_removed_job(self, sandbox, events, store, jobs_dir) -> None:
        hot = jobs_dir / "hot.yaml"
        job = {
            "sec": "*/2",
            "min": "*",
            "hour": "*",
            "dom": "*",
            "mon": "*",
            "dow": "*",
            "targets": "minion-1",
            "command": "echo version one",
        }
        hot.write_text(yaml.safe_dump({"hot": job}))
        try:
            started = events.wait(r"saltpeter/job/hot/start")
            assert started["trigger"] == "schedule"
            assert int(started["scheduled"][17:19]) % 2 == 0
            first = wait_run_complete(events, "hot", started["run_id"])
            assert results(store, first["run_id"])["minion-1"]["output"] == "version one\n"

            hot.write_text(yaml.safe_dump({"hot": {**job, "command": "echo version two"}}))
            deadline = time.monotonic() + RESULT_TIMEOUT
            while time.monotonic() < deadline:
                done = events.wait(r"saltpeter/job/hot/complete")
                if results(store, done["run_id"])["minion-1"]["output"] == "version two\n":
                    break
            else:
                pytest.fail("the changed command never ran")
        finally:
            hot.unlink()
        time.sleep(4)
        assert "hot" not in store.jobs()
        runs_before = len(store.runs("hot", limit=1000))
        time.sleep(4)
        assert len(store.runs("hot", limit=1000)) == runs_before

    def test_broken_file_keeps_last_definition(self, sandbox, events, jobs_dir) -> None:
        jobs_file = jobs_dir / "jobs.yaml"
        original = jobs_file.read_text()
        jobs_file.write_text(original + "\n  broken: [unclosed\n")
        try:
            time.sleep(3)
            run_id = run_now(sandbox, "pinned_to_three")["run_id"]
            assert wait_run_complete(events, "pinned_to_three", run_id)["success"] is True
        finally:
            jobs_file.write_text(original)


class TestOriginalJobFile:
    def test_hello_world_runs_everywhere(self, sandbox, events, store) -> None:
        run_id = run_now(sandbox, "hello_world")["run_id"]
        done = wait_run_complete(events, "hello_world", run_id)
        assert done["retcodes"] == {"minion-1": 0, "minion-2": 0, "minion-3": 0}
        for result in results(store, run_id).values():
            assert result["output"].startswith("Hello from ")

    def test_backup_databases_is_scheduled(self, sandbox) -> None:
        times = sandbox.salt_run("saltpeter.next", "job=backup_databases", "count=2")
        assert [re.sub(r"^.*T", "", instant) for instant in times] == [
            "02:00:00+00:00",
            "02:00:00+00:00",
        ]


class TestRunners:
    def test_status_has_original_shape(self, sandbox, events) -> None:
        run_id = run_now(sandbox, "exit_codes")["run_id"]
        wait_run_complete(events, "exit_codes", run_id)
        status = sandbox.salt_run("saltpeter.status", "job=exit_codes")
        state = status["state"]["exit_codes"]
        assert state["last_run_id"] == run_id
        assert state["next_run"].startswith("2099-01-01T00:00:00")
        result = state["results"]["minion-2"]
        assert set(result) >= {"starttime", "endtime", "ret", "retcode"}
        assert result["retcode"] == 7
        assert result["ret"] == "failing\n"

    def test_status_lists_running_runs(self, sandbox, events) -> None:
        run_id = run_now(sandbox, "streaming")["run_id"]
        events.wait(r"saltpeter/job/streaming/minion-1/start")
        status = sandbox.salt_run("saltpeter.status")
        assert status["running"][run_id]["name"] == "streaming"
        assert status["running"][run_id]["machines"] == ["minion-1"]
        wait_run_complete(events, "streaming", run_id)

    @pytest.mark.parametrize("runner", ["status", "run", "kill", "next"])
    def test_unknown_job_is_a_clear_error(self, sandbox, runner) -> None:
        outcome = sandbox.salt_run_raw(f"saltpeter.{runner}", "job=no_such_job")
        assert outcome.returncode != 0
        assert "unknown job 'no_such_job'" in outcome.stdout + outcome.stderr

    def test_kill_with_nothing_running(self, sandbox) -> None:
        outcome = sandbox.salt_run_raw("saltpeter.kill", "job=exit_codes")
        assert "has no run in flight" in outcome.stdout + outcome.stderr


class TestSilentMinion:
    """Last in the module: it stops minion-3 and starts it again."""

    def test_stopped_minion_gives_255(self, sandbox, events, store) -> None:
        sandbox.stop_minion("minion-3")
        try:
            run_id = run_now(sandbox, "pinned_to_three")["run_id"]
            done = wait_run_complete(events, "pinned_to_three", run_id)
        finally:
            sandbox.start_minion("minion-3")
        assert done["retcodes"] == {"minion-3": 255}
        result = results(store, run_id)["minion-3"]
        assert result["reason"] == "no_response"
        assert "did not respond" in result["output"]


def test_no_job_process_outlives_module(sandbox) -> None:
    """No process of this module's jobs is left once their runs completed."""
    names = {f"SP_JOB_NAME={name}".encode() for name in JOBS}
    leftovers = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = set((entry / "environ").read_bytes().split(b"\0"))
        except OSError:
            continue
        if environ & names:
            leftovers.append(int(entry.name))
    assert leftovers == []


class TestCredentials:
    def test_token_from_job_cache_cannot_fetch_env(self, sandbox, events) -> None:
        """The token is in Salt's job cache; without the minion's signature it is useless."""
        import asyncio
        import json

        import tornado.websocket

        result = run_now(sandbox, "killable")
        run_id = result["run_id"]
        for minion in ("minion-2", "minion-3"):
            events.wait(rf"saltpeter/job/killable/{minion}/start")
        store = RunStore(sandbox.store_path, readonly=True)
        try:
            jid = store.run(run_id)["jid"]
        finally:
            store.close()
        job = sandbox.salt_run("jobs.list_job", jid)
        token = job["Arguments"][3]
        url = f"ws://127.0.0.1:{sandbox.machines_port}/wrapper"

        async def forge() -> dict[str, Any]:
            connection = await tornado.websocket.websocket_connect(url)
            hello = {
                "type": "hello",
                "protocol": 1,
                "run": run_id,
                "machine": "minion-2",
                "token": token,
                "need_job": True,
            }
            await connection.write_message(json.dumps(hello))
            reply = await asyncio.wait_for(connection.read_message(), 10)
            connection.close()
            return json.loads(reply)

        reply = asyncio.run(forge())
        assert reply["type"] == "error"
        assert reply["code"] == "auth_failed"
        assert "signed" in reply["message"]
        sandbox.salt_run("saltpeter.kill", "job=killable")
        done = wait_run_complete(events, "killable", run_id)
        assert done["retcodes"] == {"minion-2": 143, "minion-3": 143}
