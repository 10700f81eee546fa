"""Run store: runs, results, the output cap and read-only access, on real SQLite files."""

from __future__ import annotations

import contextlib
import os
import resource
import signal
import sqlite3
import time
from datetime import datetime, timezone
from pathlib import Path

import pytest

from saltpeter import store as store_module
from saltpeter.runs import (
    MachineRun,
    MachineState,
    Reason,
    Run,
    RunStatus,
    SkipReason,
    Trigger,
)
from saltpeter.store import RunStore, StoreError

SLOT = datetime(2026, 12, 4, 12, 0, tzinfo=timezone.utc)


def make_run(run_id: str = "backup_1", scheduled_at: datetime | None = SLOT) -> Run:
    run = Run(
        run_id=run_id,
        job_name="backup",
        trigger=Trigger.SCHEDULE,
        scheduled_at=scheduled_at,
        started_at=SLOT,
        token_hash="0" * 64,
        jid="20261204120000000000",
    )
    run.machines["m1"] = MachineRun(run_id, "m1")
    run.machines["m2"] = MachineRun(run_id, "m2")
    return run


@pytest.fixture
def store(tmp_path: Path) -> RunStore:
    store = RunStore(tmp_path / "sp.db", max_output_bytes=100)
    store.sync_jobs({"backup": {"command": "true"}})
    yield store
    store.close()


class TestRuns:
    def test_insert_run_creates_pending_results(self, store: RunStore) -> None:
        store.insert_run(make_run(), ["m1", "m2"], [])
        results = store.results("backup_1")
        assert sorted(results) == ["m1", "m2"]
        assert results["m1"]["state"] == "pending"

    def test_insert_run_sets_last_run(self, store: RunStore) -> None:
        store.insert_run(make_run(), ["m1", "m2"], [])
        assert store.jobs()["backup"].last_run_id == "backup_1"

    def test_same_slot_twice_is_rejected(self, store: RunStore) -> None:
        store.insert_run(make_run("backup_1"), ["m1", "m2"], [])
        with pytest.raises(sqlite3.IntegrityError):
            store.insert_run(make_run("backup_2"), ["m1", "m2"], [])

    def test_manual_runs_share_no_slot(self, store: RunStore) -> None:
        store.insert_run(make_run("backup_1", scheduled_at=None), ["m1", "m2"], [])
        store.insert_run(make_run("backup_2", scheduled_at=None), ["m1", "m2"], [])
        assert len(store.runs("backup")) == 2

    def test_slot_taken_after_skip(self, store: RunStore) -> None:
        store.insert_skip(
            "backup_1_skipped", "backup", Trigger.SCHEDULE, SLOT, SLOT, SkipReason.OVERLAP
        )
        assert store.slot_taken("backup", SLOT)

    def test_latest_run_ignores_skips(self, store: RunStore) -> None:
        store.insert_run(make_run(), ["m1", "m2"], [])
        later = datetime(2026, 12, 4, 13, 0, tzinfo=timezone.utc)
        store.insert_skip("backup_2", "backup", Trigger.SCHEDULE, later, later, SkipReason.OVERLAP)
        assert store.latest_run("backup")["run_id"] == "backup_1"

    def test_update_machine_and_finish(self, store: RunStore) -> None:
        run = make_run()
        store.insert_run(run, ["m1", "m2"], [])
        machine = run.machines["m1"]
        machine.state = MachineState.DONE
        machine.retcode = 124
        machine.reason = Reason.TIMEOUT
        store.update_machine(machine)
        run.status = RunStatus.FAILED
        run.ended_at = SLOT
        store.finish_run(run)
        assert store.results("backup_1")["m1"]["retcode"] == 124
        assert store.run("backup_1")["status"] == "failed"
        assert store.running_runs() == []

    def test_machine_runs_round_trip(self, store: RunStore) -> None:
        run = make_run()
        store.insert_run(run, ["m1", "m2"], [])
        run.machines["m2"].state = MachineState.RUNNING
        run.machines["m2"].last_seq = 7
        store.update_machine(run.machines["m2"])
        loaded = {machine.machine: machine for machine in store.machine_runs("backup_1")}
        assert loaded["m2"].state is MachineState.RUNNING
        assert loaded["m2"].last_seq == 7

    def test_sync_jobs_removes_and_keeps_times(self, store: RunStore) -> None:
        store.set_next_run("backup", SLOT)
        store.sync_jobs({"backup": {"command": "false"}, "other": {}})
        store.sync_jobs({"backup": {"command": "false"}})
        jobs = store.jobs()
        assert sorted(jobs) == ["backup"]
        assert jobs["backup"].next_run == SLOT.isoformat()
        assert jobs["backup"].definition == {"command": "false"}

    def test_insert_runs_is_all_or_nothing(self, store: RunStore) -> None:
        store.insert_run(make_run("backup_1"), ["m1", "m2"], [])
        later = datetime(2026, 12, 4, 13, 0, tzinfo=timezone.utc)
        with pytest.raises(sqlite3.IntegrityError):
            store.insert_runs(
                [
                    (make_run("backup_2", scheduled_at=later), ["m1", "m2"], []),
                    (make_run("backup_3"), ["m1", "m2"], []),
                ]
            )
        assert store.run("backup_2") is None
        store.insert_runs([(make_run("backup_2", scheduled_at=later), ["m1", "m2"], [])])
        assert store.results("backup_2")["m2"]["state"] == "pending"
        assert store.jobs()["backup"].last_run_id == "backup_2"

    def test_slots_and_run_ids_taken_in_one_query(self, store: RunStore) -> None:
        store.insert_run(make_run("backup_1"), ["m1", "m2"], [])
        later = datetime(2026, 12, 4, 13, 0, tzinfo=timezone.utc)
        asked = [("backup", SLOT), ("backup", later), ("report", SLOT)]
        assert store.slots_taken(asked) == {("backup", SLOT)}
        assert store.run_ids_taken(["backup_1", "backup_2"]) == {"backup_1"}
        many = [f"run_{index}" for index in range(1200)] + ["backup_1"]
        assert store.run_ids_taken(many) == {"backup_1"}


class TestPreparedRuns:
    def test_hidden_from_reads_until_activated(self, store: RunStore) -> None:
        run = make_run()
        store.insert_runs([(run, ["m1", "m2"], [])], prepared=True)
        assert store.run("backup_1") is None
        assert store.runs() == []
        assert store.runs("backup") == []
        assert store.running_runs() == []
        assert store.latest_run("backup", include_skipped=True) is None
        assert store.latest_slots() == {}
        assert store.jobs()["backup"].last_run_id is None
        # The slot is held all the same.
        assert store.slot_taken("backup", SLOT)
        with pytest.raises(sqlite3.IntegrityError):
            store.insert_run(make_run("backup_2"), ["m1"], [])

        run.started_at = SLOT.replace(second=1)
        store.activate_runs([run])
        row = store.run("backup_1")
        assert row["status"] == "running"
        assert row["started_at"] == SLOT.replace(second=1).isoformat()
        assert store.jobs()["backup"].last_run_id == "backup_1"
        assert sorted(store.results("backup_1")) == ["m1", "m2"]

    def test_activating_unprepared_run_fails(self, store: RunStore) -> None:
        prepared, running = make_run("backup_1"), make_run("backup_2", SLOT.replace(minute=1))
        store.insert_runs([(prepared, ["m1"], [])], prepared=True)
        store.insert_runs([(running, ["m1"], [])])
        with pytest.raises(StoreError, match="1 of 2"):
            store.activate_runs([prepared, running])
        assert store.run("backup_1") is None
        assert store.jobs()["backup"].last_run_id == "backup_2"

    def test_dropped_with_their_results(self, store: RunStore) -> None:
        store.insert_runs([(make_run("backup_1"), ["m1", "m2"], [])], prepared=True)
        store.insert_runs([(make_run("backup_2", SLOT.replace(minute=1)), ["m1"], [])])
        assert store.drop_prepared(["backup_1", "backup_2", "absent"]) == 1
        assert not store.slot_taken("backup", SLOT)
        assert sorted(store.results("backup_2")) == ["m1", "m2"]
        assert store._db.execute("SELECT COUNT(*) FROM results").fetchone()[0] == 2
        assert store.run("backup_2")["status"] == "running"

    def test_drop_survives_a_lost_batch(self, store: RunStore) -> None:
        store.insert_runs([(make_run("backup_1"), ["m1", "m2"], [])], prepared=True)
        store.begin_batch()
        store.drop_prepared(["backup_1"])
        store.fail_batch(sqlite3.OperationalError("disk I/O error"))
        assert not store.slot_taken("backup", SLOT)

    def test_reopening_the_store_drops_them(self, tmp_path: Path) -> None:
        with contextlib.closing(RunStore(tmp_path / "sp.db")) as store:
            store.insert_runs([(make_run("backup_1"), ["m1", "m2"], [])], prepared=True)
            assert store.slot_taken("backup", SLOT)
        with contextlib.closing(RunStore(tmp_path / "sp.db")) as reopened:
            assert not reopened.slot_taken("backup", SLOT)
            assert reopened._db.execute("SELECT COUNT(*) FROM results").fetchone()[0] == 0

    def test_prune_leaves_them_alone(self, store: RunStore) -> None:
        store.insert_runs([(make_run("backup_1"), ["m1"], [])], prepared=True)
        assert store.prune(SLOT.replace(year=2100), keep_per_job=0) == 0
        assert store.slot_taken("backup", SLOT)


class TestOutputCap:
    def test_small_output_is_kept_whole(self, store: RunStore) -> None:
        store.insert_run(make_run(), ["m1", "m2"], [])
        store.append_output("backup_1", "m1", 2, "hello\n")
        store.append_output("backup_1", "m1", 3, "world\n")
        assert store.output("backup_1", "m1") == "hello\nworld\n"

    def test_append_records_last_seq(self, store: RunStore) -> None:
        store.insert_run(make_run(), ["m1", "m2"], [])
        store.append_output("backup_1", "m1", 5, "x")
        assert store.results("backup_1")["m1"]["last_seq"] == 5

    def test_long_output_keeps_head_and_tail(self, store: RunStore) -> None:
        store.insert_run(make_run(), ["m1", "m2"], [])
        lines = [f"line {number:03d}\n" for number in range(100)]
        for seq, line in enumerate(lines, start=2):
            store.append_output("backup_1", "m1", seq, line)
        output = store.output("backup_1", "m1")
        head, marker, tail = output.partition("\n[saltpeter: ")
        assert head.startswith("line 000\nline 001\n")
        assert tail.endswith("line 099\n")
        assert "bytes of output dropped]" in marker + tail

    def test_kept_bytes_stay_within_cap(self, store: RunStore) -> None:
        store.insert_run(make_run(), ["m1", "m2"], [])
        for seq in range(2, 300):
            store.append_output("backup_1", "m1", seq, f"chunk {seq}\n")
        row = store._db.execute(
            "SELECT head_bytes + tail_bytes, dropped_bytes FROM results WHERE machine = 'm1'"
        ).fetchone()
        assert row[0] <= 100
        total = sum(len(f"chunk {seq}\n") for seq in range(2, 300))
        assert row[0] + row[1] == total

    def test_single_huge_chunk_is_cut(self, store: RunStore) -> None:
        store.insert_run(make_run(), ["m1", "m2"], [])
        store.append_output("backup_1", "m1", 2, "a" * 60 + "b" * 1000 + "c" * 40)
        output = store.output("backup_1", "m1")
        assert output.startswith("a" * 50)
        assert output.endswith("b" * 10 + "c" * 40)

    def test_multibyte_characters_are_not_split(self, store: RunStore) -> None:
        store.insert_run(make_run(), ["m1", "m2"], [])
        for seq in range(2, 60):
            store.append_output("backup_1", "m1", seq, "é€😀")
        output = store.output("backup_1", "m1")
        assert "\ufffd" not in output
        assert output.encode("utf-8").decode("utf-8") == output

    def test_head_takes_nothing_after_output_went_past_it(self, store: RunStore) -> None:
        store.insert_run(make_run(), ["m1", "m2"], [])
        # 49 bytes leave one byte of head room, too little for the 2-byte é.
        store.append_output("backup_1", "m1", 2, "a" * 49)
        store.append_output("backup_1", "m1", 3, "é-after")
        store.append_output("backup_1", "m1", 4, "z")
        assert store.output("backup_1", "m1") == "a" * 49 + "é-after" + "z"

    def test_skipped_output_replaces_the_tail(self, store: RunStore) -> None:
        store.insert_run(make_run(), ["m1", "m2"], [])
        store.append_output("backup_1", "m1", 2, "h" * 50)
        store.append_output("backup_1", "m1", 3, "old tail ")
        store.append_output("backup_1", "m1", 4, "new tail", skipped=1000)
        store.append_output("backup_1", "m1", 5, " goes on")
        # The old tail does not adjoin the new one, so it counts as dropped.
        assert store.output("backup_1", "m1") == (
            "h" * 50 + "\n[saltpeter: 1009 bytes of output dropped]\nnew tail goes on"
        )
        row = store._db.execute(
            "SELECT head_bytes, tail_bytes, dropped_bytes, last_seq FROM results "
            "WHERE machine = 'm1'"
        ).fetchone()
        assert tuple(row) == (50, 16, 1009, 5)

    def test_skip_before_the_head_is_full_closes_it(self, store: RunStore) -> None:
        store.insert_run(make_run(), ["m1", "m2"], [])
        store.append_output("backup_1", "m1", 2, "start ")
        store.append_output("backup_1", "m1", 3, "end", skipped=7)
        assert store.output("backup_1", "m1") == (
            "start \n[saltpeter: 7 bytes of output dropped]\nend"
        )

    def test_skipped_counts_survive_a_reopen(self, tmp_path: Path) -> None:
        path = tmp_path / "sp.db"
        first = RunStore(path, max_output_bytes=100)
        first.insert_run(make_run(), ["m1"], [])
        first.append_output("backup_1", "m1", 2, "h" * 50)
        first.append_output("backup_1", "m1", 3, "tail", skipped=10)
        first.close()
        second = RunStore(path, max_output_bytes=100)
        second.append_output("backup_1", "m1", 4, "!")
        assert second.output("backup_1", "m1") == (
            "h" * 50 + "\n[saltpeter: 10 bytes of output dropped]\ntail!"
        )
        second.close()

    def test_outputs_are_separate_per_minion(self, store: RunStore) -> None:
        store.insert_run(make_run(), ["m1", "m2"], [])
        store.append_output("backup_1", "m1", 2, "one")
        store.append_output("backup_1", "m2", 2, "two")
        assert store.output("backup_1", "m2") == "two"


def finished_run(store: RunStore, run_id: str, started_at: datetime, output: str = "") -> None:
    """Store a run of job backup that ran on m1 and m2 and has ended."""
    run = make_run(run_id, scheduled_at=started_at)
    run.started_at = started_at
    store.insert_run(run, ["m1", "m2"], [])
    if output:
        store.append_output(run_id, "m1", 1, output)
    run.status = RunStatus.SUCCEEDED
    run.ended_at = started_at
    store.finish_run(run)


class TestPrune:
    @pytest.fixture
    def big_store(self, tmp_path: Path) -> RunStore:
        store = RunStore(tmp_path / "sp.db", max_output_bytes=1 << 20)
        store.sync_jobs({"backup": {"command": "true"}})
        yield store
        store.close()

    def test_keeps_newest_runs_per_job(self, store: RunStore) -> None:
        for minute in range(5):
            finished_run(store, f"backup_{minute}", SLOT.replace(minute=minute))
        deleted = store.prune(SLOT.replace(year=2000), keep_per_job=2)
        assert deleted == 3
        assert [row["run_id"] for row in store.runs("backup")] == ["backup_4", "backup_3"]
        assert store.results("backup_0") == {}

    def test_deletes_runs_older_than_cutoff(self, store: RunStore) -> None:
        finished_run(store, "backup_old", SLOT.replace(day=1))
        finished_run(store, "backup_new", SLOT)
        assert store.prune(SLOT.replace(day=2), keep_per_job=1000) == 1
        assert store.run("backup_old") is None
        assert store.run("backup_new") is not None

    def test_never_deletes_runs_in_flight(self, store: RunStore) -> None:
        store.insert_run(make_run("backup_running", scheduled_at=SLOT.replace(day=1)), ["m1"], [])
        assert store.prune(SLOT, keep_per_job=1) == 0
        assert store.run("backup_running")["status"] == "running"

    def test_deletes_output_with_run(self, store: RunStore) -> None:
        finished_run(store, "backup_old", SLOT.replace(day=1), output="old output\n")
        store.prune(SLOT, keep_per_job=1000)
        assert store.output("backup_old", "m1") == ""

    def test_file_size_stays_bounded(self, big_store: RunStore) -> None:
        """Runs added and pruned in cycles reuse the freed pages, so the file stops growing."""
        sizes = []
        chunk = "x" * 4000 + "\n"
        for cycle in range(8):
            for index in range(40):
                started = SLOT.replace(day=1 + cycle, minute=index)
                finished_run(big_store, f"backup_{cycle}_{index}", started, output=chunk * 10)
            big_store.prune(SLOT.replace(year=2000), keep_per_job=20)
            # What the store's checkpoint thread does every quarter second.
            # The thread's own pass may hold the checkpoint lock a moment.
            with contextlib.closing(sqlite3.connect(big_store.path)) as checkpointer:
                for _ in range(200):
                    busy = checkpointer.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0]
                    if not busy:
                        break
                    time.sleep(0.01)
            sizes.append(big_store.size_bytes())
        assert len(big_store.runs("backup", limit=100)) == 20
        assert max(sizes[3:]) <= sizes[2] * 1.1, sizes


class TestCheckpoint:
    """The checkpoint thread drops the log's copied frames from the page cache."""

    SMALL_LIMIT = 16 * 1024

    def grow_log(
        self, store: RunStore, monkeypatch: pytest.MonkeyPatch
    ) -> list[tuple[int, int, int]]:
        """Write 40 runs to the store's log; return the list each posix_fadvise call goes to."""
        calls: list[tuple[int, int, int]] = []

        def advise(descriptor: int, offset: int, length: int, advice: int) -> None:
            calls.append((offset, length, advice))

        monkeypatch.setattr(store_module.os, "posix_fadvise", advise)
        for minute in range(40):
            finished_run(store, f"backup_{minute}", SLOT.replace(minute=minute), output="x" * 90)
        return calls

    def checkpoint(self, store: RunStore) -> None:
        """Run one pass of the store's checkpoint thread, here, on a connection of its own."""
        with contextlib.closing(sqlite3.connect(store.path, isolation_level=None)) as db:
            store._checkpointer._checkpoint(db)

    def test_copied_frames_are_dropped_past_the_limit(
        self, store: RunStore, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setattr(store_module, "WAL_TRUNCATE_BYTES", self.SMALL_LIMIT)
        calls = self.grow_log(store, monkeypatch)
        log_bytes = Path(f"{store.path}-wal").stat().st_size
        self.checkpoint(store)
        assert calls
        for offset, length, advice in calls:
            assert advice == os.POSIX_FADV_DONTNEED
            # The bytes the log starts over on stay cached.
            assert offset >= self.SMALL_LIMIT
            # Up to the end of the frames copied, never past the end of the log.
            end = offset + length
            assert end <= log_bytes
            assert (end - 32) % (4096 + 24) == 0

    def test_copied_frames_are_dropped_once(
        self, store: RunStore, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setattr(store_module, "WAL_TRUNCATE_BYTES", self.SMALL_LIMIT)
        calls = self.grow_log(store, monkeypatch)
        self.checkpoint(store)
        dropped = len(calls)
        self.checkpoint(store)
        assert dropped >= 1
        assert len(calls) == dropped

    def test_small_log_stays_cached(self, store: RunStore, monkeypatch: pytest.MonkeyPatch) -> None:
        calls = self.grow_log(store, monkeypatch)
        self.checkpoint(store)
        assert calls == []


def committed_output(store: RunStore, run_id: str, machine: str) -> str:
    """The output another connection reads: only what the store has committed."""
    with contextlib.closing(RunStore(store.path, readonly=True)) as reader:
        return reader.output(run_id, machine)


class TestBatch:
    """Writes held in one transaction, and callbacks that wait for its commit."""

    def test_held_writes_are_committed_together(self, store: RunStore) -> None:
        store.insert_run(make_run(), ["m1", "m2"], [])
        acked: list[int] = []
        assert store.begin_batch() is True
        assert store.begin_batch() is False
        store.append_output("backup_1", "m1", 1, "one ")
        store.after_commit(lambda: acked.append(1))
        store.append_output("backup_1", "m1", 2, "two")
        store.after_commit(lambda: acked.append(2))
        # The engine's own connection reads the uncommitted writes, and no other does.
        assert store.output("backup_1", "m1") == "one two"
        assert committed_output(store, "backup_1", "m1") == ""
        assert acked == []
        store.commit_batch()
        assert acked == [1, 2]
        assert committed_output(store, "backup_1", "m1") == "one two"
        store.commit_batch()  # with no batch open, this does nothing
        assert acked == [1, 2]

    def test_callback_without_batch_runs_at_once(self, store: RunStore) -> None:
        acked: list[int] = []
        store.after_commit(lambda: acked.append(1))
        assert acked == [1]

    def test_new_runs_commit_batch_first(self, store: RunStore) -> None:
        store.insert_run(make_run(), ["m1", "m2"], [])
        acked: list[int] = []
        store.begin_batch()
        store.append_output("backup_1", "m1", 1, "held")
        store.after_commit(lambda: acked.append(1))
        store.insert_run(make_run("backup_2", SLOT.replace(minute=1)), ["m1"], [])
        # A new run is stored before it is published, so both are committed.
        assert acked == [1]
        with contextlib.closing(RunStore(store.path, readonly=True)) as reader:
            assert reader.run("backup_2") is not None
            assert reader.output("backup_1", "m1") == "held"

    def test_failed_write_undoes_only_itself(self, store: RunStore) -> None:
        store.insert_run(make_run(), ["m1", "m2"], [])
        store.begin_batch()
        store.append_output("backup_1", "m1", 1, "kept")
        with pytest.raises(sqlite3.IntegrityError), store._transaction():
            store._db.execute(
                "INSERT INTO output (run_id, machine, part, data) VALUES (?, ?, 'head', ?)",
                ("backup_1", "m2", "undone"),
            )
            store._db.execute("INSERT INTO runs (run_id) VALUES ('broken')")
        store.commit_batch()
        assert committed_output(store, "backup_1", "m1") == "kept"
        assert committed_output(store, "backup_1", "m2") == ""

    @pytest.fixture
    def roomy_store(self, tmp_path: Path) -> RunStore:
        store = RunStore(tmp_path / "roomy.db", max_output_bytes=1 << 20)
        store.sync_jobs({"backup": {"command": "true"}})
        store.insert_run(make_run(), ["m1", "m2"], [])
        yield store
        store.close()

    def test_full_disk_loses_the_whole_batch(self, roomy_store: RunStore) -> None:
        store = roomy_store
        events: list[str] = []
        store.begin_batch()
        store.append_output("backup_1", "m1", 1, "m1 line\n")
        store.after_commit(lambda: events.append("m1 acked"), lambda: events.append("m1 lost"))
        # No page may be added: SQLite fails the write with SQLITE_FULL and
        # rolls the whole transaction back, as on a full disk.
        pages = store._db.execute("PRAGMA page_count").fetchone()[0]
        store._db.execute(f"PRAGMA max_page_count={pages}")
        with pytest.raises(sqlite3.OperationalError, match="full"):
            store.append_output("backup_1", "m2", 1, "y" * 200_000)
        assert events == ["m1 lost"]
        store._db.execute("PRAGMA max_page_count=1073741823")
        # The batch is closed: a later write is committed on its own.
        store.append_output("backup_1", "m1", 1, "sent again\n")
        store.commit_batch()
        assert events == ["m1 lost"]
        assert committed_output(store, "backup_1", "m1") == "sent again\n"
        assert committed_output(store, "backup_1", "m2") == ""

    def test_failed_commit_calls_on_lost(self, roomy_store: RunStore) -> None:
        store = roomy_store
        events: list[str] = []
        store.begin_batch()
        store.append_output("backup_1", "m1", 1, "x" * 200_000)
        store.after_commit(lambda: events.append("acked"), lambda: events.append("lost"))
        # The log file may not grow, so the commit cannot write its frames.
        soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
        previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (8192, hard))
        try:
            store.commit_batch()
        finally:
            resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
            signal.signal(signal.SIGXFSZ, previous)
        assert events == ["lost"]
        assert not store._db.in_transaction
        assert committed_output(store, "backup_1", "m1") == ""
        # The output counters are reread from the store.
        store.append_output("backup_1", "m1", 1, "again")
        assert store.output("backup_1", "m1") == "again"

    def test_close_commits_held_writes(self, tmp_path: Path) -> None:
        store = RunStore(tmp_path / "sp.db")
        store.sync_jobs({"backup": {"command": "true"}})
        store.insert_run(make_run(), ["m1", "m2"], [])
        store.begin_batch()
        store.append_output("backup_1", "m1", 1, "last words")
        store.close()
        with contextlib.closing(RunStore(tmp_path / "sp.db", readonly=True)) as reader:
            assert reader.output("backup_1", "m1") == "last words"


class TestLogSize:
    """The write-ahead log starts over while the engine writes without pause."""

    def test_log_stays_bounded_under_constant_writes(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        limit = 256 * 1024
        monkeypatch.setattr(store_module, "WAL_SIZE_LIMIT_BYTES", limit)
        monkeypatch.setattr(store_module, "WAL_TRUNCATE_BYTES", 4 * limit)
        monkeypatch.setattr(store_module, "CHECKPOINT_SECONDS", 0.01)
        monkeypatch.setattr(store_module, "CATCH_UP_SECONDS", 0.001)
        # This writer outruns any pass, so the engine's copy starts after a few
        # passes rather than once few frames were left.
        monkeypatch.setattr(store_module, "CATCH_UP_PASSES", 3)

        store = RunStore(tmp_path / "sp.db", max_output_bytes=1 << 30)
        try:
            store.sync_jobs({"backup": {"command": "true"}})
            store.insert_run(make_run(), ["m1", "m2"], [])
            wal = Path(f"{store.path}-wal")

            chunk = "x" * 8000
            written = 0
            seq = 0
            # Writes back to back, with no pause for the checkpoint thread to
            # copy the whole log in, for 40 times the limit and half a second.
            deadline = time.monotonic() + 0.5
            while written < 40 * limit or time.monotonic() < deadline:
                seq += 1
                store.append_output("backup_1", "m1", seq, chunk)
                store.append_output("backup_1", "m2", seq, chunk)
                written += 2 * len(chunk)

            size = wal.stat().st_size
            # The log header's checkpoint sequence number counts the times
            # the log started over.
            restarts = int.from_bytes(wal.read_bytes()[12:16], "big")
        finally:
            store.close()

        # Without its own checkpoint the engine's log never starts over, and
        # keeps every write made.
        assert restarts >= 5, (restarts, size, written)
        assert size < written / 2, (restarts, size, written)

    def test_catch_up_after_full_copy(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setattr(store_module, "WAL_SIZE_LIMIT_BYTES", 16 * 1024)
        store = RunStore(tmp_path / "sp.db")
        try:
            store.sync_jobs({"backup": {"command": "true"}})
            store._checkpointer.stop()
            store._checkpointer.catch_up_requested = False
            store.insert_run(make_run(), ["m1", "m2"], [])
            for seq in range(1, 40):
                store.append_output("backup_1", "m1", seq, "y" * 1000)
            assert store._checkpointer.catch_up_requested is False
            with contextlib.closing(sqlite3.connect(store.path, isolation_level=None)) as db:
                assert store._checkpointer._checkpoint(db) is True
            assert store._checkpointer.catch_up_requested is True
            with contextlib.closing(sqlite3.connect(store.path, isolation_level=None)) as db:
                # With nothing new to copy, the thread neither hurries nor requests again.
                store._checkpointer.catch_up_requested = False
                assert store._checkpointer._checkpoint(db) is False
                assert store._checkpointer.catch_up_requested is False
                store._checkpointer.catch_up_requested = True
            store.append_output("backup_1", "m1", 40, "z")
            # The engine's connection copied the last frames, so its next
            # write starts the log over from its first frame.
            assert store._checkpointer.catch_up_requested is False
            store.append_output("backup_1", "m1", 41, "z")
            with contextlib.closing(sqlite3.connect(store.path, isolation_level=None)) as db:
                frames = db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()[1]
            assert frames < 10, frames
        finally:
            store.close()


class TestReadOnly:
    def test_missing_store_says_how_to_create_it(self, tmp_path: Path) -> None:
        with pytest.raises(StoreError, match="engine creates it"):
            RunStore(tmp_path / "absent.db", readonly=True)

    def test_reader_sees_writer_rows(self, store: RunStore) -> None:
        store.insert_run(make_run(), ["m1", "m2"], [])
        reader = RunStore(store.path, readonly=True)
        try:
            assert reader.run("backup_1")["job"] == "backup"
        finally:
            reader.close()

    def test_reader_cannot_write(self, store: RunStore) -> None:
        reader = RunStore(store.path, readonly=True)
        try:
            with pytest.raises(sqlite3.OperationalError):
                reader.sync_jobs({})
        finally:
            reader.close()

    def test_store_file_is_private(self, store: RunStore) -> None:
        assert store.path.stat().st_mode & 0o077 == 0
