"""Minion side of Saltpeter: start the wrapper, list and kill the runs it supervises.

The ``saltpeter`` execution module in ``_modules/`` is a thin shell over these
functions. They need no Salt daemon, so they are tested as plain functions.
docs/protocol.md describes the wrapper's command line, its ready pipe and its
local records in STATEDIR/<run id>.json.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

from saltpeter.wrapper import is_wrapper_cmdline, validate_name

DEFAULT_WRAPPER_PATH = "/usr/local/bin/sp_wrapper.py"
DEFAULT_LOGDIR = "/var/log/sp_wrapper"
DEFAULT_STATEDIR = "/var/run/saltpeter"
LOGLEVELS = ("normal", "debug", "off")

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


class WrapperError(Exception):
    """The wrapper file is missing, or running it failed."""


def _missing_wrapper_message(wrapper_path: str) -> str:
    return (
        f"wrapper not found at {wrapper_path}; apply the saltpeter state "
        "(salt MINION state.apply saltpeter) to install it"
    )


def _reap_launched() -> None:
    _launched[:] = [proc for proc in _launched if proc.poll() is None]


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
    ready_timeout: float = 10.0,
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
        return {"started": False, "error": _missing_wrapper_message(wrapper_path)}

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
    env = {key: value for key, value in os.environ.items() if key != "SP_RUN_TOKEN"}
    env["SP_RUN_TOKEN"] = token
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
    """Return the local records of runs whose wrapper still runs, ordered by run id."""
    records = []
    for path in sorted(Path(statedir).glob("*.json")):
        record = _read_record(path)
        if record is not None and _wrapper_alive(record):
            records.append(record)
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


def kill_local(run_id: str, statedir: str, grace: float = 5.0) -> dict[str, object]:
    """Stop a run on this minion without the engine.

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

    if _wrapper_alive(record):
        os.kill(int(str(record["wrapper_pid"])), signal.SIGTERM)
        result["killed"] = True
        if not isinstance(pgid, int) or _wait_group_gone(pgid, run_id, grace):
            # Without a pgid the command has not started, and the wrapper
            # reports the run as killed without starting it.
            return result
    else:
        path.unlink(missing_ok=True)
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


def wrapper_version(wrapper_path: str, python: str = sys.executable) -> str:
    """Run ``wrapper_path --version`` and return the version it prints.

    Raises WrapperError when the file is missing or the wrapper fails.
    """
    if not os.path.isfile(wrapper_path):
        raise WrapperError(_missing_wrapper_message(wrapper_path))
    try:
        proc = subprocess.run(
            [python, wrapper_path, "--version"],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=30,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise WrapperError(f"cannot run {python} {wrapper_path} --version: {exc}") from None
    if proc.returncode != 0:
        stderr = proc.stderr.decode("utf-8", "replace").strip()
        raise WrapperError(
            f"{python} {wrapper_path} --version failed with status {proc.returncode}: {stderr}"
        )
    return proc.stdout.decode("utf-8", "replace").strip()
