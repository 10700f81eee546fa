"""Slots that passed while the engine was down, and what to do with them.

:func:`plan_catch_up` is pure: from a job's schedule, the newest slot the
engine handled before it stopped, and the current instant, it lists which
slots to run now and which to record as missed, following the job's
``catch_up`` policy.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from saltpeter.schedule import CronSchedule

# Missed slots recorded individually per job and engine start; older ones are
# only counted, so a job that fires every second does not flood the store
# after a long outage.
MAX_RECORDED_MISSED = 1000
# Slots enumerated one by one from the last handled slot before the search
# switches to finding the most recent slots only.
MAX_SCANNED_SLOTS = 5000


@dataclass
class CatchUpPlan:
    run: list[datetime] = field(default_factory=list)  # oldest first
    missed: list[datetime] = field(default_factory=list)  # oldest first, at most the bound
    missed_not_recorded: int = 0  # further missed slots, older than those in ``missed``
    count_is_estimate: bool = False  # True when more slots passed than were enumerated

    @property
    def total_missed(self) -> int:
        return len(self.missed) + self.missed_not_recorded


def passed_slots(
    schedule: CronSchedule, after: datetime, until: datetime, keep: int
) -> tuple[list[datetime], int, bool]:
    """Return up to ``keep`` of the newest slots in (after, until], the number of
    older ones, and whether that number is a lower bound.

    Slots are enumerated from ``after`` while there are at most
    MAX_SCANNED_SLOTS of them. Past that, the window before ``until`` is
    doubled until it holds ``keep`` slots, so an outage of a year costs a few
    dozen schedule evaluations, not millions.
    """
    slots: list[datetime] = []
    instant = schedule.next_after(after)
    while instant is not None and instant <= until and len(slots) < MAX_SCANNED_SLOTS:
        slots.append(instant)
        instant = schedule.next_after(instant)
    if instant is None or instant > until:
        newest = slots[-keep:] if keep else []
        return newest, len(slots) - len(newest), False

    window = timedelta(seconds=1)
    while True:
        start = max(after, until - window)
        recent: list[datetime] = []
        instant = schedule.next_after(start)
        while instant is not None and instant <= until:
            recent.append(instant)
            if len(recent) > 2 * keep + MAX_SCANNED_SLOTS:
                recent = recent[-keep:]
            instant = schedule.next_after(instant)
        if len(recent) >= keep or start == after:
            newest = recent[-keep:] if keep else []
            # The first scan stopped after MAX_SCANNED_SLOTS, so more than that passed.
            return newest, max(MAX_SCANNED_SLOTS + 1, len(recent)) - len(newest), True
        window *= 2


def plan_catch_up(
    schedule: CronSchedule,
    last_slot: datetime,
    now: datetime,
    policy: str,
    limit: int,
) -> CatchUpPlan:
    """Plan the slots in (last_slot, now] for a ``catch_up`` policy.

    ``none`` records every slot as missed; ``latest`` runs the most recent
    one and records the others; ``all`` runs the ``limit`` most recent ones
    and records the others. At most MAX_RECORDED_MISSED slots are recorded,
    the newest ones.
    """
    to_run = {"none": 0, "latest": 1, "all": limit}[policy]
    newest, older, estimate = passed_slots(schedule, last_slot, now, to_run + MAX_RECORDED_MISSED)
    run = newest[len(newest) - to_run :] if to_run else []
    missed = newest[: len(newest) - len(run)]
    return CatchUpPlan(
        run=run, missed=missed, missed_not_recorded=older, count_is_estimate=estimate
    )
