"""The scheduler: a heap of next fire times, one entry per job.

The loop sleeps until the earliest entry is due, fires every job due at that
instant, and then pushes each job's following fire time. It never scans all
jobs on a tick, so idle cost does not grow with the number of jobs. A reload
replaces the entries of changed jobs by bumping their generation; stale heap
entries are discarded when they surface.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

from saltpeter.runs import utcnow

if TYPE_CHECKING:
    from saltpeter.config import Job

log = logging.getLogger(__name__)

# Maximum sleep before the loop reads the wall clock again, so a
# step of the system clock delays a fire by at most this much.
MAX_SLEEP_SECONDS = 30.0
# A fire later than this has missed its slot's neighbours too: the scheduler
# skips forward instead of firing every slot it slept through.
CATCH_UP_SLACK = timedelta(seconds=1)
# asyncio's epoll wait rounds its timeout up to whole milliseconds, so a timed
# sleep ends up to about 1 ms late (CPython 3.11 selectors.EpollSelector). The
# loop sleeps until this long before a fire time and yields to other callbacks
# for the rest of the way.
WAKE_EARLY_SECONDS = 0.002
# The following fire times of the jobs just fired are computed this long
# after the fire, so the dispatch of a large batch does not wait for them
# (about 18 ms for 1,000 jobs in the firing benchmark). Fire times fall on
# whole seconds, so no other instant comes due in between.
RESCHEDULE_DELAY_SECONDS = 0.25


@dataclass(frozen=True)
class _Entry:
    fire_at: datetime
    generation: int


class Scheduler:
    """Fires ``on_fire(job_name, scheduled_at)`` at each job's scheduled instants."""

    def __init__(
        self,
        on_fire: Callable[[str, datetime], None],
        clock: Callable[[], datetime] = utcnow,
        on_next: Callable[[str, datetime | None], None] | None = None,
    ) -> None:
        self.on_fire = on_fire
        self.on_next = on_next
        self.clock = clock
        self._jobs: dict[str, Job] = {}
        self._entries: dict[str, _Entry] = {}
        self._heap: list[tuple[datetime, str, int]] = []
        self._generation = 0
        self._wake = asyncio.Event()

    def next_fire(self, name: str) -> datetime | None:
        entry = self._entries.get(name)
        return entry.fire_at if entry else None

    def update(self, jobs: Mapping[str, Job]) -> None:
        """Take a new set of job definitions; unchanged schedules keep their next fire time."""
        self.remove([name for name in self._jobs if name not in jobs])
        self.put(jobs)

    def remove(self, names: Iterable[str]) -> None:
        """Stop firing the jobs ``names``."""
        for name in names:
            if self._jobs.pop(name, None) is not None:
                self._entries.pop(name, None)
                log.info("job %s: removed from the schedule", name)

    def put(self, jobs: Mapping[str, Job]) -> None:
        """Add or replace the definitions of ``jobs``, leaving the other jobs alone.

        A job whose schedule is unchanged keeps its next fire time.
        """
        now = self.clock()
        for name, job in jobs.items():
            previous = self._jobs.get(name)
            self._jobs[name] = job
            if previous is not None and _same_schedule(previous, job) and name in self._entries:
                continue
            self._push(name, job.schedule.next_after(now))
        self._wake.set()

    def _push(self, name: str, fire_at: datetime | None) -> None:
        self._generation += 1
        if fire_at is None:
            self._entries.pop(name, None)
            log.info("job %s: the schedule has no further fire times", name)
        else:
            self._entries[name] = _Entry(fire_at, self._generation)
            heapq.heappush(self._heap, (fire_at, name, self._generation))
        if self.on_next is not None:
            self.on_next(name, fire_at)

    def _pop_due(self, now: datetime) -> list[tuple[str, datetime]]:
        """Remove and return the jobs due at ``now``; :meth:`_reschedule` puts them back."""
        due: list[tuple[str, datetime]] = []
        while self._heap and self._heap[0][0] <= now:
            fire_at, name, generation = heapq.heappop(self._heap)
            entry = self._entries.get(name)
            if entry is None or entry.generation != generation:
                continue
            del self._entries[name]
            due.append((name, fire_at))
        return due

    def _reschedule(self, fired: list[tuple[str, datetime]], now: datetime) -> None:
        """Push the following fire time of each job in ``fired``.

        A job removed since it fired stays removed, and a job that a reload
        put back since then keeps the fire time the reload gave it.
        """
        for name, fire_at in fired:
            job = self._jobs.get(name)
            if job is None or name in self._entries:
                continue
            following = job.schedule.next_after(fire_at)
            if following is not None and following < now - CATCH_UP_SLACK:
                skipped_to = job.schedule.next_after(now - CATCH_UP_SLACK)
                log.warning(
                    "job %s: the scheduler fell behind; slots from %s to %s are not fired",
                    name,
                    following.isoformat(),
                    skipped_to.isoformat() if skipped_to else "the end of the schedule",
                )
                following = skipped_to
            self._push(name, following)

    def seconds_until_next(self, now: datetime) -> float:
        while self._heap:
            fire_at, name, generation = self._heap[0]
            entry = self._entries.get(name)
            if entry is not None and entry.generation == generation:
                return max(0.0, (fire_at - now).total_seconds())
            heapq.heappop(self._heap)
        return MAX_SLEEP_SECONDS

    async def run(self) -> None:
        while True:
            now = self.clock()
            fired = self._pop_due(now)
            for name, fire_at in fired:
                try:
                    self.on_fire(name, fire_at)
                except Exception:
                    log.exception("job %s: firing the %s slot failed", name, fire_at.isoformat())
            if fired:
                await asyncio.sleep(RESCHEDULE_DELAY_SECONDS)
                self._reschedule(fired, now)
                continue
            delay = min(self.seconds_until_next(self.clock()), MAX_SLEEP_SECONDS)
            if delay > WAKE_EARLY_SECONDS:
                log.debug("scheduler: sleeping %.3f s until the next fire time", delay)
                self._wake.clear()
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), timeout=delay - WAKE_EARLY_SECONDS)
            elif delay > 0:
                await asyncio.sleep(0)


def _same_schedule(old: Job, new: Job) -> bool:
    return old.schedule == new.schedule
