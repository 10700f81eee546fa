"""The scheduler: a heap of next fire times, one entry per job.

The loop sleeps until the earliest entry is due, fires every job due at that
instant, and then pushes each job's following fire time. It never scans all
jobs on a tick, so idle cost does not grow with the number of jobs. A reload
replaces the entries of changed jobs by bumping their generation; stale heap
entries are discarded when they surface.

With ``on_prepare``, the jobs due within PREPARE_AHEAD_SECONDS are handed
over once before their instant, so the engine can do the work of their runs
that does not depend on the instant itself. They still fire at their instant,
unless a reload or a removal replaced their entry in between.
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
# How long before their instant the jobs due then are handed to on_prepare.
PREPARE_AHEAD_SECONDS = 0.5


@dataclass(frozen=True)
class _Entry:
    fire_at: datetime
    generation: int


class Scheduler:
    """Fires ``on_fire(job_name, scheduled_at)`` at each job's scheduled instants.

    ``on_prepare(slots)``, if given, receives the (job name, instant) of the
    jobs due within PREPARE_AHEAD_SECONDS, once, before they fire.
    """

    def __init__(
        self,
        on_fire: Callable[[str, datetime], None],
        clock: Callable[[], datetime] = utcnow,
        on_next: Callable[[str, datetime | None], None] | None = None,
        on_prepare: Callable[[list[tuple[str, datetime]]], None] | None = None,
    ) -> None:
        self.on_fire = on_fire
        self.on_next = on_next
        self.on_prepare = on_prepare
        self.clock = clock
        self._jobs: dict[str, Job] = {}
        self._entries: dict[str, _Entry] = {}
        self._heap: list[tuple[datetime, str, int]] = []
        # Entries taken off the heap and handed to on_prepare, sorted by fire
        # time. They fire from this list.
        self._staged: list[tuple[datetime, str, int]] = []
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

    def _current(self, name: str, generation: int) -> bool:
        entry = self._entries.get(name)
        return entry is not None and entry.generation == generation

    def _pop_due(self, now: datetime) -> list[tuple[str, datetime]]:
        """Remove and return the jobs due at ``now``; :meth:`_reschedule` puts them back."""
        due: list[tuple[str, datetime]] = []
        staged = self._staged
        popped = 0
        while popped < len(staged) and staged[popped][0] <= now:
            fire_at, name, generation = staged[popped]
            popped += 1
            if self._current(name, generation):
                del self._entries[name]
                due.append((name, fire_at))
        del staged[:popped]
        while self._heap and self._heap[0][0] <= now:
            fire_at, name, generation = heapq.heappop(self._heap)
            if self._current(name, generation):
                del self._entries[name]
                due.append((name, fire_at))
        return due

    def _stage(self, until: datetime) -> None:
        """Hand the jobs due by ``until`` to on_prepare and keep them staged."""
        staged: list[tuple[datetime, str, int]] = []
        while self._heap and self._heap[0][0] <= until:
            item = heapq.heappop(self._heap)
            if self._current(item[1], item[2]):
                staged.append(item)
        if not staged:
            return
        self._staged.extend(staged)
        self._staged.sort()
        assert self.on_prepare is not None
        try:
            self.on_prepare([(name, fire_at) for fire_at, name, _ in staged])
        except Exception:
            log.exception("preparing the runs of %d job(s) failed", len(staged))

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
        while self._staged and not self._current(self._staged[0][1], self._staged[0][2]):
            del self._staged[0]
        until = self._seconds_until_heap(now)
        if self._staged:
            return min(until, max(0.0, (self._staged[0][0] - now).total_seconds()))
        return until

    def _seconds_until_heap(self, now: datetime) -> float:
        while self._heap:
            fire_at, name, generation = self._heap[0]
            if self._current(name, generation):
                return max(0.0, (fire_at - now).total_seconds())
            heapq.heappop(self._heap)
        return MAX_SLEEP_SECONDS

    def _prepare(self, now: datetime) -> float:
        """Stage the jobs due within PREPARE_AHEAD_SECONDS of ``now``.

        Returns the seconds until the next job not yet staged comes that close.
        """
        if self.on_prepare is None:
            return MAX_SLEEP_SECONDS
        self._stage(now + timedelta(seconds=PREPARE_AHEAD_SECONDS))
        return max(0.0, self._seconds_until_heap(now) - PREPARE_AHEAD_SECONDS)

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
            now = self.clock()
            until_prepare = self._prepare(now)
            delay = min(self.seconds_until_next(now), MAX_SLEEP_SECONDS)
            if until_prepare < delay - WAKE_EARLY_SECONDS:
                # Wake to prepare, and sleep again towards the fire time after.
                delay = until_prepare + WAKE_EARLY_SECONDS
            if delay > WAKE_EARLY_SECONDS:
                log.debug("scheduler: sleeping %.3f s until the next fire time", delay)
                self._wake.clear()
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), timeout=delay - WAKE_EARLY_SECONDS)
            elif delay > 0:
                await asyncio.sleep(0)


def _same_schedule(old: Job, new: Job) -> bool:
    return old.schedule == new.schedule
