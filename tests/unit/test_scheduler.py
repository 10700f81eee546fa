"""Unit tests of the scheduler's heap: what fires when, and when the next fire time is set."""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from saltpeter.config import Job, Settings, parse_job
from saltpeter.scheduler import Scheduler

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
