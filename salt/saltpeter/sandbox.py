"""Start and stop a throwaway Salt master and minions on 127.0.0.1.

A sandbox is a real ``salt-master`` with the Saltpeter engine and N real
``salt-minion`` processes from the Python environment that runs this module.
Every file lives under one root folder and every port is picked free on
127.0.0.1, so several sandboxes can run side by side::

    ROOT/sandbox.json                   ports, pidfiles, config paths, minion ids
    ROOT/master/master                  the master's config: salt -c ROOT/master ...
    ROOT/minion-N/minion                the config of minion N
    ROOT/minion-N/run/                  the wrapper's run records on minion N
    ROOT/jobs/                          the job directory unless --jobs names one
    ROOT/logs/, ROOT/wrapper-logs/      Saltpeter's logs

Command line::

    saltpeter-sandbox up --root DIR --minions N [--jobs JOBDIR] [--timeout S]
    saltpeter-sandbox down --root DIR
    saltpeter-sandbox status --root DIR
    saltpeter-sandbox watch --root DIR

The integration tests drive the same code through :class:`Sandbox`.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import yaml

log = logging.getLogger(__name__)

STATE_FILE = "sandbox.json"
LOCALHOST = "127.0.0.1"
DEFAULT_UP_TIMEOUT = 180.0
# Seconds a daemon gets between SIGTERM and SIGKILL.
STOP_GRACE = 15.0
LOG_TAIL_LINES = 25
EVENT_TAG_PREFIX = "saltpeter/job/"
SALT_INTERRUPT_TAG = "salt/event/exit"
# sun_path in struct sockaddr_un is 108 bytes on Linux, including the final NUL.
UNIX_SOCKET_PATH_MAX = 107
# The socket file name of maximum length that Salt 3008 creates in a sock_dir, with
# a 10-digit hash of the minion ID.
MAX_LENGTH_SOCKET_NAME = "minion_event_0123456789_pull.ipc"
# Text of errno EADDRINUSE, which Salt logs when a port it binds is taken.
PORT_CONFLICT_TEXT = "Address already in use"
WRAPPER_PATH = Path(__file__).resolve().parent / "wrapper.py"


class SandboxError(Exception):
    """A sandbox could not be started, stopped or inspected."""


class PortConflictError(SandboxError):
    """Another process took one of the ports picked for the sandbox."""


# Processes, read from /proc (Linux only, like the Salt daemons this module starts).


def _proc_stat_fields(pid: int) -> list[str] | None:
    """Return the fields of /proc/PID/stat after the command name, starting with the state."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name is in brackets and may itself contain spaces and brackets.
    return stat.rsplit(")", 1)[1].split()


def is_running(pid: int) -> bool:
    """Return whether process PID exists and is not a zombie."""
    fields = _proc_stat_fields(pid)
    return fields is not None and fields[0] not in ("Z", "X")


def _process_group(pid: int) -> int | None:
    fields = _proc_stat_fields(pid)
    return int(fields[2]) if fields else None


def _parent_pid(pid: int) -> int | None:
    fields = _proc_stat_fields(pid)
    return int(fields[1]) if fields else None


def _start_time(pid: int) -> float | None:
    """Return when process PID started, in seconds since the epoch."""
    fields = _proc_stat_fields(pid)
    if fields is None:
        return None
    # Field 22 of /proc/PID/stat counts clock ticks since boot, and /proc/stat has the boot time.
    ticks = int(fields[19])
    for line in Path("/proc/stat").read_text().splitlines():
        if line.startswith("btime "):
            return int(line.split()[1]) + ticks / os.sysconf("SC_CLK_TCK")
    return None


def read_cmdline(pid: int) -> str:
    """Return the command line of PID with arguments joined by spaces, or "" if it is gone.

    Salt renames its processes with setproctitle, which can turn the NUL-separated
    arguments into one space-separated string, so callers match against spaces.
    """
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return ""
    return raw.replace(b"\0", b" ").decode(errors="replace").strip()


def cmdline_names(cmdline: str, path: Path, include_below: bool) -> bool:
    """Return whether a command line has PATH as a whole argument or an option value.

    With include_below, a path inside PATH counts too. ``/tmp/sb/minion-1`` never
    matches ``/tmp/sb/minion-10``.
    """
    end = r"(?:$|[\s/])" if include_below else r"(?:$|\s)"
    return re.search(r"(?:^|[\s=])" + re.escape(str(path)) + end, cmdline) is not None


def _own_lineage() -> set[int]:
    """Return the PIDs of this process and its ancestors, which name the root when a
    user runs ``saltpeter-sandbox down --root DIR`` and must survive it."""
    lineage: set[int] = set()
    pid: int | None = os.getpid()
    while pid and pid not in lineage:
        lineage.add(pid)
        pid = _parent_pid(pid)
    return lineage


def _all_pids() -> Iterator[int]:
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            yield int(entry.name)


def processes_naming(path: Path) -> dict[int, str]:
    """Return the running processes of this user whose command line names PATH or a
    path below it, with their command lines, leaving out this process and its ancestors."""
    lineage = _own_lineage()
    found: dict[int, str] = {}
    for pid in _all_pids():
        if pid in lineage:
            continue
        try:
            if Path(f"/proc/{pid}").stat().st_uid != os.getuid():
                continue
        except OSError:
            continue
        cmdline = read_cmdline(pid)
        if cmdline and is_running(pid) and cmdline_names(cmdline, path, include_below=True):
            found[pid] = cmdline
    return found


def _group_members(pgid: int) -> list[int]:
    return [pid for pid in _all_pids() if _process_group(pid) == pgid and is_running(pid)]


def _send(pid: int, sig: signal.Signals, group: bool = False) -> None:
    try:
        if group:
            os.killpg(pid, sig)
        else:
            os.kill(pid, sig)
    except ProcessLookupError:
        pass


def terminate(
    pids: Iterable[int], groups: Iterable[int] = (), grace: float = STOP_GRACE
) -> set[int]:
    """Send SIGTERM to PIDS and process GROUPS, SIGKILL after GRACE seconds to what is left.

    Returns the PIDs still running 5 s after SIGKILL (normally none).
    """
    pids = set(pids)
    groups = set(groups)
    for pid in pids:
        _send(pid, signal.SIGTERM)
    for pgid in groups:
        _send(pgid, signal.SIGTERM, group=True)

    def remaining() -> set[int]:
        alive = {pid for pid in pids if is_running(pid)}
        for pgid in groups:
            alive.update(_group_members(pgid))
        return alive

    deadline = time.monotonic() + grace
    while remaining() and time.monotonic() < deadline:
        time.sleep(0.2)
    left = remaining()
    if not left:
        return set()
    log.warning("PIDs %s still run %g s after SIGTERM; sending SIGKILL", sorted(left), grace)
    for pid in left:
        _send(pid, signal.SIGKILL)
    for pgid in groups:
        _send(pgid, signal.SIGKILL, group=True)
    deadline = time.monotonic() + 5.0
    while remaining() and time.monotonic() < deadline:
        time.sleep(0.1)
    return remaining()


# Ports


def pick_free_ports(count: int) -> list[int]:
    """Return COUNT distinct ports that were free on 127.0.0.1 a moment ago.

    The kernel picks them (bind to port 0); they are held open together so no two
    are equal, then released. Another process may still take one before the daemon
    binds it, which the master's log then reports.
    """
    with contextlib.ExitStack() as stack:
        sockets = []
        for _ in range(count):
            sock = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            sock.bind((LOCALHOST, 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]


def port_is_free(port: int) -> bool:
    """Return whether a server could bind PORT on 127.0.0.1 now (with SO_REUSEADDR,
    as Salt's and Tornado's servers do)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((LOCALHOST, port))
        except OSError:
            return False
    return True


def port_accepts(port: int) -> bool:
    """Return whether something accepts TCP connections on 127.0.0.1:PORT."""
    try:
        with socket.create_connection((LOCALHOST, port), timeout=1.0):
            return True
    except OSError:
        return False


# Layout


@dataclass(frozen=True)
class Deadline:
    """An instant on the monotonic clock, with the timeout it was set from for messages."""

    at: float
    timeout: float

    @classmethod
    def after(cls, timeout: float) -> Deadline:
        return cls(time.monotonic() + timeout, timeout)

    def remaining(self) -> float:
        return max(0.0, self.at - time.monotonic())

    def passed(self) -> bool:
        return time.monotonic() >= self.at


@dataclass(frozen=True)
class Ports:
    """TCP ports on 127.0.0.1 that one sandbox uses."""

    publish: int
    ret: int
    machines_ws: int
    api_ws: int

    @classmethod
    def pick(cls) -> Ports:
        return cls(*pick_free_ports(4))

    def taken(self) -> list[int]:
        """Return the ports that are in use now."""
        return [port for port in vars(self).values() if not port_is_free(port)]


@dataclass(frozen=True)
class Daemon:
    """One Salt daemon of a sandbox and the files that identify it."""

    name: str
    program: str
    config_dir: Path
    pidfile: Path
    log_file: Path

    @property
    def config_file(self) -> Path:
        return self.config_dir / self.program.removeprefix("salt-")

    def pid(self) -> int | None:
        """Return the PID in the pidfile if that process runs this daemon's config, else None."""
        try:
            pid = int(self.pidfile.read_text().strip())
        except (OSError, ValueError):
            return None
        if is_running(pid) and cmdline_names(read_cmdline(pid), self.config_dir, False):
            return pid
        return None

    def processes(self) -> list[int]:
        """Return every running process started with this daemon's config directory."""
        pids = []
        for pid in _all_pids():
            cmdline = read_cmdline(pid)
            if cmdline and is_running(pid) and cmdline_names(cmdline, self.config_dir, False):
                pids.append(pid)
        return pids


@dataclass(frozen=True)
class Layout:
    """File locations, ports and minion IDs of one sandbox, and how its daemons start."""

    root: Path
    minion_ids: tuple[str, ...]
    ports: Ports
    jobs_dir: Path
    # Directory of the salt-master, salt-minion, salt and salt-run scripts. None: the
    # directory of the Python running this module.
    bin_dir: Path | None = None
    # Environment variables added for the master and the salt, salt-run and salt-key
    # commands, such as PYTHONPATH for a master that imports Saltpeter from a checkout.
    master_env: Mapping[str, str] = field(default_factory=dict)

    @property
    def master_dir(self) -> Path:
        return self.root / "master"

    @property
    def master(self) -> Daemon:
        return Daemon(
            name="master",
            program="salt-master",
            config_dir=self.master_dir,
            pidfile=self.master_dir / "salt-master.pid",
            log_file=self.master_dir / "master.log",
        )

    @property
    def sock_dir(self) -> Path:
        return self.master_dir / "sock"

    @property
    def cachedir(self) -> Path:
        return self.master_dir / "cache"

    @property
    def store_path(self) -> Path:
        return self.cachedir / "saltpeter" / "saltpeter.db"

    @property
    def logdir(self) -> Path:
        return self.root / "logs"

    @property
    def wrapper_logdir(self) -> Path:
        return self.root / "wrapper-logs"

    def minion(self, minion_id: str) -> Daemon:
        if minion_id not in self.minion_ids:
            raise SandboxError(
                f"minion {minion_id!r} is not part of the sandbox in {self.root}. "
                f"Its minions are {', '.join(self.minion_ids)}."
            )
        config_dir = self.root / minion_id
        return Daemon(
            name=minion_id,
            program="salt-minion",
            config_dir=config_dir,
            pidfile=config_dir / "salt-minion.pid",
            log_file=config_dir / "minion.log",
        )

    def statedir(self, minion_id: str) -> Path:
        return self.root / minion_id / "run"

    @property
    def minions(self) -> list[Daemon]:
        return [self.minion(minion_id) for minion_id in self.minion_ids]

    @property
    def daemons(self) -> list[Daemon]:
        return [self.master, *self.minions]

    def to_json(self) -> dict[str, Any]:
        master = self.master
        return {
            "root": str(self.root),
            "master": {
                "config_dir": str(master.config_dir),
                "config_file": str(master.config_file),
                "pidfile": str(master.pidfile),
                "log_file": str(master.log_file),
                "sock_dir": str(self.sock_dir),
                "cachedir": str(self.cachedir),
                "publish_port": self.ports.publish,
                "ret_port": self.ports.ret,
            },
            "minions": [
                {
                    "id": minion.name,
                    "config_dir": str(minion.config_dir),
                    "config_file": str(minion.config_file),
                    "pidfile": str(minion.pidfile),
                    "log_file": str(minion.log_file),
                    "statedir": str(self.statedir(minion.name)),
                }
                for minion in self.minions
            ],
            "bin_dir": str(self.bin_dir) if self.bin_dir is not None else None,
            "master_env": dict(self.master_env),
            "saltpeter": {
                "config_dir": str(self.jobs_dir),
                "machines_ws_port": self.ports.machines_ws,
                "api_ws_port": self.ports.api_ws,
                "store_path": str(self.store_path),
                "logdir": str(self.logdir),
                "wrapper_logdir": str(self.wrapper_logdir),
                "wrapper_path": str(WRAPPER_PATH),
            },
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Layout:
        master = data["master"]
        saltpeter = data["saltpeter"]
        return cls(
            root=Path(data["root"]),
            minion_ids=tuple(minion["id"] for minion in data["minions"]),
            ports=Ports(
                publish=master["publish_port"],
                ret=master["ret_port"],
                machines_ws=saltpeter["machines_ws_port"],
                api_ws=saltpeter["api_ws_port"],
            ),
            jobs_dir=Path(saltpeter["config_dir"]),
            bin_dir=Path(data["bin_dir"]) if data.get("bin_dir") else None,
            master_env=dict(data.get("master_env") or {}),
        )


def engine_settings(layout: Layout, extra: Mapping[str, object] | None) -> dict[str, object]:
    """Return the engine's ``settings``, which override ``saltpeter_config`` in job files."""
    settings: dict[str, object] = {
        "machines_ws_port": layout.ports.machines_ws,
        "machines_ws_bind_addr": LOCALHOST,
        "default_saltpeter_server_host": LOCALHOST,
        # The dashboard and HTTP API, on loopback only, so no token is needed.
        "api_ws": True,
        "api_ws_port": layout.ports.api_ws,
        "api_ws_bind_addr": LOCALHOST,
        "default_wrapper_path": str(WRAPPER_PATH),
        "default_wrapper_logdir": str(layout.wrapper_logdir),
        "logdir": str(layout.logdir),
        "startup_wait": 30,
    }
    settings.update(extra or {})
    return settings


def master_config(
    layout: Layout, settings: Mapping[str, object], extra: Mapping[str, object] | None = None
) -> dict[str, object]:
    """Return the master's config: every path under the root, every socket on 127.0.0.1.

    EXTRA replaces or adds top-level options, for example ``file_roots`` or ``reactor``.
    """
    master_dir = layout.master_dir
    master = layout.master
    config: dict[str, object] = {
        "id": f"{layout.root.name}-master",
        "user": _current_user(),
        "interface": LOCALHOST,
        "ipv6": False,
        "publish_port": layout.ports.publish,
        "ret_port": layout.ports.ret,
        "root_dir": str(master_dir),
        "pki_dir": str(master_dir / "pki"),
        "cachedir": str(layout.cachedir),
        "sock_dir": str(layout.sock_dir),
        "pidfile": str(master.pidfile),
        "log_file": str(master.log_file),
        "key_logfile": str(master_dir / "key.log"),
        "log_level_logfile": "info",
        "extension_modules": str(master_dir / "extmods"),
        "file_roots": {"base": [str(master_dir / "srv" / "salt")]},
        "pillar_roots": {"base": [str(master_dir / "srv" / "pillar")]},
        "auto_accept": True,
        "engines": [
            {"saltpeter": {"config_dir": str(layout.jobs_dir), "settings": dict(settings)}}
        ],
    }
    config.update(extra or {})
    return config


def minion_config(
    layout: Layout, minion_id: str, extra: Mapping[str, object] | None = None
) -> dict[str, object]:
    """Return a minion's config, pointing at the sandbox's master on 127.0.0.1.

    EXTRA replaces or adds top-level options.
    """
    minion = layout.minion(minion_id)
    minion_dir = minion.config_dir
    config: dict[str, object] = {
        "id": minion_id,
        "user": _current_user(),
        "master": LOCALHOST,
        "master_port": layout.ports.ret,
        "publish_port": layout.ports.publish,
        "ipv6": False,
        "root_dir": str(minion_dir),
        "pki_dir": str(minion_dir / "pki"),
        "cachedir": str(minion_dir / "cache"),
        "sock_dir": str(minion_dir / "sock"),
        "pidfile": str(minion.pidfile),
        "log_file": str(minion.log_file),
        "log_level_logfile": "info",
        # With root_dir set, Salt's default is <root_dir>/var/cache/salt/minion/extmods.
        "extension_modules": str(minion_dir / "extmods"),
        "enable_fqdns_grains": False,
        "enable_gpu_grains": False,
        # Seconds between authentication attempts while the master is not reachable.
        "acceptance_wait_time": 2,
        "saltpeter_statedir": str(layout.statedir(minion_id)),
        # Where saltpeter.running, kill_local and wrapper_version find the wrapper.
        "saltpeter_wrapper_path": str(WRAPPER_PATH),
    }
    config.update(extra or {})
    return config


def _current_user() -> str:
    import pwd

    return pwd.getpwuid(os.getuid()).pw_name


def salt_script(name: str, bin_dir: Path | None = None) -> Path:
    """Return the path of Salt's script NAME in BIN_DIR, by default in the Python
    environment running this module."""
    directory = bin_dir if bin_dir is not None else Path(sys.executable).parent
    path = directory / name
    if not path.is_file():
        raise SandboxError(
            f"{name} not found in {directory}. Run the sandbox with the Python "
            "of the environment where Salt is installed (scripts/bootstrap.sh builds .venv)"
        )
    return path


def tail_text(text: str, lines: int = LOG_TAIL_LINES) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    """Return the last LINES lines of the text file PATH, or a note that it is missing."""
    try:
        with path.open("rb") as handle:
            handle.seek(0, os.SEEK_END)
            size = handle.tell()
            handle.seek(max(0, size - 64 * 1024))
            text = handle.read().decode(errors="replace")
    except OSError as exc:
        return f"({path} cannot be read: {exc.strerror})"
    return tail_text(text, lines)


def parse_json_documents(stdout: str) -> list[object]:
    """Return the JSON documents printed one after another by a Salt command.

    ``salt --out json`` prints one document per minion as its return arrives, and
    ``salt-run`` can print progress events before its return. Raises ValueError
    when the output contains something else or nothing.
    """
    decoder = json.JSONDecoder()
    documents: list[object] = []
    position = 0
    text = stdout.strip()
    while position < len(text):
        document, position = decoder.raw_decode(text, position)
        documents.append(document)
        while position < len(text) and text[position].isspace():
            position += 1
    if not documents:
        raise ValueError("no JSON document in the output")
    return documents


def merge_returns(documents: Sequence[object]) -> dict[str, object]:
    """Merge the per-minion documents of ``salt --out json`` into one minion-to-return dict."""
    merged: dict[str, object] = {}
    for document in documents:
        if not isinstance(document, dict):
            raise ValueError(f"expected one JSON object per minion, got {document!r}")
        merged.update(document)
    return merged


# Wrapper run records (the wrapper keeps STATEDIR/<run id>.json while a run is in flight).


def _parse_time(value: object) -> float | None:
    if not isinstance(value, str):
        return None
    try:
        return dt.datetime.fromisoformat(value).timestamp()
    except ValueError:
        return None


def wrapper_processes(statedir: Path, root: Path) -> tuple[set[int], set[int]]:
    """Return the wrapper PIDs and command process groups recorded in STATEDIR.

    A wrapper PID counts only while its command line still names the root. A
    command's group counts while the wrapper runs, or, once the wrapper is gone,
    when a process of the group started no earlier than the record's ``started``,
    so a group ID reused by an unrelated process is left alone.
    """
    wrapper_pids: set[int] = set()
    groups: set[int] = set()
    for record_path in sorted(statedir.glob("*.json")):
        try:
            record = json.loads(record_path.read_text())
        except (OSError, ValueError) as exc:
            log.warning("skipping unreadable wrapper record %s: %s", record_path, exc)
            continue
        wrapper_pid = record.get("wrapper_pid")
        wrapper_alive = (
            isinstance(wrapper_pid, int)
            and is_running(wrapper_pid)
            and cmdline_names(read_cmdline(wrapper_pid), root, include_below=True)
        )
        if wrapper_alive:
            wrapper_pids.add(wrapper_pid)
        pgid = record.get("pgid")
        if not isinstance(pgid, int) or pgid <= 1:
            continue
        members = _group_members(pgid)
        if not members:
            continue
        started = _parse_time(record.get("started"))
        # Process start times have clock-tick resolution and the record is written
        # just after the command starts, so allow a few seconds of slack.
        started_after_record = started is not None and any(
            (_start_time(pid) or 0) >= started - 5.0 for pid in members
        )
        if wrapper_alive or started_after_record:
            groups.add(pgid)
    return wrapper_pids, groups


# The sandbox


class Sandbox:
    """A Salt master with the Saltpeter engine and N minions, all under one root folder."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root).absolute()
        self._layout: Layout | None = None
        # Size of each daemon's log when it was last started, so that only lines it
        # wrote since then are searched for errors.
        self._log_offsets: dict[str, int] = {}

    # State

    @property
    def state_file(self) -> Path:
        return self.root / STATE_FILE

    @property
    def layout(self) -> Layout:
        """Return the layout recorded in sandbox.json by the last ``up``."""
        if self._layout is None:
            try:
                data = json.loads(self.state_file.read_text())
            except FileNotFoundError:
                raise SandboxError(
                    f"{self.state_file} not found: no sandbox was started in {self.root}"
                ) from None
            except ValueError as exc:
                raise SandboxError(f"{self.state_file} is not valid JSON: {exc}") from None
            self._layout = Layout.from_json(data)
        return self._layout

    @property
    def minion_ids(self) -> list[str]:
        return list(self.layout.minion_ids)

    @property
    def store_path(self) -> Path:
        return self.layout.store_path

    @property
    def machines_port(self) -> int:
        return self.layout.ports.machines_ws

    @property
    def api_port(self) -> int:
        return self.layout.ports.api_ws

    @property
    def master_dir(self) -> Path:
        return self.root / "master"

    @property
    def master_config_file(self) -> Path:
        return self.layout.master.config_file

    def running_processes(self) -> dict[int, str]:
        """Return every process (PID to command line) that names this root."""
        return processes_naming(self.root)

    def running_daemons(self) -> dict[int, str]:
        """Return the Salt daemon processes (PID to command line) started in this root.

        Other processes that name the root, such as ``tail -f`` on a log, do not count.
        """
        return {
            pid: cmdline
            for pid, cmdline in self.running_processes().items()
            if "salt-master" in cmdline or "salt-minion" in cmdline
        }

    # Start

    def up(
        self,
        minions: int,
        jobs_dir: Path | None = None,
        timeout: float = DEFAULT_UP_TIMEOUT,
        settings: Mapping[str, object] | None = None,
        master_extra: Mapping[str, object] | None = None,
        minion_extra: Mapping[str, object] | None = None,
        master_env: Mapping[str, str] | None = None,
        bin_dir: Path | None = None,
    ) -> None:
        """Write the configs, start the master and MINIONS minions, and wait for test.ping.

        SETTINGS override the engine's settings. MASTER_EXTRA and MINION_EXTRA replace
        or add top-level options of the master's and every minion's config. MASTER_ENV
        adds environment variables for the master and the salt commands. BIN_DIR is the
        directory of the Salt scripts to run, by default that of this Python.

        Returns once every minion responds to ``test.ping`` through the master. Raises
        SandboxError if the root already runs a sandbox. A daemon that exits, or
        TIMEOUT seconds passing first, also raises it after the daemons are stopped.
        A port taken by another process between picking and binding makes ``up``
        pick new ports and try once more.
        """
        if minions < 1:
            raise SandboxError(f"--minions must be at least 1, not {minions}")
        running = self.running_daemons()
        if running:
            pid, cmdline = next(iter(sorted(running.items())))
            raise SandboxError(
                f"a sandbox is already running in {self.root} ({len(running)} processes, "
                f"e.g. PID {pid}: {cmdline}). Run 'saltpeter-sandbox down --root {self.root}' "
                "first."
            )
        self._check_socket_path_length()
        if jobs_dir is None:
            jobs = self.root / "jobs"
            jobs.mkdir(parents=True, exist_ok=True)
        else:
            jobs = Path(jobs_dir).absolute()
            if not jobs.is_dir():
                raise SandboxError(f"jobs directory {jobs} not found")

        deadline = Deadline.after(timeout)
        minion_ids = tuple(f"minion-{number}" for number in range(1, minions + 1))
        for attempt in (1, 2):
            layout = Layout(
                self.root,
                minion_ids,
                Ports.pick(),
                jobs,
                bin_dir=Path(bin_dir).absolute() if bin_dir is not None else None,
                master_env=dict(master_env or {}),
            )
            self._write(layout, engine_settings(layout, settings), master_extra, minion_extra or {})
            try:
                self._start_and_wait(deadline)
            except PortConflictError as exc:
                self._stop_quietly()
                if attempt == 2:
                    raise
                log.warning("%s. Picking new ports and starting again.", exc)
            except BaseException:
                self._stop_quietly()
                raise
            else:
                return

    def _check_socket_path_length(self) -> None:
        longest = self.root / "minion-000" / "sock" / MAX_LENGTH_SOCKET_NAME
        if len(os.fsencode(longest)) > UNIX_SOCKET_PATH_MAX:
            raise SandboxError(
                f"root {self.root} is too long: Salt's socket paths under it would exceed "
                f"the {UNIX_SOCKET_PATH_MAX}-byte limit of Unix sockets. Choose a shorter --root."
            )

    def _write(
        self,
        layout: Layout,
        settings: Mapping[str, object],
        master_extra: Mapping[str, object] | None = None,
        minion_extra: Mapping[str, object] | None = None,
    ) -> None:
        for directory in (layout.master_dir, layout.logdir, layout.wrapper_logdir):
            directory.mkdir(parents=True, exist_ok=True)
        _write_yaml(layout.master.config_file, master_config(layout, settings, master_extra))
        for minion in layout.minions:
            layout.statedir(minion.name).mkdir(parents=True, exist_ok=True)
            _write_yaml(minion.config_file, minion_config(layout, minion.name, minion_extra))
        self.state_file.write_text(json.dumps(layout.to_json(), indent=2) + "\n")
        self._layout = layout

    def _start_and_wait(self, deadline: Deadline) -> None:
        layout = self.layout
        taken = layout.ports.taken()
        if taken:
            raise PortConflictError(f"ports {taken} on {LOCALHOST} were taken before the start")
        self._remove_stale_keys()
        self._start_daemon(layout.master, deadline)
        self._wait_for_master(deadline)
        for minion in layout.minions:
            self._start_daemon(minion, deadline)
        self._wait_for_minions(layout.minion_ids, deadline)
        log.info(
            "sandbox in %s is up: %d minions respond to test.ping", self.root, len(layout.minions)
        )

    def _remove_stale_keys(self) -> None:
        """Delete the keys of minions that an earlier ``up`` in this root started and this
        one does not, so that ``salt '*'`` does not wait for them."""
        if not (self.master_dir / "pki").is_dir():
            return
        listing = self._run("salt-key", ["--list-all", "--out", "json"], timeout=60)
        try:
            keys = parse_json_documents(listing.stdout)[-1]
        except ValueError:
            keys = None
        if not isinstance(keys, dict):
            log.warning("salt-key --list-all printed no key list: %s", listing.stderr.strip())
            return
        known = {name for names in keys.values() for name in names}
        for minion_id in sorted(known - set(self.layout.minion_ids)):
            log.info("deleting the key of minion %s, which this sandbox no longer has", minion_id)
            self._run("salt-key", ["--delete", minion_id, "--yes"], timeout=60)

    def _start_daemon(self, daemon: Daemon, deadline: Deadline) -> int:
        """Start DAEMON with ``-d`` and return its PID once its pidfile names it."""
        with contextlib.suppress(FileNotFoundError):
            daemon.pidfile.unlink()
        try:
            self._log_offsets[daemon.name] = daemon.log_file.stat().st_size
        except FileNotFoundError:
            self._log_offsets[daemon.name] = 0
        layout = self.layout
        command = [
            str(salt_script(daemon.program, layout.bin_dir)),
            "-c",
            str(daemon.config_dir),
            "-d",
        ]
        env = {**os.environ, **layout.master_env} if daemon == layout.master else None
        # The script forks the daemon and exits at once, so later output goes to the log.
        result = subprocess.run(
            command, capture_output=True, text=True, timeout=60, check=False, env=env
        )
        if result.returncode != 0:
            output = result.stderr.strip() or result.stdout.strip()
            message = f"{' '.join(command)} failed with exit status {result.returncode}: {output}"
            # salt-master checks its ports before it forks and exits with status 4
            # ("The ports are not available to bind") when one is taken.
            if daemon.program == "salt-master" and result.returncode == 4:
                raise PortConflictError(message)
            raise SandboxError(message)
        while not deadline.passed():
            pid = daemon.pid()
            if pid is not None:
                log.info("started %s (PID %d)", daemon.name, pid)
                return pid
            time.sleep(0.1)
        raise self._daemon_failure(
            daemon, f"did not write its PID to {daemon.pidfile} within {deadline.timeout:g} s"
        )

    def _new_log_text(self, daemon: Daemon) -> str:
        """Return what DAEMON logged since this object last started it."""
        try:
            with daemon.log_file.open("rb") as handle:
                handle.seek(self._log_offsets.get(daemon.name, 0))
                return handle.read().decode(errors="replace")
        except OSError:
            return ""

    def _daemon_failure(self, daemon: Daemon, reason: str) -> SandboxError:
        message = (
            f"{daemon.name} {reason}. Last lines of {daemon.log_file}:\n{tail(daemon.log_file)}"
        )
        if PORT_CONFLICT_TEXT in self._new_log_text(daemon):
            return PortConflictError(message)
        return SandboxError(message)

    def _check_daemons(self, daemons: Sequence[Daemon]) -> None:
        """Raise if a daemon has exited or the master's log reports a taken port."""
        for daemon in daemons:
            if daemon.pid() is None:
                raise self._daemon_failure(daemon, "exited")
        master = self.layout.master
        if PORT_CONFLICT_TEXT in self._new_log_text(master):
            raise self._daemon_failure(master, "could not bind a port")

    def _wait_for_master(self, deadline: Deadline) -> None:
        layout = self.layout
        while not deadline.passed():
            self._check_daemons([layout.master])
            if port_accepts(layout.ports.ret) and port_accepts(layout.ports.publish):
                return
            time.sleep(0.2)
        raise self._daemon_failure(
            layout.master,
            f"did not listen on ports {layout.ports.publish} and {layout.ports.ret} "
            f"within {deadline.timeout:g} s",
        )

    def wait_for_minions(self, minion_ids: Sequence[str], timeout: float) -> None:
        """Wait until every minion in MINION_IDS responds to ``test.ping`` through the master.

        Raises SandboxError with the tail of the log of a minion that did not
        respond, or of a daemon that exited, when TIMEOUT seconds pass first.
        """
        self._wait_for_minions(minion_ids, Deadline.after(timeout))

    def _wait_for_minions(self, minion_ids: Sequence[str], deadline: Deadline) -> None:
        silent = self._silent_minions(minion_ids, deadline)
        if not silent:
            return
        others = f"and {len(silent) - 1} other minions " if len(silent) > 1 else ""
        raise self._daemon_failure(
            self.layout.minion(silent[0]),
            f"{others}did not respond to test.ping within {deadline.timeout:g} s",
        )

    def _silent_minions(self, minion_ids: Sequence[str], deadline: Deadline) -> list[str]:
        """Ping MINION_IDS until all respond or DEADLINE passes; return those that did not."""
        layout = self.layout
        daemons = [layout.master, *(layout.minion(minion_id) for minion_id in minion_ids)]
        silent = list(minion_ids)
        while silent:
            self._check_daemons(daemons)
            if deadline.passed():
                break
            replies = self._ping(silent, min(deadline.remaining(), 30.0))
            silent = [minion_id for minion_id in silent if replies.get(minion_id) is not True]
            if silent:
                time.sleep(min(1.0, deadline.remaining()))
        return silent

    def _ping(self, minion_ids: Sequence[str], timeout: float) -> dict[str, object]:
        """Return the minions' ``test.ping`` replies, or {} when the salt command fails."""
        try:
            result = self.salt_raw(
                "-L", ",".join(minion_ids), "test.ping", "-t", "3", timeout=max(timeout, 20.0)
            )
        except SandboxError as exc:
            log.debug("test.ping failed: %s", exc)
            return {}
        try:
            return merge_returns(parse_json_documents(result.stdout))
        except ValueError:
            return {}

    # Stop

    def down(self) -> None:
        """Stop every process of this sandbox: daemons, wrappers, their commands, the rest.

        The daemons get SIGTERM by the PIDs in their pidfiles and SIGKILL after
        15 s. Wrappers and command process groups come from the run records in
        ``minion-*/run``. Any other process whose command line names the root,
        such as an editor open on a job file, goes last. Nothing is removed from
        the root. A folder without sandbox.json is no sandbox root, so nothing in
        it is stopped. Raises SandboxError if a process is still running at the end.
        """
        if not self.state_file.exists():
            log.info("%s not found, so no sandbox runs in %s", self.state_file, self.root)
            return
        pids: set[int] = set()
        groups: set[int] = set()
        try:
            daemons = self.layout.daemons
        except SandboxError as exc:
            log.warning("%s. Stopping the processes that name %s instead.", exc, self.root)
            daemons = []
        for daemon in daemons:
            pid = daemon.pid()
            if pid is not None:
                log.info("stopping %s (PID %d)", daemon.name, pid)
                pids.add(pid)
        for statedir in sorted(self.root.glob("minion-*/run")):
            wrapper_pids, command_groups = wrapper_processes(statedir, self.root)
            if wrapper_pids or command_groups:
                log.info(
                    "stopping wrappers %s and command process groups %s recorded in %s",
                    sorted(wrapper_pids),
                    sorted(command_groups),
                    statedir,
                )
            pids |= wrapper_pids
            groups |= command_groups
        left = terminate(pids, groups)

        others = self.running_processes()
        if others:
            log.info("stopping other processes that name %s: %s", self.root, sorted(others))
            left |= terminate(others)
        left |= set(self.running_processes())
        if left:
            raise SandboxError(
                f"processes of the sandbox in {self.root} still run after SIGKILL: "
                + ", ".join(f"PID {pid}" for pid in sorted(left))
            )

    def _stop_quietly(self) -> None:
        try:
            self.down()
        except SandboxError as exc:
            log.error("stopping the sandbox after a failed start failed: %s", exc)

    # Single daemons, for tests that restart or kill one

    def start_master(self, timeout: float = 60.0) -> None:
        """Start the master and wait until every running minion responds to test.ping again."""
        deadline = Deadline.after(timeout)
        self._start_daemon(self.layout.master, deadline)
        self._wait_for_master(deadline)
        running = [minion.name for minion in self.layout.minions if minion.pid() is not None]
        if running:
            self._reconnect_minions(running, deadline)

    def _reconnect_minions(self, minion_ids: Sequence[str], deadline: Deadline) -> None:
        """Wait until MINION_IDS respond to a master that started again.

        A minion can stay silent after its master restarts: its return of a
        ping times out, and it responds to no later ping either. This was seen
        with Salt 3008.4 and the cores busy. Minions that are still silent
        halfway to DEADLINE are restarted, which makes them authenticate again.
        """
        halfway = Deadline.after(deadline.remaining() / 2)
        silent = self._silent_minions(minion_ids, halfway)
        if not silent:
            return
        log.warning(
            "minions %s did not respond within %.0f s of the master's start; restarting them",
            ", ".join(silent),
            halfway.timeout,
        )
        for minion_id in silent:
            minion = self.layout.minion(minion_id)
            self._stop_daemon(minion, signal.SIGTERM)
            self._start_daemon(minion, deadline)
        self._wait_for_minions(minion_ids, deadline)

    def stop_master(self, sig: signal.Signals = signal.SIGTERM) -> None:
        """Stop the master with SIG and wait until none of its processes is left.

        SIGKILL goes to the master's whole process group, as if its host had
        crashed; other signals go to the main process, which stops its children.
        """
        self._stop_daemon(self.layout.master, sig)

    def restart_master(self, timeout: float = 60.0) -> None:
        """Stop the master with SIGTERM and start it again (see :meth:`start_master`)."""
        self.stop_master()
        self.start_master(timeout)

    def start_minion(self, minion_id: str, timeout: float = 60.0) -> None:
        """Start MINION_ID and wait until it responds to test.ping."""
        deadline = Deadline.after(timeout)
        self._start_daemon(self.layout.minion(minion_id), deadline)
        self._wait_for_minions([minion_id], deadline)

    def stop_minion(self, minion_id: str, sig: signal.Signals = signal.SIGTERM) -> None:
        """Stop MINION_ID with SIG, like :meth:`stop_master`. Wrappers it launched keep
        running, because they run in sessions of their own."""
        self._stop_daemon(self.layout.minion(minion_id), sig)

    def _stop_daemon(self, daemon: Daemon, sig: signal.Signals) -> None:
        pid = daemon.pid()
        if pid is not None:
            group = _process_group(pid)
            if sig == signal.SIGKILL and group is not None:
                _send(group, sig, group=True)
            else:
                _send(pid, sig)
        # A stopped process acts on the signal only once it is continued.
        for member in daemon.processes():
            _send(member, signal.SIGCONT)
        deadline = Deadline.after(STOP_GRACE)
        while daemon.processes() and not deadline.passed():
            time.sleep(0.1)
        left = daemon.processes()
        if not left:
            return
        log.warning(
            "%s processes %s still run %g s after %s; sending SIGKILL",
            daemon.name,
            left,
            STOP_GRACE,
            sig.name,
        )
        for pid in left:
            _send(pid, signal.SIGKILL)
        deadline = Deadline.after(5.0)
        while daemon.processes() and not deadline.passed():
            time.sleep(0.1)
        if daemon.processes():
            raise SandboxError(f"{daemon.name} processes {daemon.processes()} survived SIGKILL")

    # Salt commands

    def salt_raw(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """Run ``salt -c ROOT/master --out json ARGS`` and return the result."""
        # Not --static: in Salt 3008 that runs the command as a batch, pinging first.
        return self._run("salt", ["--out", "json", *args], timeout)

    def salt(self, *args: str, timeout: float = 60) -> dict[str, object]:
        """Run ``salt -c ROOT/master ARGS`` and return minion ID to return value.

        A minion that was expected but did not respond in time maps to Salt's
        "Minion did not return" message.
        """
        result = self.salt_raw(*args, timeout=timeout)
        try:
            return merge_returns(parse_json_documents(result.stdout))
        except ValueError as exc:
            raise self._output_error(result, exc) from None

    def salt_run_raw(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """Run ``salt-run -c ROOT/master --out json ARGS`` and return the result."""
        return self._run("salt-run", ["--out", "json", *args], timeout)

    def salt_run(self, *args: str, timeout: float = 60) -> object:
        """Run ``salt-run -c ROOT/master ARGS`` and return the runner's return value."""
        result = self.salt_run_raw(*args, timeout=timeout)
        try:
            return parse_json_documents(result.stdout)[-1]
        except ValueError as exc:
            raise self._output_error(result, exc) from None

    def _run(
        self, program: str, args: Sequence[str], timeout: float
    ) -> subprocess.CompletedProcess[str]:
        layout = self.layout
        command = [str(salt_script(program, layout.bin_dir)), "-c", str(self.master_dir), *args]
        try:
            return subprocess.run(
                command,
                capture_output=True,
                text=True,
                timeout=timeout,
                check=False,
                env={**os.environ, **layout.master_env},
            )
        except subprocess.TimeoutExpired as exc:
            raise SandboxError(f"{' '.join(command)} timed out after {timeout:g} s") from exc

    @staticmethod
    def _output_error(result: subprocess.CompletedProcess[str], exc: ValueError) -> SandboxError:
        return SandboxError(
            f"{' '.join(result.args)} exited with status {result.returncode} and printed "
            f"no valid JSON ({exc}); stdout:\n{result.stdout.strip()}\nstderr:\n"
            f"{tail_text(result.stderr)}"
        )

    # Event bus

    def master_opts(self) -> dict[str, Any]:
        """Return the master's opts as the daemon computes them from its config file."""
        import salt.config

        return salt.config.master_config(str(self.master_config_file))

    @contextlib.contextmanager
    def event_listener(self, tag_prefix: str = EVENT_TAG_PREFIX) -> Iterator[EventListener]:
        """Connect to the master's event bus and yield a listener for TAG_PREFIX.

        Events fired after this returns reach the listener.
        """
        import salt.utils.event

        opts = self.master_opts()
        with salt.utils.event.get_master_event(opts, opts["sock_dir"], listen=True) as bus:
            if not bus.cpub:
                raise SandboxError(
                    f"could not connect to the master's event bus in {opts['sock_dir']}. "
                    f"Check that the master runs: saltpeter-sandbox status --root {self.root}"
                )
            yield EventListener(bus, tag_prefix)

    def fire_event(self, tag: str, data: Mapping[str, object]) -> None:
        """Fire one event on the master's event bus, as the engine would."""
        import salt.utils.event

        opts = self.master_opts()
        with salt.utils.event.get_master_event(opts, opts["sock_dir"], listen=False) as bus:
            if not bus.fire_event(dict(data), tag):
                raise SandboxError(f"firing event {tag} on the master's event bus failed")


class EventListener:
    """Events from a master's event bus whose tags start with one prefix."""

    def __init__(self, bus: Any, tag_prefix: str) -> None:
        self._bus = bus
        self.tag_prefix = tag_prefix

    def get(self, timeout: float) -> tuple[str, dict[str, Any]] | None:
        """Return the next event as (tag, data), or None after TIMEOUT seconds."""
        # Salt's get_event treats wait=0 as "block forever".
        event = self._bus.get_event(
            wait=max(timeout, 0.01), tag=self.tag_prefix, match_type="startswith", full=True
        )
        if event is None:
            return None
        # Salt 3008 turns a KeyboardInterrupt during the wait into this made-up event.
        if event["tag"] == SALT_INTERRUPT_TAG:
            raise KeyboardInterrupt
        return event["tag"], event["data"]


def _write_yaml(path: Path, data: Mapping[str, object]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(dict(data), default_flow_style=False, sort_keys=False))


# Event lines for `watch`


def _event_time(data: Mapping[str, Any]) -> str:
    """Return HH:MM:SS in UTC from the event's ``_stamp``, or the current time without one."""
    stamp = _parse_time(data.get("_stamp"))
    instant = dt.datetime.fromtimestamp(
        stamp if stamp is not None else time.time(), dt.timezone.utc
    )
    return instant.strftime("%H:%M:%S")


def _last_line(text: object) -> str:
    if not isinstance(text, str):
        return ""
    lines = [line.strip() for line in text.replace("\r", "\n").splitlines() if line.strip()]
    return lines[-1] if lines else ""


def format_event(tag: str, data: Mapping[str, Any]) -> str:
    """Return one line describing a Saltpeter event (tags and payloads as in docs/events.md).

    Fields are separated by two spaces and the time is UTC, for example
    ``20:31:05 backup  backup_1764880265  minion-2  exit 0  done``.
    """
    parts = tag.split("/")
    job = str(data.get("job", parts[2] if len(parts) > 2 else "?"))
    run_id = str(data.get("run_id") or "-")
    kind = parts[-1]
    fields: list[str]
    if len(parts) == 5 and kind == "start":
        minion = str(data.get("minion", parts[3]))
        fields = [run_id, minion, "start", f"pid {data.get('pid', '?')}"]
    elif len(parts) == 5 and kind == "complete":
        minion = str(data.get("minion", parts[3]))
        outcome = f"{data.get('reason', '?')} {data.get('retcode', '?')}"
        fields = [run_id, minion, outcome, _last_line(data.get("output_tail"))]
    elif len(parts) == 4 and kind == "start":
        targets = ",".join(data.get("targets") or []) or "none"
        fields = [run_id, "start", str(data.get("trigger", "?")), f"targets {targets}"]
        maintenance = data.get("maintenance") or []
        if maintenance:
            fields.append(f"maintenance {','.join(maintenance)}")
    elif len(parts) == 4 and kind == "complete":
        retcodes = data.get("retcodes") or {}
        outcome = "success" if data.get("success") else "failure"
        codes = " ".join(f"{minion}={code}" for minion, code in sorted(retcodes.items()))
        fields = [run_id, "complete", outcome, codes]
    elif len(parts) == 4 and kind == "skipped":
        fields = [run_id, "skipped", str(data.get("reason", "?"))]
        running = data.get("running") or []
        if running:
            fields.append(f"running {','.join(running)}")
    else:
        payload = {key: value for key, value in data.items() if not key.startswith("_")}
        return f"{_event_time(data)} {tag}  {json.dumps(payload, sort_keys=True, default=str)}"
    return f"{_event_time(data)} " + "  ".join([job, *(field for field in fields if field)])


def watch(sandbox: Sandbox, out: TextIO, stop: threading.Event | None = None) -> None:
    """Print one line per Saltpeter event to OUT until the master stops or STOP is set.

    Raises SandboxError when the master is not running or stops.
    """
    stop = stop or threading.Event()
    master = sandbox.layout.master
    if master.pid() is None:
        raise SandboxError(f"the master of the sandbox in {sandbox.root} is not running")
    with sandbox.event_listener() as listener:
        print(
            f"watching Saltpeter events of the sandbox in {sandbox.root} (times in UTC; "
            "Ctrl-C stops)",
            file=sys.stderr,
            flush=True,
        )
        while not stop.is_set():
            event = listener.get(timeout=1.0)
            if event is not None:
                print(format_event(*event), file=out, flush=True)
            elif master.pid() is None:
                raise SandboxError(f"the master of the sandbox in {sandbox.root} stopped")


def _watch_until_interrupted(sandbox: Sandbox) -> None:
    """Run watch() until Ctrl-C, then close the event bus before exiting.

    Ctrl-C only sets a flag, and the loop ends after the current wait for an
    event (at most a second), so the event client is closed the normal way.
    When Ctrl-C raised KeyboardInterrupt inside Salt's event client instead,
    the process sometimes did not exit within 30 s in the test suite.
    """
    stop = threading.Event()
    previous = signal.signal(signal.SIGINT, lambda signum, frame: stop.set())
    try:
        watch(sandbox, sys.stdout, stop)
    finally:
        signal.signal(signal.SIGINT, previous)


# Command line


def _print_status(sandbox: Sandbox) -> bool:
    """Print the daemons' state and ports, and return whether every daemon runs."""
    layout = sandbox.layout
    all_running = True
    for daemon in layout.daemons:
        pid = daemon.pid()
        all_running = all_running and pid is not None
        state = f"running  PID {pid}" if pid is not None else "stopped"
        ports = ""
        if daemon.name == "master":
            ports = f"  publish_port {layout.ports.publish}  ret_port {layout.ports.ret}"
        print(f"{daemon.name:<10} {state}{ports}")
    for label, port in (
        ("machines WebSocket", layout.ports.machines_ws),
        ("API", layout.ports.api_ws),
    ):
        listening = "listening" if port_accepts(port) else "not listening"
        print(f"saltpeter {label} {LOCALHOST}:{port}  {listening}")
    print(f"saltpeter store {layout.store_path}")
    print(f"jobs directory  {layout.jobs_dir}")
    return all_running


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="saltpeter-sandbox",
        description="Run a throwaway Salt master with the Saltpeter engine and minions on "
        "127.0.0.1, every file under one root folder.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    up = commands.add_parser("up", help="write configs, start the daemons, wait for test.ping")
    down = commands.add_parser(
        "down",
        help="stop the daemons, the wrappers and every process whose command line names ROOT",
    )
    status = commands.add_parser("status", help="print which daemons run, with PIDs and ports")
    watch_parser = commands.add_parser("watch", help="print Saltpeter events until Ctrl-C")
    for sub in (up, down, status, watch_parser):
        sub.add_argument("--root", type=Path, required=True, help="the sandbox's root folder")
    up.add_argument("--minions", type=int, required=True, help="number of minions to start")
    up.add_argument(
        "--jobs",
        type=Path,
        default=None,
        help="Saltpeter job directory (default: ROOT/jobs, created empty)",
    )
    up.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_UP_TIMEOUT,
        help="seconds to wait for the daemons to start and every minion to respond to test.ping "
        "(default: %(default)g)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``saltpeter-sandbox`` command line and return the exit status."""
    args = _build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="saltpeter-sandbox: %(message)s")
    sandbox = Sandbox(args.root)
    try:
        if args.command == "up":
            sandbox.up(args.minions, jobs_dir=args.jobs, timeout=args.timeout)
            _print_status(sandbox)
            print(f"try: {salt_script('salt')} -c {sandbox.master_dir} '*' test.ping")
            print(f"dashboard: http://{LOCALHOST}:{sandbox.api_port}/")
        elif args.command == "down":
            sandbox.down()
            print(f"no process of the sandbox in {sandbox.root} is running")
        elif args.command == "status":
            return 0 if _print_status(sandbox) else 1
        else:
            _watch_until_interrupted(sandbox)
    except SandboxError as exc:
        print(f"saltpeter-sandbox {args.command}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
