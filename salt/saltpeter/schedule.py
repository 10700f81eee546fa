"""Cron schedules with seconds and years, evaluated in a time zone.

A Saltpeter job gives its schedule as seven fields, ``sec min hour dom mon dow year``,
in Vixie/Debian cron syntax: ``*``, ``N``, ``N-M``, ``*/S``, ``N-M/S``, ``N/S`` (N to
the field's maximum, step S) and comma-separated lists of these. Months and weekdays
also accept the case-insensitive names ``jan``-``dec`` and ``sun``-``sat``.

:meth:`CronSchedule.next_after` returns the next fire instant after a given one. It
skips ahead field by field instead of stepping through seconds or minutes, so a call
takes a few steps per month it searches. Wall-clock fields are matched in the
schedule's time zone, with Debian cron's rules for daylight saving time changes (see
``CronSchedule._resolve``).
"""

from __future__ import annotations

import calendar
import re
from bisect import bisect_left
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta, timezone, tzinfo
from zoneinfo import ZoneInfo

FIELD_NAMES: tuple[str, ...] = ("sec", "min", "hour", "dom", "mon", "dow", "year")

_UTC = timezone.utc
_ONE_SECOND = timedelta(seconds=1)

# Debian cron's cron(8) applies its daylight saving rules only to clock changes of less
# than 3 hours. It treats larger changes as corrections of the clock and uses the new
# time immediately, so skipped times never fire and repeated times fire again. A change
# of exactly 3 hours counts as a correction here.
_MAX_DST_SHIFT = timedelta(hours=3)

# With the year field `*`, a search gives up after this many years. The Gregorian
# calendar repeats every 400 years (146097 days, exactly 20871 weeks), so a
# combination of month, day and weekday that does not occur in 400 years never occurs.
_YEAR_SEARCH_SPAN = 400

# Maximum length of each month, counting February 29.
_MAX_MONTH_DAYS = (0, 31, 29, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31)

_MONTH_NAMES = {name.lower(): number for number, name in enumerate(calendar.month_abbr) if name}
_WEEKDAY_NAMES = {
    name: number for number, name in enumerate(("sun", "mon", "tue", "wed", "thu", "fri", "sat"))
}

_ITEM_RE = re.compile(
    r"(?P<start>\*|[0-9]+|[a-z]+)(?:-(?P<end>[0-9]+|[a-z]+))?(?:/(?P<step>[0-9]+))?",
    re.IGNORECASE,
)
_INVALID_CHARACTER_RE = re.compile(r"[^0-9a-zA-Z*,/\-\s]")
_ITEM_FORMS = "*, N, N-M, */S, N-M/S or N/S"


class ScheduleError(ValueError):
    """One invalid schedule field, or a schedule that never fires.

    ``field`` is the field name (one of FIELD_NAMES) or None when no single field is
    responsible, ``value`` is that field's text as given, and ``message`` describes the
    problem. ``str(error)`` is ``field 'hour': 25 is out of range 0-23``, or only
    the message when ``field`` is None.
    """

    def __init__(self, message: str, field: str | None = None, value: str | None = None) -> None:
        self.field = field
        self.value = value
        self.message = message
        super().__init__(f"field {field!r}: {message}" if field is not None else message)

    def __reduce__(self) -> tuple[type[ScheduleError], tuple[str, str | None, str | None]]:
        return (type(self), (self.message, self.field, self.value))


@dataclass(frozen=True)
class _FieldSpec:
    """Allowed values and names of one schedule field."""

    name: str
    low: int
    high: int
    names: Mapping[str, int]
    name_kind: str = ""


_FIELD_SPECS = {
    spec.name: spec
    for spec in (
        _FieldSpec("sec", 0, 59, {}),
        _FieldSpec("min", 0, 59, {}),
        _FieldSpec("hour", 0, 23, {}),
        _FieldSpec("dom", 1, 31, {}),
        _FieldSpec("mon", 1, 12, _MONTH_NAMES, "month name (jan-dec)"),
        # 0 and 7 are both Sunday.
        _FieldSpec("dow", 0, 7, _WEEKDAY_NAMES, "weekday name (sun-sat)"),
        _FieldSpec("year", 1970, 2099, {}),
    )
}


@dataclass(frozen=True)
class CronSchedule:
    """A parsed seven-field schedule in one time zone.

    Create instances with :meth:`parse`. ``text`` contains the normalized field text in
    FIELD_NAMES order: items stripped of whitespace and names in lower case.
    """

    text: tuple[str, ...]
    tz: tzinfo
    seconds: tuple[int, ...] = field(repr=False)
    minutes: tuple[int, ...] = field(repr=False)
    hours: tuple[int, ...] = field(repr=False)
    days: tuple[int, ...] = field(repr=False)
    months: tuple[int, ...] = field(repr=False)
    # Weekdays 0-6 with Sunday as 0 (a 7 in the field is stored as 0).
    weekdays: tuple[int, ...] = field(repr=False)
    # None when the year field is `*`, which matches every year without bound.
    years: tuple[int, ...] | None = field(repr=False)
    # Vixie cron's day rule: when the dom or the dow field starts with `*`, a day must
    # match both fields. Otherwise it must match either one.
    days_intersect: bool = field(repr=False)
    # Some date in some year matches the month and day fields.
    has_possible_day: bool = field(repr=False)
    # Neither the hour nor the minute field starts with `*`, so Debian cron's
    # daylight saving catch-up and once-only rules apply (see _resolve).
    fixed_time: bool = field(repr=False)

    @classmethod
    def parse(cls, fields: Mapping[str, str], tz: tzinfo | None = None) -> CronSchedule:
        """Parse the seven FIELD_NAMES entries of ``fields`` into a schedule.

        Other keys in ``fields`` are ignored. ``tz`` is the zone whose wall clock the
        fields describe and defaults to UTC. Raises ScheduleError naming the first
        missing or invalid field.
        """
        if tz is None:
            tz = ZoneInfo("UTC")
        elif not isinstance(tz, tzinfo):
            raise TypeError(f"tz must be a tzinfo such as ZoneInfo('Europe/Berlin'), got {tz!r}")

        texts: dict[str, str] = {}
        values: dict[str, tuple[int, ...] | None] = {}
        for name in FIELD_NAMES:
            if name not in fields:
                raise ScheduleError("the field is missing", name)
            raw = fields[name]
            if not isinstance(raw, str):
                raise ScheduleError(
                    f"expected a string, got {type(raw).__name__} {raw!r}", name, repr(raw)
                )
            texts[name], values[name] = _parse_field(_FIELD_SPECS[name], raw)

        weekdays = tuple(sorted({day % 7 for day in values["dow"] or ()}))
        days_intersect = texts["dom"].startswith("*") or texts["dow"].startswith("*")
        return cls(
            text=tuple(texts[name] for name in FIELD_NAMES),
            tz=tz,
            seconds=values["sec"] or (),
            minutes=values["min"] or (),
            hours=values["hour"] or (),
            days=values["dom"] or (),
            months=values["mon"] or (),
            weekdays=weekdays,
            years=values["year"],
            days_intersect=days_intersect,
            has_possible_day=_has_possible_day(
                days_intersect, values["dom"] or (), values["mon"] or ()
            ),
            fixed_time=not (texts["hour"].startswith("*") or texts["min"].startswith("*")),
        )

    @property
    def fields(self) -> dict[str, str]:
        """Normalized field text by field name."""
        return dict(zip(FIELD_NAMES, self.text, strict=True))

    def __str__(self) -> str:
        return " ".join(self.text)

    def next_after(self, after: datetime) -> datetime | None:
        """Return the first fire instant strictly after ``after``, or None if none remains.

        ``after`` must be timezone-aware. The result is an aware UTC datetime with
        microsecond 0. None means the schedule never fires again: the listed years have
        passed, or the month and day fields never match a date.
        """
        if after.tzinfo is None or after.utcoffset() is None:
            raise ValueError(f"after must be a timezone-aware datetime, got {after!r}")

        after_utc = after.astimezone(_UTC).replace(microsecond=0)
        local = after_utc.astimezone(self.tz)
        try:
            start = local.replace(tzinfo=None, fold=0) + _ONE_SECOND
        except OverflowError:
            return None

        second_pass_fire = self._next_second_pass_fire(after_utc, local)
        while True:
            wall = self._next_wall_time(start)
            if wall is None:
                return second_pass_fire

            fire, next_start = self._resolve(wall, after_utc)
            if fire is not None:
                if second_pass_fire is not None and second_pass_fire < fire:
                    return second_pass_fire
                return fire
            start = next_start

    def next_times(self, after: datetime, count: int) -> list[datetime]:
        """Return up to ``count`` consecutive fire instants after ``after``.

        The list is shorter than ``count`` only when the schedule stops firing.
        """
        if count < 0:
            raise ValueError(f"count must be 0 or more, got {count}")

        times: list[datetime] = []
        current: datetime | None = after
        while len(times) < count and current is not None:
            current = self.next_after(current)
            if current is not None:
                times.append(current)
        return times

    def check_fires(self, now: datetime) -> None:
        """Raise ScheduleError naming the responsible field if nothing fires after ``now``."""
        if self.next_after(now) is not None:
            return

        dom_text = self.fields["dom"]
        if not self.has_possible_day:
            month_names = [calendar.month_name[month] for month in self.months]
            raise ScheduleError(
                f"{dom_text} never occurs in {_join_words(month_names)}", "dom", dom_text
            )

        year_text = self.fields["year"]
        local_now = now.astimezone(self.tz)
        if self.years is not None and self.years[-1] < local_now.year:
            verb = "is" if len(self.years) == 1 else "are all"
            raise ScheduleError(f"{year_text} {verb} in the past", "year", year_text)
        # The messages leave out the current time, so the same problem reads the
        # same on every reload and is logged once.
        if self.years is not None:
            raise ScheduleError(
                f"no remaining time in {year_text} matches the other fields", "year", year_text
            )
        raise ScheduleError("the schedule has no remaining fire time")

    def _next_wall_time(self, start: datetime) -> datetime | None:
        """Return the first naive wall-clock time at or after ``start`` that matches.

        Each step moves one field to its next matching value and resets the smaller
        fields to their minimum, or carries into the next larger field when no value
        is left. Returns None past the last listed year, or, with the year field `*`,
        past _YEAR_SEARCH_SPAN years after ``start``.
        """
        if self.years is None:
            if not self.has_possible_day:
                return None
            last_year = min(start.year + _YEAR_SEARCH_SPAN, datetime.max.year)
        else:
            last_year = self.years[-1]

        year, month, day = start.year, start.month, start.day
        hour, minute, second = start.hour, start.minute, start.second
        while True:
            if self.years is not None:
                next_year = _next_value(self.years, year)
                if next_year is None:
                    return None
                if next_year != year:
                    year, month, day, hour, minute, second = next_year, 1, 1, 0, 0, 0
            if year > last_year:
                return None

            next_month = _next_value(self.months, month)
            if next_month is None:
                year, month, day, hour, minute, second = year + 1, 1, 1, 0, 0, 0
                continue
            if next_month != month:
                month, day, hour, minute, second = next_month, 1, 0, 0, 0

            next_day = self._next_day(year, month, day)
            if next_day is None:
                month, day, hour, minute, second = month + 1, 1, 0, 0, 0
                continue
            if next_day != day:
                day, hour, minute, second = next_day, 0, 0, 0

            next_hour = _next_value(self.hours, hour)
            if next_hour is None:
                day, hour, minute, second = day + 1, 0, 0, 0
                continue
            if next_hour != hour:
                hour, minute, second = next_hour, 0, 0

            next_minute = _next_value(self.minutes, minute)
            if next_minute is None:
                hour, minute, second = hour + 1, 0, 0
                continue
            if next_minute != minute:
                minute, second = next_minute, 0

            next_second = _next_value(self.seconds, second)
            if next_second is None:
                minute, second = minute + 1, 0
                continue
            return datetime(year, month, day, hour, minute, next_second)

    def _next_day(self, year: int, month: int, day: int) -> int | None:
        """Return the first day of the month from ``day`` on that matches the day fields."""
        month_days = calendar.monthrange(year, month)[1]
        if day > month_days:
            return None
        if self.days_intersect and len(self.weekdays) == 7:
            next_day = _next_value(self.days, day)
            return next_day if next_day is not None and next_day <= month_days else None

        # Weekday of the 1st in cron numbering, where Sunday is 0.
        first_weekday = (date(year, month, 1).weekday() + 1) % 7
        for candidate in range(day, month_days + 1):
            dom_matches = candidate in self.days
            dow_matches = (first_weekday + candidate - 1) % 7 in self.weekdays
            if self.days_intersect:
                matches = dom_matches and dow_matches
            else:
                matches = dom_matches or dow_matches
            if matches:
                return candidate
        return None

    def _resolve(self, wall: datetime, after: datetime) -> tuple[datetime | None, datetime]:
        """Map a matching wall time to its fire instant after ``after``, if it fires.

        Returns ``(fire, wall)`` when the wall time fires after ``after``. Otherwise
        returns ``(None, start)``, where ``start`` is the wall time from which the
        search continues.

        This is Debian cron's rule for clock changes of less than 3 hours, as the Notes
        section of its cron(8) man page describes it (cronsim implements the same rule):

        - A fixed-time job (neither the hour nor the minute field starts with `*`)
          whose wall time is skipped when clocks spring forward fires at the
          transition instant, the first wall time after the gap. Several skipped times
          still fire only once, because the next search starts after the gap.
        - A fixed-time job whose wall time repeats when clocks fall back fires at the
          first occurrence only.
        - Other jobs follow the new time immediately. A skipped wall time does not
          fire, and a repeated wall time fires in both passes.

        Changes of 3 hours or more are treated as a reset (see _MAX_DST_SHIFT), as for
        jobs that are not fixed-time. The two offsets of a wall time are found with
        PEP 495's ``fold``: in a repeated interval fold=0 is the first pass, and in a
        gap fold=0 gives the offset before the transition.
        """
        first_offset = _utcoffset(wall.replace(tzinfo=self.tz, fold=0))
        second_offset = _utcoffset(wall.replace(tzinfo=self.tz, fold=1))
        first = (wall - first_offset).replace(tzinfo=_UTC)
        if first_offset == second_offset:
            return first, wall

        second = (wall - second_offset).replace(tzinfo=_UTC)
        if first_offset > second_offset:
            # Clocks fell back, so the wall time occurs at ``first`` and again at ``second``.
            if first > after:
                return first, wall
            if not self._catches_up(first_offset - second_offset) and second > after:
                return second, wall
            # Every remaining time of this repeated interval has fired already, in
            # the first pass, so continue at the wall time where that pass ended.
            transition = _find_transition(self.tz, first, second)
            return None, (transition + first_offset).replace(tzinfo=None)

        # Clocks sprang forward, so the wall time does not exist. ``second`` lies
        # before the transition and ``first`` after it.
        transition = _find_transition(self.tz, second, first)
        if self._catches_up(second_offset - first_offset) and transition > after:
            return transition, wall
        return None, (transition + second_offset).replace(tzinfo=None)

    def _next_second_pass_fire(self, after: datetime, local: datetime) -> datetime | None:
        """Return the first fire in the coming second pass of a repeated interval.

        When ``after`` lies in the first pass of a repeated interval, the search from
        its wall time forward misses the second pass, which starts at an earlier wall
        time but a later instant. Returns None when ``after`` is not in a first pass,
        or when the job fires only once per repeated wall time.
        """
        if local.fold:
            return None
        first_offset = _utcoffset(local)
        second_offset = _utcoffset(local.replace(fold=1))
        shift = first_offset - second_offset
        if shift <= timedelta(0) or self._catches_up(shift):
            return None

        # The wall time ``after + first_offset`` lies in [transition - shift, transition)
        # of the first pass, so the transition lies in (after, after + shift].
        transition = _find_transition(self.tz, after, after + shift)
        repeat_start = (transition + second_offset).replace(tzinfo=None)
        repeat_end = (transition + first_offset).replace(tzinfo=None)
        wall = self._next_wall_time(repeat_start)
        if wall is None or wall >= repeat_end:
            return None
        return (wall - second_offset).replace(tzinfo=_UTC)

    def _catches_up(self, shift: timedelta) -> bool:
        """Return whether Debian cron's fixed-time rules apply to a clock change of ``shift``."""
        return self.fixed_time and shift < _MAX_DST_SHIFT


def _has_possible_day(days_intersect: bool, days: tuple[int, ...], months: tuple[int, ...]) -> bool:
    """Return whether some date matches the month and day fields in some year.

    Under the OR rule the weekday field alone matches some day of every month. Under
    the AND rule each date of a listed month falls on every weekday within the 400-year
    Gregorian cycle (February 29 included), so only the month lengths can rule it out.
    """
    if not days_intersect:
        return True
    return any(day <= _MAX_MONTH_DAYS[month] for month in months for day in days)


def _parse_field(spec: _FieldSpec, raw: str) -> tuple[str, tuple[int, ...] | None]:
    """Parse one field's text into its normalized text and sorted values.

    The values are None only for a year field of exactly `*`, which matches every year.
    """
    text = raw.strip()
    if not text:
        raise ScheduleError("the field is empty", spec.name, raw)
    invalid = _INVALID_CHARACTER_RE.search(text)
    if invalid:
        raise ScheduleError(
            f"{text!r} contains the invalid character {invalid.group()!r}", spec.name, raw
        )

    items = [item.strip() for item in text.split(",")]
    if "" in items:
        raise ScheduleError(f"{text!r} contains an empty list item", spec.name, raw)
    normalized = ",".join(item.lower() for item in items)
    if spec.name == "year" and normalized == "*":
        return normalized, None

    values: set[int] = set()
    for item in items:
        values.update(_parse_item(spec, item, raw))
    return normalized, tuple(sorted(values))


def _parse_item(spec: _FieldSpec, item: str, raw: str) -> range:
    """Parse one list item (``*``, ``N``, ``N-M``, ``*/S``, ``N-M/S`` or ``N/S``)."""
    match = _ITEM_RE.fullmatch(item)
    if match is None or (match["start"] == "*" and match["end"] is not None):
        if "*" in item:
            raise ScheduleError(
                f"{item!r} is invalid because '*' can only stand alone or before a step (*/S)",
                spec.name,
                raw,
            )
        raise ScheduleError(f"{item!r} is invalid (expected {_ITEM_FORMS})", spec.name, raw)

    if match["start"] == "*":
        low, high = spec.low, spec.high
    else:
        low = _parse_value(spec, match["start"], raw)
        if match["end"] is not None:
            high = _parse_value(spec, match["end"], raw)
            # `fri-sun` reads naturally as Friday to Sunday, so a range that ends on
            # the name sun uses Sunday's second number, 7.
            if spec.name == "dow" and match["end"].lower() == "sun" and low > 0:
                high = 7
        elif match["step"] is not None:
            high = spec.high
        else:
            high = low
        if low > high and spec.name == "year":
            raise ScheduleError(
                f"{item} is a reversed range, so write {high}-{low} instead", spec.name, raw
            )
        if low > high:
            raise ScheduleError(
                f"{item} is a reversed range. Wrap-around ranges are not supported, so "
                f"write {_split_wrapped_range(spec, low, high)} instead",
                spec.name,
                raw,
            )

    step = 1
    if match["step"] is not None:
        step = int(match["step"])
        if step == 0:
            raise ScheduleError(f"step 0 in {item!r} must be at least 1", spec.name, raw)
        if step > high - low + 1:
            raise ScheduleError(
                f"step {step} in {item!r} is larger than the range {low}-{high}", spec.name, raw
            )
    return range(low, high + 1, step)


def _parse_value(spec: _FieldSpec, token: str, raw: str) -> int:
    """Parse a number or a name and check it against the field's range."""
    if token.isdigit():
        value = int(token)
        if not spec.low <= value <= spec.high:
            raise ScheduleError(f"{value} is out of range {spec.low}-{spec.high}", spec.name, raw)
        return value
    if not spec.names:
        raise ScheduleError(f"{token!r} is not a number", spec.name, raw)
    value_for_name = spec.names.get(token.lower())
    if value_for_name is None:
        raise ScheduleError(f"{token!r} is not a {spec.name_kind}", spec.name, raw)
    return value_for_name


def _split_wrapped_range(spec: _FieldSpec, low: int, high: int) -> str:
    """Return two ranges that cover the reversed range ``low-high``, for error messages."""
    parts = [f"{low}-{spec.high}" if low < spec.high else str(low)]
    # For dow the first part already ends with 7 (Sunday), so the second starts at 1.
    second_low = 1 if spec.name == "dow" else spec.low
    if high >= second_low:
        parts.append(f"{second_low}-{high}" if high > second_low else str(high))
    return ",".join(parts)


def _next_value(values: tuple[int, ...], minimum: int) -> int | None:
    """Return the smallest of the sorted ``values`` that is at least ``minimum``."""
    index = bisect_left(values, minimum)
    return values[index] if index < len(values) else None


def _utcoffset(moment: datetime) -> timedelta:
    offset = moment.utcoffset()
    if offset is None:
        raise ValueError(f"time zone {moment.tzinfo!r} returned no UTC offset for {moment}")
    return offset


def _find_transition(tz: tzinfo, earlier: datetime, later: datetime) -> datetime:
    """Return the first whole-second instant in (earlier, later] with ``later``'s offset.

    ``earlier`` and ``later`` are aware UTC instants whose UTC offsets in ``tz`` differ,
    with one offset change between them. zoneinfo has no public list of transitions,
    so a binary search over the seconds in between finds it.
    """
    low = int(earlier.timestamp())
    high = int(later.timestamp())
    low_offset = _utcoffset(datetime.fromtimestamp(low, tz))
    while high - low > 1:
        middle = (low + high) // 2
        if _utcoffset(datetime.fromtimestamp(middle, tz)) == low_offset:
            low = middle
        else:
            high = middle
    return datetime.fromtimestamp(high, _UTC)


def _join_words(words: list[str]) -> str:
    """Join ``words`` as English prose: 'a', 'a or b', 'a, b or c'."""
    if len(words) <= 1:
        return "".join(words)
    return f"{', '.join(words[:-1])} or {words[-1]}"
