"""Load and validate Saltpeter's job files.

The config directory (default ``/etc/saltpeter``) contains ``*.yaml`` and ``*.yml``
files. Each maps job names to job definitions and may contain two special sections:
``saltpeter_config`` (global settings) and ``saltpeter_maintenance``. The format is
the original Saltpeter's, so an existing directory loads unchanged. The reference for
every key is ``docs/configuration.md``.

:class:`ConfigLoader` keeps what it parsed per file, so a reload re-reads only the
files whose stat changed. A problem in one job or file never stops the others, and a
job whose definition turns invalid keeps its last valid definition.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import math
import os
import re
import stat
import time
import urllib.parse
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from types import MappingProxyType
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import yaml

from saltpeter.schedule import FIELD_NAMES, CronSchedule, ScheduleError

log = logging.getLogger(__name__)

TARGET_TYPES = (
    "glob",
    "pcre",
    "list",
    "grain",
    "grain_pcre",
    "pillar",
    "pillar_pcre",
    "nodegroup",
    "ipcidr",
    "compound",
)
WRAPPER_LOGLEVELS = ("normal", "debug", "off")

DEFAULT_CONFIG_DIR = Path("/etc/saltpeter")
SETTINGS_SECTION = "saltpeter_config"
MAINTENANCE_SECTION = "saltpeter_maintenance"
CONFIG_SUFFIXES = (".yaml", ".yml")

# Job names become parts of Salt event tags and run ids, so they exclude "/" and spaces.
JOB_NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")

SCHEDULE_DEFAULTS: Mapping[str, str] = MappingProxyType({"sec": "0", "year": "*"})
DEFAULT_TIMEOUT = 3600
MAX_TIMEOUT = 10 * 365 * 86400
# The command and the environment reach the wrapper in one WebSocket frame of at
# most 1 MiB, and Linux refuses a single environment string over 128 KiB
# (MAX_ARG_STRLEN), so both are bounded here, where the error can name them.
MAX_COMMAND_BYTES = 256 * 1024
MAX_ENV_VALUE_BYTES = 128 * 1024
MAX_ENV_TOTAL_BYTES = 512 * 1024
# Run ids are the job name plus a timestamp, and the wrapper accepts ids of up
# to 200 bytes.
MAX_JOB_NAME_LENGTH = 100
MAX_CATCH_UP_LIMIT = 1000
CATCH_UP_POLICIES = ("none", "latest", "all")
DEFAULT_CATCH_UP = "latest"
DEFAULT_CATCH_UP_LIMIT = 10

# The original Saltpeter allowed overlapping runs only when allow_overlap was this string.
LEGACY_ALLOW_OVERLAP = "i know what i am doing!"

_JOB_KEYS = frozenset(
    (
        *FIELD_NAMES,
        "targets",
        "target_type",
        "command",
        "user",
        "cwd",
        "env",
        "timeout",
        "hard_timeout",
        "allow_overlap",
        "wrapper_path",
        "wrapper_loglevel",
        "wrapper_logdir",
        "timezone",
        "utc",
        "catch_up",
        "catch_up_limit",
    )
)

# Keys the original Saltpeter read that have no effect here, with the reason in the warning.
_IGNORED_JOB_KEYS: Mapping[str, str] = MappingProxyType(
    {
        "group": "the group of a job is the name of its file without the extension",
        "number_of_targets": "every matched minion runs the job; random subsets are not supported",
        "batch_size": "every matched minion starts at once; batches are not supported",
        "use_wrapper": "jobs always run through the wrapper",
        "lockfile": "overlapping runs are controlled by allow_overlap",
        "saltpeter_server_host": (
            "set default_saltpeter_server_host or machines_ws_url in saltpeter_config instead"
        ),
    }
)

_MAINTENANCE_KEYS = frozenset(("global", "machines"))

# A file whose mtime is this close to the moment it was read may change again without
# changing its mtime, because file systems store timestamps with a coarse granularity
# (whole seconds on some, 2 s on FAT). Such a file is read again on the next load.
_RACY_WINDOW_NS = 2_000_000_000

_MAX_SHOWN_CHARS = 80


def _utc_now() -> datetime:
    return datetime.now(timezone.utc)


# --------------------------------------------------------------------------- errors


class ConfigError(Exception):
    """A problem in the config directory, with the file, job, field and value involved.

    ``str()`` prefixes the message with its context, for example
    ``job 'backup' in /etc/saltpeter/db.yaml: field 'hour': 25 is out of range 0-23``.
    """

    def __init__(
        self,
        message: str,
        *,
        file: Path | None = None,
        job: str | None = None,
        field: str | None = None,
        value: object = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.file = file
        self.job = job
        self.field = field
        self.value = value

    def __str__(self) -> str:
        parts = []
        if self.job is not None and self.file is not None:
            parts.append(f"job {self.job!r} in {self.file}")
        elif self.job is not None:
            parts.append(f"job {self.job!r}")
        elif self.file is not None:
            parts.append(str(self.file))
        if self.field is not None:
            parts.append(f"field {self.field!r}")
        parts.append(self.message)
        return ": ".join(parts)

    def __repr__(self) -> str:
        return f"ConfigError({str(self)!r})"

    def __reduce__(self) -> tuple[Any, ...]:
        # Exception pickles only its args, which would drop the keyword attributes.
        return (type(self), (self.message,), self.__dict__)


class _InvalidValue(Exception):
    """A rejected value inside a validator. The caller adds the file, job and field."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class _FieldError(Exception):
    """A rejected job field, before the file and job name are attached."""

    def __init__(self, field: str, value: object, message: str) -> None:
        super().__init__(message)
        self.field = field
        self.value = value
        self.message = message


def _show(value: object) -> str:
    """Format a configured value for a message, in YAML spelling where it differs."""
    if value is None:
        text = "null"
    elif isinstance(value, bool):
        text = "true" if value else "false"
    else:
        text = repr(value)
    if len(text) > _MAX_SHOWN_CHARS:
        text = text[: _MAX_SHOWN_CHARS - 3] + "..."
    return text


def _type_name(value: object) -> str:
    """Name the type of a YAML value for a message, with its article."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, (list, tuple)):
        return "a list"
    return f"a {type(value).__name__}"


# ------------------------------------------------------------------------ validators
# Each validator returns the converted value or raises _InvalidValue with a message that
# starts with the rejected value.


def _check_bool(value: object) -> bool:
    if not isinstance(value, bool):
        raise _InvalidValue(f"{_show(value)} is invalid: expected true or false")
    return value


def _check_text(value: object) -> str:
    if not isinstance(value, str):
        raise _InvalidValue(
            f"{_show(value)} is invalid: expected a string, got {_type_name(value)}"
        )
    if not value.strip():
        raise _InvalidValue(f"{_show(value)} is invalid: must not be empty")
    return value


def _check_text_or_empty(value: object) -> str:
    if not isinstance(value, str):
        raise _InvalidValue(
            f"{_show(value)} is invalid: expected a string, got {_type_name(value)}"
        )
    return value


def _check_secret(value: object) -> str:
    # The message never shows the value, because it is a secret.
    if not isinstance(value, str):
        raise _InvalidValue(f"the value is invalid: expected a string, got {_type_name(value)}")
    return value


def _check_port(value: object) -> int:
    # The original Saltpeter passed ports on to the socket layer unconverted, which
    # accepted digit strings, so those still load.
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise _InvalidValue(f"{_show(value)} is invalid: expected a port number")
    if not 1 <= value <= 65535:
        raise _InvalidValue(f"{value} is out of range 1-65535")
    return value


def _check_positive_int(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _InvalidValue(f"{_show(value)} is invalid: expected a whole number")
    if value < 1:
        raise _InvalidValue(f"{value} is invalid: must be at least 1")
    return value


def _check_seconds(value: object, *, allow_zero: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _InvalidValue(f"{_show(value)} is invalid: expected a number of seconds")
    if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        bound = "0 or more" if allow_zero else "more than 0"
        raise _InvalidValue(f"{value} is invalid: must be {bound}")
    return float(value)


def _check_positive_days(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _InvalidValue(f"{_show(value)} is invalid: expected a number of days")
    if not math.isfinite(value) or value <= 0:
        raise _InvalidValue(f"{value} is invalid: must be more than 0")
    return float(value)


def _check_positive_seconds(value: object) -> float:
    return _check_seconds(value, allow_zero=False)


def _check_nonnegative_seconds(value: object) -> float:
    return _check_seconds(value, allow_zero=True)


def _check_loglevel(value: object) -> str:
    if value not in WRAPPER_LOGLEVELS:
        raise _InvalidValue(
            f"{_show(value)} is invalid: expected one of {', '.join(WRAPPER_LOGLEVELS)}"
        )
    return str(value)


def _check_timezone(value: object) -> str:
    if not isinstance(value, str):
        raise _InvalidValue(f"{_show(value)} is invalid: expected an IANA time zone name")
    try:
        ZoneInfo(value)
    except (ZoneInfoNotFoundError, ValueError):
        raise _InvalidValue(f"{_show(value)} is not a known IANA time zone name") from None
    return value


def _check_ws_url(value: object) -> str:
    text = _check_text_or_empty(value)
    if not text:
        return text
    parts = urllib.parse.urlsplit(text)
    if parts.scheme not in ("ws", "wss") or not parts.netloc:
        raise _InvalidValue(f"{_show(value)} is invalid: expected a ws:// or wss:// URL")
    return text


# -------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class Settings:
    """Global settings: the merged ``saltpeter_config`` sections and the engine's overrides."""

    logdir: str = "/var/log/saltpeter"
    debug: bool = False
    api_ws: bool = False
    api_ws_port: int = 8888
    api_ws_bind_addr: str = "127.0.0.1"
    machines_ws_port: int = 8889
    machines_ws_bind_addr: str = "0.0.0.0"
    default_saltpeter_server_host: str = field(default_factory=lambda: os.uname().nodename)
    default_wrapper_path: str = "/usr/local/bin/sp_wrapper.py"
    default_wrapper_loglevel: str = "normal"
    default_wrapper_logdir: str = "/var/log/sp_wrapper"
    # Cluster URLs may contain credentials, so they stay out of repr().
    elasticsearch: str = field(default="", repr=False)
    elasticsearch_index: str = "saltpeter"
    elasticsearch_username: str = ""
    elasticsearch_password: str = field(default="", repr=False)
    elasticsearch_api_key: str = field(default="", repr=False)
    elasticsearch_ca_certs: str = ""
    opensearch: str = field(default="", repr=False)
    opensearch_index: str = "saltpeter"
    opensearch_username: str = ""
    opensearch_password: str = field(default="", repr=False)
    opensearch_ca_certs: str = ""
    shipping_spool_max_bytes: int = 104857600  # disk spool per cluster while it is down
    timezone: str = "UTC"  # default zone of job schedules (IANA name)
    launch_timeout: float = 30.0  # s to wait for a minion's response to the launch
    heartbeat_timeout: float = 15.0  # s without a frame before a run on a minion is lost
    max_output_bytes: int = 1048576  # output kept per run and minion
    startup_wait: float = 60.0  # s the engine waits for accepted minions at start
    # Full URL wrappers connect to. Empty means wrapper_url() builds it.
    machines_ws_url: str = ""
    # Secret that every HTTP API request must present. Empty means no check,
    # which the API allows only on a loopback address.
    api_token: str = field(default="", repr=False)
    # TLS for the machines WebSocket: with both set, wrappers connect over wss://.
    machines_ws_certfile: str = ""
    machines_ws_keyfile: str = ""
    # CA bundle the wrappers verify the engine's certificate with; empty means the
    # minion's default trust store.
    machines_ws_cafile: str = ""
    history_days: float = 30.0  # runs older than this are pruned from the store
    history_runs_per_job: int = 1000  # newest runs kept per job

    def wrapper_url(self) -> str:
        """Return the URL that wrappers connect to.

        That is ``machines_ws_url`` when set, otherwise
        ``ws://<default_saltpeter_server_host>:<machines_ws_port>/wrapper``, with
        ``wss://`` when the machines WebSocket has a certificate.
        """
        if self.machines_ws_url:
            return self.machines_ws_url
        host = self.default_saltpeter_server_host
        if ":" in host and not host.startswith("["):
            host = f"[{host}]"  # an IPv6 address needs brackets in a URL
        scheme = "wss" if self.machines_ws_certfile else "ws"
        return f"{scheme}://{host}:{self.machines_ws_port}/wrapper"


_SETTINGS_VALIDATORS: Mapping[str, Callable[[object], object]] = MappingProxyType(
    {
        "logdir": _check_text,
        "debug": _check_bool,
        "api_ws": _check_bool,
        "api_ws_port": _check_port,
        "api_ws_bind_addr": _check_text,
        "machines_ws_port": _check_port,
        "machines_ws_bind_addr": _check_text,
        "default_saltpeter_server_host": _check_text,
        "default_wrapper_path": _check_text,
        "default_wrapper_loglevel": _check_loglevel,
        "default_wrapper_logdir": _check_text,
        "elasticsearch": _check_secret,
        "elasticsearch_index": _check_text,
        "opensearch": _check_secret,
        "opensearch_index": _check_text,
        "elasticsearch_username": _check_text_or_empty,
        "elasticsearch_password": _check_secret,
        "elasticsearch_api_key": _check_secret,
        "elasticsearch_ca_certs": _check_text_or_empty,
        "opensearch_username": _check_text_or_empty,
        "opensearch_password": _check_secret,
        "opensearch_ca_certs": _check_text_or_empty,
        "shipping_spool_max_bytes": _check_positive_int,
        "timezone": _check_timezone,
        "launch_timeout": _check_positive_seconds,
        "heartbeat_timeout": _check_positive_seconds,
        "max_output_bytes": _check_positive_int,
        "startup_wait": _check_nonnegative_seconds,
        "machines_ws_url": _check_ws_url,
        "api_token": _check_secret,
        "machines_ws_certfile": _check_text_or_empty,
        "machines_ws_keyfile": _check_text_or_empty,
        "machines_ws_cafile": _check_text_or_empty,
        "history_days": _check_positive_days,
        "history_runs_per_job": _check_positive_int,
    }
)


@dataclass
class _SectionCheck:
    """The valid values of one settings or maintenance section, and its problems."""

    values: dict[str, Any] = field(default_factory=dict)
    errors: list[ConfigError] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def _section_label(section: str, source: Path | None) -> str:
    if source is None:
        return f"{section} in the engine's settings"
    return f"{source}: {section}"


def _check_settings_section(
    raw: object, source: Path | None, previous: Mapping[str, Any] | None = None
) -> _SectionCheck:
    """Validate a ``saltpeter_config`` mapping key by key.

    ``source`` is None for the overrides from the master config. A key whose value is
    invalid keeps its value from ``previous`` (the same file's last load) when there is one.
    """
    check = _SectionCheck()
    where = "" if source is not None else " (engine settings in the master config)"
    if raw is None:
        return check
    if not isinstance(raw, Mapping):
        check.errors.append(
            ConfigError(
                f"the section is {_type_name(raw)}; expected a mapping of keys to values" + where,
                file=source,
                field=SETTINGS_SECTION,
            )
        )
        check.values.update(previous or {})
        return check

    for key, value in raw.items():
        validator = _SETTINGS_VALIDATORS.get(key) if isinstance(key, str) else None
        if validator is None:
            check.warnings.append(
                f"{_section_label(SETTINGS_SECTION, source)}: unknown key {key!r} is ignored"
            )
            continue
        try:
            check.values[key] = validator(value)
        except _InvalidValue as exc:
            check.errors.append(
                ConfigError(exc.message + where, file=source, field=key, value=value)
            )
            if previous is not None and key in previous:
                check.values[key] = previous[key]
    return check


def parse_settings(raw: Mapping[str, Any], source: Path | None) -> Settings:
    """Validate one ``saltpeter_config`` mapping and return it merged over the defaults.

    Raises ConfigError for the first invalid value. Unknown keys are ignored.
    """
    check = _check_settings_section(raw, source)
    if check.errors:
        raise check.errors[0]
    return Settings(**check.values)


# ----------------------------------------------------------------------- maintenance


@dataclass(frozen=True)
class Maintenance:
    """Merged ``saltpeter_maintenance`` sections."""

    global_: bool = False  # YAML key "global": no new run starts anywhere
    machines: frozenset[str] = frozenset()  # minion ids left out of every run


def _check_maintenance_section(
    raw: object, source: Path, previous: Mapping[str, Any] | None = None
) -> _SectionCheck:
    """Validate a ``saltpeter_maintenance`` mapping.

    The result's values use the keys ``global`` (bool) and ``machines`` (frozenset). An
    invalid part keeps its value from ``previous`` (the same file's last load).
    """
    check = _SectionCheck()
    if raw is None:
        return check
    if not isinstance(raw, Mapping):
        check.errors.append(
            ConfigError(
                f"the section is {_type_name(raw)}; expected a mapping with the keys "
                "global and machines",
                file=source,
                field=MAINTENANCE_SECTION,
            )
        )
        check.values.update(previous or {})
        return check

    for key in raw:
        if key not in _MAINTENANCE_KEYS:
            check.warnings.append(
                f"{_section_label(MAINTENANCE_SECTION, source)}: unknown key {key!r} is ignored"
            )

    if raw.get("global") is not None:
        try:
            check.values["global"] = _check_bool(raw["global"])
        except _InvalidValue as exc:
            check.errors.append(
                ConfigError(exc.message, file=source, field="global", value=raw["global"])
            )
            if previous is not None and "global" in previous:
                check.values["global"] = previous["global"]

    machines = raw.get("machines")
    if machines is not None:
        try:
            check.values["machines"] = _check_machine_list(machines)
        except _InvalidValue as exc:
            check.errors.append(
                ConfigError(exc.message, file=source, field="machines", value=machines)
            )
            if previous is not None and "machines" in previous:
                check.values["machines"] = previous["machines"]
    return check


def _check_machine_list(value: object) -> frozenset[str]:
    if not isinstance(value, list):
        raise _InvalidValue(
            f"{_show(value)} is invalid: expected a list of minion ids, got {_type_name(value)}"
        )
    for item in value:
        if not isinstance(item, str) or not item.strip():
            raise _InvalidValue(f"item {_show(item)} is invalid: expected a minion id (a string)")
    return frozenset(value)


# ------------------------------------------------------------------------------ jobs


@dataclass(frozen=True)
class Job:
    """One validated job definition."""

    name: str
    source: Path  # the file it was read from
    group: str  # the name of that file without the extension
    # The schedule is derived from schedule_fields and timezone, which equality compares.
    schedule: CronSchedule = field(compare=False, repr=False)
    schedule_fields: Mapping[str, str]  # normalized text per FIELD_NAMES key, with defaults
    timezone: str  # IANA name the schedule is read in
    targets: str
    target_type: str
    command: str
    user: str | None  # None: the wrapper's own user (root on a minion)
    cwd: str | None  # None: the home directory of the user
    env: Mapping[str, str]  # values converted to str
    timeout: int  # seconds, 0 = no limit
    allow_overlap: bool
    wrapper_path: str | None  # None: Settings.default_wrapper_path at dispatch
    wrapper_loglevel: str | None  # None: Settings.default_wrapper_loglevel
    wrapper_logdir: str | None  # None: Settings.default_wrapper_logdir
    # What to do with slots that passed while the engine was down: record them as
    # missed ("none"), run the most recent one ("latest"), or run each of them
    # ("all", at most catch_up_limit, the most recent ones).
    catch_up: str = DEFAULT_CATCH_UP
    catch_up_limit: int = DEFAULT_CATCH_UP_LIMIT

    def describe(self) -> dict[str, object]:
        """Return the definition as JSON-ready data for status output.

        ``env`` lists only the variable names, because the values may be secrets.
        """
        return {
            "name": self.name,
            "source": str(self.source),
            "group": self.group,
            "schedule": dict(self.schedule_fields),
            "timezone": self.timezone,
            "targets": self.targets,
            "target_type": self.target_type,
            "command": self.command,
            "user": self.user,
            "cwd": self.cwd,
            "env": sorted(self.env),
            "timeout": self.timeout,
            "allow_overlap": self.allow_overlap,
            "catch_up": self.catch_up,
            "catch_up_limit": self.catch_up_limit,
            "wrapper_path": self.wrapper_path,
            "wrapper_loglevel": self.wrapper_loglevel,
            "wrapper_logdir": self.wrapper_logdir,
        }


def _group_of(source: Path) -> str:
    return source.stem


@dataclass
class _JobCheck:
    """The outcome of validating one job definition."""

    job: Job | None
    errors: list[ConfigError]
    warnings: list[str]


def _schedule_text(raw: Mapping[str, Any], key: str) -> str:
    value = raw.get(key)
    if value is None:
        if key in SCHEDULE_DEFAULTS:
            return SCHEDULE_DEFAULTS[key]
        raise _FieldError(
            key,
            None,
            "the field is missing; every job needs min, hour, dom, mon and dow",
        )
    # YAML reads an unquoted 5 as an integer, and the original accepted that.
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise _FieldError(
            key, value, f"{_show(value)} is invalid: expected a cron field such as '*/5' or 0"
        )
    # Cron fields contain no whitespace, so "1, 15" can only mean "1,15".
    text = "".join(str(value).split())
    if not text:
        raise _FieldError(key, value, f"{_show(value)} is invalid: must not be empty")
    return text


def _job_timezone(raw: Mapping[str, Any], settings: Settings) -> str:
    value = raw.get("timezone")
    utc = raw.get("utc")
    if utc is not None and not isinstance(utc, bool):
        raise _FieldError("utc", utc, f"{_show(utc)} is invalid: expected true or false")
    if value is not None:
        try:
            return _check_timezone(value)
        except _InvalidValue as exc:
            raise _FieldError("timezone", value, exc.message) from None
    utc = raw.get("utc")
    if utc is not None:
        try:
            if _check_bool(utc):
                return "UTC"
        except _InvalidValue as exc:
            raise _FieldError("utc", utc, exc.message) from None
    return settings.timezone


def _job_targets(raw: Mapping[str, Any], target_type: str | None) -> str:
    value = raw.get("targets")
    if value is None:
        raise _FieldError("targets", None, "the field is missing; set a Salt target such as '*'")
    # Salt's list matcher takes a YAML list as well as a comma-separated string, and the
    # original passed either through to Salt.
    if isinstance(value, list) and target_type == "list":
        if not value or not all(isinstance(item, str) and item.strip() for item in value):
            raise _FieldError(
                "targets", value, f"{_show(value)} is invalid: expected a list of minion ids"
            )
        return ",".join(item.strip() for item in value)
    if not isinstance(value, str):
        raise _FieldError(
            "targets",
            value,
            f"{_show(value)} is invalid: expected a Salt target string, got {_type_name(value)}",
        )
    if not value.strip():
        raise _FieldError("targets", value, "the field is empty; set a Salt target such as '*'")
    return value


def _job_target_type(raw: Mapping[str, Any]) -> str:
    value = raw.get("target_type")
    if value is None:
        return "glob"
    if value not in TARGET_TYPES:
        raise _FieldError(
            "target_type",
            value,
            f"{_show(value)} is invalid: expected one of {', '.join(TARGET_TYPES)}",
        )
    return str(value)


def _job_command(raw: Mapping[str, Any]) -> str:
    value = raw.get("command")
    if value is None:
        raise _FieldError("command", None, "the field is missing; set the shell command to run")
    if not isinstance(value, str):
        raise _FieldError(
            "command",
            value,
            f"the value is {_type_name(value)}; expected the shell command as a string",
        )
    if not value.strip():
        raise _FieldError("command", value, "the field is empty; set the shell command to run")
    size = len(value.encode("utf-8"))
    if size > MAX_COMMAND_BYTES:
        raise _FieldError(
            "command",
            None,
            f"the command is {size} bytes; at most {MAX_COMMAND_BYTES} are allowed. Put a "
            "long script in a file on the minions and run that",
        )
    return value


def _job_optional_text(raw: Mapping[str, Any], key: str) -> str | None:
    value = raw.get(key)
    if value is None:
        return None
    try:
        return _check_text(value)
    except _InvalidValue as exc:
        raise _FieldError(key, value, exc.message) from None


def _job_timeout(raw: Mapping[str, Any]) -> int:
    # hard_timeout is the original's older name. When both are set, timeout wins, as it
    # did in the original.
    for key in ("timeout", "hard_timeout"):
        value = raw.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int):
            raise _FieldError(
                key, value, f"{_show(value)} is invalid: expected a whole number of seconds"
            )
        if value < 0:
            raise _FieldError(key, value, f"{value} is invalid: must be 0 (no limit) or more")
        if value > MAX_TIMEOUT:
            raise _FieldError(
                key,
                value,
                f"{value} is invalid: must be at most {MAX_TIMEOUT} (10 years); use 0 for no limit",
            )
        return value
    return DEFAULT_TIMEOUT


def _job_allow_overlap(raw: Mapping[str, Any]) -> bool:
    value = raw.get("allow_overlap")
    if value is None:
        return False
    if value == LEGACY_ALLOW_OVERLAP:
        return True
    if not isinstance(value, bool):
        raise _FieldError(
            "allow_overlap", value, f"{_show(value)} is invalid: expected true or false"
        )
    return value


def _job_catch_up(raw: Mapping[str, Any]) -> str:
    value = raw.get("catch_up")
    if value is None:
        return DEFAULT_CATCH_UP
    if value is False:
        # YAML reads an unquoted `none` as a string but `no`/`off` as false.
        return "none"
    if value not in CATCH_UP_POLICIES:
        raise _FieldError(
            "catch_up",
            value,
            f"{_show(value)} is invalid: expected one of {', '.join(CATCH_UP_POLICIES)}",
        )
    return str(value)


def _job_catch_up_limit(raw: Mapping[str, Any]) -> int:
    value = raw.get("catch_up_limit")
    if value is None:
        return DEFAULT_CATCH_UP_LIMIT
    if (
        isinstance(value, bool)
        or not isinstance(value, int)
        or not 1 <= value <= MAX_CATCH_UP_LIMIT
    ):
        raise _FieldError(
            "catch_up_limit",
            value,
            f"{_show(value)} is invalid: expected a whole number of 1 or more",
        )
    return value


def _job_env(raw: Mapping[str, Any]) -> Mapping[str, str]:
    """Validate the env mapping. Messages name variables but never show their values."""
    value = raw.get("env")
    if value is None:
        return MappingProxyType({})
    if not isinstance(value, Mapping):
        raise _FieldError(
            "env",
            None,
            f"the value is {_type_name(value)}; expected a mapping of variable names to values",
        )
    env: dict[str, str] = {}
    problems: list[str] = []
    named: list[str] = []  # variables with a problem, for the error's value
    total = 0
    for name, item in value.items():
        if not isinstance(name, str) or not name or "=" in name or "\0" in name:
            problems.append(
                f"variable name {_show(name)} is invalid: expected a non-empty string "
                "without '=' or NUL"
            )
            continue
        if item is None or not isinstance(item, (str, int, float, bool)):
            problems.append(
                f"the value of {name} is {_type_name(item)}; expected a string or a number"
            )
            named.append(name)
            continue
        text = str(item)
        size = len(text.encode("utf-8"))
        if "\0" in text:
            problems.append(f"the value of {name} contains a NUL character")
            named.append(name)
        elif size > MAX_ENV_VALUE_BYTES:
            problems.append(
                f"the value of {name} is {size} bytes; at most {MAX_ENV_VALUE_BYTES} are allowed"
            )
            named.append(name)
        total += size + len(name.encode("utf-8"))
        env[name] = text
    if total > MAX_ENV_TOTAL_BYTES:
        problems.append(
            f"the variables take {total} bytes; at most {MAX_ENV_TOTAL_BYTES} are allowed"
        )
    if problems:
        # Every problem at once, so one edit fixes them all. Values are never shown.
        message = ". ".join(problem[0].upper() + problem[1:] for problem in problems)
        raise _FieldError("env", ", ".join(named) or None, message[0].lower() + message[1:])
    return MappingProxyType(env)


def _job_loglevel(raw: Mapping[str, Any]) -> str | None:
    value = raw.get("wrapper_loglevel")
    if value is None:
        return None
    try:
        return _check_loglevel(value)
    except _InvalidValue as exc:
        raise _FieldError("wrapper_loglevel", value, exc.message) from None


def key_warnings(name: str, raw: Mapping[Any, Any], source: Path) -> list[str]:
    warnings = []
    for key in raw:
        if key in _JOB_KEYS:
            continue
        reason = _IGNORED_JOB_KEYS.get(key) if isinstance(key, str) else None
        if reason is not None:
            warnings.append(f"job {name!r} in {source}: key {key!r} is ignored: {reason}")
        else:
            warnings.append(f"job {name!r} in {source}: unknown key {key!r} is ignored")
    return warnings


# Validation steps for the fields of Job other than the schedule, in order. Each takes the
# raw definition, the settings and the values of the earlier steps.
_JobStep = Callable[[Mapping[str, Any], Settings, dict[str, Any]], object]
_JOB_STEPS: tuple[tuple[str, _JobStep], ...] = (
    ("timezone", lambda raw, settings, values: _job_timezone(raw, settings)),
    ("target_type", lambda raw, settings, values: _job_target_type(raw)),
    ("targets", lambda raw, settings, values: _job_targets(raw, values.get("target_type"))),
    ("command", lambda raw, settings, values: _job_command(raw)),
    ("user", lambda raw, settings, values: _job_optional_text(raw, "user")),
    ("cwd", lambda raw, settings, values: _job_optional_text(raw, "cwd")),
    ("env", lambda raw, settings, values: _job_env(raw)),
    ("timeout", lambda raw, settings, values: _job_timeout(raw)),
    ("allow_overlap", lambda raw, settings, values: _job_allow_overlap(raw)),
    ("wrapper_path", lambda raw, settings, values: _job_optional_text(raw, "wrapper_path")),
    ("wrapper_loglevel", lambda raw, settings, values: _job_loglevel(raw)),
    ("wrapper_logdir", lambda raw, settings, values: _job_optional_text(raw, "wrapper_logdir")),
    ("catch_up", lambda raw, settings, values: _job_catch_up(raw)),
    ("catch_up_limit", lambda raw, settings, values: _job_catch_up_limit(raw)),
)


class _ScheduleCache:
    """Parsed schedules and the outcome of their check_fires(now), for one instant.

    Many jobs share a schedule, so the jobs of one load share the parsing. CronSchedule
    is immutable, so jobs can share an instance.
    """

    def __init__(self, now: datetime) -> None:
        self.now = now
        self._results: dict[tuple[tuple[str, ...], str], CronSchedule | ScheduleError] = {}

    def lookup(self, fields: Mapping[str, str], zone: str) -> CronSchedule | ScheduleError:
        key = (tuple(fields.values()), zone)
        result = self._results.get(key)
        if result is None:
            try:
                result = CronSchedule.parse(fields, ZoneInfo(zone))
                result.check_fires(self.now)
            except ScheduleError as exc:
                result = exc
            self._results[key] = result
        return result


def _check_job(
    name: object, raw: object, source: Path, settings: Settings, schedules: _ScheduleCache
) -> _JobCheck:
    """Validate one job definition and collect every problem in it."""
    name_error = _check_job_name(name, source)
    if name_error is not None:
        return _JobCheck(None, [name_error], [])
    assert isinstance(name, str)

    def error(exc: _FieldError | ScheduleError) -> ConfigError:
        return ConfigError(exc.message, file=source, job=name, field=exc.field, value=exc.value)

    if not isinstance(raw, Mapping):
        message = (
            f"the definition is {_type_name(raw)}; expected a mapping with schedule fields, "
            "targets and command"
        )
        return _JobCheck(None, [ConfigError(message, file=source, job=name)], [])

    errors: list[ConfigError] = []
    schedule_fields: dict[str, str] = {}
    for key in FIELD_NAMES:
        try:
            schedule_fields[key] = _schedule_text(raw, key)
        except _FieldError as exc:
            errors.append(error(exc))
    values: dict[str, Any] = {}
    for key, step in _JOB_STEPS:
        try:
            values[key] = step(raw, settings, values)
        except _FieldError as exc:
            errors.append(error(exc))

    # The schedule is parsed only once its text and zone are valid, so that a missing
    # field is reported once and not again as a parse error.
    schedule: CronSchedule | None = None
    if len(schedule_fields) == len(FIELD_NAMES) and "timezone" in values:
        result = schedules.lookup(schedule_fields, values["timezone"])
        if isinstance(result, ScheduleError):
            errors.append(error(result))
        else:
            schedule = result

    warnings = key_warnings(name, raw, source)
    if errors or schedule is None:
        return _JobCheck(None, errors, warnings)
    job = Job(
        name=name,
        source=source,
        group=_group_of(source),
        schedule=schedule,
        schedule_fields=MappingProxyType(schedule.fields),
        **values,
    )
    return _JobCheck(job, [], warnings)


def _check_job_name(name: object, source: Path) -> ConfigError | None:
    if not isinstance(name, str):
        return ConfigError(
            f"job name {_show(name)} is {_type_name(name)}; quote it to use it as a name",
            file=source,
            value=name,
        )
    if not JOB_NAME_PATTERN.fullmatch(name):
        return ConfigError(
            f"job name {name!r} is invalid: names start with a letter or digit and "
            "contain only letters, digits, '_', '.' and '-'",
            file=source,
            value=name,
        )
    if len(name) > MAX_JOB_NAME_LENGTH:
        return ConfigError(
            f"job name {name[:40]!r}... is {len(name)} characters long; at most "
            f"{MAX_JOB_NAME_LENGTH} are allowed",
            file=source,
            value=name,
        )
    return None


def parse_job(name: str, raw: object, source: Path, settings: Settings, now: datetime) -> Job:
    """Validate one job definition read from ``source`` and return it as a Job.

    ``now`` is the instant that the schedule must be able to fire after. Raises
    ConfigError for the first problem found.
    """
    check = _check_job(name, raw, source, settings, _ScheduleCache(now))
    if check.job is None:
        raise check.errors[0]
    return check.job


# -------------------------------------------------------------------------- the files


_YAML_TAG = "tag:yaml.org,2002:"
_YAML_STR = _YAML_TAG + "str"
_YAML_MAP = _YAML_TAG + "map"
_YAML_SEQ = _YAML_TAG + "seq"
_YAML_MERGE = _YAML_TAG + "merge"
_YAML_SCALAR_TAGS = frozenset(
    _YAML_TAG + name for name in ("null", "bool", "int", "float", "str", "timestamp", "binary")
)


class _NeedsFullConstructor(Exception):
    """The document uses a YAML feature that the fast path leaves to PyYAML."""


class _YamlLoader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):  # type: ignore[misc]
    """Safe YAML loader (libyaml-based when available) that records duplicate keys.

    PyYAML keeps the last of two equal keys in a mapping without any warning, and so did
    the original Saltpeter, so a duplicate stays valid here but produces a warning.

    Building the Python objects from the parsed nodes took half of PyYAML's time on
    generated job files. :meth:`_build` does it about three times faster for documents
    made of plain mappings, lists and standard scalars, which is what job files are.
    Anything else, such as merge keys or unhashable keys, goes through PyYAML's own
    SafeConstructor.
    """

    # Tags of plain scalars by their text. Job files repeat the same keys and values
    # (min, hour, '*', glob) thousands of times, and PyYAML's resolver runs its regular
    # expressions on each. Without path resolvers, which this loader does not use, the
    # tag of a plain scalar depends on its text alone.
    _plain_scalar_tags: dict[str, str] = {}
    _MAX_CACHED_TAGS = 4096

    def __init__(self, stream: bytes) -> None:
        super().__init__(stream)
        self.duplicate_keys: list[str] = []

    def resolve(self, kind: type[yaml.Node], value: Any, implicit: tuple[bool, bool]) -> str:
        if kind is not yaml.ScalarNode or not implicit[0] or self.yaml_path_resolvers:
            return super().resolve(kind, value, implicit)
        tag = self._plain_scalar_tags.get(value)
        if tag is None:
            tag = super().resolve(kind, value, implicit)
            if len(self._plain_scalar_tags) < self._MAX_CACHED_TAGS:
                self._plain_scalar_tags[value] = tag
        return tag

    def construct_document(self, node: yaml.Node) -> Any:
        try:
            return self._build(node, {})
        except _NeedsFullConstructor:
            self.duplicate_keys.clear()
            return super().construct_document(node)

    def _build(self, node: yaml.Node, built: dict[int, Any]) -> Any:
        """Build the object for ``node``. ``built`` maps node ids to finished containers,
        so that an alias yields the same object as its anchor, as in PyYAML."""
        tag = node.tag
        if type(node) is yaml.ScalarNode:
            if tag == _YAML_STR:
                return node.value
            if tag not in _YAML_SCALAR_TAGS:
                raise _NeedsFullConstructor
            return self.yaml_constructors[tag](self, node)

        known = built.get(id(node))
        if known is not None:
            return known
        if type(node) is yaml.SequenceNode and tag == _YAML_SEQ:
            items: list[Any] = []
            built[id(node)] = items
            for item in node.value:
                items.append(self._build(item, built))
            return items
        if type(node) is yaml.MappingNode and tag == _YAML_MAP:
            mapping: dict[Any, Any] = {}
            built[id(node)] = mapping
            for key_node, value_node in node.value:
                if key_node.tag == _YAML_MERGE:
                    raise _NeedsFullConstructor
                key = self._build(key_node, built)
                try:
                    seen = key in mapping
                except TypeError:
                    raise _NeedsFullConstructor from None  # PyYAML reports unhashable keys
                if seen:
                    self._record_duplicate(node, key_node, key)
                mapping[key] = self._build(value_node, built)
            return mapping
        raise _NeedsFullConstructor

    def _record_duplicate(self, node: yaml.MappingNode, key_node: yaml.Node, key: Any) -> None:
        first_line = next(
            other.start_mark.line + 1
            for other, _ in node.value
            if type(other) is yaml.ScalarNode and other.value == key_node.value
        )
        self.duplicate_keys.append(
            f"line {key_node.start_mark.line + 1}: duplicate key {key!r} (first at line "
            f"{first_line}); the later value is used"
        )

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        # Only documents that _build leaves to PyYAML come here.
        first_lines: dict[tuple[str, str], int] = {}
        for key_node, _ in node.value:
            # Merge keys ("<<") may repeat, and the keys they bring in may be overridden.
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == _YAML_MERGE:
                continue
            identity = (key_node.tag, key_node.value)
            line = key_node.start_mark.line + 1
            if identity in first_lines:
                self.duplicate_keys.append(
                    f"line {line}: duplicate key {key_node.value!r} (first at line "
                    f"{first_lines[identity]}); the later value is used"
                )
            else:
                first_lines[identity] = line
        return super().construct_mapping(node, deep=deep)


def _read_yaml(data: bytes, source: Path) -> tuple[object, list[str]]:
    """Parse one YAML document and return it with the duplicate-key warnings."""
    loader = _YamlLoader(data)
    try:
        document = loader.get_single_data()
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        problem = exc.problem or exc.context or "syntax error"
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        context = ""
        if exc.context and exc.context_mark is not None and exc.problem:
            # "while scanning a quoted scalar" and where it began: often the real mistake.
            start = exc.context_mark
            context = f" ({exc.context} at line {start.line + 1}, column {start.column + 1})"
        raise ConfigError(f"invalid YAML{where}: {problem}{context}", file=source) from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"invalid YAML: {exc}", file=source) from None
    except RecursionError:
        raise ConfigError("invalid YAML: the document is nested too deeply", file=source) from None
    finally:
        loader.dispose()
    warnings = [f"{source}: {text}" for text in loader.duplicate_keys]
    return document, warnings


# Stat key of one version of a file: (st_mtime_ns, st_size, st_ino, st_ctime_ns). The
# ctime also changes on chmod and chown, so fixing a file's permissions counts as a change.
_StatKey = tuple[int, int, int, int]


def _stat_key(result: os.stat_result) -> _StatKey:
    return (result.st_mtime_ns, result.st_size, result.st_ino, result.st_ctime_ns)


@dataclass
class _FileContent:
    """The jobs and sections from one successful parse of a file, before job validation."""

    raw_jobs: dict[str, object]
    settings: _SectionCheck
    maintenance: _SectionCheck
    errors: list[ConfigError]  # invalid job names
    warnings: list[str]  # duplicate YAML keys


@dataclass
class _FileState:
    """A config file as of the last load, with its parse and job checks cached."""

    path: Path
    stat_key: _StatKey | str | None = None  # a string when stat failed, saying why
    racy: bool = False  # modified too close to the read to trust its stat key
    error: ConfigError | None = None  # the file could not be read or parsed
    content: _FileContent | None = None  # the last successful parse, kept after an error
    checked_with: Settings | None = None  # the settings that the cached checks used
    checks: dict[str, _JobCheck] = field(default_factory=dict)

    def check_job(self, name: str, settings: Settings, schedules: _ScheduleCache) -> _JobCheck:
        """Validate one job of the file, or return the cached check for these settings."""
        if self.checked_with != settings:
            self.checks.clear()
            self.checked_with = settings
        check = self.checks.get(name)
        if check is None:
            assert self.content is not None
            raw = self.content.raw_jobs[name]
            check = _check_job(name, raw, self.path, settings, schedules)
            self.checks[name] = check
        return check


def _parse_file(data: bytes, path: Path, previous: _FileContent | None) -> _FileContent:
    """Split a file's document into jobs and sections. Raises ConfigError for the file.

    Section values that are invalid now keep their value from ``previous``, the file's
    last successful parse.
    """
    document, warnings = _read_yaml(data, path)
    if document is None:
        document = {}  # an empty file, or one with only comments
    if not isinstance(document, Mapping):
        raise ConfigError(
            f"the top level is {_type_name(document)}; expected a mapping of job names to "
            "job definitions",
            file=path,
        )

    raw_jobs: dict[str, object] = {}
    errors: list[ConfigError] = []
    settings = _SectionCheck()
    maintenance = _SectionCheck()
    for key, value in document.items():
        if key == SETTINGS_SECTION:
            previous_values = previous.settings.values if previous else None
            settings = _check_settings_section(value, path, previous_values)
        elif key == MAINTENANCE_SECTION:
            previous_values = previous.maintenance.values if previous else None
            maintenance = _check_maintenance_section(value, path, previous_values)
        else:
            name_error = _check_job_name(key, path)
            if name_error is not None:
                errors.append(name_error)
            else:
                raw_jobs[key] = value
    return _FileContent(raw_jobs, settings, maintenance, errors, warnings)


def _is_config_name(name: str) -> bool:
    """Tell whether a directory entry is a config file, by its name.

    Hidden files (which include Vim swap and Emacs lock files) and backups ending in
    "~" are skipped.
    """
    if name.startswith(".") or name.endswith("~"):
        return False
    return name.endswith(CONFIG_SUFFIXES)


# ---------------------------------------------------------------------------- loader


@dataclass
class ConfigSnapshot:
    """The result of one load: what the engine runs with, and what is wrong."""

    jobs: dict[str, Job]
    settings: Settings
    maintenance: Maintenance
    errors: list[ConfigError]  # every problem found by this load
    warnings: list[str]


class ConfigLoader:
    """Load a config directory again and again, re-reading only the files that changed.

    A job whose definition or file turns invalid keeps its last valid definition, and
    the error is still reported. A job removed from a valid file, or whose file was
    deleted, is gone. The loader returns problems in the snapshot and leaves logging
    them to the caller. It is not safe to call from two threads at once.
    """

    def __init__(
        self,
        config_dir: Path,
        overrides: Mapping[str, object] | None = None,
        clock: Callable[[], datetime] = _utc_now,
    ) -> None:
        """Create a loader for ``config_dir``. Nothing is read before load().

        ``overrides`` are settings from the engine's options in the master config. They
        take precedence over ``saltpeter_config`` in the files and are validated alike.
        ``clock`` returns the current time as an aware datetime.
        """
        self.config_dir = Path(config_dir)
        self._clock = clock
        self._overrides = _check_settings_section(dict(overrides or {}), None)
        self._loaded = False
        self._files: dict[str, _FileState] = {}  # by file name, in name order
        self._scan_error: str | None = None
        self._jobs: dict[str, Job] = {}
        self._owners: dict[str, Path] = {}

    def changed(self) -> bool:
        """Tell whether a config file was added, removed or modified since the last load.

        This only lists the directory and stats the files, so it is cheap enough to call
        every second. A file modified within 2 s of being read counts as changed until
        it is read again, because its mtime cannot show a second write in the same
        timestamp tick.
        """
        if not self._loaded:
            return True
        try:
            listing = self._scan()
        except OSError as exc:
            return str(exc) != self._scan_error
        if self._scan_error is not None or listing.keys() != self._files.keys():
            return True
        return any(
            state.racy or state.stat_key != listing[name] for name, state in self._files.items()
        )

    def load(self) -> ConfigSnapshot:
        """Read the changed files and return the jobs, settings and maintenance in effect."""
        now = self._clock()
        with _gc_paused():
            scan_error, reread = self._refresh_files()
            errors, warnings = self._file_problems()
            if scan_error is not None:
                errors.insert(0, scan_error)
            settings = self._merge_settings(warnings)
            errors.extend(self._overrides.errors)
            warnings.extend(self._overrides.warnings)
            maintenance = self._merge_maintenance()
            jobs = self._resolve_jobs(settings, now, errors, warnings)
        self._loaded = True
        if reread:
            log.debug(
                "Read %d changed file(s) in %s: %d job(s), %d error(s), %d warning(s)",
                reread,
                self.config_dir,
                len(jobs),
                len(errors),
                len(warnings),
            )
        return ConfigSnapshot(jobs, settings, maintenance, errors, warnings)

    def _scan(self) -> dict[str, _StatKey | str]:
        """List the config files in name order with their stat keys, following symlinks.

        Subdirectories and other non-regular files are left out.
        """
        listing: dict[str, _StatKey | str] = {}
        with os.scandir(self.config_dir) as entries:
            for entry in entries:
                if not _is_config_name(entry.name):
                    continue
                try:
                    result = entry.stat()  # follows a symlink to its target
                except OSError as exc:
                    listing[entry.name] = f"stat failed: {exc.strerror}"
                    continue
                if stat.S_ISREG(result.st_mode):
                    listing[entry.name] = _stat_key(result)
        return dict(sorted(listing.items()))

    def _refresh_files(self) -> tuple[ConfigError | None, int]:
        """Re-read the added and modified files and forget the deleted ones.

        Returns an error when the directory cannot be listed, in which case every file
        keeps its last state, and the number of files read.
        """
        try:
            listing = self._scan()
        except OSError as exc:
            self._scan_error = str(exc)
            error = ConfigError(
                f"the config directory cannot be read: {exc.strerror}", file=self.config_dir
            )
            return error, 0
        self._scan_error = None

        files: dict[str, _FileState] = {}
        reread = 0
        for name, key in listing.items():
            state = self._files.get(name) or _FileState(path=self.config_dir / name)
            if state.stat_key != key or state.racy:
                self._read_file(state, key)
                reread += 1
            files[name] = state
        self._files = files
        return None, reread

    def _read_file(self, state: _FileState, listed_key: _StatKey | str) -> None:
        """Parse one file into ``state``, keeping its last good content on failure."""
        read_started_ns = time.time_ns()
        try:
            with open(state.path, "rb") as stream:
                # The key comes from the open file, so that it describes the bytes read.
                result = os.fstat(stream.fileno())
                data = stream.read()
        except OSError as exc:
            # Retried once the stat key changes, for example when the permissions are fixed.
            state.stat_key = listed_key
            state.racy = False
            state.error = ConfigError(f"cannot be read: {exc.strerror}", file=state.path)
            return
        state.stat_key = _stat_key(result)
        state.racy = abs(read_started_ns - result.st_mtime_ns) < _RACY_WINDOW_NS
        try:
            content = _parse_file(data, state.path, state.content)
        except ConfigError as exc:
            state.error = exc
            return
        state.error = None
        state.content = content
        state.checked_with = None
        state.checks.clear()

    def _file_problems(self) -> tuple[list[ConfigError], list[str]]:
        """Collect the problems found while reading and parsing the files, in name order."""
        errors: list[ConfigError] = []
        warnings: list[str] = []
        for state in self._files.values():
            if state.error is not None:
                errors.append(state.error)
            content = state.content
            if content is None:
                continue
            errors.extend(content.errors)
            errors.extend(content.settings.errors)
            errors.extend(content.maintenance.errors)
            warnings.extend(content.warnings)
            warnings.extend(content.settings.warnings)
            warnings.extend(content.maintenance.warnings)
        return errors, warnings

    def _merge_settings(self, warnings: list[str]) -> Settings:
        """Merge the saltpeter_config sections in file name order, then the overrides.

        A later file overrides an earlier one, with a warning naming both.
        """
        values: dict[str, Any] = {}
        origins: dict[str, Path] = {}
        for state in self._files.values():
            if state.content is None:
                continue
            for key, value in state.content.settings.values.items():
                if key in origins:
                    warnings.append(
                        f"{state.path}: {SETTINGS_SECTION} key {key!r} is also set in "
                        f"{origins[key]}; the value from {state.path} is used"
                    )
                values[key] = value
                origins[key] = state.path
        values.update(self._overrides.values)
        return Settings(**values)

    def _merge_maintenance(self) -> Maintenance:
        """Merge the saltpeter_maintenance sections: any global true wins, machines add up."""
        global_ = False
        machines: set[str] = set()
        for state in self._files.values():
            if state.content is None:
                continue
            section = state.content.maintenance.values
            global_ = global_ or section.get("global", False)
            machines.update(section.get("machines", ()))
        return Maintenance(global_=global_, machines=frozenset(machines))

    def _resolve_jobs(
        self, settings: Settings, now: datetime, errors: list[ConfigError], warnings: list[str]
    ) -> dict[str, Job]:
        """Validate each job in the file that owns its name.

        A name whose definition is invalid keeps the Job from the last load, if any.
        """
        schedules = _ScheduleCache(now)
        candidates: dict[str, list[_FileState]] = {}
        for state in self._files.values():
            if state.content is None:
                continue
            for name in state.content.raw_jobs:
                candidates.setdefault(name, []).append(state)

        jobs: dict[str, Job] = {}
        owners: dict[str, Path] = {}
        for name, states in candidates.items():
            owner = _pick_owner(states, self._owners.get(name))
            owners[name] = owner.path
            for other in states:
                if other is not owner:
                    message = f"already defined in {owner.path}, which keeps it; rename one of them"
                    errors.append(ConfigError(message, file=other.path, job=name))
            check = owner.check_job(name, settings, schedules)
            warnings.extend(check.warnings)
            errors.extend(check.errors)
            if check.job is not None:
                jobs[name] = check.job
            elif name in self._jobs:
                jobs[name] = self._jobs[name]
        self._jobs = jobs
        self._owners = owners
        return jobs


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    """Pause Python's cyclic garbage collector for the duration of the block.

    A large load allocates hundreds of thousands of objects that all stay alive, so each
    collection pass during it walks them and frees nothing. In a benchmark of 10,000
    generated jobs in 100 files on a 2-core VM, the pause cut the first load by 15 to
    40 percent.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _pick_owner(states: list[_FileState], previous_owner: Path | None) -> _FileState:
    """Return the file that keeps a job name defined in several files.

    The file that had the name at the last load keeps it, otherwise the first file in
    name order.
    """
    for state in states:
        if state.path == previous_owner:
            return state
    return states[0]


def load_directory(
    config_dir: Path, overrides: Mapping[str, object] | None = None
) -> ConfigSnapshot:
    """Load a config directory once, for ``saltpeter.validate``."""
    return ConfigLoader(config_dir, overrides).load()
