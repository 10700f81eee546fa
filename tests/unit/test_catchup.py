"""Planning the slots that passed while the engine was down."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from saltpeter.catchup import MAX_RECORDED_MISSED, plan_catch_up
from saltpeter.schedule import CronSchedule

START = datetime(2026, 12, 4, 12, 0, tzinfo=timezone.utc)


def schedule(**fields: str) -> CronSchedule:
    base = {"sec": "0", "min": "*", "hour": "*", "dom": "*", "mon": "*", "dow": "*", "year": "*"}
    return CronSchedule.parse({**base, **fields})


EVERY_MINUTE = schedule()
EVERY_SECOND = schedule(sec="*")


class TestPolicies:
    def test_nothing_passed(self) -> None:
        plan = plan_catch_up(EVERY_MINUTE, START, START + timedelta(seconds=30), "latest", 10)
        assert plan.run == []
        assert plan.missed == []

    def test_latest_runs_newest_and_records_rest(self) -> None:
        plan = plan_catch_up(
            EVERY_MINUTE, START, START + timedelta(minutes=5, seconds=1), "latest", 10
        )
        assert plan.run == [START + timedelta(minutes=5)]
        assert plan.missed == [START + timedelta(minutes=n) for n in range(1, 5)]

    def test_none_records_every_slot(self) -> None:
        plan = plan_catch_up(EVERY_MINUTE, START, START + timedelta(minutes=3), "none", 10)
        assert plan.run == []
        assert plan.missed == [START + timedelta(minutes=n) for n in range(1, 4)]

    def test_all_runs_up_to_limit_oldest_first(self) -> None:
        plan = plan_catch_up(EVERY_MINUTE, START, START + timedelta(minutes=5), "all", 3)
        assert plan.run == [START + timedelta(minutes=n) for n in (3, 4, 5)]
        assert plan.missed == [START + timedelta(minutes=n) for n in (1, 2)]

    def test_all_with_fewer_slots_than_limit(self) -> None:
        plan = plan_catch_up(EVERY_MINUTE, START, START + timedelta(minutes=2), "all", 10)
        assert plan.run == [START + timedelta(minutes=1), START + timedelta(minutes=2)]
        assert plan.missed == []

    def test_slot_at_now_is_included(self) -> None:
        plan = plan_catch_up(EVERY_MINUTE, START, START + timedelta(minutes=1), "latest", 10)
        assert plan.run == [START + timedelta(minutes=1)]

    def test_last_slot_itself_is_excluded(self) -> None:
        plan = plan_catch_up(EVERY_MINUTE, START, START, "all", 10)
        assert plan.run == []


class TestLongOutages:
    def test_recorded_missed_slots_are_bounded(self) -> None:
        now = START + timedelta(seconds=3000)
        plan = plan_catch_up(EVERY_SECOND, START, now, "none", 10)
        assert len(plan.missed) == MAX_RECORDED_MISSED
        assert plan.missed[-1] == now
        assert plan.missed_not_recorded == 3000 - MAX_RECORDED_MISSED
        assert plan.count_is_estimate is False

    def test_year_of_seconds_finds_newest_quickly(self) -> None:
        now = START + timedelta(days=365)
        plan = plan_catch_up(EVERY_SECOND, START, now, "latest", 10)
        assert plan.run == [now]
        assert plan.missed[-1] == now - timedelta(seconds=1)
        assert len(plan.missed) == MAX_RECORDED_MISSED
        assert plan.count_is_estimate is True
        assert plan.total_missed + len(plan.run) > 5000

    @pytest.mark.parametrize("policy", ["none", "latest", "all"])
    def test_missed_and_run_never_overlap(self, policy: str) -> None:
        plan = plan_catch_up(EVERY_MINUTE, START, START + timedelta(hours=30), policy, 5)
        assert not set(plan.run) & set(plan.missed)
        assert plan.missed == sorted(plan.missed)
        assert all(slot > START for slot in plan.missed + plan.run)
