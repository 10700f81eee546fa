"""Run manager: launch returns, frame sequencing, results, sweeps and kills.

The store is a real SQLite file. Events go to an in-memory recorder instead of
the Salt event bus, which needs a running master; the integration tests check
the same events on a real bus.
"""

from __future__ import annotations

import gc
import sqlite3
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from saltpeter.config import Settings, parse_job
from saltpeter.manager import RunManager, hash_token, sweep_verdict
from saltpeter.protocol import (
    AUTH_FAILED,
    JOB_UNAVAILABLE,
    UNKNOWN_RUN,
    Complete,
    Hello,
    Output,
    ProtocolError,
    Start,
)
from saltpeter.runs import MachineState, Reason, RunStatus, SkipReason, Trigger
from saltpeter.store import RunStore

NOW = datetime(2026, 12, 4, 12, 0, tzinfo=timezone.utc)
SLOT = datetime(2026, 12, 4, 12, 5, tzinfo=timezone.utc)


class RecordedEvents:
    def __init__(self) -> None:
        self.events: list[tuple[str, dict[str, Any]]] = []

    def fire(self, tag: str, data: dict[str, Any]) -> None:
        self.events.append((tag, data))

    def tags(self) -> list[str]:
        return [tag for tag, _ in self.events]

    def last(self, tag: str) -> dict[str, Any]:
        return [data for event_tag, data in self.events if event_tag == tag][-1]


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class RecordedConnection:
    def __init__(self) -> None:
        self.frames: list[str] = []
        self.dropped: list[str] = []

    def send_frame(self, text: str) -> None:
        self.frames.append(text)

    def drop(self, reason: str) -> None:
        self.dropped.append(reason)


def make_job(name: str = "backup", **extra: Any):
    raw = {
        "min": "*/5",
        "hour": "*",
        "dom": "*",
        "mon": "*",
        "dow": "*",
        "targets": "*",
        "command": "echo hi",
        "env": {"SECRET": "hunter2"},
        **extra,
    }
    return parse_job(name, raw, Path("/etc/saltpeter/jobs.yaml"), Settings(), NOW)


@pytest.fixture
def store(tmp_path: Path) -> RunStore:
    store = RunStore(tmp_path / "sp.db")
    store.sync_jobs({"backup": {}})
    yield store
    store.close()


@pytest.fixture
def events() -> RecordedEvents:
    return RecordedEvents()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def manager(store: RunStore, events: RecordedEvents, clock: FakeClock) -> RunManager:
    jobs = {"backup": make_job()}
    return RunManager(store, events, jobs.get, launch_timeout=30, heartbeat_timeout=15, clock=clock)


def hello(run_id: str, token: str, machine: str = "m1", need_job: bool = True) -> Hello:
    return Hello(1, run_id, machine, token, "test", need_job)


def start_run(manager: RunManager, targets=("m1", "m2"), maintenance=()):
    return manager.start_run(make_job(), Trigger.SCHEDULE, SLOT, targets, maintenance, "jid1")


def complete(manager: RunManager, run, machine: str, retcode: int = 0, reason: str = "exit"):
    run_machine = run.machines[machine]
    manager.on_frame(run, run_machine, Start(run_machine.last_seq + 1, 42, "t"))
    manager.on_frame(
        run, run_machine, Complete(run_machine.last_seq + 1, retcode, reason, "t", None)
    )


class TestStartRun:
    def test_run_id_uses_slot_timestamp(self, manager: RunManager) -> None:
        run, _ = start_run(manager)
        assert run.run_id == f"backup_{int(SLOT.timestamp())}"

    def test_token_is_stored_hashed(self, manager: RunManager, store: RunStore) -> None:
        run, token = start_run(manager)
        assert store.run(run.run_id)["token_hash"] == hash_token(token)
        assert token not in store.run(run.run_id)["token_hash"]

    def test_start_event_lists_targets(self, manager: RunManager, events: RecordedEvents) -> None:
        start_run(manager, maintenance=("m3",))
        data = events.last("saltpeter/job/backup/start")
        assert data["targets"] == ["m1", "m2"]
        assert data["maintenance"] == ["m3"]

    def test_maintenance_minion_is_recorded(self, manager: RunManager, store: RunStore) -> None:
        run, _ = start_run(manager, maintenance=("m3",))
        result = store.results(run.run_id)["m3"]
        assert result["state"] == "maintenance"
        assert result["output"] == "target under maintenance\n"

    def test_second_run_of_same_second_gets_suffix(self, manager: RunManager) -> None:
        first = manager.new_run_id("backup", SLOT)
        start_run(manager)
        assert manager.new_run_id("backup", SLOT) == f"{first}_2"

    def test_skip_is_recorded_and_announced(
        self, manager: RunManager, store: RunStore, events: RecordedEvents
    ) -> None:
        start_run(manager)
        later = datetime(2026, 12, 4, 12, 10, tzinfo=timezone.utc)
        manager.record_skip("backup", Trigger.SCHEDULE, later, SkipReason.OVERLAP)
        data = events.last("saltpeter/job/backup/skipped")
        assert data["reason"] == "overlap"
        assert data["running"] == [f"backup_{int(SLOT.timestamp())}"]
        assert store.slot_taken("backup", later)


class TestStartRuns:
    """Several runs stored in one transaction, as a burst of due jobs is."""

    def make(self, manager: RunManager, name: str, slot: datetime = SLOT, maintenance=()):
        run_id = manager.new_run_id(name, slot)
        return manager.new_run(
            run_id, make_job(name), Trigger.SCHEDULE, slot, ["m1"], maintenance, f"jid-{name}"
        )

    def test_all_are_stored_and_announced(
        self, manager: RunManager, store: RunStore, events: RecordedEvents
    ) -> None:
        store.sync_jobs({"backup": {}, "report": {}})
        runs = [self.make(manager, "backup")[0], self.make(manager, "report")[0]]
        assert manager.start_runs(runs) == runs
        assert set(manager.runs) == {run.run_id for run in runs}
        assert {row["job"] for row in store.running_runs()} == {"backup", "report"}
        assert events.tags() == ["saltpeter/job/backup/start", "saltpeter/job/report/start"]
        assert store.jobs()["report"].last_run_id == runs[1].run_id

    def test_taken_slot_leaves_others_running(
        self, manager: RunManager, store: RunStore, events: RecordedEvents
    ) -> None:
        store.sync_jobs({"backup": {}, "report": {}})
        start_run(manager)
        # A second backup run for the same slot, as after a race with catch-up.
        duplicate, _ = manager.new_run(
            "backup_other", make_job(), Trigger.SCHEDULE, SLOT, ["m1"], [], "jid-dup"
        )
        report, _ = self.make(manager, "report")
        assert manager.start_runs([duplicate, report]) == [report]
        assert "backup_other" not in manager.runs
        assert store.run("backup_other") is None
        assert store.run(report.run_id) is not None
        assert events.tags().count("saltpeter/job/backup/start") == 1

    def test_maintenance_minions_are_recorded_for_each_run(
        self, manager: RunManager, store: RunStore
    ) -> None:
        run, _ = self.make(manager, "backup", maintenance=["m9"])
        manager.start_runs([run])
        result = store.results(run.run_id)["m9"]
        assert result["reason"] == "maintenance"
        assert result["output"] == "target under maintenance\n"

    def test_run_ids_are_unique_within_one_call(self, manager: RunManager, store: RunStore) -> None:
        start_run(manager)
        base = f"backup_{int(SLOT.timestamp())}"
        ids = manager.new_run_ids([("backup", SLOT), ("backup", SLOT), ("report", SLOT)])
        assert ids == [f"{base}_2", f"{base}_3", f"report_{int(SLOT.timestamp())}"]


class TestLaunchReturn:
    def test_started_moves_to_launched(self, manager: RunManager) -> None:
        run, _ = start_run(manager)
        manager.on_launch_return("jid1", "m1", {"return": {"started": True, "pid": 5}})
        assert run.machines["m1"].state is MachineState.LAUNCHED

    def test_failure_records_255_with_reason(self, manager: RunManager, store: RunStore) -> None:
        run, _ = start_run(manager)
        manager.on_launch_return(
            "jid1", "m1", {"return": {"started": False, "error": "wrapper not found at /x"}}
        )
        result = store.results(run.run_id)["m1"]
        assert result["retcode"] == 255
        assert result["reason"] == "launch_failed"
        assert "wrapper not found at /x" in result["output"]

    def test_missing_module_string_is_the_reason(
        self, manager: RunManager, store: RunStore
    ) -> None:
        run, _ = start_run(manager)
        manager.on_launch_return("jid1", "m2", {"return": "'saltpeter.launch' is not available."})
        assert "is not available" in store.results(run.run_id)["m2"]["output"]

    def test_unknown_jid_is_ignored(self, manager: RunManager) -> None:
        run, _ = start_run(manager)
        manager.on_launch_return("other", "m1", {"return": {"started": True}})
        assert run.machines["m1"].state is MachineState.PENDING


class TestAuthentication:
    def test_valid_token(self, manager: RunManager) -> None:
        run, token = start_run(manager)
        found_run, machine = manager.authenticate(hello(run.run_id, token))
        assert found_run is run
        assert machine.machine == "m1"

    def test_wrong_token(self, manager: RunManager) -> None:
        run, _ = start_run(manager)
        with pytest.raises(ProtocolError) as caught:
            manager.authenticate(hello(run.run_id, "forged"))
        assert caught.value.code == AUTH_FAILED

    def test_token_of_another_run(self, manager: RunManager) -> None:
        _, first_token = start_run(manager)
        second, _ = manager.start_run(make_job(), Trigger.MANUAL, None, ["m1"], [], "jid2")
        with pytest.raises(ProtocolError) as caught:
            manager.authenticate(hello(second.run_id, first_token))
        assert caught.value.code == AUTH_FAILED

    def test_minion_not_in_run(self, manager: RunManager) -> None:
        run, token = start_run(manager)
        with pytest.raises(ProtocolError, match="not a target"):
            manager.authenticate(hello(run.run_id, token, machine="intruder"))

    def test_unknown_run(self, manager: RunManager) -> None:
        with pytest.raises(ProtocolError) as caught:
            manager.authenticate(hello("nope_1", "x"))
        assert caught.value.code == UNKNOWN_RUN

    def test_welcome_carries_job_with_env(self, manager: RunManager) -> None:
        run, token = start_run(manager)
        found_run, machine = manager.authenticate(hello(run.run_id, token))
        welcome = manager.welcome(found_run, machine, need_job=True)
        assert welcome["job"]["env"] == {"SECRET": "hunter2"}
        assert welcome["acked"] == 0

    def test_welcome_without_job_when_not_asked(self, manager: RunManager) -> None:
        run, token = start_run(manager)
        found_run, machine = manager.authenticate(hello(run.run_id, token))
        assert manager.welcome(found_run, machine, need_job=False)["job"] is None

    def test_finished_run_welcomes_with_last_ack(
        self, manager: RunManager, store: RunStore
    ) -> None:
        run, token = start_run(manager, targets=("m1",))
        complete(manager, run, "m1")
        run_id = run.run_id
        del run
        gc.collect()
        found_run, machine = manager.authenticate(hello(run_id, token))
        assert found_run.run_id == run_id
        assert manager.welcome(found_run, machine, need_job=True) == {
            "acked": 2,
            "job": None,
            "heartbeat_interval": 5,
            "output_limit": store.max_output_bytes,
        }

    def test_finished_run_still_held_is_shared(self, manager: RunManager) -> None:
        run, token = start_run(manager, targets=("m1",))
        complete(manager, run, "m1")
        assert run.run_id not in manager.runs
        found_run, _ = manager.authenticate(hello(run.run_id, token))
        assert found_run is run

    def test_late_wrappers_share_finished_run(
        self, manager: RunManager, store: RunStore, clock: FakeClock
    ) -> None:
        run, token = start_run(manager, targets=("m1", "m2", "m3"))
        run_id = run.run_id
        clock.now += 31
        manager.sweep()  # no wrapper connected: 255 on every minion
        del run
        gc.collect()
        loads = []
        real_machine_runs = store.machine_runs

        def counted_machine_runs(loaded_run_id: str) -> Any:
            loads.append(loaded_run_id)
            return real_machine_runs(loaded_run_id)

        store.machine_runs = counted_machine_runs  # type: ignore[method-assign]
        first, m1 = manager.authenticate(hello(run_id, token, "m1"))
        second, m2 = manager.authenticate(hello(run_id, token, "m2"))
        assert second is first
        assert loads == [run_id]
        manager.on_frame(first, m1, Start(1, 9, "t"))
        manager.on_frame(first, m1, Complete(2, 0, "exit", "t", None))
        # The late result through one wrapper is seen through the other.
        assert second.machines["m1"].late_retcode == 0
        assert store.results(run_id)["m1"]["late_retcode"] == 0
        del first, second, m1, m2
        gc.collect()
        third, _ = manager.authenticate(hello(run_id, token, "m3"))
        assert loads == [run_id, run_id]
        assert third.machines["m1"].late_retcode == 0

    def test_pruned_run_is_unknown_while_held(self, manager: RunManager, store: RunStore) -> None:
        run, token = start_run(manager, targets=("m1",))
        complete(manager, run, "m1")
        # Runs start at the wall clock's time, so the cutoff follows this run's start.
        assert store.prune(run.started_at + timedelta(seconds=1), keep_per_job=1000) == 1
        with pytest.raises(ProtocolError) as caught:
            manager.authenticate(hello(run.run_id, token))
        assert caught.value.code == UNKNOWN_RUN

    def test_reloaded_run_without_definition(self, store: RunStore, events: RecordedEvents) -> None:
        first = RunManager(store, events, {"backup": make_job()}.get)
        run, token = start_run(first)
        reloaded = RunManager(store, events, {}.get)
        assert reloaded.load_in_flight() == 1
        found_run, machine = reloaded.authenticate(hello(run.run_id, token))
        with pytest.raises(ProtocolError) as caught:
            reloaded.welcome(found_run, machine, need_job=True)
        assert caught.value.code == JOB_UNAVAILABLE


class TestFrames:
    def test_output_in_order_is_stored(self, manager: RunManager, store: RunStore) -> None:
        run, _ = start_run(manager)
        machine = run.machines["m1"]
        assert manager.on_frame(run, machine, Start(1, 42, "t")) == 1
        assert manager.on_frame(run, machine, Output(2, "a\n")) == 2
        assert manager.on_frame(run, machine, Output(3, "b\n")) == 3
        assert store.output(run.run_id, "m1") == "a\nb\n"

    def test_duplicate_is_acked_not_stored(self, manager: RunManager, store: RunStore) -> None:
        run, _ = start_run(manager)
        machine = run.machines["m1"]
        manager.on_frame(run, machine, Start(1, 42, "t"))
        manager.on_frame(run, machine, Output(2, "a\n"))
        assert manager.on_frame(run, machine, Output(2, "a\n")) == 2
        assert store.output(run.run_id, "m1") == "a\n"

    def test_frame_after_gap_is_dropped(self, manager: RunManager, store: RunStore) -> None:
        run, _ = start_run(manager)
        machine = run.machines["m1"]
        manager.on_frame(run, machine, Start(1, 42, "t"))
        assert manager.on_frame(run, machine, Output(5, "late\n")) == 1
        assert store.output(run.run_id, "m1") == ""

    def test_lone_surrogate_is_replaced(self, manager: RunManager, store: RunStore) -> None:
        run, _ = start_run(manager)
        machine = run.machines["m1"]
        manager.on_frame(run, machine, Start(1, 42, "t"))
        manager.on_frame(run, machine, Output(2, "x\ud800y"))
        assert store.output(run.run_id, "m1") == "x?y"

    def test_start_event_and_state(self, manager: RunManager, events: RecordedEvents) -> None:
        run, _ = start_run(manager)
        manager.on_frame(run, run.machines["m1"], Start(1, 42, "t"))
        assert run.machines["m1"].state is MachineState.RUNNING
        assert events.last("saltpeter/job/backup/m1/start")["pid"] == 42


class TestCompletion:
    def test_minion_complete_event(self, manager: RunManager, events: RecordedEvents) -> None:
        run, _ = start_run(manager)
        machine = run.machines["m1"]
        manager.on_frame(run, machine, Start(1, 42, "t"))
        manager.on_frame(run, machine, Output(2, "bye\n"))
        manager.on_frame(run, machine, Complete(3, 3, "exit", "t", None))
        data = events.last("saltpeter/job/backup/m1/complete")
        assert data["retcode"] == 3
        assert data["output_tail"] == "bye\n"

    def test_run_completes_when_all_minions_did(
        self, manager: RunManager, store: RunStore, events: RecordedEvents
    ) -> None:
        run, _ = start_run(manager)
        complete(manager, run, "m1")
        assert "saltpeter/job/backup/complete" not in events.tags()
        complete(manager, run, "m2", retcode=124, reason="timeout")
        data = events.last("saltpeter/job/backup/complete")
        assert data["retcodes"] == {"m1": 0, "m2": 124}
        assert data["success"] is False
        assert store.run(run.run_id)["status"] == "failed"
        assert manager.running("backup") == []

    def test_results_in_any_order(self, manager: RunManager, events: RecordedEvents) -> None:
        names = [f"m{index}" for index in range(6)]
        run, _ = start_run(manager, targets=names)
        # The first minion in order finishes last, the others out of order.
        for name in ["m3", "m1", "m5", "m2", "m4"]:
            complete(manager, run, name)
            assert run.in_flight
            assert "saltpeter/job/backup/complete" not in events.tags()
        complete(manager, run, "m0")
        assert not run.in_flight
        assert events.last("saltpeter/job/backup/complete")["retcodes"] == dict.fromkeys(names, 0)

    def test_all_zero_is_success(self, manager: RunManager, store: RunStore) -> None:
        run, _ = start_run(manager)
        complete(manager, run, "m1")
        complete(manager, run, "m2")
        assert store.run(run.run_id)["status"] == RunStatus.SUCCEEDED.value

    def test_duplicate_complete_is_acked_not_stored(
        self, manager: RunManager, store: RunStore, events: RecordedEvents
    ) -> None:
        run, token = start_run(manager, targets=("m1",))
        complete(manager, run, "m1")
        found_run, machine = manager.authenticate(hello(run.run_id, token))
        assert manager.on_frame(found_run, machine, Output(3, "extra\n")) == 3
        assert "extra" not in store.output(run.run_id, "m1")
        assert len(events.tags()) == 4


class TestLostWrites:
    def test_reload_puts_the_store_state_back(self, manager: RunManager, store: RunStore) -> None:
        run, token = start_run(manager)
        connections = {name: RecordedConnection() for name in run.machines}
        for name, machine in run.machines.items():
            manager.attach(run, machine, connections[name])
        manager.on_frame(run, run.machines["m1"], Start(1, 42, "t"))
        # The frames below are held in a batch that is then lost.
        store.begin_batch()
        manager.on_frame(run, run.machines["m1"], Output(2, "lost\n"))
        manager.on_frame(run, run.machines["m1"], Complete(3, 0, "exit", "t", None))
        manager.on_frame(run, run.machines["m2"], Start(1, 43, "t"))
        manager.on_frame(run, run.machines["m2"], Complete(2, 0, "exit", "t", None))
        assert manager.running("backup") == []
        store.after_commit(lambda: None, lambda: manager.reload_run(run))
        store.fail_batch(sqlite3.OperationalError("database or disk is full"))
        [fresh] = manager.running("backup")
        assert fresh is not run
        assert fresh.run_id == run.run_id
        assert fresh.machines["m1"].last_seq == 1
        assert fresh.machines["m1"].state is MachineState.RUNNING
        assert fresh.machines["m2"].last_seq == 0
        assert all(connection.dropped == ["store_failed"] for connection in connections.values())
        # The wrapper learns the stored sequence number and sends the rest again.
        _, machine = manager.authenticate(hello(run.run_id, token))
        assert manager.welcome(fresh, machine, False)["acked"] == 1
        assert manager.on_frame(fresh, machine, Output(2, "sent again\n")) == 2
        assert store.output(run.run_id, "m1") == "sent again\n"
        # A second loss report for the replaced run changes nothing.
        manager.reload_run(run)
        assert manager.running("backup") == [fresh]


class TestLateResults:
    def lose(self, manager: RunManager, clock: FakeClock):
        run, token = start_run(manager, targets=("m1",))
        machine = run.machines["m1"]
        manager.on_frame(run, machine, Start(1, 42, "t"))
        manager.on_frame(run, machine, Output(2, "before\n"))
        clock.now += 16
        manager.sweep()
        return run, token

    def test_late_output_and_result_are_stored(
        self, manager: RunManager, store: RunStore, clock: FakeClock
    ) -> None:
        run, token = self.lose(manager, clock)
        found_run, machine = manager.authenticate(hello(run.run_id, token, need_job=False))
        assert manager.welcome(found_run, machine, need_job=False)["acked"] == 2
        assert manager.on_frame(found_run, machine, Output(3, "after\n")) == 3
        assert manager.on_frame(found_run, machine, Complete(4, 0, "exit", "t", None)) == 4
        result = store.results(run.run_id)["m1"]
        assert result["retcode"] == 253
        assert result["late_retcode"] == 0
        assert result["late_reason"] == "exit"
        assert result["output"].startswith("before\n")
        assert result["output"].endswith("after\n")

    def test_late_result_is_announced(
        self, manager: RunManager, events: RecordedEvents, clock: FakeClock
    ) -> None:
        run, token = self.lose(manager, clock)
        found_run, machine = manager.authenticate(hello(run.run_id, token, need_job=False))
        manager.on_frame(found_run, machine, Complete(3, 5, "exit", "t", None))
        data = events.last("saltpeter/job/backup/m1/complete")
        assert data["late"] is True
        assert data["retcode"] == 5
        assert data["recorded_retcode"] == 253

    def test_second_late_result_is_dropped(
        self, manager: RunManager, store: RunStore, clock: FakeClock
    ) -> None:
        run, token = self.lose(manager, clock)
        found_run, machine = manager.authenticate(hello(run.run_id, token, need_job=False))
        manager.on_frame(found_run, machine, Complete(3, 5, "exit", "t", None))
        assert manager.on_frame(found_run, machine, Output(4, "ghost\n")) == 4
        assert "ghost" not in store.output(run.run_id, "m1")

    def test_no_response_then_wrapper_reports(
        self, manager: RunManager, store: RunStore, clock: FakeClock
    ) -> None:
        run, token = start_run(manager, targets=("m1",))
        clock.now += 31
        manager.sweep()
        found_run, machine = manager.authenticate(hello(run.run_id, token))
        assert manager.welcome(found_run, machine, need_job=True)["job"]["command"] == "echo hi"
        manager.on_frame(found_run, machine, Start(1, 9, "t"))
        manager.on_frame(found_run, machine, Complete(2, 0, "exit", "t", None))
        result = store.results(run.run_id)["m1"]
        assert result["retcode"] == 255
        assert result["late_retcode"] == 0


class TestMissed:
    def test_missed_slot_recorded_once(
        self, manager: RunManager, store: RunStore, events: RecordedEvents
    ) -> None:
        manager.record_missed("backup", SLOT)
        manager.record_missed("backup", SLOT)
        assert [tag for tag in events.tags() if tag.endswith("/missed")] == [
            "saltpeter/job/backup/missed"
        ]
        assert store.slot_taken("backup", SLOT)
        assert store.runs("backup")[0]["status"] == "missed"


class TestSweep:
    def test_overrun_wrapper_is_stopped(self, manager: RunManager, clock: FakeClock) -> None:
        run, _ = start_run(manager)
        machine = run.machines["m1"]
        connection = RecordedConnection()
        manager.attach(run, machine, connection)
        manager.on_frame(run, machine, Start(1, 42, "t"))
        run.timeout = 60
        machine.started_at = machine.started_at - timedelta(seconds=81)
        manager.sweep()
        assert machine.retcode == 253
        assert connection.frames == ['{"type":"kill"}']

    def test_no_timeout_never_overruns(self, manager: RunManager) -> None:
        run, _ = start_run(manager)
        machine = run.machines["m1"]
        manager.on_frame(run, machine, Start(1, 42, "t"))
        run.timeout = 0
        machine.started_at = machine.started_at - timedelta(days=30)
        manager.sweep()
        assert machine.retcode is None

    def test_reloaded_run_gets_reconnect_grace(
        self, store: RunStore, events: RecordedEvents, clock: FakeClock
    ) -> None:
        first = RunManager(store, events, {"backup": make_job()}.get, clock=clock)
        run, _ = start_run(first)
        first.on_frame(run, run.machines["m1"], Start(1, 42, "t"))
        reloaded = RunManager(store, events, {}.get, heartbeat_timeout=15, clock=clock)
        reloaded.load_in_flight()
        clock.now += 40
        reloaded.sweep()
        assert reloaded.runs[run.run_id].machines["m1"].retcode is None
        clock.now += 10
        reloaded.sweep()
        assert store.results(run.run_id)["m1"]["retcode"] == 253

    def test_silent_minion_gets_255(self, manager: RunManager, clock: FakeClock, store) -> None:
        run, _ = start_run(manager)
        clock.now += 31
        manager.sweep()
        result = store.results(run.run_id)["m1"]
        assert result["retcode"] == 255
        assert result["reason"] == "no_response"
        assert "did not respond" in result["output"]

    def test_lost_heartbeat_gets_253(self, manager: RunManager, clock: FakeClock) -> None:
        run, _ = start_run(manager)
        manager.on_frame(run, run.machines["m1"], Start(1, 42, "t"))
        clock.now += 14
        manager.sweep()
        assert run.machines["m1"].retcode is None
        clock.now += 2
        manager.sweep()
        assert run.machines["m1"].retcode == 253

    def test_heartbeat_keeps_minion_alive(self, manager: RunManager, clock: FakeClock) -> None:
        run, _ = start_run(manager)
        machine = run.machines["m1"]
        manager.on_frame(run, machine, Start(1, 42, "t"))
        for _ in range(10):
            clock.now += 10
            manager.touch(machine)
            manager.sweep()
        assert machine.state is MachineState.RUNNING

    @pytest.mark.parametrize(
        ("state", "silent_for", "expected"),
        [
            (MachineState.PENDING, 29.0, None),
            (MachineState.PENDING, 31.0, (255, Reason.NO_RESPONSE)),
            (MachineState.LAUNCHED, 14.0, None),
            (MachineState.LAUNCHED, 16.0, (255, Reason.LAUNCH_FAILED)),
            (MachineState.RUNNING, 16.0, (253, Reason.LOST)),
            (MachineState.DONE, 1000.0, None),
            (MachineState.MAINTENANCE, 1000.0, None),
        ],
    )
    def test_verdict_table(self, state, silent_for, expected) -> None:
        verdict = sweep_verdict(state, silent_for, 30.0, 15.0)
        assert (verdict[:2] if verdict else None) == expected


class TestKill:
    def test_connected_wrapper_gets_kill_frame(self, manager: RunManager) -> None:
        run, _ = start_run(manager)
        connection = RecordedConnection()
        manager.attach(run, run.machines["m1"], connection)
        signalled = manager.kill("backup")
        assert signalled == {run.run_id: ["m1", "m2"]}
        assert connection.frames == ['{"type":"kill"}']

    def test_kill_before_connect_is_sent_on_attach(self, manager: RunManager) -> None:
        run, _ = start_run(manager)
        manager.kill("backup")
        connection = RecordedConnection()
        manager.attach(run, run.machines["m2"], connection)
        assert connection.frames == ['{"type":"kill"}']

    def test_disconnected_running_minion_uses_fallback(
        self, store: RunStore, events: RecordedEvents
    ) -> None:
        fallback: list[tuple[str, list[str]]] = []
        manager = RunManager(
            store,
            events,
            {"backup": make_job()}.get,
            kill_fallback=lambda run, minions: fallback.append((run.run_id, minions)),
        )
        run, _ = start_run(manager)
        manager.on_frame(run, run.machines["m2"], Start(1, 42, "t"))
        manager.kill("backup")
        assert fallback == [(run.run_id, ["m2"])]

    def test_nothing_in_flight(self, manager: RunManager) -> None:
        assert manager.kill("backup") == {}


class RecordingObserver:
    def __init__(self) -> None:
        self.seen: list[tuple[str, ...]] = []

    def on_event(self, tag: str, data: dict[str, Any]) -> None:
        self.seen.append(("event", tag))

    def on_output(self, job: str, run_id: str, minion: str, data: str) -> None:
        self.seen.append(("output", minion, data))


class BrokenObserver:
    def on_event(self, tag: str, data: dict[str, Any]) -> None:
        raise RuntimeError("observer bug")

    def on_output(self, job: str, run_id: str, minion: str, data: str) -> None:
        raise RuntimeError("observer bug")


class TestObservers:
    def test_observer_sees_events_and_output_in_order(self, manager: RunManager) -> None:
        observer = RecordingObserver()
        manager.observers.append(observer)
        run, _ = start_run(manager, targets=("m1",))
        machine = run.machines["m1"]
        manager.on_frame(run, machine, Start(1, 42, "t"))
        manager.on_frame(run, machine, Output(2, "a\n"))
        manager.on_frame(run, machine, Complete(3, 0, "exit", "t", None))
        assert observer.seen == [
            ("event", "saltpeter/job/backup/start"),
            ("event", "saltpeter/job/backup/m1/start"),
            ("output", "m1", "a\n"),
            ("event", "saltpeter/job/backup/m1/complete"),
            ("event", "saltpeter/job/backup/complete"),
        ]

    def test_skipped_output_is_marked_for_followers_and_store(
        self, manager: RunManager, store: RunStore
    ) -> None:
        observer = RecordingObserver()
        manager.observers.append(observer)
        run, _ = start_run(manager, targets=("m1",))
        machine = run.machines["m1"]
        manager.on_frame(run, machine, Start(1, 42, "t"))
        manager.on_frame(run, machine, Output(2, "begin\n"))
        manager.on_frame(run, machine, Output(3, "end\n", skipped=5000))
        outputs = [entry[2] for entry in observer.seen if entry[0] == "output"]
        assert outputs == [
            "begin\n",
            "\n[saltpeter: 5000 bytes of output skipped on the minion]\nend\n",
        ]
        assert store.output(run.run_id, "m1") == (
            "begin\n\n[saltpeter: 5000 bytes of output dropped]\nend\n"
        )

    def test_sweep_note_is_streamed(self, manager: RunManager, clock: FakeClock) -> None:
        observer = RecordingObserver()
        manager.observers.append(observer)
        start_run(manager, targets=("m1",))
        clock.now += 31
        manager.sweep()
        outputs = [entry for entry in observer.seen if entry[0] == "output"]
        assert "did not respond" in outputs[0][2]

    def test_broken_observer_does_not_stop_the_run(
        self, manager: RunManager, store: RunStore, events: RecordedEvents
    ) -> None:
        manager.observers.append(BrokenObserver())
        run, _ = start_run(manager, targets=("m1",))
        complete(manager, run, "m1")
        assert store.run(run.run_id)["status"] == "succeeded"
        assert events.last("saltpeter/job/backup/complete")["success"] is True


class TestSignatureAndJobDelivery:
    def test_unsigned_hello_is_rejected(self, store: RunStore, events: RecordedEvents) -> None:
        checked: list[tuple[str, bytes, str | None]] = []

        def verify(machine: str, message: bytes, signature: str | None) -> bool:
            checked.append((machine, message, signature))
            return signature == "good"

        manager = RunManager(store, events, {"backup": make_job()}.get, verify_signature=verify)
        run, token = start_run(manager)
        with pytest.raises(ProtocolError) as caught:
            manager.authenticate(hello(run.run_id, token))
        assert caught.value.code == AUTH_FAILED
        assert checked[0][1] == f"saltpeter-run-credential:{run.run_id}:m1:{token}".encode()
        signed = Hello(1, run.run_id, "m1", token, "test", True, signature="good")
        assert manager.authenticate(signed)[1].machine == "m1"

    def test_job_is_not_sent_again_once_started(self, manager: RunManager) -> None:
        run, token = start_run(manager)
        found_run, machine = manager.authenticate(hello(run.run_id, token))
        assert manager.welcome(found_run, machine, need_job=True)["job"] is not None
        manager.on_frame(found_run, machine, Start(1, 42, "t"))
        assert manager.welcome(found_run, machine, need_job=True)["job"] is None
