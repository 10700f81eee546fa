"""Fault injection on a real master, engine, minions and wrappers.

Each test breaks something in the middle of a run (the engine, the master,
the connection, a minion, a wrapper) and then checks that every minion's
output is complete, in order and without a duplicated line, and that every
minion has exactly one result. Results are read from the engine's store,
because the event bus goes away with the master in some of these tests.

Wrappers reach the engine through a TCP relay that the test runs on
127.0.0.1, so a test can cut every wrapper connection at once.
"""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import yaml

from saltpeter.sandbox import Sandbox
from saltpeter.store import RunStore

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="signals processes of the sandbox")

LINES = 40
# Prints LINES numbered lines over about 20 s, so a fault lands mid-output.
SLOW_COUNTER = f'for i in $(seq 1 {LINES}); do echo "line $i"; sleep 0.5; done'
EXPECTED_OUTPUT = "".join(f"line {number}\n" for number in range(1, LINES + 1))
DORMANT = {"sec": 0, "min": 0, "hour": 0, "dom": 1, "mon": 1, "dow": "*", "year": 2099}
RESULT_TIMEOUT = 150.0


class Relay:
    """A TCP relay on 127.0.0.1 whose connections the test can cut."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.target_port: int | None = None
        self.writers: set[asyncio.StreamWriter] = set()
        self.cuts = 0
        self.thread.start()
        self.server = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._accept, "127.0.0.1", 0), self.loop
        ).result(10)
        self.port = self.server.sockets[0].getsockname()[1]

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.target_port is None:
            writer.close()
            return
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection(
                "127.0.0.1", self.target_port
            )
        except OSError:
            writer.close()
            return
        self.writers.update((writer, upstream_writer))
        await asyncio.gather(
            self._pipe(reader, upstream_writer), self._pipe(upstream_reader, writer)
        )

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            self.writers.discard(writer)
            writer.close()

    def cut(self) -> int:
        """Close every relayed connection; return how many sockets were closed."""

        async def close_all() -> int:
            closing = list(self.writers)
            for writer in closing:
                transport = writer.transport
                transport.abort()
            self.writers.clear()
            return len(closing)

        closed = asyncio.run_coroutine_threadsafe(close_all(), self.loop).result(10)
        self.cuts += 1
        return closed

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.server.close)
        self.cut()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)


@pytest.fixture(scope="module")
def relay() -> Iterator[Relay]:
    running = Relay()
    yield running
    running.stop()


@pytest.fixture(scope="module")
def jobs_dir(short_tmp_dir: Callable[[str], Path]) -> Path:
    directory = short_tmp_dir("jobs")
    jobs = {
        "counter": {**DORMANT, "targets": "*", "command": SLOW_COUNTER},
        "counter_one": {
            **DORMANT,
            "targets": "minion-1",
            "target_type": "list",
            "command": SLOW_COUNTER,
        },
        "quick_three": {
            **DORMANT,
            "targets": "minion-3",
            "target_type": "list",
            "command": 'echo "started late"; sleep 2; echo "finished late"',
        },
    }
    (directory / "jobs.yaml").write_text(yaml.safe_dump(jobs))
    return directory


@pytest.fixture(scope="module")
def sandbox_settings(relay: Relay) -> dict[str, object]:
    return {
        "machines_ws_url": f"ws://127.0.0.1:{relay.port}/wrapper",
        "launch_timeout": 10,
    }


@pytest.fixture(scope="module")
def wired_sandbox(sandbox: Sandbox, relay: Relay) -> Sandbox:
    relay.target_port = sandbox.machines_port
    return sandbox


def run_now(sandbox: Sandbox, job: str) -> str:
    result = sandbox.salt_run("saltpeter.run", f"job={job}")
    assert isinstance(result, dict) and result.get("started") is True, result
    return str(result["run_id"])


def read_store(sandbox: Sandbox, query: Callable[[RunStore], Any]) -> Any:
    store = RunStore(sandbox.store_path, readonly=True)
    try:
        return query(store)
    finally:
        store.close()


def wait_for_run(
    sandbox: Sandbox, run_id: str, done: Callable[[dict[str, Any], dict[str, Any]], bool]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Poll the store until ``done(run, results)`` holds; return both."""
    deadline = time.monotonic() + RESULT_TIMEOUT
    while True:
        run, results = read_store(sandbox, lambda store: (store.run(run_id), store.results(run_id)))
        if run is not None and done(run, results):
            return run, results
        if time.monotonic() > deadline:
            raise AssertionError(f"run {run_id} not done in time: {run}, {results}")
        time.sleep(0.5)


def finished(run: dict[str, Any], results: dict[str, Any]) -> bool:
    return run["status"] != "running"


def output_has(minion: str, text: str) -> Callable[[dict[str, Any], dict[str, Any]], bool]:
    def check(run: dict[str, Any], results: dict[str, Any]) -> bool:
        return text in results.get(minion, {}).get("output", "")

    return check


def result_rows(sandbox: Sandbox, run_id: str) -> list[str]:
    def query(store: RunStore) -> list[str]:
        rows = store._db.execute("SELECT machine FROM results WHERE run_id = ?", (run_id,))
        return sorted(row[0] for row in rows)

    return read_store(sandbox, query)


def engine_pid(sandbox: Sandbox) -> int | None:
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if (
            "Engine(salt.loaded.ext.engines.saltpeter)" in cmdline
            and str(sandbox.master_dir) in cmdline
        ):
            return int(entry.name)
    return None


def wrapper_record(sandbox: Sandbox, minion: str, run_id: str) -> dict[str, Any]:
    path = sandbox.layout.statedir(minion) / f"{run_id}.json"
    deadline = time.monotonic() + 30
    while True:
        try:
            record = yaml.safe_load(path.read_text())
        except (OSError, yaml.YAMLError):
            record = None
        if record and record.get("pid"):
            return record
        if time.monotonic() > deadline:
            raise AssertionError(f"no wrapper record with a pid at {path}")
        time.sleep(0.2)


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def assert_exact_outputs(results: dict[str, Any], minions: list[str]) -> None:
    for minion in minions:
        assert results[minion]["output"] == EXPECTED_OUTPUT, minion


class TestEngineAndMaster:
    def test_engine_sigkill_mid_run(self, wired_sandbox: Sandbox) -> None:
        sandbox = wired_sandbox
        run_id = run_now(sandbox, "counter")
        wait_for_run(sandbox, run_id, output_has("minion-3", "line 5\n"))
        pid = engine_pid(sandbox)
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        run, results = wait_for_run(sandbox, run_id, finished)
        assert not Path(f"/proc/{pid}").exists()
        assert run["status"] == "succeeded"
        assert {minion: result["retcode"] for minion, result in results.items()} == {
            "minion-1": 0,
            "minion-2": 0,
            "minion-3": 0,
        }
        assert_exact_outputs(results, ["minion-1", "minion-2", "minion-3"])
        assert result_rows(sandbox, run_id) == ["minion-1", "minion-2", "minion-3"]

    def test_master_down_past_heartbeat_window(self, wired_sandbox: Sandbox) -> None:
        sandbox = wired_sandbox
        run_id = run_now(sandbox, "counter")
        wait_for_run(sandbox, run_id, output_has("minion-1", "line 3\n"))
        sandbox.stop_master()
        time.sleep(25)  # longer than the 15 s heartbeat window
        sandbox.start_master()
        run, results = wait_for_run(sandbox, run_id, finished)
        assert run["status"] == "succeeded"
        assert_exact_outputs(results, ["minion-1", "minion-2", "minion-3"])
        assert all(result["late_retcode"] is None for result in results.values())
        assert result_rows(sandbox, run_id) == ["minion-1", "minion-2", "minion-3"]


class TestConnections:
    def test_connection_cut_mid_output(self, wired_sandbox: Sandbox, relay: Relay) -> None:
        sandbox = wired_sandbox
        run_id = run_now(sandbox, "counter")
        for line in (4, 12, 25):
            wait_for_run(sandbox, run_id, output_has("minion-2", f"line {line}\n"))
            assert relay.cut() > 0
        run, results = wait_for_run(sandbox, run_id, finished)
        assert run["status"] == "succeeded"
        assert_exact_outputs(results, ["minion-1", "minion-2", "minion-3"])
        assert result_rows(sandbox, run_id) == ["minion-1", "minion-2", "minion-3"]


class TestLostMinions:
    def test_killed_wrapper_is_lost_within_20_s(self, wired_sandbox: Sandbox) -> None:
        sandbox = wired_sandbox
        run_id = run_now(sandbox, "counter_one")
        record = wrapper_record(sandbox, "minion-1", run_id)
        wait_for_run(sandbox, run_id, output_has("minion-1", "line 2\n"))
        killed_at = time.time()
        os.kill(int(record["wrapper_pid"]), signal.SIGKILL)
        _, results = wait_for_run(sandbox, run_id, finished)
        result = results["minion-1"]
        assert result["retcode"] == 253
        assert result["reason"] == "lost"
        ended = datetime.fromisoformat(result["ended_at"]).timestamp()
        assert ended - killed_at < 20
        assert result_rows(sandbox, run_id) == ["minion-1"]
        # The engine has the minion stop what the dead wrapper left running.
        deadline = time.monotonic() + 60
        while group_alive(int(record["pgid"])) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not group_alive(int(record["pgid"]))

    def test_killed_minion_host_is_lost(self, wired_sandbox: Sandbox) -> None:
        sandbox = wired_sandbox
        run_id = run_now(sandbox, "counter_one")
        record = wrapper_record(sandbox, "minion-1", run_id)
        sandbox.stop_minion("minion-1", signal.SIGKILL)
        os.kill(int(record["wrapper_pid"]), signal.SIGKILL)
        os.killpg(int(record["pgid"]), signal.SIGKILL)
        try:
            _, results = wait_for_run(sandbox, run_id, finished)
        finally:
            sandbox.start_minion("minion-1")
        assert results["minion-1"]["retcode"] == 253
        assert result_rows(sandbox, run_id) == ["minion-1"]

    def test_stopped_wrapper_reports_late(self, wired_sandbox: Sandbox) -> None:
        sandbox = wired_sandbox
        run_id = run_now(sandbox, "counter_one")
        record = wrapper_record(sandbox, "minion-1", run_id)
        wait_for_run(sandbox, run_id, output_has("minion-1", "line 2\n"))
        wrapper_pid = int(record["wrapper_pid"])
        os.kill(wrapper_pid, signal.SIGSTOP)
        try:
            wait_for_run(sandbox, run_id, finished)
        finally:
            os.kill(wrapper_pid, signal.SIGCONT)
        _, results = wait_for_run(
            sandbox, run_id, lambda run, results: results["minion-1"]["late_retcode"] is not None
        )
        result = results["minion-1"]
        assert result["retcode"] == 253
        assert result["late_retcode"] == 0
        assert result["late_reason"] == "exit"
        output = result["output"]
        lines = [line for line in output.splitlines() if line.startswith("line ")]
        assert lines == [f"line {number}" for number in range(1, LINES + 1)]
        assert "no heartbeat" in output
        assert result_rows(sandbox, run_id) == ["minion-1"]

    def test_wrapper_started_after_declared_lost(self, wired_sandbox: Sandbox) -> None:
        sandbox = wired_sandbox
        minion_pids = sandbox.layout.minion("minion-3").processes()
        for pid in minion_pids:
            os.kill(pid, signal.SIGSTOP)
        try:
            run_id = run_now(sandbox, "quick_three")
            _, results = wait_for_run(sandbox, run_id, finished)
            assert results["minion-3"]["retcode"] == 255
            assert results["minion-3"]["reason"] == "no_response"
        finally:
            for pid in minion_pids:
                os.kill(pid, signal.SIGCONT)
        _, results = wait_for_run(
            sandbox, run_id, lambda run, results: results["minion-3"]["late_retcode"] is not None
        )
        result = results["minion-3"]
        assert result["late_retcode"] == 0
        assert result["output"].endswith("started late\nfinished late\n")
        assert result["retcode"] == 255
        assert result_rows(sandbox, run_id) == ["minion-3"]
