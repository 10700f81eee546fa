"""Unit tests of the scheduler's heap: what fires when, and when the next fire time is set."""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from saltpeter.config import Job, Settings, parse_job
from saltpeter.runs import utcnow
from saltpeter.scheduler import PREPARE_AHEAD_SECONDS, Scheduler

START = datetime(2026, 12, 5, 3, 0, 0, tzinfo=timezone.utc)


def make_job(name: str, **fields: Any) -> Job:
    raw = {"sec": "*", "min": "*", "hour": "*", "dom": "*", "mon": "*", "dow": "*"}
    raw.update(command="true", targets="*", **fields)
    return parse_job(name, raw, Path("/etc/saltpeter/jobs.yaml"), Settings(), START)


def scheduler_at(now: datetime, *jobs: Job) -> Scheduler:
    scheduler = Scheduler(lambda name, at: None, clock=lambda: now)
    scheduler.put({job.name: job for job in jobs})
    return scheduler


class TestPopAndReschedule:
    def test_fired_job_has_no_fire_time_until_rescheduled(self) -> None:
        scheduler = scheduler_at(START, make_job("every_second"))
        due_at = START + timedelta(seconds=1)
        assert scheduler.next_fire("every_second") == due_at

        fired = scheduler._pop_due(due_at)
        assert fired == [("every_second", due_at)]
        assert scheduler.next_fire("every_second") is None
        assert scheduler._pop_due(due_at) == []

        scheduler._reschedule(fired, due_at)
        assert scheduler.next_fire("every_second") == due_at + timedelta(seconds=1)

    def test_job_removed_meanwhile_stays_removed(self) -> None:
        scheduler = scheduler_at(START, make_job("gone"))
        fired = scheduler._pop_due(START + timedelta(seconds=1))
        scheduler.remove(["gone"])
        scheduler._reschedule(fired, START + timedelta(seconds=1))
        assert scheduler.next_fire("gone") is None
        assert scheduler.seconds_until_next(START) == 30.0

    def test_reload_meanwhile_keeps_its_fire_time(self) -> None:
        scheduler = scheduler_at(START, make_job("changed"))
        due_at = START + timedelta(seconds=1)
        fired = scheduler._pop_due(due_at)
        scheduler.clock = lambda: due_at
        scheduler.put({"changed": make_job("changed", sec="30")})
        scheduler._reschedule(fired, due_at)
        assert scheduler.next_fire("changed") == START + timedelta(seconds=30)

    def test_late_fire_skips_the_slots_it_slept_through(self) -> None:
        scheduler = scheduler_at(START, make_job("behind"))
        late = START + timedelta(seconds=10)
        fired = scheduler._pop_due(late)
        assert fired == [("behind", START + timedelta(seconds=1))]
        scheduler._reschedule(fired, late)
        assert scheduler.next_fire("behind") == late


class TestRunLoop:
    def test_dispatch_precedes_next_fire_time(self) -> None:
        order: list[str] = []

        async def scenario() -> None:
            loop = asyncio.get_running_loop()

            def on_fire(name: str, at: datetime) -> None:
                order.append("fired")
                # The engine dispatches a fired batch in a callback of its own.
                loop.call_soon(order.append, "dispatched")

            def on_next(name: str, at: datetime | None) -> None:
                order.append("next set")

            scheduler = Scheduler(on_fire, on_next=on_next)
            scheduler.put({"tick": make_job("tick")})
            task = asyncio.create_task(scheduler.run())
            try:
                while order.count("next set") < 3:
                    await asyncio.sleep(0.05)
            finally:
                task.cancel()

        asyncio.run(asyncio.wait_for(scenario(), timeout=30))
        # The first entry is the put; after it, each fire is dispatched before
        # the following fire time is computed.
        assert order[:7] == [
            "next set",
            "fired",
            "dispatched",
            "next set",
            "fired",
            "dispatched",
            "next set",
        ]


def staging_scheduler(now: datetime, prepared: list[list[tuple[str, datetime]]], *jobs: Job):
    scheduler = Scheduler(lambda name, at: None, clock=lambda: now, on_prepare=prepared.append)
    scheduler.put({job.name: job for job in jobs})
    return scheduler


class TestPrepare:
    def test_jobs_due_soon_are_handed_over_once(self) -> None:
        prepared: list[list[tuple[str, datetime]]] = []
        every_second, hourly = make_job("every_second"), make_job("hourly", sec="0", min="0")
        scheduler = staging_scheduler(START, prepared, every_second, hourly)
        due_at = START + timedelta(seconds=1)
        # Nothing is within the lead yet, so the result is when the next job will be.
        assert scheduler._prepare(START) == pytest.approx(1.0 - PREPARE_AHEAD_SECONDS)
        assert prepared == []

        almost = due_at - timedelta(seconds=PREPARE_AHEAD_SECONDS / 2)
        scheduler._prepare(almost)
        scheduler._prepare(almost)
        assert prepared == [[("every_second", due_at)]]
        # Staged, the job still counts as due at its instant, and fires then.
        assert scheduler.next_fire("every_second") == due_at
        assert scheduler.seconds_until_next(almost) == pytest.approx(PREPARE_AHEAD_SECONDS / 2)
        assert scheduler._pop_due(almost) == []
        assert scheduler._pop_due(due_at) == [("every_second", due_at)]

    def test_changed_job_fires_at_new_time(self) -> None:
        prepared: list[list[tuple[str, datetime]]] = []
        scheduler = staging_scheduler(START, prepared, make_job("changed"))
        due_at = START + timedelta(seconds=1)
        scheduler._prepare(due_at - timedelta(seconds=0.1))
        assert prepared == [[("changed", due_at)]]
        scheduler.put({"changed": make_job("changed", sec="30")})
        assert scheduler._pop_due(due_at) == []
        assert scheduler.next_fire("changed") == START + timedelta(seconds=30)

    def test_job_removed_after_staging_does_not_fire(self) -> None:
        prepared: list[list[tuple[str, datetime]]] = []
        scheduler = staging_scheduler(START, prepared, make_job("gone"), make_job("kept"))
        due_at = START + timedelta(seconds=1)
        scheduler._prepare(due_at - timedelta(seconds=0.1))
        scheduler.remove(["gone"])
        assert scheduler._pop_due(due_at) == [("kept", due_at)]

    def test_failing_preparation_still_fires(self) -> None:
        fired: list[str] = []

        def on_prepare(slots: list[tuple[str, datetime]]) -> None:
            raise RuntimeError("the store is gone")

        async def scenario() -> None:
            scheduler = Scheduler(lambda name, at: fired.append(name), on_prepare=on_prepare)
            scheduler.put({"tick": make_job("tick")})
            task = asyncio.create_task(scheduler.run())
            try:
                while len(fired) < 2:
                    await asyncio.sleep(0.05)
            finally:
                task.cancel()

        asyncio.run(asyncio.wait_for(scenario(), timeout=30))
        assert fired[:2] == ["tick", "tick"]

    def test_each_fire_is_prepared_before_its_instant(self) -> None:
        events: list[tuple[str, datetime, datetime]] = []

        async def scenario() -> None:
            scheduler = Scheduler(
                lambda name, at: events.append(("fired", at, utcnow())),
                on_prepare=lambda slots: events.extend(
                    ("prepared", at, utcnow()) for _, at in slots
                ),
            )
            scheduler.put({"tick": make_job("tick")})
            task = asyncio.create_task(scheduler.run())
            try:
                while sum(kind == "fired" for kind, _, _ in events) < 3:
                    await asyncio.sleep(0.05)
            finally:
                task.cancel()

        asyncio.run(asyncio.wait_for(scenario(), timeout=30))
        for position, (kind, slot, _) in enumerate(events):
            if kind != "fired":
                continue
            earlier = [when for kind, at, when in events[:position] if at == slot]
            # Handed over once, before the instant, and before the fire.
            assert len(earlier) == 1
            assert earlier[0] < slot
