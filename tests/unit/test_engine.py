"""The engine: dispatching due slots together, and taking a reload in slices.

The store is a real SQLite file. The bridge to Salt is a stand-in, because
target resolution and publishing need a running salt-master. The integration
tests send the same dispatches through a real master and minions.
"""

from __future__ import annotations

import asyncio
import fnmatch
import gc
import sqlite3
import sys
from collections.abc import Iterable
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from saltpeter import engine as engine_module
from saltpeter.config import ConfigSnapshot, Maintenance, Settings, parse_job
from saltpeter.engine import APPLY_SLICE, NEXT_RUN_WRITE_DELAY, Engine
from saltpeter.runs import Trigger
from saltpeter.scheduler import Scheduler
from saltpeter.store import RunStore

NOW = datetime(2026, 12, 4, 12, 0, tzinfo=timezone.utc)
SLOT = datetime(2026, 12, 4, 12, 5, tzinfo=timezone.utc)
MINIONS = ["db1", "db2", "web1"]


class StandInBridge:
    """Resolves and publishes as a master with MINIONS accepted would, recording each call."""

    def __init__(self, fail_publish: set[str] | None = None) -> None:
        self.resolved: list[tuple[str, str]] = []
        self.published: list[tuple[list[str], str, list[Any]]] = []
        self.events: list[tuple[str, dict[str, Any]]] = []
        self.fail_publish = fail_publish or set()
        self._jids = 0

    async def resolve_targets(self, targets: str, target_type: str) -> list[str]:
        self.resolved.append((targets, target_type))
        await asyncio.sleep(0)
        return [minion for minion in MINIONS if fnmatch.fnmatch(minion, targets)]

    def new_jid(self) -> str:
        self._jids += 1
        return f"2026120412050000{self._jids:04d}"

    async def publish(
        self,
        minions: Iterable[str],
        fun: str,
        arg: list[Any],
        kwarg: dict[str, Any] | None = None,
        jid: str = "",
    ) -> dict[str, Any]:
        if arg[1] in self.fail_publish:
            raise RuntimeError("the master did not accept the publish")
        self.published.append((list(minions), fun, arg))
        return {"jid": jid, "minions": list(minions)}

    def fire(self, tag: str, data: dict[str, Any]) -> None:
        self.events.append((tag, data))

    def verify_minion_signature(self, minion: str, message: bytes, signature: str | None) -> bool:
        return True


def make_job(name: str, targets: str = "*", **extra: Any):
    raw = {"min": "*/5", "hour": "*", "dom": "*", "mon": "*", "dow": "*", "command": "true"}
    raw.update(targets=targets, **extra)
    return parse_job(name, raw, Path("/etc/saltpeter/jobs.yaml"), Settings(), NOW)


@pytest.fixture
def engine(tmp_path: Path):
    engine = Engine({}, config_dir=str(tmp_path / "config"), store_path=str(tmp_path / "sp.db"))
    engine.bridge = StandInBridge()  # type: ignore[assignment]
    engine.jobs = {
        "backup": make_job("backup", "db*"),
        "report": make_job("report", "db*"),
        "web": make_job("web", "web*"),
        "nowhere": make_job("nowhere", "mail*"),
    }
    engine.store = RunStore(tmp_path / "sp.db")
    engine.store.sync_jobs({name: {} for name in engine.jobs})
    engine.manager = engine._new_manager(engine.store)
    engine._ready.set()
    yield engine
    engine.store.close()
    engine.executor.shutdown(wait=False)


def dispatch_many(engine: Engine, requests) -> list[dict[str, Any]]:
    return asyncio.run(engine.dispatch_many(requests))


class TestDispatchMany:
    def test_each_request_gets_its_own_answer(self, engine: Engine) -> None:
        results = dispatch_many(
            engine,
            [
                ("backup", Trigger.SCHEDULE, SLOT),
                ("ghost", Trigger.SCHEDULE, SLOT),
                ("web", Trigger.SCHEDULE, SLOT),
                ("nowhere", Trigger.SCHEDULE, SLOT),
            ],
        )
        assert [result["started"] for result in results] == [True, False, True, False]
        assert results[0]["targets"] == ["db1", "db2"]
        assert results[1]["reason"] == "unknown_job"
        assert results[2]["targets"] == ["web1"]
        assert results[3]["reason"] == "no_targets"
        published = {arg[1]: minions for minions, _, arg in engine.bridge.published}
        assert published == {"backup": ["db1", "db2"], "web": ["web1"]}

    def test_jobs_with_one_target_share_one_resolution(self, engine: Engine) -> None:
        dispatch_many(
            engine,
            [
                ("backup", Trigger.SCHEDULE, SLOT),
                ("report", Trigger.SCHEDULE, SLOT),
                ("web", Trigger.SCHEDULE, SLOT),
            ],
        )
        assert sorted(engine.bridge.resolved) == [("db*", "glob"), ("web*", "glob")]
        assert len(engine.store.running_runs()) == 3

    def test_taken_slot_not_started_again(self, engine: Engine) -> None:
        first = dispatch_many(engine, [("backup", Trigger.SCHEDULE, SLOT)])[0]
        engine.manager.runs.clear()
        again = dispatch_many(
            engine,
            [("backup", Trigger.SCHEDULE, SLOT), ("report", Trigger.SCHEDULE, SLOT)],
        )
        assert again[0] == {"started": False, "reason": "slot_taken"}
        assert again[1]["started"]
        assert [arg[0] for _, _, arg in engine.bridge.published] == [
            first["run_id"],
            again[1]["run_id"],
        ]

    def test_same_job_twice_in_batch_overlaps(self, engine: Engine) -> None:
        later = SLOT + timedelta(minutes=5)
        results = dispatch_many(
            engine,
            [("backup", Trigger.SCHEDULE, SLOT), ("backup", Trigger.SCHEDULE, later)],
        )
        assert results[0]["started"]
        assert results[1]["reason"] == "overlap"
        assert engine.store.slot_taken("backup", later)  # the skip is recorded
        assert len(engine.bridge.published) == 1

    def test_run_in_flight_blocks_next_slot(self, engine: Engine) -> None:
        dispatch_many(engine, [("backup", Trigger.SCHEDULE, SLOT)])
        later = SLOT + timedelta(minutes=5)
        result = dispatch_many(engine, [("backup", Trigger.SCHEDULE, later)])[0]
        assert result["reason"] == "overlap"
        assert result["running"] == [f"backup_{int(SLOT.timestamp())}"]

    def test_global_maintenance_skips_every_request(self, engine: Engine) -> None:
        engine.maintenance = Maintenance(global_=True)
        results = dispatch_many(
            engine,
            [("backup", Trigger.SCHEDULE, SLOT), ("web", Trigger.MANUAL, None)],
        )
        assert [result["reason"] for result in results] == ["maintenance", "maintenance"]
        assert engine.bridge.published == []

    def test_failed_publish_ends_only_its_run(self, engine: Engine) -> None:
        engine.bridge.fail_publish = {"backup"}
        results = dispatch_many(
            engine,
            [("backup", Trigger.SCHEDULE, SLOT), ("web", Trigger.SCHEDULE, SLOT)],
        )
        failed = engine.store.results(results[0]["run_id"])
        assert {row["retcode"] for row in failed.values()} == {255}
        assert engine.store.results(results[1]["run_id"])["web1"]["state"] == "pending"

    def test_lateness_is_observed_for_each_scheduled_launch(self, engine: Engine) -> None:
        dispatch_many(
            engine,
            [
                ("backup", Trigger.SCHEDULE, SLOT),
                ("web", Trigger.SCHEDULE, SLOT),
                ("report", Trigger.MANUAL, None),
            ],
        )
        (family,) = engine.metrics.dispatch_lateness.collect()
        counts = [sample.value for sample in family.samples if sample.name.endswith("_count")]
        assert counts == [2]


def stored_rows(engine: Engine) -> list[tuple[str, str]]:
    """Every row of the runs table, prepared ones included, as (run id, status)."""
    rows = engine.store._db.execute("SELECT run_id, status FROM runs ORDER BY run_id")
    return [(row[0], row[1]) for row in rows]


def prepare_then_dispatch(engine: Engine, slots, requests, between=None) -> list[dict[str, Any]]:
    async def scenario() -> list[dict[str, Any]]:
        await engine._prepare(slots)
        if between is not None:
            between()
        return await engine.dispatch_many(requests)

    return asyncio.run(scenario())


class TestPreparedRuns:
    def test_hidden_until_the_instant(self, engine: Engine) -> None:
        asyncio.run(engine._prepare([("backup", SLOT), ("web", SLOT), ("nowhere", SLOT)]))
        run_id = f"backup_{int(SLOT.timestamp())}"
        # Stored, but no read shows it and nothing is published yet.
        assert stored_rows(engine) == [
            (run_id, "prepared"),
            (f"web_{int(SLOT.timestamp())}", "prepared"),
        ]
        assert engine.store.runs() == []
        assert engine.store.run(run_id) is None
        assert engine.store.latest_run("backup") is None
        assert engine.store.latest_slots() == {}
        assert engine.store.jobs()["backup"].last_run_id is None
        assert engine.bridge.published == []
        assert engine.manager.runs == {}
        resolved = len(engine.bridge.resolved)
        activated_after = datetime.now(timezone.utc)

        results = asyncio.run(
            engine.dispatch_many(
                [
                    ("backup", Trigger.SCHEDULE, SLOT),
                    ("web", Trigger.SCHEDULE, SLOT),
                    ("nowhere", Trigger.SCHEDULE, SLOT),
                ]
            )
        )
        assert [result["started"] for result in results] == [True, True, False]
        assert results[0] == {
            "started": True,
            "run_id": run_id,
            "targets": ["db1", "db2"],
            "maintenance": [],
        }
        assert results[2]["reason"] == "no_targets"
        # The instant resolved only the target that was not prepared.
        assert engine.bridge.resolved[resolved:] == [("mail*", "glob")]
        assert {arg[1] for _, _, arg in engine.bridge.published} == {"backup", "web"}
        assert {row["run_id"] for row in engine.store.running_runs()} == {
            run_id,
            results[1]["run_id"],
        }
        # Started when it was activated, not when it was prepared.
        assert datetime.fromisoformat(engine.store.run(run_id)["started_at"]) >= activated_after
        assert engine.store.jobs()["backup"].last_run_id == run_id
        assert engine.store.latest_slots()["backup"] == SLOT
        started = [tag for tag, _ in engine.bridge.events if tag.endswith("/start")]
        assert len(started) == 2

    def test_old_definition_is_remade(self, engine: Engine) -> None:
        def redefine() -> None:
            engine.jobs["backup"] = make_job("backup", "db1", command="pg_dump all")

        result = prepare_then_dispatch(
            engine, [("backup", SLOT)], [("backup", Trigger.SCHEDULE, SLOT)], redefine
        )[0]
        assert result["targets"] == ["db1"]
        assert engine.manager.runs[result["run_id"]].job.command == "pg_dump all"
        assert stored_rows(engine) == [(result["run_id"], "running")]
        assert engine.bridge.published[0][0] == ["db1"]

    def test_new_maintenance_leaves_minion_out(self, engine: Engine) -> None:
        def maintain() -> None:
            engine.maintenance = Maintenance(machines=frozenset({"db2"}))

        result = prepare_then_dispatch(
            engine, [("backup", SLOT)], [("backup", Trigger.SCHEDULE, SLOT)], maintain
        )[0]
        assert result["targets"] == ["db1"]
        assert result["maintenance"] == ["db2"]
        assert engine.bridge.published[0][0] == ["db1"]

    def test_removed_job_leaves_no_run_behind(self, engine: Engine) -> None:
        def remove() -> None:
            del engine.jobs["backup"]

        results = prepare_then_dispatch(
            engine,
            [("backup", SLOT), ("web", SLOT)],
            [("web", Trigger.SCHEDULE, SLOT)],
            remove,
        )
        assert results[0]["started"]
        assert stored_rows(engine) == [(results[0]["run_id"], "running")]

    def test_overlap_at_the_instant_records_the_skip(self, engine: Engine) -> None:
        earlier = SLOT - timedelta(minutes=5)
        running = dispatch_many(engine, [("backup", Trigger.SCHEDULE, earlier)])[0]
        result = prepare_then_dispatch(
            engine, [("backup", SLOT)], [("backup", Trigger.SCHEDULE, SLOT)]
        )[0]
        assert result["reason"] == "overlap"
        assert result["running"] == [running["run_id"]]
        assert engine.store.latest_run("backup", include_skipped=True)["status"] == "skipped"
        assert [status for _, status in stored_rows(engine)] == ["running", "skipped"]
        assert len(engine.bridge.published) == 1

    def test_maintenance_at_the_instant_records_the_skip(self, engine: Engine) -> None:
        def maintain() -> None:
            engine.maintenance = Maintenance(global_=True)

        result = prepare_then_dispatch(
            engine, [("backup", SLOT)], [("backup", Trigger.SCHEDULE, SLOT)], maintain
        )[0]
        assert result["reason"] == "maintenance"
        assert [status for _, status in stored_rows(engine)] == ["skipped"]
        assert engine.bridge.published == []

    def test_dispatch_waits_for_a_preparation_under_way(self, engine: Engine) -> None:
        async def scenario() -> list[dict[str, Any]]:
            engine._on_prepare([("backup", SLOT)])
            return await engine.dispatch_many([("backup", Trigger.SCHEDULE, SLOT)])

        result = asyncio.run(scenario())[0]
        assert result["started"]
        # One resolution: the dispatch used the prepared run.
        assert engine.bridge.resolved == [("db*", "glob")]
        assert stored_rows(engine) == [(result["run_id"], "running")]

    def test_failed_drop_keeps_the_rest_of_the_batch(
        self, engine: Engine, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        real_drop = engine.store.drop_prepared

        def failing_drop(run_ids=None):
            raise sqlite3.OperationalError("disk I/O error")

        async def scenario() -> list[dict[str, Any]]:
            await engine._prepare([("backup", SLOT), ("web", SLOT)])
            engine.jobs["web"] = make_job("web", "web*", command="changed")
            monkeypatch.setattr(engine.store, "drop_prepared", failing_drop)
            results = await engine.dispatch_many(
                [
                    ("backup", Trigger.SCHEDULE, SLOT),
                    ("web", Trigger.SCHEDULE, SLOT),
                    ("report", Trigger.SCHEDULE, SLOT),
                ]
            )
            monkeypatch.setattr(engine.store, "drop_prepared", real_drop)
            return results

        results = asyncio.run(scenario())
        # The stale web run could not be deleted, so its slot stays taken.
        # The valid prepared run and the run that was not prepared start.
        assert [result.get("started") for result in results] == [True, False, True]
        assert results[1]["reason"] == "slot_taken"
        assert {arg[1] for _, _, arg in engine.bridge.published} == {"backup", "report"}
        # The deletion is tried again, here by the sweep's pass.
        engine._drop_expired_prepared()
        assert engine._undropped == []
        assert [status for _, status in stored_rows(engine)] == ["running", "running"]

    def test_failed_activation_makes_the_runs_again(
        self, engine: Engine, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        def failing_activation(runs):
            raise sqlite3.OperationalError("database is locked")

        async def scenario() -> list[dict[str, Any]]:
            await engine._prepare([("backup", SLOT)])
            monkeypatch.setattr(engine.store, "activate_runs", failing_activation)
            return await engine.dispatch_many(
                [("backup", Trigger.SCHEDULE, SLOT), ("web", Trigger.SCHEDULE, SLOT)]
            )

        results = asyncio.run(scenario())
        assert [result["started"] for result in results] == [True, True]
        assert {arg[1] for _, _, arg in engine.bridge.published} == {"backup", "web"}
        assert [status for _, status in stored_rows(engine)] == ["running", "running"]

    def test_expired_prepared_run_is_dropped(self, engine: Engine) -> None:
        # SLOT is in the past: the job was rescheduled after its preparation,
        # and no scheduled dispatch claimed the slot.
        asyncio.run(engine._prepare([("backup", SLOT)]))
        engine.jobs["backup"] = make_job("backup", "db*", min="1")
        asyncio.run(engine.dispatch_many([("report", Trigger.MANUAL, None)]))
        assert ("backup", SLOT) in engine._prepared
        engine._drop_expired_prepared()
        assert engine._prepared == {}
        assert [status for _, status in stored_rows(engine)] == ["running"]

    def test_slot_under_preparation_is_prepared_once(
        self, engine: Engine, caplog: pytest.LogCaptureFixture
    ) -> None:
        async def scenario() -> None:
            engine._on_prepare([("backup", SLOT), ("web", SLOT)])
            engine._on_prepare([("backup", SLOT), ("web", SLOT), ("report", SLOT)])
            await asyncio.gather(*engine._preparing)

        asyncio.run(scenario())
        assert not [record for record in caplog.records if record.levelname == "WARNING"]
        assert sorted(name for name, _ in engine._prepared) == ["backup", "report", "web"]

    def test_manual_run_does_not_wait_for_preparations(self, engine: Engine) -> None:
        plain = engine.bridge.resolve_targets
        release = asyncio.Event()

        async def held(targets: str, target_type: str) -> list[str]:
            if targets == "db*":
                await release.wait()
            return await plain(targets, target_type)

        engine.bridge.resolve_targets = held  # type: ignore[method-assign]

        async def scenario() -> tuple[dict[str, Any], bool]:
            engine._on_prepare([("backup", SLOT)])
            await asyncio.sleep(0)
            result = (await engine.dispatch_many([("web", Trigger.MANUAL, None)]))[0]
            still_preparing = bool(engine._preparing)
            release.set()
            await asyncio.gather(*engine._preparing)
            return result, still_preparing

        result, still_preparing = asyncio.run(asyncio.wait_for(scenario(), timeout=10))
        assert result["started"]
        assert still_preparing

    def test_engine_restart_drops_prepared_runs(self, engine: Engine, tmp_path: Path) -> None:
        asyncio.run(engine._prepare([("backup", SLOT)]))
        engine.store.close()
        engine.store = RunStore(tmp_path / "sp.db")
        assert stored_rows(engine) == []
        assert not engine.store.slot_taken("backup", SLOT)


class TestNextRuns:
    def test_stored_in_batches_after_a_reload(self, engine: Engine) -> None:
        engine.scheduler = Scheduler(lambda name, at: None, on_next=engine._on_next_fire)
        many = {f"job{index:04d}": make_job(f"job{index:04d}") for index in range(1200)}
        batches: list[int] = []
        original = engine.store.set_next_runs

        def recording(instants):
            batches.append(len(instants))
            original(instants)

        engine.store.set_next_runs = recording  # type: ignore[method-assign]

        async def reload_and_wait() -> None:
            await engine._apply_jobs(many)
            await asyncio.sleep(NEXT_RUN_WRITE_DELAY + 0.1)

        asyncio.run(reload_and_wait())
        assert sum(batches) == 1200
        assert max(batches) <= 500
        assert len(batches) >= 3
        rows = engine.store.jobs()
        assert all(rows[name].next_run for name in many)


class TestCatchUp:
    def test_missed_slots_run_oldest_first(self, engine: Engine) -> None:
        slots = [SLOT, SLOT + timedelta(minutes=5)]
        engine.jobs["backup"] = make_job("backup", "db*", allow_overlap=True)
        asyncio.run(engine._run_catch_up("backup", slots))
        rows = engine.store.runs("backup")
        assert sorted(row["scheduled_at"] for row in rows) == [slot.isoformat() for slot in slots]
        assert {row["trigger"] for row in rows} == {"catch_up"}
        assert len(engine.bridge.published) == 2


class TestFiring:
    def test_slots_fired_together_are_dispatched_together(self, engine: Engine) -> None:
        calls: list[list[tuple[str, Trigger, datetime | None]]] = []
        original = engine.dispatch_many

        async def recording(requests):
            calls.append(list(requests))
            return await original(requests)

        engine.dispatch_many = recording  # type: ignore[method-assign]

        async def fire_and_settle() -> None:
            for name in ("backup", "web", "report"):
                engine._on_fire(name, SLOT)
            for _ in range(20):
                await asyncio.sleep(0)
            await asyncio.gather(*engine._tasks)

        asyncio.run(fire_and_settle())
        assert [[name for name, _, _ in batch] for batch in calls] == [["backup", "web", "report"]]
        assert len(engine.store.running_runs()) == 3


class TestReload:
    def test_definitions_reach_store_scheduler_and_manager(self, engine: Engine) -> None:
        engine.scheduler = Scheduler(lambda name, at: None)
        engine.scheduler.update(engine.jobs)
        reloaded = {name: job for name, job in engine.jobs.items() if name != "nowhere"}
        reloaded["backup"] = make_job("backup", "db*", command="pg_dump all")
        reloaded["audit"] = make_job("audit", "web*", min="7")
        asyncio.run(engine._apply_jobs(reloaded))
        rows = engine.store.jobs()
        assert set(rows) == {"audit", "backup", "report", "web"}
        assert rows["backup"].definition["command"] == "pg_dump all"
        assert engine.scheduler.next_fire("nowhere") is None
        assert engine.scheduler.next_fire("audit").minute == 7
        # Runs look their job up at call time, so they see the reloaded one.
        assert engine.manager.job_lookup("backup").command == "pg_dump all"
        assert engine.manager.job_lookup("nowhere") is None

    def test_loop_runs_between_slices(self, engine: Engine) -> None:
        engine.scheduler = Scheduler(lambda name, at: None)
        many = {f"job{index:04d}": make_job(f"job{index:04d}") for index in range(APPLY_SLICE * 3)}
        seen_between: list[int] = []

        async def reload_and_watch() -> None:
            reload = asyncio.ensure_future(engine._apply_jobs(many))
            while not reload.done():
                seen_between.append(len(engine.scheduler._entries))
                await asyncio.sleep(0)

        asyncio.run(reload_and_watch())
        # Other work ran while the scheduler held only a part of the new jobs.
        assert any(0 < count < len(many) for count in seen_between)
        assert len(engine.scheduler._entries) == len(many)


class TestReloadGarbageCollection:
    def test_reload_leaves_no_young_objects(self, engine: Engine, tmp_path: Path) -> None:
        lines = []
        for number in range(300):
            lines += [f"job{number:03d}:", "  min: '*/5'", "  hour: '*'", "  dom: '*'"]
            lines += ["  mon: '*'", "  dow: '*'", "  targets: '*'", f"  command: echo {number}"]
        (tmp_path / "config").mkdir()
        (tmp_path / "config" / "jobs.yaml").write_text("\n".join(lines) + "\n")
        gc.collect()
        frozen_before = gc.get_freeze_count()
        try:
            snapshot = engine._reload()
            # A young-generation pass would have nothing of the load's to walk.
            young = gc.get_count()[0]
            frozen_after = gc.get_freeze_count()
            enabled = gc.isenabled()
        finally:
            gc.unfreeze()
        assert len(snapshot.jobs) == 300
        assert enabled
        assert young < gc.get_threshold()[0]
        assert frozen_after > frozen_before

    def test_reload_shortens_the_switch_interval_while_loading(
        self, engine: Engine, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        seen = []
        real_load = engine.loader.load

        def load() -> ConfigSnapshot:
            seen.append(sys.getswitchinterval())
            return real_load()

        monkeypatch.setattr(engine.loader, "load", load)
        before = sys.getswitchinterval()
        try:
            engine._reload()
        finally:
            gc.unfreeze()
        assert seen == [pytest.approx(engine_module.RELOAD_SWITCH_INTERVAL)]
        assert sys.getswitchinterval() == before

    def test_failed_reload_restores_the_switch_interval(
        self, engine: Engine, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        def load() -> ConfigSnapshot:
            raise RuntimeError("load failed")

        monkeypatch.setattr(engine.loader, "load", load)
        before = sys.getswitchinterval()
        try:
            with pytest.raises(RuntimeError, match="load failed"):
                engine._reload()
        finally:
            gc.unfreeze()
        assert sys.getswitchinterval() == before
        assert gc.isenabled()
