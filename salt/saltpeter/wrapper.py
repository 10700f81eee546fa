#!/usr/bin/env python3
"""Run one Saltpeter job on a minion and report it to the engine over a WebSocket.

The ``state.apply saltpeter`` formula installs this file on each minion, by
default as ``/usr/local/bin/sp_wrapper.py``. It runs with the minion's own
Python (3.10 or newer), needs only the standard library and Tornado, and
imports nothing from Salt or Saltpeter. docs/protocol.md in the Saltpeter
repository is the contract with the engine: launch arguments, frames,
sequencing, acknowledgements, heartbeats, reconnecting, timeouts and local
records.

The ``saltpeter`` execution module runs the launcher subcommands, which
import no Tornado::

    sp_wrapper.py launch --run RUN --job JOB --machine MINION --url URL [...]
    sp_wrapper.py running [--statedir DIR]
    sp_wrapper.py kill-local RUN [--statedir DIR] [--grace SECONDS]
    sp_wrapper.py --version

``launch`` starts the wrapper proper detached (``sp_wrapper.py --run RUN
...``), waits for its ready line and prints the result as JSON, as the other
two subcommands do.

The wrapper exits with status 0 once the engine has acknowledged the run's
``complete`` frame. It exits with 1 when the result could not be delivered,
after a fatal error code from the engine or 24 h without a connection, and
with 255 when it could not start, after writing the reason to the ready pipe.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import codecs
import collections
import concurrent.futures
import contextlib
import ctypes
import enum
import itertools
import json
import logging
import os
import pwd
import random
import select
import signal
import ssl
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, NoReturn

__version__ = "0.1.0"

log = logging.getLogger(__name__)

PROTOCOL_VERSION = 1
DEFAULT_LOGDIR = "/var/log/sp_wrapper"
DEFAULT_STATEDIR = "/var/run/saltpeter"
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
SHELL = "/bin/sh"
LOGLEVELS = ("normal", "debug", "off")

MAX_FRAME_BYTES = 1024 * 1024
# Output is flushed into an `output` frame 50 ms after its first character, or
# at once when 64 Ki characters are buffered. A 64 Ki-character frame stays
# below MAX_FRAME_BYTES even when every character is a control character that
# JSON escapes as \u00XX (6 bytes).
FLUSH_INTERVAL = 0.05
FLUSH_CHARS = 64 * 1024
READ_CHUNK_BYTES = 64 * 1024
# Once the engine's cap keeps only the end of the output, the newest output
# is sent at most this often, and only while the send window has room. What
# the command prints faster than that is skipped, so a flood costs the
# wrapper little more than reading the pipe.
TAIL_FLUSH_INTERVAL = 0.25
# Most output held in memory for the end of a capped run.
TAIL_MEMORY_MAX_BYTES = 16 * 1024 * 1024
# Output numbered and kept in memory until acknowledged; more waits in the spool.
WINDOW_OUTPUT_BYTES = 4 * 1024 * 1024
# Output the spool file keeps while the engine is unreachable; older output is dropped.
DEFAULT_SPOOL_MAX_BYTES = 256 * 1024 * 1024

DEFAULT_HEARTBEAT_INTERVAL = 5.0
MIN_HEARTBEAT_INTERVAL = 0.05
DEFAULT_KILL_GRACE = 5.0
PIPE_GRACE = 5.0
BACKOFF_INITIAL = 0.5
BACKOFF_MAX = 30.0
BACKOFF_JITTER = 0.25
GIVE_UP_AFTER = 24 * 3600.0
CONNECT_TIMEOUT = 20.0
WELCOME_TIMEOUT = 30.0
# WebSocket pings detect a connection that died without a FIN (a NAT entry
# that expired, a pulled cable); heartbeats alone would only tell the engine.
PING_INTERVAL = 15.0
PING_TIMEOUT = 30.0
GROUP_POLL_INTERVAL = 0.05

FATAL_ERROR_CODES = frozenset({"auth_failed", "unknown_run", "protocol_version", "job_unavailable"})

EXIT_DELIVERED = 0
EXIT_OK = 0
EXIT_UNDELIVERED = 1
EXIT_START_FAILED = 255

RETCODE_TIMEOUT = 124
RETCODE_KILLED = 143
RETCODE_START_FAILED = 255

# prctl(2) option that makes orphaned descendants children of this process, so
# the wrapper reaps them. Without it an orphan that exits stays a zombie when
# PID 1 does not reap, as in many containers. A zombie still counts as a
# member of its process group, so the wait for an empty group would not end.
PR_SET_CHILD_SUBREAPER = 36


def _import_tornado() -> None:
    """Import Tornado's WebSocket client into this module, or raise StartupError.

    Run as a script, the wrapper imports Tornado only when it runs a job, so
    the launcher subcommands start without it. Imported as a module, it tries
    at once, below.
    """
    global tornado
    try:
        import tornado.httpclient
        import tornado.iostream
        import tornado.websocket
    except ImportError as exc:
        raise StartupError(f"cannot import tornado: {exc}") from None


# -- time arithmetic --------------------------------------------------------
# Durations and deadlines are time.monotonic() seconds. Only frame timestamps
# use the wall clock.


def backoff_delay(attempt: int, jitter: float) -> float:
    """Return the seconds to wait before reconnect attempt ``attempt`` (0 for the first).

    The delay starts at 0.5 s and doubles up to 30 s. ``jitter`` is a random
    number in [0, 1) that takes up to 25% off, so wrappers that lost the engine
    at the same moment do not all reconnect at the same moment.
    """
    base = min(BACKOFF_INITIAL * 2.0 ** min(attempt, 32), BACKOFF_MAX)
    return base * (1.0 - BACKOFF_JITTER * jitter)


def heartbeat_wait(now: float, last_sent_at: float, interval: float) -> float:
    """Return the seconds until the next heartbeat is due."""
    return max(0.0, last_sent_at + interval - now)


def timeout_wait(now: float, started_at: float, timeout: float) -> float | None:
    """Return the seconds until the job's timeout passes, or None when it has no timeout."""
    if timeout <= 0:
        return None
    return max(0.0, started_at + timeout - now)


def kill_wait(now: float, term_sent_at: float, grace: float) -> float:
    """Return the seconds until SIGKILL follows the SIGTERM sent at ``term_sent_at``."""
    return max(0.0, term_sent_at + grace - now)


def give_up_wait(now: float, disconnected_since: float, idle_since: float | None) -> float | None:
    """Return the seconds left before the wrapper stops reconnecting, or None while it must not.

    ``idle_since`` is when the command finished, or when the wrapper started if
    the command has not started. It is None while the command runs. The wrapper
    gives up after GIVE_UP_AFTER seconds without a connection once it is idle.
    """
    if idle_since is None:
        return None
    return max(0.0, max(disconnected_since, idle_since) + GIVE_UP_AFTER - now)


def utc_timestamp() -> str:
    """Return the current time as an ISO 8601 string in UTC with microseconds."""
    return datetime.now(timezone.utc).isoformat(timespec="microseconds")


# -- names, arguments and the job definition ----------------------------------


class StartupError(Exception):
    """The wrapper cannot start. main() writes the message to the ready pipe."""


class JobStartError(Exception):
    """The command cannot start. The message goes to the engine as output."""


def validate_name(kind: str, value: str) -> str:
    """Return ``value`` unchanged, or raise ValueError if it is unsafe in a file name.

    Run ids and job names become STATEDIR/<run>.json and LOGDIR/<job>.log, so
    they must not contain "/" or "..", control characters, or be empty.
    """
    if not value:
        raise ValueError(f"{kind} is empty")
    if len(value.encode("utf-8", "surrogateescape")) > 200:
        raise ValueError(f"{kind} {value[:40]!r}... is longer than 200 bytes")
    if "/" in value or ".." in value:
        raise ValueError(f"{kind} {value!r} contains '/' or '..'")
    if any(ord(char) < 32 or ord(char) == 127 for char in value):
        raise ValueError(f"{kind} {value!r} contains a control character")
    return value


@dataclass(frozen=True)
class JobSpec:
    """The job definition that the engine sends in its welcome."""

    command: str
    user: str | None
    cwd: str | None
    env: dict[str, str]
    timeout: float
    kill_grace: float


def _number_field(job: Mapping[str, Any], name: str, default: float) -> float:
    value = job.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise JobStartError(f"field '{name}': {value!r} is not a number of seconds >= 0")
    return float(value)


def _optional_text_field(job: Mapping[str, Any], name: str) -> str | None:
    value = job.get(name)
    if value is None or value == "":
        return None
    if not isinstance(value, str) or "\0" in value:
        raise JobStartError(f"field '{name}': {value!r} is not a string")
    return value


def _env_field(job: Mapping[str, Any]) -> dict[str, str]:
    env = job.get("env")
    if env is None:
        return {}
    if not isinstance(env, dict):
        raise JobStartError("field 'env' is not an object")
    result = {}
    for key, value in env.items():
        if not key or "=" in key or "\0" in key:
            raise JobStartError(f"field 'env': {key!r} is not a valid variable name")
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = str(value)
        if not isinstance(value, str) or "\0" in value:
            # The value itself is never shown: it may be a secret.
            raise JobStartError(f"field 'env': the value of {key} is not a string")
        result[key] = value
    return result


def parse_job(job: object) -> JobSpec:
    """Check the welcome's job object and return it as a JobSpec, or raise JobStartError."""
    if not isinstance(job, dict):
        raise JobStartError("the job definition is not an object")
    command = job.get("command")
    if not isinstance(command, str) or "\0" in command:
        raise JobStartError("field 'command' is missing or not a string")
    return JobSpec(
        command=command,
        user=_optional_text_field(job, "user"),
        cwd=_optional_text_field(job, "cwd"),
        env=_env_field(job),
        timeout=_number_field(job, "timeout", 0.0),
        kill_grace=_number_field(job, "kill_grace", DEFAULT_KILL_GRACE),
    )


def build_command_env(
    wrapper_env: Mapping[str, str],
    job_env: Mapping[str, str],
    account: pwd.struct_passwd,
    job_name: str,
    run_id: str,
    machine_id: str,
) -> dict[str, str]:
    """Return the command's environment.

    Only PATH and the locale variables come from the wrapper's own environment.
    The job's env may override anything except the SP_* variables set last.
    """
    env = {
        "HOME": account.pw_dir,
        "USER": account.pw_name,
        "LOGNAME": account.pw_name,
        "SHELL": SHELL,
        "PATH": wrapper_env.get("PATH") or DEFAULT_PATH,
    }
    for key, value in wrapper_env.items():
        if key == "LANG" or key.startswith("LC_"):
            env[key] = value
    env.update(job_env)
    env["SP_JOB_NAME"] = job_name
    env["SP_JOB_INSTANCE"] = run_id
    env["SP_MACHINE_ID"] = machine_id
    return env


@dataclass(frozen=True)
class LaunchPlan:
    """Everything needed to start the command, checked before the fork."""

    account: pwd.struct_passwd
    switch_user: bool
    groups: list[int]
    cwd: str
    env: dict[str, str]


def plan_launch(
    spec: JobSpec, job_name: str, run_id: str, machine_id: str, euid: int
) -> LaunchPlan:
    """Resolve the job's user, groups, cwd and environment, or raise JobStartError."""
    if spec.user is None:
        try:
            account = pwd.getpwuid(euid)
        except KeyError:
            raise JobStartError(f"the wrapper's uid {euid} has no passwd entry") from None
    else:
        try:
            account = pwd.getpwnam(spec.user)
        except KeyError:
            raise JobStartError(f"user {spec.user!r} not found") from None
    if euid != 0 and account.pw_uid != euid:
        raise JobStartError(
            f"the wrapper runs as uid {euid}, not root, so it cannot run the command as "
            f"user {account.pw_name!r}; launch the wrapper as root or remove 'user'"
        )
    cwd = spec.cwd if spec.cwd is not None else account.pw_dir
    if not os.path.isdir(cwd):
        what = "cwd" if spec.cwd is not None else f"home directory of user {account.pw_name!r}"
        raise JobStartError(f"{what} {cwd!r} not found or not a directory")
    groups = os.getgrouplist(account.pw_name, account.pw_gid) if euid == 0 else []
    env = build_command_env(os.environ, spec.env, account, job_name, run_id, machine_id)
    return LaunchPlan(account=account, switch_user=euid == 0, groups=groups, cwd=cwd, env=env)


# -- sequenced frames ---------------------------------------------------------


@dataclass(frozen=True)
class Frame:
    """One sequenced frame, serialized once and kept until an ack covers it."""

    seq: int
    kind: str
    text: str
    output_bytes: int


class Spool:
    """Entries waiting for a place in the send window, oldest first, in a file.

    Each entry is one line of JSON: ``[kind, fields]``. Entries have no
    sequence number yet, so the oldest output can be dropped when the spool is
    full without leaving a gap in the numbers the engine sees. With ``path``
    None the entries stay in memory, which the unit tests use. When the disk
    refuses a write, later entries wait in memory behind the file's, and
    ``failed`` stays true until both are empty, so the caller can stop reading
    output meanwhile.
    """

    def __init__(self, path: str | None, max_bytes: int) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self.failed = False
        self._memory: collections.deque[bytes] = collections.deque()
        self._memory_bytes = 0
        self._read_offset = 0
        self._write_offset = 0
        # Length of each entry in the file, oldest first, so a pop reads it in one call.
        self._file_lines: collections.deque[int] = collections.deque()
        self._file: Any = None
        if path is not None:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
            self._file = os.fdopen(fd, "r+b", buffering=0)

    @property
    def size(self) -> int:
        """Bytes of the entries waiting, as stored."""
        return self._write_offset - self._read_offset + self._memory_bytes

    def __bool__(self) -> bool:
        return self.size > 0

    def append(self, kind: str, fields: Mapping[str, Any]) -> None:
        line = json.dumps([kind, dict(fields)], ensure_ascii=False).encode("utf-8") + b"\n"
        if self._file is not None and not self.failed:
            try:
                self._file.seek(self._write_offset)
                self._file.write(line)
                self._write_offset += len(line)
                self._file_lines.append(len(line))
                return
            except OSError as exc:
                log.error("cannot spool output to %s: %s; pausing output", self.path, exc)
                self.failed = True
        self._memory.append(line)
        self._memory_bytes += len(line)

    def pop(self) -> tuple[str, dict[str, Any]] | None:
        """Remove and return the oldest entry."""
        line = self._pop_line()
        if line is None:
            return None
        kind, fields = json.loads(line)
        return str(kind), dict(fields)

    def _pop_line(self) -> bytes | None:
        if self._read_offset < self._write_offset:
            # readline() on this unbuffered file reads one byte per system call,
            # so the entry is read whole, at the length recorded when it was written.
            line = os.pread(self._file.fileno(), self._file_lines.popleft(), self._read_offset)
            self._read_offset += len(line)
            if self._read_offset >= self._write_offset:
                # The file is empty again: start over at its beginning.
                self._file.truncate(0)
                self._read_offset = self._write_offset = 0
                self._file_lines.clear()
            return line
        if self._memory:
            line = self._memory.popleft()
            self._memory_bytes -= len(line)
            if not self._memory:
                self.failed = False
            return line
        self.failed = False
        return None

    def drop_oldest_output(self) -> int:
        """Drop the oldest output entry to make room; return the UTF-8 bytes it held.

        A ``complete`` entry is never dropped. Returns 0 when no output entry
        is left to drop.
        """
        line = self._pop_line()
        if line is None:
            return 0
        kind, fields = json.loads(line)
        if kind != "output":
            # Only complete can follow output, and it is the last entry; put it back.
            self.append(kind, fields)
            return 0
        skipped = fields.get("skipped", 0)
        return len(str(fields.get("data", "")).encode("utf-8")) + int(skipped)

    def close(self, remove: bool) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if remove and self.path is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)


class Outbox:
    """Sequenced frames the engine has not acknowledged, and output waiting to be sent.

    Output is numbered and kept in memory, to be sent and resent until
    acknowledged, while less than WINDOW_OUTPUT_BYTES of it is unacknowledged,
    so the window holds at most that plus one frame. Everything after that waits in the
    spool, on disk, and gets its sequence number when an ack makes room. The
    spool holds at most ``spool_max_bytes``; beyond that the oldest waiting
    output is dropped and an ``output`` frame says how many bytes went, so the
    command never blocks on a full pipe while the engine is away.
    """

    def __init__(
        self,
        spool_path: str | None = None,
        spool_max_bytes: int = DEFAULT_SPOOL_MAX_BYTES,
        window_bytes: int = WINDOW_OUTPUT_BYTES,
    ) -> None:
        self._frames: collections.deque[Frame] = collections.deque()
        self._spool = Spool(spool_path, spool_max_bytes)
        self._window_bytes = window_bytes
        self._next_seq = 1
        self._complete_seq: int | None = None
        self._dropped_bytes = 0
        self.dropped_total = 0
        self.acked = 0
        self.unacked_output_bytes = 0
        self.changed = asyncio.Event()

    @property
    def last_seq(self) -> int:
        return self._next_seq - 1

    @property
    def complete_acked(self) -> bool:
        return self._complete_seq is not None and self.acked >= self._complete_seq

    @property
    def spooled_bytes(self) -> int:
        return self._spool.size

    @property
    def accepting(self) -> bool:
        """False while the disk refuses the spool: the command's output is not read then."""
        return not self._spool.failed

    @property
    def streaming(self) -> bool:
        """True while a new frame is numbered and sent at once rather than spooled."""
        return not self._spool and not self._dropped_bytes and self._has_room()

    def push(self, kind: str, **fields: Any) -> Frame | None:
        """Queue a frame; return it when it was numbered at once, or None when it was spooled."""
        if self.streaming:
            return self._number(kind, fields)
        self._spool_entry(kind, fields)
        self.changed.set()
        return None

    def _has_room(self) -> bool:
        return self.unacked_output_bytes < self._window_bytes

    def _number(self, kind: str, fields: Mapping[str, Any]) -> Frame:
        seq = self._next_seq
        self._next_seq += 1
        text = json.dumps(
            {"type": kind, "seq": seq, **fields}, ensure_ascii=False, separators=(",", ":")
        )
        output_bytes = len(fields["data"].encode("utf-8")) if kind == "output" else 0
        frame = Frame(seq=seq, kind=kind, text=text, output_bytes=output_bytes)
        self._frames.append(frame)
        self.unacked_output_bytes += output_bytes
        if kind == "complete":
            self._complete_seq = seq
        self.changed.set()
        return frame

    def _spool_entry(self, kind: str, fields: Mapping[str, Any]) -> None:
        size = len(str(fields.get("data", "")).encode("utf-8"))
        while kind == "output" and self._spool.size + size > self._spool.max_bytes:
            dropped = self._spool.drop_oldest_output()
            if not dropped:
                break
            self._dropped_bytes += dropped
            self.dropped_total += dropped
        self._spool.append(kind, fields)

    def _refill(self) -> None:
        """Number waiting entries while the window has room."""
        while self._has_room():
            if self._dropped_bytes:
                note = (
                    f"\n[saltpeter: {self._dropped_bytes} bytes of output dropped on the minion "
                    "while the engine was unreachable]\n"
                )
                log.warning("%s", note.strip())
                self._dropped_bytes = 0
                self._number("output", {"data": note})
                continue
            entry = self._spool.pop()
            if entry is None:
                return
            self._number(*entry)

    def ack(self, seq: int) -> None:
        """Drop every frame up to and including ``seq``, and number what waits."""
        if seq > self.last_seq:
            log.warning(
                "engine acknowledged seq %d, but the last frame sent has seq %d; "
                "treating it as an ack of %d",
                seq,
                self.last_seq,
                self.last_seq,
            )
            seq = self.last_seq
        if seq <= self.acked:
            return
        self.acked = seq
        while self._frames and self._frames[0].seq <= seq:
            self.unacked_output_bytes -= self._frames.popleft().output_bytes
        self._refill()

    def first_after(self, seq: int) -> Frame | None:
        """Return the first unacknowledged frame with a seq above ``seq``."""
        if not self._frames:
            return None
        index = max(0, seq + 1 - self._frames[0].seq)
        return self._frames[index] if index < len(self._frames) else None

    def close(self, remove: bool) -> None:
        self._spool.close(remove)


# -- the command --------------------------------------------------------------


@dataclass(frozen=True)
class RunIds:
    """The identifiers that every log line and frame of this run carries."""

    run: str
    job: str
    machine: str


@dataclass(frozen=True)
class Result:
    """The command's outcome, as the `complete` frame reports it."""

    retcode: int
    reason: str
    signal: str | None = None


class LocalRecord:
    """STATEDIR/<run>.json: the record of a run in flight that the execution module reads."""

    def __init__(self, statedir: str, ids: RunIds) -> None:
        self.path = os.path.join(statedir, f"{ids.run}.json")
        self._ids = ids

    def write(self, pid: int | None = None, started: str | None = None) -> None:
        record = {
            "run": self._ids.run,
            "job": self._ids.job,
            "machine": self._ids.machine,
            "wrapper_pid": os.getpid(),
            "pid": pid,
            "pgid": pid,
            "started": started,
        }
        # Write a temporary file and rename it, so a reader never sees half a record.
        tmp = f"{self.path}.{os.getpid()}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        try:
            os.write(fd, json.dumps(record).encode())
        finally:
            os.close(fd)
        os.replace(tmp, self.path)

    def remove(self) -> None:
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.error("run %s: cannot remove local record %s: %s", self._ids.run, self.path, exc)


def continuation_bytes(data: bytes) -> int:
    """Count the UTF-8 continuation bytes (at most 3) that ``data`` starts with."""
    count = 0
    while count < min(3, len(data)) and data[count] & 0xC0 == 0x80:
        count += 1
    return count


class TailBuffer:
    """The newest output read and not sent yet: at most ``limit`` bytes.

    Older bytes are let go and counted in ``skipped``.
    """

    def __init__(self, limit: int) -> None:
        self.limit = max(1, limit)
        self.skipped = 0
        self._chunks: collections.deque[bytes] = collections.deque()
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def add(self, data: bytes) -> None:
        self._chunks.append(data)
        self._size += len(data)
        # Whole chunks go while the others still fill the limit; take() trims the rest.
        while self._size - len(self._chunks[0]) >= self.limit:
            oldest = self._chunks.popleft()
            self._size -= len(oldest)
            self.skipped += len(oldest)

    def take(self) -> tuple[int, bytes]:
        """Empty the buffer; return the bytes skipped before its data, and the data."""
        data = b"".join(self._chunks)
        excess = max(0, len(data) - self.limit)
        skipped = self.skipped + excess
        self._chunks.clear()
        self._size = 0
        self.skipped = 0
        return skipped, data[excess:]


class OutputReader:
    """Reads the command's combined stdout and stderr and queues it as `output` frames.

    Bytes are decoded incrementally, so a UTF-8 character split between two
    reads arrives whole, and invalid bytes become U+FFFD.

    With an ``output_limit`` (the engine's cap per minion, from its welcome),
    the first half of the cap is sent as it comes. After that the engine keeps
    only the newest half, so the reader keeps the newest output in a
    :class:`TailBuffer` and sends it every TAIL_FLUSH_INTERVAL while the send
    window has room; output that the buffer let go in between is announced in
    the next frame's ``skipped``. The end of the output always reaches the engine.
    """

    def __init__(
        self,
        fd: int,
        outbox: Outbox,
        ids: RunIds,
        on_eof: Callable[[], None],
        output_limit: int = 0,
    ) -> None:
        self._loop = asyncio.get_running_loop()
        self._fd = fd
        self._outbox = outbox
        self._ids = ids
        self._on_eof = on_eof
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._buffer: list[str] = []
        self._buffered_chars = 0
        self._flush_handle: asyncio.TimerHandle | None = None
        self._reading = False
        # Bytes the engine still keeps from the start of the output; None without a cap.
        self._head_room: int | None = output_limit // 2 if output_limit > 0 else None
        self._tail_limit = min(output_limit - output_limit // 2, TAIL_MEMORY_MAX_BYTES)
        self._tail: TailBuffer | None = None
        self.paused = False
        self.closed = False
        os.set_blocking(fd, False)
        self.update_backpressure()

    def _on_readable(self) -> None:
        try:
            data = os.read(self._fd, READ_CHUNK_BYTES)
        except BlockingIOError:
            return
        except OSError as exc:
            log.error("run %s: reading the command's output failed: %s", self._ids.run, exc)
            data = b""
        if not data:
            self.close()
            self._on_eof()
            return
        if self._tail is not None:
            self._tail.add(data)
            if self._flush_handle is None:
                self._flush_handle = self._loop.call_later(TAIL_FLUSH_INTERVAL, self.flush)
            return
        self._append(self._decoder.decode(data))

    def _append(self, text: str) -> None:
        if not text:
            return
        self._buffer.append(text)
        self._buffered_chars += len(text)
        if self._buffered_chars >= FLUSH_CHARS:
            self.flush()
        elif self._flush_handle is None:
            self._flush_handle = self._loop.call_later(FLUSH_INTERVAL, self.flush)

    def flush(self) -> None:
        """Queue the buffered text as one or more `output` frames."""
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        if self._buffer:
            text = "".join(self._buffer)
            self._buffer.clear()
            self._buffered_chars = 0
            self._push_text(text, 0)
        if self._tail is not None:
            self._flush_tail()
        self.update_backpressure()

    def _flush_tail(self) -> None:
        assert self._tail is not None
        if not self.closed and not len(self._tail):
            return
        if not self.closed and not self._outbox.streaming:
            # The engine has not caught up: keep only the newest output meanwhile.
            self._flush_handle = self._loop.call_later(TAIL_FLUSH_INTERVAL, self.flush)
            return
        skipped, data = self._tail.take()
        if skipped:
            # A character that the skip cut in two is skipped whole.
            skipped += len(self._decoder.getstate()[0])
            self._decoder.reset()
            cut = continuation_bytes(data)
            data = data[cut:]
            skipped += cut
            log.debug("run %s: skipped %d bytes of output", self._ids.run, skipped)
        self._push_text(self._decoder.decode(data, final=self.closed), skipped)

    def _push_text(self, text: str, skipped: int) -> None:
        if skipped and not text:
            self._push("", skipped)
        for start in range(0, len(text), FLUSH_CHARS):
            self._push(text[start : start + FLUSH_CHARS], skipped if start == 0 else 0)

    def _push(self, text: str, skipped: int) -> None:
        fields: dict[str, Any] = {"data": text}
        if skipped:
            fields["skipped"] = skipped
        frame = self._outbox.push("output", **fields)
        if frame is not None:
            log.debug("run %s: queued output seq %d", self._ids.run, frame.seq)
        else:
            log.debug(
                "run %s: spooled output (%d bytes waiting)",
                self._ids.run,
                self._outbox.spooled_bytes,
            )
        if self._head_room is not None and self._tail is None:
            size = len(text.encode("utf-8"))
            if size < self._head_room:
                self._head_room -= size
                return
            # The engine's head is full: from here on it keeps only the newest output.
            self._tail = TailBuffer(self._tail_limit)
            log.debug(
                "run %s: the engine keeps the newest %d bytes from here on",
                self._ids.run,
                self._tail_limit,
            )

    def update_backpressure(self) -> None:
        """Stop reading the pipe while the spool cannot take output, and resume after.

        Once only the newest output is kept, reading never stops: output the
        engine cannot take yet is skipped instead.
        """
        if self.closed:
            return
        paused = self._tail is None and not self._outbox.accepting
        if paused and self._reading:
            self._loop.remove_reader(self._fd)
            self._reading = False
            self.paused = True
            log.info(
                "run %s: output paused: the spool is not writable and %d bytes wait for the "
                "engine's acknowledgement",
                self._ids.run,
                self._outbox.unacked_output_bytes,
            )
        elif not paused and not self._reading:
            if self.paused:
                log.info("run %s: output resumed", self._ids.run)
            self._loop.add_reader(self._fd, self._on_readable)
            self._reading = True
            self.paused = False

    def close(self) -> None:
        """Stop reading, queue what the decoder still holds, and close the pipe."""
        if self.closed:
            return
        # Set first, so that flush() does not register the reader again.
        self.closed = True
        if self._reading:
            self._loop.remove_reader(self._fd)
            self._reading = False
        if self._tail is None:
            self._append(self._decoder.decode(b"", final=True))
        self.flush()
        os.close(self._fd)


class Command:
    """The job's command: start, output, timeout, kill, and the `complete` result.

    The command runs through /bin/sh in its own session, so its process group
    id is the shell's pid. The command text reaches the shell through a pipe
    (``/bin/sh /dev/fd/N``), so it never shows in any argv or environment.
    """

    def __init__(self, ids: RunIds, outbox: Outbox, record: LocalRecord, script_fd: int) -> None:
        self._ids = ids
        self._outbox = outbox
        self._record = record
        self._script_fd = script_fd
        self._loop = asyncio.get_running_loop()
        self._pid: int | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._output: OutputReader | None = None
        self._script: bytes = b""
        self._script_write_fd: int | None = None
        self._kill_grace = DEFAULT_KILL_GRACE
        self._output_limit = 0
        self._exit_code: int | None = None
        self._pipe_grace_over = False
        self._stop_reason: str | None = None
        self._kill_requested_before_start = False
        self._stopper: asyncio.Task[None] | None = None
        self._stopping_group = False
        self._leftovers_stopped = False
        self._timer: asyncio.Task[None] | None = None
        self._finished = asyncio.Event()
        self.received_job = False
        self.result: Result | None = None
        self.idle_since: float | None = time.monotonic()

    @property
    def running(self) -> bool:
        return self._pid is not None and self._exit_code is None

    async def wait_finished(self) -> None:
        """Wait until the result is queued. Return at once if the job never arrived."""
        if self.received_job:
            await self._finished.wait()

    # -- start -----------------------------------------------------------------

    def start(self, job: object, output_limit: int = 0) -> None:
        """Start the job from the welcome's definition, or queue start_failed.

        ``output_limit`` is the engine's cap on the output it keeps, 0 for none.
        """
        self.received_job = True
        self._output_limit = output_limit
        self.idle_since = None
        if self._kill_requested_before_start:
            self._finish_without_start(
                Result(RETCODE_KILLED, "killed"), "killed before the command started"
            )
            return
        try:
            spec = parse_job(job)
            self._kill_grace = spec.kill_grace
            plan = plan_launch(spec, self._ids.job, self._ids.run, self._ids.machine, os.geteuid())
            self._spawn(spec, plan)
        except JobStartError as exc:
            self._finish_without_start(Result(RETCODE_START_FAILED, "start_failed"), str(exc))
            return
        if spec.timeout > 0:
            self._timer = asyncio.create_task(self._enforce_timeout(spec.timeout))

    def _spawn(self, spec: JobSpec, plan: LaunchPlan) -> None:
        script_write = self._open_script_pipe(spec, plan)
        try:
            output_read, output_write = os.pipe()
        except OSError as exc:
            os.close(self._script_fd)
            os.close(script_write)
            raise JobStartError(f"cannot create the output pipe: {exc}") from None

        try:
            self._proc = self._popen(plan, output_write)
        except OSError as exc:
            os.close(script_write)
            os.close(output_read)
            raise JobStartError(
                f"cannot run {SHELL} as user {plan.account.pw_name!r} in {plan.cwd!r}: {exc}"
            ) from None
        finally:
            os.close(self._script_fd)
            os.close(output_write)

        self._pid = self._proc.pid
        self._record_start(plan)
        self._output = OutputReader(
            output_read, self._outbox, self._ids, self._on_output_eof, self._output_limit
        )
        self._script_write_fd = script_write
        os.set_blocking(script_write, False)
        self._write_script()

    def _open_script_pipe(self, spec: JobSpec, plan: LaunchPlan) -> int:
        """Put a new pipe's read end on the reserved descriptor and return its write end."""
        try:
            script_read, script_write = os.pipe()
        except OSError as exc:
            raise JobStartError(f"cannot create the script pipe: {exc}") from None
        # dash accepts only single-digit descriptors in redirections, so the
        # script pipe goes to the low descriptor reserved at startup. The text
        # starts by closing that descriptor (on the same line, so the shell's
        # line numbers still match the job's command), so no process that the
        # command starts inherits the pipe. The shell itself reads the script
        # through its own close-on-exec descriptor for /dev/fd/N.
        os.dup2(script_read, self._script_fd, inheritable=False)
        os.close(script_read)
        if plan.switch_user:
            # Opening /dev/fd/N reopens the pipe and checks its owner and mode
            # (root, 0600), so the shell running as the job's user needs to own it.
            os.fchown(self._script_fd, plan.account.pw_uid, plan.account.pw_gid)
        self._script = f"exec {self._script_fd}<&- ; {spec.command}\n".encode(
            "utf-8", "surrogateescape"
        )
        return script_write

    def _popen(self, plan: LaunchPlan, output_write: int) -> subprocess.Popen[bytes]:
        credentials: dict[str, Any] = {}
        if plan.switch_user:
            credentials = {
                "user": plan.account.pw_uid,
                "group": plan.account.pw_gid,
                "extra_groups": plan.groups,
            }
        return subprocess.Popen(
            [SHELL, f"/dev/fd/{self._script_fd}"],
            stdin=subprocess.DEVNULL,
            stdout=output_write,
            stderr=output_write,
            cwd=plan.cwd,
            env=plan.env,
            start_new_session=True,
            pass_fds=(self._script_fd,),
            **credentials,
        )

    def _record_start(self, plan: LaunchPlan) -> None:
        """Queue the `start` frame, log the start and add the pid to the local record."""
        assert self._pid is not None
        started = utc_timestamp()
        self._outbox.push("start", pid=self._pid, time=started)
        log.info(
            "run %s: command started as pid %d, user %s, cwd %s",
            self._ids.run,
            self._pid,
            plan.account.pw_name,
            plan.cwd,
        )
        try:
            self._record.write(pid=self._pid, started=started)
        except OSError as exc:
            log.error(
                "run %s: cannot update local record %s: %s", self._ids.run, self._record.path, exc
            )

    def _write_script(self) -> None:
        fd = self._script_write_fd
        if fd is None:
            return
        try:
            written = os.write(fd, self._script)
        except BlockingIOError:
            written = 0
        except BrokenPipeError:
            # The shell exited before it read the whole script.
            written = len(self._script)
        self._script = self._script[written:]
        if self._script:
            self._loop.add_writer(fd, self._write_script)
            return
        self._loop.remove_writer(fd)
        os.close(fd)
        self._script_write_fd = None

    def _finish_without_start(self, result: Result, why: str) -> None:
        message = f"saltpeter: job {self._ids.job!r} did not start on {self._ids.machine}: {why}\n"
        self._outbox.push("output", data=message)
        log.error("run %s: command did not start: %s", self._ids.run, why)
        self._queue_complete(result)

    # -- exit and output -------------------------------------------------------

    def reap(self) -> None:
        """Collect every exited child: the shell, and orphans adopted as subreaper."""
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            if pid == self._pid:
                # A SIGTERM that was pending together with this SIGCHLD (while
                # the wrapper was stopped, say) has its handler queued behind
                # this one. Handling the exit on the next loop pass lets that
                # SIGTERM count as the kill it requested.
                self._loop.call_soon(self._on_leader_exit, os.waitstatus_to_exitcode(status))

    def _on_leader_exit(self, exit_code: int) -> None:
        self._exit_code = exit_code
        if self._proc is not None:
            self._proc.returncode = exit_code
        if self._timer is not None:
            self._timer.cancel()
        log.debug("run %s: shell exited with status %d", self._ids.run, exit_code)
        self._loop.call_later(PIPE_GRACE, self._on_pipe_grace)
        self._maybe_finish()

    def _on_pipe_grace(self) -> None:
        self._pipe_grace_over = True
        if self._output is not None and not self._output.closed and self.result is None:
            log.info(
                "run %s: the output pipe is still open %g s after the command exited, "
                "held by a background process; sending complete without its further output",
                self._ids.run,
                PIPE_GRACE,
            )
        self._maybe_finish()

    def _on_output_eof(self) -> None:
        self._maybe_finish()

    def on_ack(self) -> None:
        if self._output is not None:
            self._output.update_backpressure()

    def _maybe_finish(self) -> None:
        if self.result is not None or self._exit_code is None or self._output is None:
            return
        if self._stopping_group:
            return
        if not self._output.closed and not self._pipe_grace_over:
            return
        if not self._leftovers_stopped and self._group_alive():
            # The shell exited but left processes in the job's process group.
            # The run is over, so they are stopped like on a kill; the result
            # stays the shell's exit status.
            self._leftovers_stopped = True
            log.info(
                "run %s: the command exited and left processes in group %d; stopping them",
                self._ids.run,
                self._pid,
            )
            self.stop("leftovers")
            return
        self._output.close()
        if self._leftovers_stopped:
            self._outbox.push(
                "output",
                data="[saltpeter: stopped the processes the command left running]\n",
            )
        self._queue_complete(self._result())

    def _result(self) -> Result:
        assert self._exit_code is not None
        if self._stop_reason == "timeout":
            return Result(RETCODE_TIMEOUT, "timeout")
        if self._stop_reason == "killed":
            return Result(RETCODE_KILLED, "killed")
        if self._exit_code < 0:
            number = -self._exit_code
            try:
                name = signal.Signals(number).name
            except ValueError:
                name = f"signal {number}"
            return Result(128 + number, "signal", name)
        return Result(self._exit_code, "exit")

    def _queue_complete(self, result: Result) -> None:
        self.result = result
        self.idle_since = time.monotonic()
        fields: dict[str, Any] = {
            "retcode": result.retcode,
            "reason": result.reason,
            "time": utc_timestamp(),
        }
        if result.signal is not None:
            fields["signal"] = result.signal
        self._outbox.push("complete", **fields)
        log.info(
            "run %s: command finished: reason %s, retcode %d%s",
            self._ids.run,
            result.reason,
            result.retcode,
            f", signal {result.signal}" if result.signal else "",
        )
        self._finished.set()

    # -- timeout and kill --------------------------------------------------------

    async def _enforce_timeout(self, timeout: float) -> None:
        started_at = time.monotonic()
        while True:
            wait = timeout_wait(time.monotonic(), started_at, timeout)
            if not wait:
                break
            await asyncio.sleep(wait)
        log.info("run %s: timeout of %g s passed", self._ids.run, timeout)
        self.stop("timeout")

    def stop(self, reason: str) -> None:
        """Stop the process group, for a `kill` frame, SIGTERM or the timeout.

        While the shell runs, ``reason`` ("killed" or "timeout") becomes the
        result. After it exited, the processes it left behind are stopped but
        the result stays its exit status.
        """
        if self.result is not None:
            log.info("run %s: %s ignored: the command has already finished", self._ids.run, reason)
            return
        if self._pid is None:
            if not self.received_job:
                log.info("run %s: kill requested before the job definition arrived", self._ids.run)
                self._kill_requested_before_start = True
            return
        if self._exit_code is None and self._stop_reason is None:
            self._stop_reason = reason
        if self._stopper is None:
            self._stopping_group = True
            self._stopper = asyncio.create_task(self._stop_group(reason))

    def _group_alive(self) -> bool:
        assert self._pid is not None
        try:
            os.killpg(self._pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True

    def _signal_group(self, signum: signal.Signals) -> None:
        assert self._pid is not None
        try:
            os.killpg(self._pid, signum)
        except ProcessLookupError:
            pass
        except PermissionError as exc:
            log.error(
                "run %s: cannot send %s to process group %d: %s",
                self._ids.run,
                signum.name,
                self._pid,
                exc,
            )

    async def _stop_group(self, reason: str) -> None:
        # NOTE: signals reach only the command's process group. A process that
        # moved to a session or group of its own (setsid, double-fork daemons)
        # is not stopped, and the wait for an empty group does not see it.
        assert self._pid is not None
        log.info(
            "run %s: %s: sending SIGTERM to process group %d, SIGKILL after %g s",
            self._ids.run,
            reason,
            self._pid,
            self._kill_grace,
        )
        self._signal_group(signal.SIGTERM)
        term_sent_at = time.monotonic()

        while self._group_alive():
            wait = kill_wait(time.monotonic(), term_sent_at, self._kill_grace)
            if not wait:
                log.info(
                    "run %s: process group %d still has processes; sending SIGKILL",
                    self._ids.run,
                    self._pid,
                )
                self._signal_group(signal.SIGKILL)
                break
            await asyncio.sleep(min(GROUP_POLL_INTERVAL, wait))
            self.reap()

        while self._group_alive():
            await asyncio.sleep(GROUP_POLL_INTERVAL)
            self.reap()
        log.debug("run %s: process group %d is empty", self._ids.run, self._pid)
        self._stopping_group = False
        self._maybe_finish()

    def kill_abandoned(self) -> None:
        """SIGKILL the process group if the shell still runs when the wrapper exits."""
        if self.running:
            log.error(
                "run %s: wrapper exits while the command runs; killing process group %d",
                self._ids.run,
                self._pid,
            )
            self._signal_group(signal.SIGKILL)


# -- the connection to the engine ----------------------------------------------


def _output_limit(welcome: Mapping[str, Any], run_id: str) -> int:
    """Return the welcome's cap on the output the engine keeps; 0 when it sets none."""
    limit = welcome.get("output_limit", 0)
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 0:
        log.warning(
            "run %s: the welcome has an invalid 'output_limit' %r; sending all output",
            run_id,
            limit,
        )
        return 0
    return limit


class Outcome(enum.Enum):
    """End state of one connection to the engine."""

    DONE = "done"
    FATAL = "fatal"
    DROPPED = "dropped"


class EngineLink:
    """Connects to the engine, resends what it has not acknowledged, and reconnects."""

    def __init__(
        self,
        url: str,
        token: str,
        ids: RunIds,
        outbox: Outbox,
        command: Command,
        cafile: str | None = None,
        signature: str | None = None,
    ) -> None:
        self._url = url
        self._signature = signature
        # For wss://: verify the engine against ``cafile``, or the system's trust store.
        self._ssl_context: ssl.SSLContext | None = None
        if url.startswith("wss://"):
            self._ssl_context = ssl.create_default_context(cafile=cafile or None)
        self._token = token
        self._ids = ids
        self._outbox = outbox
        self._command = command
        self._heartbeat_interval = DEFAULT_HEARTBEAT_INTERVAL
        self._failures = 0
        self._disconnected_since = time.monotonic()
        self.fatal_error: str | None = None

    async def run(self) -> int:
        """Keep a connection until `complete` is acknowledged. Return the wrapper's exit status."""
        attempt = 0
        while True:
            welcomed, outcome = await self._session()
            if outcome is Outcome.DONE:
                log.info("run %s: the engine acknowledged the result; exiting", self._ids.run)
                return EXIT_DELIVERED
            if outcome is Outcome.FATAL:
                return await self._finish_after_fatal()
            if welcomed:
                attempt = 0
            give_up = give_up_wait(
                time.monotonic(), self._disconnected_since, self._command.idle_since
            )
            if give_up == 0:
                log.error(
                    "run %s: no connection to the engine at %s for %g h; giving up. %s",
                    self._ids.run,
                    self._url,
                    GIVE_UP_AFTER / 3600,
                    self._result_summary(),
                )
                return EXIT_UNDELIVERED
            delay = backoff_delay(attempt, random.random())
            attempt += 1
            log.debug("run %s: reconnecting in %.2f s", self._ids.run, delay)
            await asyncio.sleep(delay if give_up is None else min(delay, give_up))

    def _result_summary(self) -> str:
        result = self._command.result
        if result is None:
            return "The command did not run."
        return (
            f"The result (reason {result.reason}, retcode {result.retcode}) "
            "was not delivered to the engine."
        )

    async def _finish_after_fatal(self) -> int:
        if self._command.running:
            log.info(
                "run %s: letting the command run to the end after the engine's error",
                self._ids.run,
            )
        await self._command.wait_finished()
        log.error(
            "run %s: not reconnecting after error %s. %s",
            self._ids.run,
            self.fatal_error,
            self._result_summary(),
        )
        return EXIT_UNDELIVERED

    # -- one connection ----------------------------------------------------------

    async def _connect(self) -> tornado.websocket.WebSocketClientConnection | None:
        request = tornado.httpclient.HTTPRequest(
            self._url, connect_timeout=CONNECT_TIMEOUT, ssl_options=self._ssl_context
        )
        try:
            return await tornado.websocket.websocket_connect(
                request,
                max_message_size=MAX_FRAME_BYTES,
                ping_interval=PING_INTERVAL,
                ping_timeout=PING_TIMEOUT,
            )
        except (
            OSError,
            asyncio.TimeoutError,
            tornado.httpclient.HTTPClientError,
            tornado.iostream.StreamClosedError,
            tornado.websocket.WebSocketError,
        ) as exc:
            self._failures += 1
            if self._failures == 1:
                log.warning(
                    "run %s: cannot connect to the engine at %s: %s; retrying with backoff",
                    self._ids.run,
                    self._url,
                    exc,
                )
            else:
                log.debug(
                    "run %s: connection attempt %d to %s failed: %s",
                    self._ids.run,
                    self._failures,
                    self._url,
                    exc,
                )
            return None

    async def _session(self) -> tuple[bool, Outcome]:
        """Connect, send hello and serve the connection.

        Return whether the engine sent a welcome, and how the connection ended.
        """
        conn = await self._connect()
        if conn is None:
            return False, Outcome.DROPPED
        welcomed = False
        try:
            outcome = await self._handshake(conn)
            if outcome is not None:
                return False, outcome
            welcomed = True
            return True, await self._serve(conn)
        except tornado.websocket.WebSocketClosedError:
            log.warning("run %s: connection to %s closed", self._ids.run, self._url)
            return welcomed, Outcome.DROPPED
        finally:
            conn.close()
            # Only a welcomed connection counts as one for the give-up clock.
            if welcomed:
                self._disconnected_since = time.monotonic()

    async def _send(
        self, conn: tornado.websocket.WebSocketClientConnection, kind: str, text: str
    ) -> None:
        await conn.write_message(text)
        log.debug("run %s: sent %s", self._ids.run, kind)

    async def _handshake(self, conn: tornado.websocket.WebSocketClientConnection) -> Outcome | None:
        """Send hello and process the welcome. Return an Outcome if the connection must end."""
        need_job = not self._command.received_job
        hello = {
            "type": "hello",
            "protocol": PROTOCOL_VERSION,
            "run": self._ids.run,
            "machine": self._ids.machine,
            "token": self._token,
            "wrapper_version": __version__,
            "need_job": need_job,
        }
        if self._signature:
            hello["signature"] = self._signature
        await self._send(conn, f"hello (need_job {need_job})", json.dumps(hello))
        try:
            message = await asyncio.wait_for(conn.read_message(), WELCOME_TIMEOUT)
        except asyncio.TimeoutError:
            log.warning(
                "run %s: no welcome from %s within %g s", self._ids.run, self._url, WELCOME_TIMEOUT
            )
            return Outcome.DROPPED
        if message is None:
            log.warning("run %s: %s closed the connection after hello", self._ids.run, self._url)
            return Outcome.DROPPED
        frame = self._parse(message)
        if frame is None:
            return Outcome.DROPPED
        if frame.get("type") == "error":
            return self._on_error(frame)
        if frame.get("type") != "welcome":
            log.warning(
                "run %s: expected a welcome, got a %r frame", self._ids.run, frame.get("type")
            )
            return Outcome.DROPPED
        return self._on_welcome(frame, need_job)

    def _on_welcome(self, frame: dict[str, Any], need_job: bool) -> Outcome | None:
        interval = frame.get("heartbeat_interval", DEFAULT_HEARTBEAT_INTERVAL)
        if isinstance(interval, bool) or not isinstance(interval, (int, float)):
            interval = DEFAULT_HEARTBEAT_INTERVAL
        self._heartbeat_interval = max(float(interval), MIN_HEARTBEAT_INTERVAL)

        acked = frame.get("acked")
        if isinstance(acked, bool) or not isinstance(acked, int) or acked < 0:
            log.warning("run %s: welcome has an invalid 'acked': %r", self._ids.run, acked)
            return Outcome.DROPPED
        job = frame.get("job")
        log.debug(
            "run %s: received welcome: acked %d, heartbeat_interval %g, job %s",
            self._ids.run,
            acked,
            self._heartbeat_interval,
            "included" if job is not None else "none",
        )
        if need_job and job is None:
            # The engine sends job null in reply to need_job when it already
            # has a result for this minion, so there is nothing left to run.
            self.fatal_error = "welcome without a job definition"
            log.error(
                "run %s: the engine sent no job definition, because it already has a "
                "result for this minion",
                self._ids.run,
            )
            return Outcome.FATAL

        if acked < self._outbox.acked:
            log.error(
                "run %s: the engine acknowledges only seq %d after it acknowledged seq %d, "
                "so frames %d to %d are lost",
                self._ids.run,
                acked,
                self._outbox.acked,
                acked + 1,
                self._outbox.acked,
            )
        self._log_connected()
        self._outbox.ack(acked)
        self._command.on_ack()
        if need_job:
            self._command.start(job, _output_limit(frame, self._ids.run))
        return None

    def _log_connected(self) -> None:
        if self._failures:
            log.info(
                "run %s: connected to %s after %d failed attempts",
                self._ids.run,
                self._url,
                self._failures,
            )
        else:
            log.info("run %s: connected to %s", self._ids.run, self._url)
        self._failures = 0

    async def _serve(self, conn: tornado.websocket.WebSocketClientConnection) -> Outcome:
        tasks = [
            asyncio.create_task(self._read_loop(conn)),
            asyncio.create_task(self._send_loop(conn)),
            asyncio.create_task(self._heartbeat_loop(conn)),
        ]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                task.cancel()
        for task in done:
            error = task.exception()
            if isinstance(error, tornado.websocket.WebSocketClosedError):
                log.warning("run %s: connection to %s closed", self._ids.run, self._url)
                return Outcome.DROPPED
            if error is not None:
                raise error
            outcome = task.result()
            if outcome is not None:
                return outcome
        return Outcome.DROPPED

    async def _read_loop(self, conn: tornado.websocket.WebSocketClientConnection) -> Outcome:
        while True:
            message = await conn.read_message()
            if message is None:
                log.warning(
                    "run %s: connection to %s closed (code %s)",
                    self._ids.run,
                    self._url,
                    conn.close_code,
                )
                return Outcome.DROPPED
            frame = self._parse(message)
            if frame is None:
                continue
            kind = frame.get("type")
            if kind == "ack":
                seq = frame.get("seq")
                if isinstance(seq, bool) or not isinstance(seq, int):
                    log.warning("run %s: ack with an invalid 'seq': %r", self._ids.run, seq)
                    continue
                log.debug("run %s: received ack %d", self._ids.run, seq)
                self._outbox.ack(seq)
                self._command.on_ack()
                if self._outbox.complete_acked:
                    return Outcome.DONE
            elif kind == "kill":
                log.info("run %s: the engine requested a kill", self._ids.run)
                self._command.stop("killed")
            elif kind == "error":
                return self._on_error(frame)
            else:
                log.debug("run %s: ignored a %r frame", self._ids.run, kind)

    async def _send_loop(self, conn: tornado.websocket.WebSocketClientConnection) -> None:
        # Unacknowledged frames from earlier connections go out first, in order,
        # because the cursor starts at the welcome's `acked`.
        sent = self._outbox.acked
        while True:
            frame = self._outbox.first_after(sent)
            if frame is None:
                self._outbox.changed.clear()
                await self._outbox.changed.wait()
                continue
            await self._send(conn, f"{frame.kind} seq {frame.seq}", frame.text)
            sent = frame.seq

    async def _heartbeat_loop(self, conn: tornado.websocket.WebSocketClientConnection) -> None:
        last_sent_at = time.monotonic()
        while True:
            await asyncio.sleep(
                heartbeat_wait(time.monotonic(), last_sent_at, self._heartbeat_interval)
            )
            text = json.dumps({"type": "heartbeat", "time": utc_timestamp()})
            await self._send(conn, "heartbeat", text)
            last_sent_at = time.monotonic()

    def _parse(self, message: str | bytes) -> dict[str, Any] | None:
        try:
            frame = json.loads(message)
        except ValueError as exc:
            log.warning("run %s: ignored a frame that is not JSON: %s", self._ids.run, exc)
            return None
        if not isinstance(frame, dict):
            log.warning("run %s: ignored a frame that is not a JSON object", self._ids.run)
            return None
        return frame

    def _on_error(self, frame: dict[str, Any]) -> Outcome:
        code = str(frame.get("code"))
        message = str(frame.get("message", ""))
        if code in FATAL_ERROR_CODES:
            self.fatal_error = code
            log.error("run %s: the engine rejected the run: %s: %s", self._ids.run, code, message)
            return Outcome.FATAL
        log.warning(
            "run %s: the engine reported error %s: %s; reconnecting", self._ids.run, code, message
        )
        return Outcome.DROPPED


# -- process setup and main ----------------------------------------------------


class UsageError(Exception):
    """Invalid command-line arguments."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(message)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="sp_wrapper.py",
        description="Run one Saltpeter job and report it to the engine over a WebSocket. "
        "The run token is read from the SP_RUN_TOKEN environment variable.",
    )
    parser.add_argument("--version", action="version", version=__version__)
    parser.add_argument("--run", required=True, help="run id")
    parser.add_argument("--job", required=True, help="job name")
    parser.add_argument("--machine", required=True, help="this minion's id")
    parser.add_argument("--url", required=True, help="engine WebSocket URL (ws:// or wss://)")
    parser.add_argument("--loglevel", choices=LOGLEVELS, default="normal", help="local log detail")
    parser.add_argument("--logdir", default=DEFAULT_LOGDIR, help="directory of <job>.log")
    parser.add_argument("--statedir", default=DEFAULT_STATEDIR, help="directory of <run>.json")
    parser.add_argument(
        "--cafile", default=None, help="CA bundle to verify a wss:// engine with (default: system)"
    )
    parser.add_argument(
        "--ready-fd",
        type=int,
        default=None,
        help="inherited pipe that receives 'ok' or 'error: <reason>' once the wrapper started",
    )
    return parser


def _ready_fd_from_argv(argv: list[str]) -> int | None:
    """Find --ready-fd in arguments that argparse rejected, to report the error there."""
    for index, arg in enumerate(argv):
        value = None
        if arg.startswith("--ready-fd="):
            value = arg.split("=", 1)[1]
        elif arg == "--ready-fd" and index + 1 < len(argv):
            value = argv[index + 1]
        if value is not None and value.isdigit():
            return int(value)
    return None


def _send_ready(fd: int | None, line: str) -> None:
    if fd is None:
        return
    try:
        os.write(fd, line.encode("utf-8", "replace"))
        os.close(fd)
    except OSError:
        # The launcher closed the pipe, so no one is left to read the line.
        pass


def _reserve_low_fd() -> int:
    """Open /dev/null on the lowest free descriptor and return it, or raise StartupError."""
    fd = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    if fd > 9:
        os.close(fd)
        raise StartupError("no file descriptor from 3 to 9 is free for the command's script pipe")
    return fd


def _prepare_statedir(statedir: str) -> None:
    try:
        os.makedirs(statedir, mode=0o700, exist_ok=True)
        if os.stat(statedir).st_uid == os.geteuid():
            os.chmod(statedir, 0o700)
    except OSError as exc:
        raise StartupError(f"cannot create state directory {statedir}: {exc}") from None


def is_wrapper_cmdline(cmdline: bytes, run: str) -> bool:
    """Return True if a /proc/PID/cmdline is that of a wrapper for ``run``."""
    args = cmdline.split(b"\0")
    run_bytes = run.encode()
    if b"--run=" + run_bytes in args:
        return True
    return any(a == b"--run" and b == run_bytes for a, b in itertools.pairwise(args))


def _check_duplicate(record: LocalRecord, run: str) -> None:
    try:
        with open(record.path, encoding="utf-8") as file:
            other_pid = json.load(file).get("wrapper_pid")
    except (OSError, ValueError, AttributeError):
        return
    if isinstance(other_pid, int) and other_pid != os.getpid():
        try:
            with open(f"/proc/{other_pid}/cmdline", "rb") as file:
                cmdline = file.read()
        except OSError:
            return
        if is_wrapper_cmdline(cmdline, run):
            raise StartupError(f"run {run} is already in flight here (wrapper pid {other_pid})")


def setup_logging(loglevel: str, logdir: str, ids: RunIds) -> None:
    """Log to LOGDIR/<job>.log. If the directory cannot be created, log nothing."""
    root = logging.getLogger()
    root.handlers.clear()
    root.addHandler(logging.NullHandler())
    if loglevel == "off":
        root.setLevel(logging.CRITICAL + 1)
        return
    root.setLevel(logging.DEBUG if loglevel == "debug" else logging.INFO)
    try:
        os.makedirs(logdir, mode=0o755, exist_ok=True)
        handler = logging.FileHandler(os.path.join(logdir, f"{ids.job}.log"), encoding="utf-8")
    except OSError:
        return
    prefix = f"job {ids.job}".replace("%", "%%")
    handler.setFormatter(
        logging.Formatter(f"%(asctime)s %(levelname)s [%(process)d] {prefix}: %(message)s")
    )
    root.addHandler(handler)
    # Tornado logs every failed connection attempt at warning level, but the
    # wrapper already logs the first failure of each streak.
    logging.getLogger("tornado.general").setLevel(logging.ERROR)


def scrub_initial_environ(name: str) -> None:
    """Overwrite the value of ``name`` in the environment block the process started with.

    /proc/PID/environ shows that block, and neither os.environ nor unsetenv()
    changes it, so without this the token would stay readable there. The C
    ``environ`` array points into the block until something calls setenv().
    The call does nothing where libc has no ``environ`` symbol. os.environ
    keeps its own copy of the value.
    """
    try:
        environ = ctypes.POINTER(ctypes.c_void_p).in_dll(ctypes.CDLL(None), "environ")
    except (OSError, ValueError):
        return
    prefix = name.encode() + b"="
    index = 0
    while environ[index]:
        address = environ[index]
        entry = ctypes.string_at(address)
        if entry.startswith(prefix):
            ctypes.memset(address + len(prefix), 0, len(entry) - len(prefix))
        index += 1


def _become_subreaper() -> None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER) failed")
    except (OSError, AttributeError) as exc:
        log.warning("cannot become a child subreaper, orphans may stay zombies: %s", exc)


@dataclass
class Setup:
    """The checked arguments and resources that main() hands to the event loop."""

    ids: RunIds
    url: str
    token: str
    record: LocalRecord
    script_fd: int
    cafile: str | None = None
    signature: str | None = None


def prepare(args: argparse.Namespace) -> Setup:
    """Check the arguments, take the token, and create the local record, or raise StartupError."""
    _import_tornado()
    try:
        ids = RunIds(
            run=validate_name("run id", args.run),
            job=validate_name("job name", args.job),
            machine=validate_name("machine id", args.machine),
        )
    except ValueError as exc:
        raise StartupError(f"invalid argument: {exc}") from None
    if not args.url.startswith(("ws://", "wss://")):
        raise StartupError(f"invalid --url {args.url!r}: expected a ws:// or wss:// URL")
    if args.cafile and not os.path.isfile(args.cafile):
        raise StartupError(f"--cafile {args.cafile!r} is not a readable file")
    scrub_initial_environ("SP_RUN_TOKEN")
    token = os.environ.pop("SP_RUN_TOKEN", "")
    if not token:
        raise StartupError("the SP_RUN_TOKEN environment variable is missing or empty")
    scrub_initial_environ("SP_RUN_SIGNATURE")
    signature = os.environ.pop("SP_RUN_SIGNATURE", "") or None
    script_fd = _reserve_low_fd()
    _prepare_statedir(args.statedir)
    record = LocalRecord(args.statedir, ids)
    _check_duplicate(record, ids.run)
    try:
        record.write()
    except OSError as exc:
        raise StartupError(f"cannot write local record {record.path}: {exc}") from None
    return Setup(
        ids=ids,
        url=args.url,
        token=token,
        record=record,
        script_fd=script_fd,
        cafile=args.cafile,
        signature=signature,
    )


async def run_wrapper(setup: Setup) -> int:
    """Run the job and report it to the engine. Return the wrapper's exit status."""
    loop = asyncio.get_running_loop()
    spool_path = os.path.splitext(setup.record.path)[0] + ".spool"
    outbox = Outbox(spool_path)
    command = Command(setup.ids, outbox, setup.record, setup.script_fd)
    link = EngineLink(
        setup.url,
        setup.token,
        setup.ids,
        outbox,
        command,
        cafile=setup.cafile,
        signature=setup.signature,
    )
    # Worker threads (Tornado resolves host names in them) block the signals
    # that the loop handles, so the kernel runs every handler in the main
    # thread. Signals that are pending together then reach the loop in one
    # read of its wakeup pipe, which Command.reap relies on.
    handled = {signal.SIGCHLD, signal.SIGTERM, signal.SIGINT}
    loop.set_default_executor(
        concurrent.futures.ThreadPoolExecutor(
            max_workers=2, initializer=signal.pthread_sigmask, initargs=(signal.SIG_BLOCK, handled)
        )
    )
    loop.add_signal_handler(signal.SIGCHLD, command.reap)
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, _on_stop_signal, command, signum)
    try:
        return await link.run()
    finally:
        command.kill_abandoned()
        outbox.close(remove=True)


def _on_stop_signal(command: Command, signum: signal.Signals) -> None:
    log.info("received %s; stopping the command as if the engine sent a kill", signum.name)
    command.stop("killed")


# -- launcher subcommands -------------------------------------------------------
# The execution module runs these in a short-lived process with the minion's
# Python. They read and signal local processes only, and import no Tornado.

LAUNCHER_COMMANDS = ("launch", "running", "kill-local")
DEFAULT_READY_TIMEOUT = 10.0
DEFAULT_LOCAL_KILL_GRACE = 5.0
EXIT_LAUNCHER_FAILED = 1
EXIT_LAUNCHER_USAGE = 2

# Maximum bytes read for the ready line, which is "ok" or "error: " and one sentence.
_READY_LINE_MAX_BYTES = 4096
_KILL_POLL_INTERVAL = 0.05
# After SIGKILL the kernel ends the processes at once, unless one sits in an
# uninterruptible sleep (D state). kill_local stops waiting after this long.
_SIGKILL_WAIT = 5.0

# Wrappers that launch() started and that have not exited yet. launch() polls
# them on each call, so a long-lived caller (a test run) collects the exit
# statuses instead of keeping zombies.
_launched: list[subprocess.Popen[bytes]] = []


def missing_wrapper_message(wrapper_path: str) -> str:
    return (
        f"wrapper not found at {wrapper_path}; apply the saltpeter state "
        "(salt MINION state.apply saltpeter) to install it"
    )


def _reap_launched() -> None:
    _launched[:] = [proc for proc in _launched if proc.poll() is None]


def credential_message(run_id: str, machine_id: str, token: str) -> bytes:
    """Return the bytes a minion signs to prove it is the minion a run was sent to."""
    return f"saltpeter-run-credential:{run_id}:{machine_id}:{token}".encode()


def sign_credential(key_path: str, run_id: str, machine_id: str, token: str) -> str:
    """Sign the run credential with the minion's Salt key; return it in base64.

    The engine verifies it with the minion's accepted public key, so a run's
    token alone, which every minion and Salt's job cache see, does not let
    anyone act as this minion. RSA PKCS#1 v1.5 with SHA-256, through the
    ``cryptography`` package, which every Salt installation has. Imported
    here so the rest of the wrapper needs only the standard library and Tornado.

    The key is loaded without the consistency check of its primes. That check
    guards against malformed keys from elsewhere. This key is the minion's
    own, readable only by root, and Salt loads it too for every login to the
    master, so a malformed key would already break the minion. The check
    costs 36 ms for a 2048-bit key and 260 ms for a 4096-bit one on every
    launch (measured with cryptography 50), while signing takes 1 ms to 2 ms.
    """
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import padding, rsa

    with open(key_path, "rb") as handle:
        pem = handle.read()
    try:
        key = serialization.load_pem_private_key(
            pem, password=None, unsafe_skip_rsa_key_validation=True
        )
    except TypeError:  # cryptography before 39 has no such argument
        key = serialization.load_pem_private_key(pem, password=None)
    if not isinstance(key, rsa.RSAPrivateKey):
        raise ValueError(f"{key_path} is not an RSA private key")
    signature = key.sign(
        credential_message(run_id, machine_id, token), padding.PKCS1v15(), hashes.SHA256()
    )
    return base64.b64encode(signature).decode("ascii")


def launch(
    run_id: str,
    job: str,
    url: str,
    token: str,
    machine_id: str,
    wrapper_path: str,
    loglevel: str,
    logdir: str,
    statedir: str,
    python: str = sys.executable,
    ready_timeout: float = DEFAULT_READY_TIMEOUT,
    cafile: str | None = None,
    key_path: str | None = None,
) -> dict[str, object]:
    """Start the wrapper detached and wait for its ready line.

    Returns ``{"started": True, "pid": N}``, or ``{"started": False, "error":
    REASON}`` when an argument is invalid, the wrapper file is missing, the
    wrapper reports an error, exits, or sends no ready line within
    ``ready_timeout`` seconds (it is then killed). The token travels in the
    wrapper's environment as SP_RUN_TOKEN, never in its argv.
    """
    _reap_launched()
    try:
        validate_name("run id", run_id)
        validate_name("job name", job)
        validate_name("machine id", machine_id)
    except ValueError as exc:
        return {"started": False, "error": f"invalid argument: {exc}"}
    if loglevel not in LOGLEVELS:
        return {
            "started": False,
            "error": f"invalid loglevel {loglevel!r}: expected one of {', '.join(LOGLEVELS)}",
        }
    if not os.path.isfile(wrapper_path):
        return {"started": False, "error": missing_wrapper_message(wrapper_path)}

    ready_read, ready_write = os.pipe()
    argv = [
        python,
        wrapper_path,
        f"--run={run_id}",
        f"--job={job}",
        f"--machine={machine_id}",
        f"--url={url}",
        f"--loglevel={loglevel}",
        f"--logdir={logdir}",
        f"--statedir={statedir}",
        f"--ready-fd={ready_write}",
    ]
    if cafile:
        argv.append(f"--cafile={cafile}")
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in ("SP_RUN_TOKEN", "SP_RUN_SIGNATURE")
    }
    env["SP_RUN_TOKEN"] = token
    if key_path:
        try:
            env["SP_RUN_SIGNATURE"] = sign_credential(key_path, run_id, machine_id, token)
        except (OSError, ValueError, ImportError) as exc:
            return {"started": False, "error": f"cannot sign the run credential: {exc}"}
    try:
        # A new session, /dev/null for stdio and no inherited descriptor except
        # the ready pipe let the wrapper outlive the Salt job that started it.
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env=env,
            start_new_session=True,
            close_fds=True,
            pass_fds=(ready_write,),
        )
    except OSError as exc:
        os.close(ready_read)
        return {"started": False, "error": f"cannot execute {python} {wrapper_path}: {exc}"}
    finally:
        os.close(ready_write)
    try:
        line = _read_ready_line(ready_read, ready_timeout)
    finally:
        os.close(ready_read)
    return _ready_result(proc, line, ready_timeout)


def _read_ready_line(fd: int, timeout: float) -> bytes | None:
    """Read up to a newline or end of file; return None if ``timeout`` seconds pass first."""
    deadline = time.monotonic() + timeout
    data = b""
    while b"\n" not in data and len(data) < _READY_LINE_MAX_BYTES:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return None
        readable, _, _ = select.select([fd], [], [], remaining)
        if not readable:
            return None
        chunk = os.read(fd, _READY_LINE_MAX_BYTES)
        if not chunk:
            break
        data += chunk
    return data


def _ready_result(
    proc: subprocess.Popen[bytes], line: bytes | None, ready_timeout: float
) -> dict[str, object]:
    if line is None:
        proc.kill()
        proc.wait()
        return {
            "started": False,
            "error": f"the wrapper sent no ready line within {ready_timeout:g} s and was killed",
        }
    text = line.decode("utf-8", "replace").strip()
    if text == "ok":
        _launched.append(proc)
        return {"started": True, "pid": proc.pid}
    if text.startswith("error:"):
        _wait_or_kill(proc, ready_timeout)
        return {"started": False, "error": text[len("error:") :].strip()}
    status = _wait_or_kill(proc, ready_timeout)
    detail = f"an unexpected ready line {text[:200]!r}" if text else "no ready line"
    return {
        "started": False,
        "error": f"the wrapper exited with status {status} after {detail}",
    }


def _wait_or_kill(proc: subprocess.Popen[bytes], timeout: float) -> int:
    """Wait for a wrapper that reported failure to exit, killing it after ``timeout`` seconds."""
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()


def _read_record(path: Path) -> dict[str, object] | None:
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def _wrapper_alive(record: dict[str, object]) -> bool:
    """Return True if the record's wrapper process still runs for the record's run."""
    pid = record.get("wrapper_pid")
    run = record.get("run")
    if not isinstance(pid, int) or not isinstance(run, str):
        return False
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    # A zombie has an empty cmdline, and a reused pid has another one.
    return is_wrapper_cmdline(cmdline, run)


def running(statedir: str) -> list[dict[str, object]]:
    """Return the local records of runs in flight on this minion, ordered by run id.

    A run counts while its wrapper runs, or while processes of the run are left
    after its wrapper died (``wrapper_alive`` is then false, and
    ``kill-local`` stops them).
    """
    records = []
    for path in sorted(Path(statedir).glob("*.json")):
        record = _read_record(path)
        if record is None:
            continue
        alive = _wrapper_alive(record)
        pgid = record.get("pgid")
        orphaned = (
            not alive
            and isinstance(pgid, int)
            and bool(_group_members(pgid, str(record.get("run"))))
        )
        if alive or orphaned:
            records.append({**record, "wrapper_alive": alive})
    return records


def _group_members(pgid: int, run_id: str) -> list[int]:
    """Return the pids in process group ``pgid`` that belong to run ``run_id``.

    A process belongs to the run when its environment has SP_JOB_INSTANCE set
    to the run id. The check keeps a stale record from killing an unrelated
    group that reuses the id. A zombie has no readable environment and is left
    out, because signals cannot reach it anyway.

    NOTE: a process that the job started with a cleared environment (``env -i``)
    is not found here. The wrapper's own SIGKILL to the group still reaches it.
    """
    marker = f"SP_JOB_INSTANCE={run_id}".encode()
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            # The fields after the command name, which is in brackets and may
            # contain spaces: state, ppid, pgrp, ...
            fields = stat[stat.rindex(")") + 2 :].split()
            if int(fields[2]) != pgid:
                continue
            environ = (entry / "environ").read_bytes()
        except (OSError, ValueError, IndexError):
            continue
        if marker in environ.split(b"\0"):
            members.append(int(entry.name))
    return members


def _wait_group_gone(pgid: int, run_id: str, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while _group_members(pgid, run_id):
        if time.monotonic() >= deadline:
            return False
        time.sleep(_KILL_POLL_INTERVAL)
    return True


def kill_local(
    run_id: str,
    statedir: str,
    grace: float = DEFAULT_LOCAL_KILL_GRACE,
    orphaned_only: bool = False,
) -> dict[str, object]:
    """Stop a run on this minion without the engine.

    With ``orphaned_only`` it acts only when the run's wrapper is gone: a live
    wrapper enforces the job's timeout itself and may still report to the
    engine, so it is left alone. The engine asks for this when it records a
    minion as lost.

    Sends SIGTERM to the run's wrapper, which stops the command as if the
    engine had sent a `kill` (SIGTERM to the process group, SIGKILL after the
    job's kill grace) and reports reason killed to the engine. Processes of the
    run that are left ``grace`` seconds later get SIGKILL from here. When the
    wrapper no longer runs, the processes it left get SIGKILL at once and its
    record is removed.

    Returns ``{"killed": bool, "run", "wrapper_pid", "pgid", "forced"}``.
    ``forced`` is True when kill_local itself sent SIGKILL. ``error`` is added
    when nothing was killed or processes survived.
    """
    try:
        validate_name("run id", run_id)
    except ValueError as exc:
        return {"killed": False, "run": run_id, "error": f"invalid argument: {exc}"}
    path = Path(statedir) / f"{run_id}.json"
    record = _read_record(path)
    if record is None:
        return {
            "killed": False,
            "run": run_id,
            "error": f"no local record of run {run_id} in {statedir}",
        }
    pgid = record.get("pgid")
    result: dict[str, object] = {
        "killed": False,
        "run": run_id,
        "wrapper_pid": record.get("wrapper_pid"),
        "pgid": pgid,
        "forced": False,
    }

    if _wrapper_alive(record) and orphaned_only:
        result["error"] = f"the wrapper of run {run_id} still runs; it is left alone"
        return result
    if _wrapper_alive(record):
        os.kill(int(str(record["wrapper_pid"])), signal.SIGTERM)
        result["killed"] = True
        if not isinstance(pgid, int) or _wait_group_gone(pgid, run_id, grace):
            # Without a pgid the command has not started, and the wrapper
            # reports the run as killed without starting it.
            return result
    else:
        path.unlink(missing_ok=True)
        Path(statedir, f"{run_id}.spool").unlink(missing_ok=True)
        if not isinstance(pgid, int) or not _group_members(pgid, run_id):
            result["error"] = f"run {run_id} is not running; removed its stale record"
            return result

    result["forced"] = True
    for pid in _group_members(pgid, run_id):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    result["killed"] = True
    if not _wait_group_gone(pgid, run_id, _SIGKILL_WAIT):
        result["error"] = (
            f"processes of run {run_id} are still alive {_SIGKILL_WAIT:g} s after SIGKILL"
        )
    return result


def build_launcher_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="sp_wrapper.py",
        description="Start, list and stop Saltpeter runs on this minion. Each subcommand "
        "prints its result as one JSON document.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    launch_parser = commands.add_parser(
        "launch",
        help="start the wrapper for one run, detached, and wait until it is ready",
        description="Start the wrapper for one run, detached, and wait until it is ready. "
        "The run token is read from the SP_RUN_TOKEN environment variable. Exits with "
        "status 0 when the wrapper started, 1 otherwise.",
    )
    launch_parser.add_argument("--run", required=True, help="run id")
    launch_parser.add_argument("--job", required=True, help="job name")
    launch_parser.add_argument("--machine", required=True, help="this minion's id")
    launch_parser.add_argument("--url", required=True, help="engine WebSocket URL")
    launch_parser.add_argument(
        "--loglevel", choices=LOGLEVELS, default="normal", help="local log detail"
    )
    launch_parser.add_argument("--logdir", default=DEFAULT_LOGDIR, help="directory of <job>.log")
    launch_parser.add_argument(
        "--cafile", default=None, help="CA bundle to verify a wss:// engine with (default: system)"
    )
    launch_parser.add_argument(
        "--key",
        default=None,
        help="the minion's Salt private key, to sign the run credential with",
    )
    launch_parser.add_argument(
        "--ready-timeout",
        type=float,
        default=DEFAULT_READY_TIMEOUT,
        help="seconds to wait for the wrapper's ready line (default: %(default)g)",
    )
    running_parser = commands.add_parser(
        "running", help="list the runs whose wrapper still runs on this minion"
    )
    kill_parser = commands.add_parser(
        "kill-local",
        help="stop a run on this minion without the engine",
        description="Stop a run on this minion without the engine. Exits with status 0 "
        "when something was killed, 1 otherwise.",
    )
    kill_parser.add_argument("run", help="run id")
    kill_parser.add_argument(
        "--orphaned-only",
        action="store_true",
        help="act only when the run's wrapper is gone, on the processes it left",
    )
    kill_parser.add_argument(
        "--grace",
        type=float,
        default=DEFAULT_LOCAL_KILL_GRACE,
        help="seconds before the run's processes that are left get SIGKILL (default: %(default)g)",
    )
    for sub in (launch_parser, running_parser, kill_parser):
        sub.add_argument("--statedir", default=DEFAULT_STATEDIR, help="directory of <run>.json")
    return parser


def launcher_main(arguments: list[str]) -> int:
    """Run one launcher subcommand, print its JSON result and return the exit status."""
    try:
        args = build_launcher_parser().parse_args(arguments)
    except UsageError as exc:
        print(json.dumps({"error": f"invalid arguments: {exc}"}))
        print(f"sp_wrapper.py: invalid arguments: {exc}", file=sys.stderr)
        return EXIT_LAUNCHER_USAGE
    result: object
    if args.command == "launch":
        # The token must not stay readable in /proc/PID/environ of this process.
        scrub_initial_environ("SP_RUN_TOKEN")
        token = os.environ.pop("SP_RUN_TOKEN", "")
        result = launch(
            run_id=args.run,
            job=args.job,
            url=args.url,
            token=token,
            machine_id=args.machine,
            wrapper_path=os.path.abspath(__file__),
            loglevel=args.loglevel,
            logdir=args.logdir,
            statedir=args.statedir,
            ready_timeout=args.ready_timeout,
            cafile=args.cafile,
            key_path=args.key,
        )
        status = EXIT_OK if result.get("started") else EXIT_LAUNCHER_FAILED
    elif args.command == "running":
        result = running(args.statedir)
        status = EXIT_OK
    else:
        result = kill_local(
            args.run, args.statedir, grace=args.grace, orphaned_only=args.orphaned_only
        )
        status = EXIT_OK if result.get("killed") else EXIT_LAUNCHER_FAILED
    print(json.dumps(result))
    return status


def main(argv: list[str] | None = None) -> int:
    arguments = sys.argv[1:] if argv is None else argv
    if arguments and arguments[0] in LAUNCHER_COMMANDS:
        return launcher_main(arguments)
    try:
        args = build_parser().parse_args(arguments)
    except UsageError as exc:
        message = f"invalid arguments: {exc}"
        _send_ready(_ready_fd_from_argv(arguments), f"error: {message}\n")
        print(f"sp_wrapper.py: {message}", file=sys.stderr)
        return EXIT_START_FAILED
    if args.ready_fd is not None:
        try:
            os.set_inheritable(args.ready_fd, False)
        except OSError:
            args.ready_fd = None
    try:
        setup = prepare(args)
    except StartupError as exc:
        _send_ready(args.ready_fd, f"error: {exc}\n")
        print(f"sp_wrapper.py: {exc}", file=sys.stderr)
        return EXIT_START_FAILED
    setup_logging(args.loglevel, args.logdir, setup.ids)
    _become_subreaper()
    log.info(
        "run %s: wrapper %s started (pid %d) for minion %s, engine %s",
        setup.ids.run,
        __version__,
        os.getpid(),
        setup.ids.machine,
        setup.url,
    )
    _send_ready(args.ready_fd, "ok\n")
    try:
        status = asyncio.run(run_wrapper(setup))
    except Exception:
        log.exception("run %s: wrapper failed", setup.ids.run)
        status = EXIT_UNDELIVERED
    finally:
        setup.record.remove()
    log.info("run %s: wrapper exits with status %d", setup.ids.run, status)
    return status


if __name__ == "__main__":
    sys.exit(main())
else:
    # Importers (saltpeter.minion, the tests) use the classes that need Tornado
    # directly. Without it, prepare() raises the same error later.
    with contextlib.suppress(StartupError):
        _import_tornado()
