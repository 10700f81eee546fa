"""Unit tests for saltpeter.schedule: parsing, field semantics, search and time zones."""

from __future__ import annotations

import pickle
from datetime import datetime, timedelta, timezone, tzinfo
from zoneinfo import ZoneInfo

import pytest
from croniter import croniter
from croniter.croniter import CroniterBadDateError
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from saltpeter.schedule import FIELD_NAMES, CronSchedule, ScheduleError

UTC = timezone.utc
BERLIN = ZoneInfo("Europe/Berlin")
NEW_YORK = ZoneInfo("America/New_York")


def make_schedule(tz: tzinfo | None = None, **fields: str) -> CronSchedule:
    """Parse a schedule that fires every minute at second 0, except where ``fields`` differ."""
    values = {"sec": "0", "min": "*", "hour": "*", "dom": "*", "mon": "*", "dow": "*", "year": "*"}
    values.update(fields)
    return CronSchedule.parse(values, tz)


def utc(*parts: int) -> datetime:
    return datetime(*parts, tzinfo=UTC)


def parse_error(**fields: str) -> ScheduleError:
    with pytest.raises(ScheduleError) as caught:
        make_schedule(**fields)
    return caught.value


class TestParseErrors:
    @pytest.mark.parametrize(
        ("name", "value", "message"),
        [
            ("hour", "", "the field is empty"),
            ("min", "   ", "the field is empty"),
            ("min", "1,,2", "'1,,2' contains an empty list item"),
            ("min", "1,", "'1,' contains an empty list item"),
            ("dow", "5#2", "'5#2' contains the invalid character '#'"),
            ("dom", "L", "'L' is not a number"),
            ("sec", "1.5", "'1.5' contains the invalid character '.'"),
            ("mon", "foo", "'foo' is not a month name (jan-dec)"),
            ("mon", "january", "'january' is not a month name (jan-dec)"),
            ("dow", "Funday", "'Funday' is not a weekday name (sun-sat)"),
            ("dow", "mon-foo", "'foo' is not a weekday name (sun-sat)"),
            ("hour", "noon", "'noon' is not a number"),
            ("hour", "jan", "'jan' is not a number"),
            ("sec", "60", "60 is out of range 0-59"),
            ("min", "60", "60 is out of range 0-59"),
            ("hour", "25", "25 is out of range 0-23"),
            ("hour", "1,24", "24 is out of range 0-23"),
            ("dom", "0", "0 is out of range 1-31"),
            ("dom", "32", "32 is out of range 1-31"),
            ("mon", "0", "0 is out of range 1-12"),
            ("mon", "13", "13 is out of range 1-12"),
            ("dow", "8", "8 is out of range 0-7"),
            ("year", "1969", "1969 is out of range 1970-2099"),
            ("year", "2100", "2100 is out of range 1970-2099"),
            ("min", "5-70", "70 is out of range 0-59"),
            (
                "hour",
                "22-2",
                "22-2 is a reversed range. Wrap-around ranges are not supported, "
                "so write 22-23,0-2 instead",
            ),
            (
                "min",
                "5-1",
                "5-1 is a reversed range. Wrap-around ranges are not supported, "
                "so write 5-59,0-1 instead",
            ),
            (
                "dow",
                "fri-mon",
                "fri-mon is a reversed range. Wrap-around ranges are not supported, "
                "so write 5-7,1 instead",
            ),
            (
                "mon",
                "nov-feb",
                "nov-feb is a reversed range. Wrap-around ranges are not supported, "
                "so write 11-12,1-2 instead",
            ),
            ("min", "*/0", "step 0 in '*/0' must be at least 1"),
            ("min", "5/0", "step 0 in '5/0' must be at least 1"),
            ("min", "*/61", "step 61 in '*/61' is larger than the range 0-59"),
            ("hour", "9-17/10", "step 10 in '9-17/10' is larger than the range 9-17"),
            ("min", "50/11", "step 11 in '50/11' is larger than the range 50-59"),
            (
                "min",
                "*-5",
                "'*-5' is invalid because '*' can only stand alone or before a step (*/S)",
            ),
            (
                "min",
                "5-*",
                "'5-*' is invalid because '*' can only stand alone or before a step (*/S)",
            ),
            (
                "min",
                "*/*",
                "'*/*' is invalid because '*' can only stand alone or before a step (*/S)",
            ),
            ("min", "1-2-3", "'1-2-3' is invalid (expected *, N, N-M, */S, N-M/S or N/S)"),
            ("min", "/5", "'/5' is invalid (expected *, N, N-M, */S, N-M/S or N/S)"),
            ("min", "5/", "'5/' is invalid (expected *, N, N-M, */S, N-M/S or N/S)"),
            ("min", "1 2", "'1 2' is invalid (expected *, N, N-M, */S, N-M/S or N/S)"),
            ("year", "2030-2026", "2030-2026 is a reversed range, so write 2026-2030 instead"),
        ],
    )
    def test_invalid_field_message(self, name: str, value: str, message: str) -> None:
        error = parse_error(**{name: value})
        assert error.message == message
        assert error.field == name
        assert error.value == value

    def test_error_str_names_field(self) -> None:
        error = parse_error(hour="25")
        assert str(error) == "field 'hour': 25 is out of range 0-23"

    def test_error_without_field_is_message(self) -> None:
        assert str(ScheduleError("the schedule never fires")) == "the schedule never fires"

    def test_error_is_value_error(self) -> None:
        assert isinstance(parse_error(hour="25"), ValueError)

    def test_error_survives_pickle(self) -> None:
        copy = pickle.loads(pickle.dumps(parse_error(hour="25")))
        assert (copy.field, copy.value, copy.message) == ("hour", "25", "25 is out of range 0-23")

    def test_missing_field(self) -> None:
        fields = {name: "*" for name in FIELD_NAMES if name != "dow"}
        with pytest.raises(ScheduleError) as caught:
            CronSchedule.parse(fields)
        assert str(caught.value) == "field 'dow': the field is missing"

    def test_non_string_value(self) -> None:
        fields = {name: "*" for name in FIELD_NAMES}
        fields["hour"] = 5  # type: ignore[assignment]
        with pytest.raises(ScheduleError) as caught:
            CronSchedule.parse(fields)
        assert str(caught.value) == "field 'hour': expected a string, got int 5"

    def test_tz_of_wrong_type(self) -> None:
        fields = {name: "*" for name in FIELD_NAMES}
        with pytest.raises(TypeError):
            CronSchedule.parse(fields, "Europe/Berlin")  # type: ignore[arg-type]


class TestParse:
    def test_text_normalized(self) -> None:
        schedule = make_schedule(min=" 1 , 2,3 ", dow="MON, Fri", mon=" Jan-Mar ")
        assert schedule.fields == {
            "sec": "0",
            "min": "1,2,3",
            "hour": "*",
            "dom": "*",
            "mon": "jan-mar",
            "dow": "mon,fri",
            "year": "*",
        }

    def test_fields_in_field_name_order(self) -> None:
        assert tuple(make_schedule().fields) == FIELD_NAMES

    def test_str_joins_fields(self) -> None:
        assert str(make_schedule(min="*/5", hour="2")) == "0 */5 2 * * * *"

    def test_default_zone_is_utc(self) -> None:
        assert make_schedule().tz == ZoneInfo("UTC")

    def test_extra_keys_ignored(self) -> None:
        fields = {name: "*" for name in FIELD_NAMES} | {"command": "true"}
        assert CronSchedule.parse(fields).fields["min"] == "*"

    def test_equal_text_equal_schedules(self) -> None:
        assert make_schedule(min="5") == make_schedule(min=" 5 ")


class TestFieldSemantics:
    def test_second_list(self) -> None:
        schedule = make_schedule(sec="15,45")
        assert schedule.next_times(utc(2026, 1, 1), 3) == [
            utc(2026, 1, 1, 0, 0, 15),
            utc(2026, 1, 1, 0, 0, 45),
            utc(2026, 1, 1, 0, 1, 15),
        ]

    def test_second_step(self) -> None:
        assert make_schedule(sec="*/20").seconds == (0, 20, 40)

    def test_every_second(self) -> None:
        schedule = make_schedule(sec="*")
        assert schedule.next_after(utc(2026, 1, 1, 0, 0, 59)) == utc(2026, 1, 1, 0, 1, 0)

    def test_minute_step_from_start(self) -> None:
        assert make_schedule(min="50/5").minutes == (50, 55)

    def test_range_with_step(self) -> None:
        assert make_schedule(hour="9-17/4").hours == (9, 13, 17)

    def test_star_step(self) -> None:
        assert make_schedule(min="*/25").minutes == (0, 25, 50)

    def test_step_equal_to_range_keeps_start(self) -> None:
        assert make_schedule(min="*/60").minutes == (0,)

    def test_list_of_ranges_and_steps(self) -> None:
        assert make_schedule(min="1-3,10/20,58").minutes == (1, 2, 3, 10, 30, 50, 58)

    def test_overlapping_items_deduplicated(self) -> None:
        assert make_schedule(hour="1-5,3-7").hours == (1, 2, 3, 4, 5, 6, 7)

    def test_single_value_range(self) -> None:
        assert make_schedule(hour="5-5").hours == (5,)

    def test_leading_zero(self) -> None:
        assert make_schedule(min="05").minutes == (5,)

    def test_month_names_case_insensitive(self) -> None:
        assert make_schedule(mon="MAR,jul,Dec").months == (3, 7, 12)

    def test_month_name_range(self) -> None:
        assert make_schedule(mon="jan-mar").months == (1, 2, 3)

    def test_weekday_name_range(self) -> None:
        assert make_schedule(dow="mon-fri").weekdays == (1, 2, 3, 4, 5)

    def test_weekday_range_ending_sunday(self) -> None:
        assert make_schedule(dow="Fri-Sun").weekdays == (0, 5, 6)

    def test_weekday_mixed_names_and_numbers(self) -> None:
        assert make_schedule(dow="sun,3-thu").weekdays == (0, 3, 4)

    def test_dow_seven_is_sunday(self) -> None:
        assert make_schedule(dow="7").weekdays == make_schedule(dow="0").weekdays

    def test_dow_range_to_seven(self) -> None:
        assert make_schedule(dow="5-7").weekdays == (0, 5, 6)

    def test_dow_seven_fires_on_sunday(self) -> None:
        schedule = make_schedule(min="0", hour="0", dow="7")
        # 2026-01-04 is a Sunday.
        assert schedule.next_after(utc(2026, 1, 1)) == utc(2026, 1, 4)

    def test_hour_and_minute(self) -> None:
        schedule = make_schedule(min="30", hour="2")
        assert schedule.next_times(utc(2026, 1, 1, 2, 30), 2) == [
            utc(2026, 1, 2, 2, 30),
            utc(2026, 1, 3, 2, 30),
        ]

    def test_year_listed(self) -> None:
        schedule = make_schedule(min="0", hour="0", dom="1", mon="1", year="2027")
        assert schedule.next_after(utc(2026, 6, 1)) == utc(2027, 1, 1)

    def test_year_range_with_step(self) -> None:
        schedule = make_schedule(min="0", hour="0", dom="1", mon="1", year="2028-2032/2")
        assert schedule.next_times(utc(2026, 6, 1), 5) == [
            utc(2028, 1, 1),
            utc(2030, 1, 1),
            utc(2032, 1, 1),
        ]

    def test_year_star_step_within_range(self) -> None:
        assert make_schedule(year="*/50").years == (1970, 2020, 2070)

    def test_year_star_has_no_bound(self) -> None:
        schedule = make_schedule(min="0", hour="0", dom="1", mon="1")
        assert schedule.next_after(utc(2150, 6, 1)) == utc(2151, 1, 1)


class TestDayRule:
    """Vixie cron's rule for day of month and day of week (January 1, 2026 is a Thursday)."""

    def test_dom_only(self) -> None:
        schedule = make_schedule(min="0", hour="0", dom="13")
        assert schedule.next_times(utc(2026, 1, 1), 2) == [utc(2026, 1, 13), utc(2026, 2, 13)]

    def test_dow_only(self) -> None:
        schedule = make_schedule(min="0", hour="0", dow="mon")
        assert schedule.next_times(utc(2026, 1, 1), 3) == [
            utc(2026, 1, 5),
            utc(2026, 1, 12),
            utc(2026, 1, 19),
        ]

    def test_both_restricted_either_matches(self) -> None:
        schedule = make_schedule(min="0", hour="0", dom="13", dow="fri")
        assert schedule.next_times(utc(2026, 1, 1), 4) == [
            utc(2026, 1, 2),
            utc(2026, 1, 9),
            utc(2026, 1, 13),
            utc(2026, 1, 16),
        ]

    def test_dom_star_step_requires_both(self) -> None:
        # `*/2` starts with `*`, so a day must be odd and a Monday.
        schedule = make_schedule(min="0", hour="0", dom="*/2", dow="1")
        assert schedule.next_times(utc(2026, 1, 1), 4) == [
            utc(2026, 1, 5),
            utc(2026, 1, 19),
            utc(2026, 2, 9),
            utc(2026, 2, 23),
        ]

    def test_dow_star_step_requires_both(self) -> None:
        # `*/7` is Sunday (0 and 7) and starts with `*`: the first Sunday of a month.
        schedule = make_schedule(min="0", hour="0", dom="1-7", dow="*/7")
        assert schedule.next_times(utc(2026, 1, 1), 2) == [utc(2026, 1, 4), utc(2026, 2, 1)]

    def test_full_dom_range_is_not_star(self) -> None:
        # 1-31 does not start with `*`, so either field matching is enough: every day.
        schedule = make_schedule(min="0", hour="0", dom="1-31", dow="mon")
        assert schedule.next_after(utc(2026, 1, 1)) == utc(2026, 1, 2)

    def test_list_starting_with_star(self) -> None:
        schedule = make_schedule(min="0", hour="0", dom="*/10,2", dow="fri")
        # Days 1, 11, 21, 31 or 2 that are also Fridays: January 2 2026.
        assert schedule.next_after(utc(2026, 1, 1)) == utc(2026, 1, 2)

    def test_days_intersect_flag(self) -> None:
        assert make_schedule(dom="*/2", dow="1").days_intersect is True
        assert make_schedule(dom="1", dow="1").days_intersect is False


class TestNextAfter:
    def test_strictly_after_fire_time(self) -> None:
        schedule = make_schedule(min="*/5")
        assert schedule.next_after(utc(2026, 1, 1, 0, 5)) == utc(2026, 1, 1, 0, 10)

    def test_microseconds_dropped(self) -> None:
        schedule = make_schedule(sec="*")
        after = utc(2026, 1, 1, 0, 0, 5).replace(microsecond=999_999)
        assert schedule.next_after(after) == utc(2026, 1, 1, 0, 0, 6)

    def test_result_is_utc(self) -> None:
        result = make_schedule().next_after(datetime(2026, 1, 1, tzinfo=BERLIN))
        assert result is not None
        assert result.tzinfo is UTC

    def test_result_microsecond_zero(self) -> None:
        result = make_schedule().next_after(utc(2026, 1, 1).replace(microsecond=5))
        assert result is not None
        assert result.microsecond == 0

    def test_after_in_other_zone(self) -> None:
        schedule = make_schedule(min="0", hour="12")
        after = datetime(2026, 1, 1, 13, 0, tzinfo=BERLIN)
        assert schedule.next_after(after) == utc(2026, 1, 2, 12, 0)

    def test_naive_after_rejected(self) -> None:
        with pytest.raises(ValueError):
            make_schedule().next_after(datetime(2026, 1, 1))

    def test_month_end(self) -> None:
        schedule = make_schedule(sec="0", min="0", hour="0")
        assert schedule.next_after(utc(2026, 4, 30, 12)) == utc(2026, 5, 1)

    def test_year_end(self) -> None:
        schedule = make_schedule(sec="*")
        assert schedule.next_after(utc(2026, 12, 31, 23, 59, 59)) == utc(2027, 1, 1)

    def test_dom_31_skips_short_months(self) -> None:
        schedule = make_schedule(min="0", hour="0", dom="31")
        assert schedule.next_times(utc(2026, 1, 31), 2) == [utc(2026, 3, 31), utc(2026, 5, 31)]

    def test_dom_30_skips_february(self) -> None:
        schedule = make_schedule(min="0", hour="0", dom="30")
        assert schedule.next_after(utc(2026, 1, 30)) == utc(2026, 3, 30)

    def test_leap_day(self) -> None:
        schedule = make_schedule(min="0", hour="0", dom="29", mon="2")
        assert schedule.next_after(utc(2025, 3, 1)) == utc(2028, 2, 29)

    def test_leap_day_skips_2100(self) -> None:
        schedule = make_schedule(min="0", hour="0", dom="29", mon="2")
        assert schedule.next_after(utc(2096, 3, 1)) == utc(2104, 2, 29)

    def test_leap_day_on_weekday(self) -> None:
        # February 29 that is also a Sunday: 2032.
        schedule = make_schedule(min="0", hour="0", dom="29", mon="2", dow="*/7")
        assert schedule.next_after(utc(2026, 1, 1)) == utc(2032, 2, 29)

    def test_next_times_count(self) -> None:
        assert len(make_schedule().next_times(utc(2026, 1, 1), 7)) == 7

    def test_next_times_zero(self) -> None:
        assert make_schedule().next_times(utc(2026, 1, 1), 0) == []

    def test_next_times_negative(self) -> None:
        with pytest.raises(ValueError):
            make_schedule().next_times(utc(2026, 1, 1), -1)

    def test_next_times_stops_at_end(self) -> None:
        schedule = make_schedule(min="0", hour="0", dom="1", mon="1", year="2027,2028")
        assert schedule.next_times(utc(2026, 1, 1), 5) == [utc(2027, 1, 1), utc(2028, 1, 1)]


@pytest.mark.timeout(30)
class TestNeverFires:
    def test_dom_never_in_month(self) -> None:
        assert make_schedule(dom="30", mon="2").next_after(utc(2026, 1, 1)) is None

    def test_year_in_past(self) -> None:
        assert make_schedule(year="2020").next_after(utc(2026, 1, 1)) is None

    def test_leap_day_in_listed_common_years(self) -> None:
        schedule = make_schedule(dom="29", mon="2", year="2025-2027")
        assert schedule.next_after(utc(2024, 3, 1)) is None

    def test_last_listed_slot_passed(self) -> None:
        schedule = make_schedule(min="0", hour="0", dom="1", mon="1", year="2026")
        assert schedule.next_after(utc(2026, 1, 1)) is None

    def test_near_datetime_max(self) -> None:
        assert make_schedule(mon="1").next_after(utc(9999, 6, 1)) is None

    def test_many_never_firing_schedules(self) -> None:
        # Each call returns without walking the 400-year span day by day.
        for _ in range(1000):
            assert make_schedule(dom="31", mon="2,4,6,9,11").next_after(utc(2026, 1, 1)) is None

    def test_check_fires_dom(self) -> None:
        with pytest.raises(ScheduleError) as caught:
            make_schedule(dom="30", mon="2").check_fires(utc(2026, 1, 1))
        assert str(caught.value) == "field 'dom': 30 never occurs in February"

    def test_check_fires_dom_several_months(self) -> None:
        with pytest.raises(ScheduleError) as caught:
            make_schedule(dom="31", mon="feb,apr,6").check_fires(utc(2026, 1, 1))
        assert caught.value.message == "31 never occurs in February, April or June"

    def test_check_fires_dom_attributes(self) -> None:
        with pytest.raises(ScheduleError) as caught:
            make_schedule(dom="30,31", mon="2").check_fires(utc(2026, 1, 1))
        assert (caught.value.field, caught.value.value) == ("dom", "30,31")

    def test_check_fires_year_in_past(self) -> None:
        with pytest.raises(ScheduleError) as caught:
            make_schedule(year="2020").check_fires(utc(2026, 1, 1))
        assert str(caught.value) == "field 'year': 2020 is in the past"

    def test_check_fires_years_in_past(self) -> None:
        with pytest.raises(ScheduleError) as caught:
            make_schedule(year="2019,2020").check_fires(utc(2026, 1, 1))
        assert str(caught.value) == "field 'year': 2019,2020 are all in the past"

    def test_check_fires_year_without_remaining_slot(self) -> None:
        schedule = make_schedule(min="0", hour="0", dom="1", mon="1", year="2026")
        with pytest.raises(ScheduleError) as caught:
            schedule.check_fires(utc(2026, 6, 1))
        assert caught.value.field == "year"
        assert caught.value.message == "no remaining time in 2026 matches the other fields"

    def test_check_fires_year_uses_local_year(self) -> None:
        # 23:30 UTC on December 31 is already 2027 in Berlin.
        schedule = make_schedule(year="2026", tz=BERLIN)
        with pytest.raises(ScheduleError) as caught:
            schedule.check_fires(utc(2026, 12, 31, 23, 30))
        assert caught.value.message == "2026 is in the past"

    def test_check_fires_passes(self) -> None:
        make_schedule(dom="29", mon="2").check_fires(utc(2026, 1, 1))


class TestDaylightSaving:
    """Clock changes on real zone data.

    Europe/Berlin: 2026-03-29 01:00 UTC the wall clock jumps from 02:00 to 03:00, and
    2026-10-25 01:00 UTC it falls back from 03:00 to 02:00. America/New_York:
    2026-03-08 07:00 UTC from 02:00 to 03:00, and 2026-11-01 06:00 UTC from 02:00 to
    01:00.
    """

    def test_berlin_spring_fixed_fires_at_transition(self) -> None:
        schedule = make_schedule(min="30", hour="2", tz=BERLIN)
        assert schedule.next_times(utc(2026, 3, 28, 12), 2) == [
            utc(2026, 3, 29, 1, 0),
            utc(2026, 3, 30, 0, 30),
        ]

    def test_berlin_spring_fixed_seconds_fire_at_transition(self) -> None:
        schedule = make_schedule(sec="30", min="30", hour="2", tz=BERLIN)
        assert schedule.next_after(utc(2026, 3, 28, 12)) == utc(2026, 3, 29, 1, 0, 0)

    def test_berlin_spring_several_skipped_fire_once(self) -> None:
        schedule = make_schedule(min="0,30", hour="2", tz=BERLIN)
        assert schedule.next_times(utc(2026, 3, 28, 12), 2) == [
            utc(2026, 3, 29, 1, 0),
            utc(2026, 3, 30, 0, 0),
        ]

    def test_berlin_spring_skipped_and_gap_end_fire_once(self) -> None:
        # 02:00, 02:30 and 03:00 all map to the transition, then 03:30 follows.
        schedule = make_schedule(min="0,30", hour="2,3", tz=BERLIN)
        assert schedule.next_times(utc(2026, 3, 29, 0, 0), 2) == [
            utc(2026, 3, 29, 1, 0),
            utc(2026, 3, 29, 1, 30),
        ]

    def test_berlin_spring_fixed_after_transition(self) -> None:
        schedule = make_schedule(min="30", hour="2", tz=BERLIN)
        assert schedule.next_after(utc(2026, 3, 29, 1, 0)) == utc(2026, 3, 30, 0, 30)

    def test_berlin_spring_fixed_just_before_transition(self) -> None:
        schedule = make_schedule(min="30", hour="2", tz=BERLIN)
        assert schedule.next_after(utc(2026, 3, 29, 0, 59, 59)) == utc(2026, 3, 29, 1, 0)

    def test_berlin_spring_wildcard_hour_skips(self) -> None:
        # `*/2` starts with `*`, so the skipped 02:30 does not fire and 04:30 follows.
        schedule = make_schedule(min="30", hour="*/2", tz=BERLIN)
        assert schedule.next_after(utc(2026, 3, 29, 0, 0)) == utc(2026, 3, 29, 2, 30)

    def test_berlin_spring_wildcard_minutes(self) -> None:
        schedule = make_schedule(min="*/15", tz=BERLIN)
        assert schedule.next_times(utc(2026, 3, 29, 0, 40), 3) == [
            utc(2026, 3, 29, 0, 45),
            utc(2026, 3, 29, 1, 0),
            utc(2026, 3, 29, 1, 15),
        ]

    def test_berlin_fall_fixed_fires_once(self) -> None:
        schedule = make_schedule(min="30", hour="2", tz=BERLIN)
        assert schedule.next_times(utc(2026, 10, 24, 12), 2) == [
            utc(2026, 10, 25, 0, 30),
            utc(2026, 10, 26, 1, 30),
        ]

    def test_berlin_fall_wildcard_fires_both_passes(self) -> None:
        schedule = make_schedule(min="*/15", tz=BERLIN)
        assert schedule.next_times(utc(2026, 10, 25, 0, 40), 6) == [
            utc(2026, 10, 25, 0, 45),
            utc(2026, 10, 25, 1, 0),
            utc(2026, 10, 25, 1, 15),
            utc(2026, 10, 25, 1, 30),
            utc(2026, 10, 25, 1, 45),
            utc(2026, 10, 25, 2, 0),
        ]

    def test_berlin_fall_wildcard_hour_fires_both_passes(self) -> None:
        schedule = make_schedule(min="30", hour="*/2", tz=BERLIN)
        assert schedule.next_times(utc(2026, 10, 25, 0, 0), 3) == [
            utc(2026, 10, 25, 0, 30),
            utc(2026, 10, 25, 1, 30),
            utc(2026, 10, 25, 3, 30),
        ]

    def test_new_york_spring_fixed_fires_at_transition(self) -> None:
        schedule = make_schedule(min="30", hour="2", tz=NEW_YORK)
        assert schedule.next_times(utc(2026, 3, 7, 12), 2) == [
            utc(2026, 3, 8, 7, 0),
            utc(2026, 3, 9, 6, 30),
        ]

    def test_new_york_spring_wildcard_minutes(self) -> None:
        schedule = make_schedule(min="*/15", tz=NEW_YORK)
        assert schedule.next_times(utc(2026, 3, 8, 6, 40), 3) == [
            utc(2026, 3, 8, 6, 45),
            utc(2026, 3, 8, 7, 0),
            utc(2026, 3, 8, 7, 15),
        ]

    def test_new_york_fall_fixed_fires_once(self) -> None:
        schedule = make_schedule(min="30", hour="1", tz=NEW_YORK)
        assert schedule.next_times(utc(2026, 10, 31, 12), 2) == [
            utc(2026, 11, 1, 5, 30),
            utc(2026, 11, 2, 6, 30),
        ]

    def test_new_york_fall_wildcard_fires_both_passes(self) -> None:
        schedule = make_schedule(min="*/15", tz=NEW_YORK)
        assert schedule.next_times(utc(2026, 11, 1, 5, 40), 6) == [
            utc(2026, 11, 1, 5, 45),
            utc(2026, 11, 1, 6, 0),
            utc(2026, 11, 1, 6, 15),
            utc(2026, 11, 1, 6, 30),
            utc(2026, 11, 1, 6, 45),
            utc(2026, 11, 1, 7, 0),
        ]

    def test_new_york_fall_fixed_seconds_in_repeated_hour(self) -> None:
        schedule = make_schedule(sec="*/20", min="30", hour="1", tz=NEW_YORK)
        assert schedule.next_times(utc(2026, 11, 1, 5, 0), 4) == [
            utc(2026, 11, 1, 5, 30, 0),
            utc(2026, 11, 1, 5, 30, 20),
            utc(2026, 11, 1, 5, 30, 40),
            utc(2026, 11, 2, 6, 30, 0),
        ]

    def test_new_york_fall_wildcard_seconds_in_repeated_hour(self) -> None:
        schedule = make_schedule(sec="15,45", min="30", tz=NEW_YORK)
        assert schedule.next_times(utc(2026, 11, 1, 5, 0), 5) == [
            utc(2026, 11, 1, 5, 30, 15),
            utc(2026, 11, 1, 5, 30, 45),
            utc(2026, 11, 1, 6, 30, 15),
            utc(2026, 11, 1, 6, 30, 45),
            utc(2026, 11, 1, 7, 30, 15),
        ]

    def test_new_york_fall_fixed_after_second_pass_starts(self) -> None:
        # 06:30 UTC is 01:30 EST in the second pass. 01:45 fired in the first pass.
        schedule = make_schedule(min="45", hour="1", tz=NEW_YORK)
        assert schedule.next_after(utc(2026, 11, 1, 6, 30)) == utc(2026, 11, 2, 6, 45)

    def test_new_york_fall_wildcard_from_first_pass_end(self) -> None:
        # 05:50 UTC is 01:50 EDT. The second pass starts again at 01:00 EST.
        schedule = make_schedule(min="*/15", hour="1", tz=NEW_YORK)
        assert schedule.next_after(utc(2026, 11, 1, 5, 50)) == utc(2026, 11, 1, 6, 0)

    def test_new_york_fall_wildcard_in_second_pass(self) -> None:
        schedule = make_schedule(min="*/15", hour="1", tz=NEW_YORK)
        assert schedule.next_times(utc(2026, 11, 1, 6, 40), 2) == [
            utc(2026, 11, 1, 6, 45),
            utc(2026, 11, 2, 6, 0),
        ]

    def test_large_gap_not_caught_up(self) -> None:
        # Pacific/Apia skipped 2011-12-30 (from -10:00 to +14:00). A change of 3 hours
        # or more resets the clock, so the noon job fires neither that day nor at the
        # transition.
        schedule = make_schedule(min="0", hour="12", tz=ZoneInfo("Pacific/Apia"))
        assert schedule.next_times(utc(2011, 12, 29, 12), 2) == [
            utc(2011, 12, 29, 22, 0),
            utc(2011, 12, 30, 22, 0),
        ]

    def test_three_hour_fall_back_fires_twice(self) -> None:
        # Antarctica/Casey fell back from +11:00 to +08:00 at 2010-03-04 15:00 UTC,
        # repeating the wall times 23:00 to 02:00. Three hours count as a reset.
        schedule = make_schedule(min="30", hour="0", tz=ZoneInfo("Antarctica/Casey"))
        assert schedule.next_times(utc(2010, 3, 4, 12), 2) == [
            utc(2010, 3, 4, 13, 30),
            utc(2010, 3, 4, 16, 30),
        ]

    def test_three_hour_spring_forward_skips(self) -> None:
        # Antarctica/Casey jumped from +08:00 to +11:00 at 2009-10-17 18:00 UTC,
        # skipping the wall times 02:00 to 05:00 on October 18.
        schedule = make_schedule(min="0", hour="3", tz=ZoneInfo("Antarctica/Casey"))
        assert schedule.next_after(utc(2009, 10, 17, 12)) == utc(2009, 10, 18, 16, 0)

    def test_fixed_offset_zone(self) -> None:
        schedule = make_schedule(min="0", hour="9", tz=timezone(timedelta(hours=5, minutes=30)))
        assert schedule.next_after(utc(2026, 1, 1)) == utc(2026, 1, 1, 3, 30)


# Hypothesis strategies for 5-field Vixie cron expressions, as used by croniter.
FIVE_FIELD_BOUNDS = {"min": (0, 59), "hour": (0, 23), "dom": (1, 31), "mon": (1, 12), "dow": (0, 7)}
MONTH_NAMES = (
    "",
    "jan",
    "feb",
    "mar",
    "apr",
    "may",
    "jun",
    "jul",
    "aug",
    "sep",
    "oct",
    "nov",
    "dec",
)
WEEKDAY_NAMES = ("sun", "mon", "tue", "wed", "thu", "fri", "sat", "sun")


@st.composite
def cron_value(draw: st.DrawFn, name: str, value: int, range_start: int | None = None) -> str:
    """Draw the spelling of one value: a number, or for mon and dow sometimes a name."""
    # `0-sun` would spell an equal-endpoint range, which croniter widens (see below).
    if name == "dow" and value == 7 and range_start == 0:
        return "7"
    if name in ("mon", "dow") and draw(st.booleans()):
        word = (MONTH_NAMES if name == "mon" else WEEKDAY_NAMES)[value]
        return draw(st.sampled_from([word, word.upper(), word.title()]))
    return str(value)


@st.composite
def cron_item(draw: st.DrawFn, name: str) -> str:
    """Draw one list item of a field, in a form where croniter 7 follows Vixie cron.

    Two forms are left out because croniter 7.0 reads them differently from Vixie
    cron. It widens a range with equal endpoints (`5-5`) to the whole field. In dow it
    ends `N/S` at 6 instead of 7 and reads `7/S` as the whole week.
    """
    low, high = FIVE_FIELD_BOUNDS[name]
    forms = ["*", "N", "N-M", "*/S", "N-M/S"] + ([] if name == "dow" else ["N/S"])
    form = draw(st.sampled_from(forms))
    if form == "*":
        return "*"
    if form == "*/S":
        return f"*/{draw(st.integers(1, high - low + 1))}"

    start = draw(st.integers(low, high))
    if form == "N" or start == high:
        return draw(cron_value(name, start))
    if form == "N/S":
        return f"{start}/{draw(st.integers(1, high - start + 1))}"
    end = draw(st.integers(start + 1, high))
    text = f"{draw(cron_value(name, start))}-{draw(cron_value(name, end, start))}"
    if form == "N-M":
        return text
    return f"{text}/{draw(st.integers(1, end - start + 1))}"


def cron_field(name: str) -> st.SearchStrategy[str]:
    return st.lists(cron_item(name), min_size=1, max_size=3).map(",".join)


def croniter_times(expression: str, after: datetime, count: int) -> list[datetime]:
    # implement_cron_bug=True selects Vixie cron's rule: a day must match both day
    # fields when either field starts with `*`.
    iterator = croniter(expression, after, implement_cron_bug=True, max_years_between_matches=400)
    times: list[datetime] = []
    try:
        for _ in range(count):
            times.append(iterator.get_next(datetime))
    except CroniterBadDateError:
        pass
    return times


class TestCroniterDifferential:
    """Comparison with croniter for 5-field expressions in UTC.

    The first tests check that croniter, with the options of croniter_times, follows
    Vixie cron's day rule on dates known independently.
    """

    def test_croniter_either_day_field(self) -> None:
        assert croniter_times("0 0 13 * fri", utc(2026, 1, 1), 3) == [
            utc(2026, 1, 2),
            utc(2026, 1, 9),
            utc(2026, 1, 13),
        ]

    def test_croniter_star_step_requires_both(self) -> None:
        assert croniter_times("0 0 */2 * 1", utc(2026, 1, 1), 2) == [
            utc(2026, 1, 5),
            utc(2026, 1, 19),
        ]

    def test_croniter_dow_only(self) -> None:
        assert croniter_times("0 0 * * 7", utc(2026, 1, 1), 1) == [utc(2026, 1, 4)]

    @settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(
        minute=cron_field("min"),
        hour=cron_field("hour"),
        dom=cron_field("dom"),
        month=cron_field("mon"),
        dow=cron_field("dow"),
        after=st.datetimes(min_value=datetime(1990, 1, 1), max_value=datetime(2060, 1, 1)),
    )
    def test_matches_croniter(
        self, minute: str, hour: str, dom: str, month: str, dow: str, after: datetime
    ) -> None:
        schedule = make_schedule(sec="0", min=minute, hour=hour, dom=dom, mon=month, dow=dow)
        # A day field that lists every value without starting with `*` keeps Vixie's
        # either-field rule, but croniter 7.0 replaces it by `*` when the other day
        # field contains a `*`, which switches to the both-fields rule.
        assume(len(schedule.days) < 31 or dom.startswith("*"))
        assume(len(schedule.weekdays) < 7 or dow.startswith("*"))

        after = after.replace(tzinfo=UTC)
        expression = f"{minute} {hour} {dom} {month} {dow}"
        assert schedule.next_times(after, 3) == croniter_times(expression, after, 3)


def wall_matches(fields: dict[str, list[int] | None], wall: datetime) -> bool:
    """Match a wall time against explicit value lists, where None stands for `*`."""

    def field_matches(name: str, value: int) -> bool:
        values = fields[name]
        return values is None or value in values

    if not all(
        field_matches(name, value)
        for name, value in (
            ("sec", wall.second),
            ("min", wall.minute),
            ("hour", wall.hour),
            ("mon", wall.month),
            ("year", wall.year),
        )
    ):
        return False
    dom_matches = field_matches("dom", wall.day)
    dow_values = fields["dow"]
    cron_weekday = (wall.weekday() + 1) % 7
    dow_matches = dow_values is None or cron_weekday in {value % 7 for value in dow_values}
    if fields["dom"] is None or dow_values is None:
        return dom_matches and dow_matches
    return dom_matches or dow_matches


def field_text(values: list[int] | None) -> str:
    return "*" if values is None else ",".join(str(value) for value in values)


def value_lists(low: int, high: int, max_size: int) -> st.SearchStrategy[list[int] | None]:
    values = st.lists(st.integers(low, high), min_size=1, max_size=max_size, unique=True)
    return st.none() | values.map(sorted)


explicit_fields = st.fixed_dictionaries(
    {
        "sec": value_lists(0, 59, 20),
        "min": value_lists(0, 59, 20),
        "hour": value_lists(0, 23, 12),
        "dom": value_lists(1, 31, 10),
        "mon": value_lists(1, 12, 6),
        "dow": value_lists(0, 7, 4),
        "year": st.none() | st.just([2025, 2026, 2027]),
    }
)


class TestProperties:
    @settings(max_examples=200, deadline=None)
    @given(
        fields=explicit_fields,
        after=st.datetimes(min_value=datetime(2025, 1, 1), max_value=datetime(2027, 12, 31)),
        zone=st.sampled_from(["UTC", "Europe/Berlin", "America/New_York"]),
    )
    def test_fire_times_match_fields(
        self, fields: dict[str, list[int] | None], after: datetime, zone: str
    ) -> None:
        tz = ZoneInfo(zone)
        schedule = CronSchedule.parse({name: field_text(fields[name]) for name in fields}, tz)
        fixed_time = fields["hour"] is not None and fields["min"] is not None
        current = after.replace(tzinfo=UTC)
        for fire in schedule.next_times(current, 5):
            local = fire.astimezone(tz)
            sprang_forward = _utc_offset(fire - timedelta(seconds=1), tz) < _utc_offset(fire, tz)
            # A fixed-time job fires at a spring-forward transition for wall times
            # that the transition skipped, so its wall time there need not match.
            if not (fixed_time and sprang_forward):
                assert wall_matches(fields, local.replace(tzinfo=None))
            assert fire > current
            current = fire

    @settings(max_examples=200, deadline=None)
    @given(
        fields=explicit_fields,
        after=st.datetimes(min_value=datetime(2025, 1, 1), max_value=datetime(2027, 12, 31)),
    )
    def test_no_fire_time_skipped_in_utc(
        self, fields: dict[str, list[int] | None], after: datetime
    ) -> None:
        schedule = CronSchedule.parse({name: field_text(fields[name]) for name in fields})
        after = after.replace(tzinfo=UTC, microsecond=0)
        fire = schedule.next_after(after)

        # Check every second of the span up to the fire time, or of the first two
        # days when the fire time is further away or never comes.
        span_end = after + timedelta(days=2)
        if fire is not None:
            span_end = min(span_end, fire)
        assert _first_match_by_scan(fields, after, span_end) is None
        if fire is not None and fire <= after + timedelta(days=2):
            assert wall_matches(fields, fire.replace(tzinfo=None))


class TestDaylightSavingReference:
    """Comparison of next_after with a minute-by-minute scan around real transitions."""

    TRANSITIONS = (
        (BERLIN, utc(2026, 3, 29, 1)),
        (BERLIN, utc(2026, 10, 25, 1)),
        (NEW_YORK, utc(2026, 3, 8, 7)),
        (NEW_YORK, utc(2026, 11, 1, 6)),
    )

    @settings(max_examples=300, deadline=None)
    @given(
        transition=st.sampled_from(TRANSITIONS),
        start_offset=st.integers(-4 * 3600, 3600),
        sec=st.sampled_from(["0", "*/20", "30", "0-59/15"]),
        minute=st.sampled_from(["*", "*/15", "0", "30", "0,30", "15-45/15", "59"]),
        hour=st.sampled_from(["*", "*/2", "1", "2", "3", "1-3", "0,2", "1,2"]),
    )
    def test_matches_scan(
        self,
        transition: tuple[ZoneInfo, datetime],
        start_offset: int,
        sec: str,
        minute: str,
        hour: str,
    ) -> None:
        tz, instant = transition
        schedule = make_schedule(sec=sec, min=minute, hour=hour, tz=tz)
        fixed_time = not (minute.startswith("*") or hour.startswith("*"))
        after = instant + timedelta(seconds=start_offset)
        end = instant + timedelta(hours=4)

        expected = _debian_fire_times(schedule, fixed_time, after, end)
        actual: list[datetime] = []
        current = schedule.next_after(after)
        while current is not None and current < end:
            actual.append(current)
            current = schedule.next_after(current)
        assert actual == expected


def _utc_offset(instant: datetime, tz: tzinfo) -> timedelta:
    offset = instant.astimezone(tz).utcoffset()
    assert offset is not None
    return offset


def _first_match_by_scan(
    fields: dict[str, list[int] | None], after: datetime, end: datetime
) -> datetime | None:
    """Return the first second in (after, end) whose UTC wall time matches, scanning minutes."""
    minute = after.replace(second=0)
    while minute < end:
        if wall_matches(fields | {"sec": None}, minute.replace(tzinfo=None)):
            for second in range(60):
                instant = minute + timedelta(seconds=second)
                if after < instant < end and wall_matches(fields, instant.replace(tzinfo=None)):
                    return instant
        minute += timedelta(minutes=1)
    return None


def _debian_fire_times(
    schedule: CronSchedule, fixed_time: bool, after: datetime, end: datetime
) -> list[datetime]:
    """List the fire instants in (after, end) by scanning every UTC minute.

    A matching wall time fires, except that a fixed-time job skips the second pass of a
    repeated wall time. A fixed-time job also fires at a spring-forward transition when
    a skipped wall time matches. All transitions scanned here are shorter than 3 hours
    and fall on whole minutes.
    """
    tz = schedule.tz
    fields: dict[str, list[int] | None] = {
        "sec": None,
        "min": list(schedule.minutes),
        "hour": list(schedule.hours),
        "dom": None,
        "mon": None,
        "dow": None,
        "year": None,
    }
    times: set[datetime] = set()
    minute = after.replace(second=0) - timedelta(minutes=1)
    previous_wall = minute.astimezone(tz).replace(tzinfo=None)
    while minute < end:
        minute += timedelta(minutes=1)
        local = minute.astimezone(tz)
        wall = local.replace(tzinfo=None)

        gap_wall = previous_wall + timedelta(minutes=1)
        skipped_match = False
        while gap_wall < wall:
            skipped_match = skipped_match or wall_matches(fields, gap_wall)
            gap_wall += timedelta(minutes=1)
        if fixed_time and skipped_match:
            times.add(minute)

        repeated = local.fold == 1 and local.utcoffset() != local.replace(fold=0).utcoffset()
        if wall_matches(fields, wall) and not (fixed_time and repeated):
            times.update(minute + timedelta(seconds=second) for second in schedule.seconds)
        previous_wall = wall
    return sorted(instant for instant in times if after < instant < end)
