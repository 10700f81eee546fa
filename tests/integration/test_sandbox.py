"""Integration tests of the sandbox: the command line, two sandboxes side by side,
the Python API, ``watch`` and ``down``.

TestDownCommand stops the command-line sandbox that earlier classes use, so it
stays last in this file (pytest runs tests in file order).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

import pytest
import yaml

from saltpeter.sandbox import Sandbox, format_event

BIN_DIR = Path(sys.executable).parent
SANDBOX_COMMAND = BIN_DIR / "saltpeter-sandbox"
SALT_COMMAND = BIN_DIR / "salt"
# Generous bounds that only keep a broken sandbox from hanging the suite.
COMMAND_TIMEOUT = 240.0
WATCH_TIMEOUT = 30.0


def run_sandbox(*args: str, timeout: float = COMMAND_TIMEOUT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(SANDBOX_COMMAND), *args], capture_output=True, text=True, timeout=timeout, check=False
    )


def run_salt(root: Path, *args: str) -> object:
    """Run ``salt -c ROOT/master ARGS --out json --static`` and return the parsed output."""
    result = subprocess.run(
        [str(SALT_COMMAND), "-c", str(root / "master"), *args, "--out", "json", "--static"],
        capture_output=True,
        text=True,
        timeout=COMMAND_TIMEOUT,
        check=False,
    )
    return json.loads(result.stdout)


def processes_naming(root: Path) -> dict[int, str]:
    """Scan /proc for live processes, other than this one, whose command line names ROOT."""
    pattern = re.compile(re.escape(str(root)) + r"(?:$|[\s/])")
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if pattern.search(cmdline.strip()):
            found[int(entry.name)] = cmdline
    return found


def listening_addresses(port: int) -> set[str]:
    """Return the IPv4 and IPv6 addresses with a socket listening on PORT, from /proc/net."""
    addresses = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            address_hex, port_hex = fields[1].split(":")
            # State 0A is TCP_LISTEN.
            if fields[3] != "0A" or int(port_hex, 16) != port:
                continue
            if len(address_hex) == 8:
                addresses.add(".".join(str(byte) for byte in bytes.fromhex(address_hex)[::-1]))
            else:
                addresses.add(address_hex)
    return addresses


@pytest.fixture(scope="module")
def cli_root(short_tmp_dir: Callable[[str], Path]) -> Iterator[Path]:
    """The root of a sandbox driven through the command line, stopped after the module."""
    root = short_tmp_dir("cli")
    yield root
    run_sandbox("down", "--root", str(root))


@pytest.fixture(scope="module")
def cli_up(cli_root: Path) -> subprocess.CompletedProcess[str]:
    return run_sandbox("up", "--root", str(cli_root), "--minions", "2", "--timeout", "180")


@pytest.fixture(scope="module")
def cli_state(cli_up: subprocess.CompletedProcess[str], cli_root: Path) -> dict[str, Any]:
    assert cli_up.returncode == 0, cli_up.stderr
    return json.loads((cli_root / "sandbox.json").read_text())


@pytest.fixture(scope="module")
def cli_master_config(cli_state: dict[str, Any]) -> dict[str, Any]:
    return yaml.safe_load(Path(cli_state["master"]["config_file"]).read_text())


def state_ports(state: dict[str, Any]) -> set[int]:
    return {
        state["master"]["publish_port"],
        state["master"]["ret_port"],
        state["saltpeter"]["machines_ws_port"],
        state["saltpeter"]["api_ws_port"],
    }


class TestUpCommand:
    def test_up_exits_zero(self, cli_up: subprocess.CompletedProcess[str]) -> None:
        assert cli_up.returncode == 0, cli_up.stderr

    def test_ping_reaches_every_minion(self, cli_state: dict[str, Any], cli_root: Path) -> None:
        assert run_salt(cli_root, "*", "test.ping") == {"minion-1": True, "minion-2": True}

    def test_state_file_lists_minions(self, cli_state: dict[str, Any]) -> None:
        assert [minion["id"] for minion in cli_state["minions"]] == ["minion-1", "minion-2"]

    def test_state_file_ports_are_distinct(self, cli_state: dict[str, Any]) -> None:
        assert len(state_ports(cli_state)) == 4

    def test_store_path_is_in_master_cachedir(self, cli_state: dict[str, Any]) -> None:
        expected = Path(cli_state["master"]["cachedir"]) / "saltpeter" / "saltpeter.db"
        assert Path(cli_state["saltpeter"]["store_path"]) == expected

    def test_default_jobs_dir_is_created_empty(
        self, cli_state: dict[str, Any], cli_root: Path
    ) -> None:
        assert list((cli_root / "jobs").iterdir()) == []

    def test_master_config_names_only_saltpeter_engine(
        self, cli_master_config: dict[str, Any]
    ) -> None:
        assert [next(iter(engine)) for engine in cli_master_config["engines"]] == ["saltpeter"]

    def test_engine_reads_default_jobs_dir(
        self, cli_master_config: dict[str, Any], cli_root: Path
    ) -> None:
        engine = cli_master_config["engines"][0]["saltpeter"]
        assert engine["config_dir"] == str(cli_root / "jobs")

    @pytest.mark.parametrize(
        ("setting", "expected"),
        [
            ("machines_ws_bind_addr", "127.0.0.1"),
            ("api_ws_bind_addr", "127.0.0.1"),
            ("default_saltpeter_server_host", "127.0.0.1"),
            ("logdir", "{root}/logs"),
            ("default_wrapper_logdir", "{root}/wrapper-logs"),
            ("startup_wait", 30),
        ],
    )
    def test_engine_setting(
        self, cli_master_config: dict[str, Any], cli_root: Path, setting: str, expected: object
    ) -> None:
        if isinstance(expected, str):
            expected = expected.format(root=cli_root)
        assert cli_master_config["engines"][0]["saltpeter"]["settings"][setting] == expected

    def test_engine_ports_match_state_file(
        self, cli_master_config: dict[str, Any], cli_state: dict[str, Any]
    ) -> None:
        settings = cli_master_config["engines"][0]["saltpeter"]["settings"]
        ports = (settings["machines_ws_port"], settings["api_ws_port"])
        expected = (
            cli_state["saltpeter"]["machines_ws_port"],
            cli_state["saltpeter"]["api_ws_port"],
        )
        assert ports == expected

    def test_wrapper_path_is_absolute(self, cli_master_config: dict[str, Any]) -> None:
        wrapper = cli_master_config["engines"][0]["saltpeter"]["settings"]["default_wrapper_path"]
        assert Path(wrapper).is_absolute()

    def test_minion_config_sets_statedir(self, cli_state: dict[str, Any], cli_root: Path) -> None:
        config = yaml.safe_load((cli_root / "minion-2" / "minion").read_text())
        assert config["saltpeter_statedir"] == str(cli_root / "minion-2" / "run")

    def test_runner_found_without_sync_all(self, cli_state: dict[str, Any], cli_root: Path) -> None:
        runners = Sandbox(cli_root).salt_run("doc.runner")
        assert "saltpeter.status" in dict(runners)

    def test_nothing_synced_into_extension_modules(
        self, cli_state: dict[str, Any], cli_root: Path
    ) -> None:
        assert not (cli_root / "master" / "extmods" / "runners").exists()


class TestStatusCommand:
    @pytest.fixture(scope="class")
    def status(self, cli_state: dict[str, Any], cli_root: Path) -> subprocess.CompletedProcess[str]:
        return run_sandbox("status", "--root", str(cli_root))

    def test_status_exits_zero(self, status: subprocess.CompletedProcess[str]) -> None:
        assert status.returncode == 0, status.stdout + status.stderr

    @pytest.mark.parametrize("daemon", ["master", "minion-1", "minion-2"])
    def test_status_shows_daemon_running(
        self, status: subprocess.CompletedProcess[str], daemon: str
    ) -> None:
        assert re.search(rf"^{daemon}\s+running\s+PID \d+", status.stdout, re.MULTILINE)

    def test_status_shows_master_ports(
        self, status: subprocess.CompletedProcess[str], cli_state: dict[str, Any]
    ) -> None:
        master = cli_state["master"]
        expected = f"publish_port {master['publish_port']}  ret_port {master['ret_port']}"
        assert expected in status.stdout


class TestUpOnRunningRoot:
    @pytest.fixture(scope="class")
    def second_up(
        self, cli_state: dict[str, Any], cli_root: Path
    ) -> subprocess.CompletedProcess[str]:
        return run_sandbox("up", "--root", str(cli_root), "--minions", "2")

    def test_second_up_fails(self, second_up: subprocess.CompletedProcess[str]) -> None:
        assert second_up.returncode == 1

    def test_second_up_says_already_running(
        self, second_up: subprocess.CompletedProcess[str]
    ) -> None:
        assert "already running" in second_up.stderr

    def test_second_up_keeps_first_sandbox(
        self, second_up: subprocess.CompletedProcess[str], cli_root: Path
    ) -> None:
        assert run_salt(cli_root, "*", "test.ping") == {"minion-1": True, "minion-2": True}


class TestUpTimeout:
    @pytest.fixture(scope="class")
    def timed_out(
        self, short_tmp_dir: Callable[[str], Path]
    ) -> Iterator[tuple[Path, subprocess.CompletedProcess[str]]]:
        root = short_tmp_dir("slow")
        # Minions take several seconds to start (about 6 s on a 2-core VM), so an up
        # cannot finish within 1 s.
        result = run_sandbox("up", "--root", str(root), "--minions", "1", "--timeout", "1")
        yield root, result
        run_sandbox("down", "--root", str(root))

    def test_timed_out_up_fails(
        self, timed_out: tuple[Path, subprocess.CompletedProcess[str]]
    ) -> None:
        assert timed_out[1].returncode == 1

    def test_timed_out_up_names_timeout(
        self, timed_out: tuple[Path, subprocess.CompletedProcess[str]]
    ) -> None:
        assert "within 1 s" in timed_out[1].stderr

    def test_timed_out_up_shows_log_tail(
        self, timed_out: tuple[Path, subprocess.CompletedProcess[str]]
    ) -> None:
        assert "Last lines of" in timed_out[1].stderr

    def test_timed_out_up_leaves_no_process(
        self, timed_out: tuple[Path, subprocess.CompletedProcess[str]]
    ) -> None:
        assert processes_naming(timed_out[0]) == {}


class TestSideBySide:
    def test_ports_do_not_overlap(self, sandbox: Sandbox, cli_state: dict[str, Any]) -> None:
        state = json.loads(sandbox.state_file.read_text())
        assert state_ports(state) & state_ports(cli_state) == set()

    def test_module_master_reaches_its_three_minions(
        self, sandbox: Sandbox, cli_state: dict[str, Any]
    ) -> None:
        replies = sandbox.salt("*", "test.ping")
        assert replies == {"minion-1": True, "minion-2": True, "minion-3": True}

    def test_cli_master_reaches_its_two_minions(
        self, sandbox: Sandbox, cli_state: dict[str, Any], cli_root: Path
    ) -> None:
        assert run_salt(cli_root, "*", "test.ping") == {"minion-1": True, "minion-2": True}

    def test_module_minion_uses_module_root(
        self, sandbox: Sandbox, cli_state: dict[str, Any]
    ) -> None:
        reply = sandbox.salt("minion-1", "config.get", "saltpeter_statedir")
        assert reply == {"minion-1": str(sandbox.root / "minion-1" / "run")}

    def test_cli_minion_uses_cli_root(
        self, sandbox: Sandbox, cli_state: dict[str, Any], cli_root: Path
    ) -> None:
        reply = run_salt(cli_root, "minion-1", "config.get", "saltpeter_statedir")
        assert reply == {"minion-1": str(cli_root / "minion-1" / "run")}


class TestPythonApi:
    def test_minion_ids(self, sandbox: Sandbox) -> None:
        assert sandbox.minion_ids == ["minion-1", "minion-2", "minion-3"]

    def test_master_opts_use_root_sock_dir(self, sandbox: Sandbox) -> None:
        assert sandbox.master_opts()["sock_dir"] == str(sandbox.root / "master" / "sock")

    def test_store_path_is_in_master_cachedir(self, sandbox: Sandbox) -> None:
        cachedir = Path(sandbox.master_opts()["cachedir"])
        assert sandbox.store_path == cachedir / "saltpeter" / "saltpeter.db"

    @pytest.mark.parametrize("port_name", ["publish_port", "ret_port"])
    def test_master_port_listens_on_loopback_only(self, sandbox: Sandbox, port_name: str) -> None:
        port = sandbox.master_opts()[port_name]
        assert listening_addresses(port) == {"127.0.0.1"}

    def test_engine_ports_listen_on_loopback_only(self, sandbox: Sandbox) -> None:
        # The engine may not listen yet, but whatever listens must be on loopback.
        for port in (sandbox.machines_port, sandbox.api_port):
            assert listening_addresses(port) <= {"127.0.0.1"}

    def test_fired_event_reaches_events_fixture(self, sandbox: Sandbox, events: Any) -> None:
        sandbox.fire_event(
            "saltpeter/job/api-check/skipped", {"job": "api-check", "reason": "overlap"}
        )
        assert events.wait(r"saltpeter/job/api-check/skipped")["reason"] == "overlap"

    def test_stopped_minion_leaves_no_process(self, sandbox: Sandbox) -> None:
        sandbox.stop_minion("minion-3")
        try:
            assert processes_naming(sandbox.root / "minion-3") == {}
        finally:
            sandbox.start_minion("minion-3")

    def test_killed_minion_restarts(self, sandbox: Sandbox) -> None:
        sandbox.stop_minion("minion-2", signal.SIGKILL)
        sandbox.start_minion("minion-2")
        assert sandbox.salt("minion-2", "test.ping") == {"minion-2": True}

    def test_restarted_master_reaches_every_minion(self, sandbox: Sandbox) -> None:
        sandbox.restart_master()
        replies = sandbox.salt("*", "test.ping")
        assert replies == {"minion-1": True, "minion-2": True, "minion-3": True}

    def test_master_restart_revives_silent_minion(self, sandbox: Sandbox) -> None:
        minion = sandbox.layout.minion("minion-3")
        before = minion.pid()
        # Stopped processes stand in for a minion that no longer responds to its master.
        for pid in minion.processes():
            os.kill(pid, signal.SIGSTOP)
        sandbox.restart_master(timeout=60)
        assert minion.pid() != before
        replies = sandbox.salt("*", "test.ping")
        assert replies == {"minion-1": True, "minion-2": True, "minion-3": True}


def read_lines(stream: IO[str], lines: queue.Queue[str]) -> None:
    for line in stream:
        lines.put(line.rstrip("\n"))


class TestWatchCommand:
    RUN_COMPLETE = {
        "job": "x",
        "run_id": "x_1764880265",
        "retcodes": {"minion-1": 0, "minion-2": 0},
        "success": True,
        "started": "2025-12-04T20:31:05+00:00",
        "ended": "2025-12-04T20:31:07+00:00",
    }

    @pytest.fixture(scope="class")
    def watched(self, sandbox: Sandbox) -> Iterator[tuple[str, int]]:
        """Run ``watch``, fire a run's complete event until it prints a line, then Ctrl-C it.

        Yields the first line printed and the exit status.
        """
        process = subprocess.Popen(
            [str(SANDBOX_COMMAND), "watch", "--root", str(sandbox.root)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        stdout: queue.Queue[str] = queue.Queue()
        stderr: queue.Queue[str] = queue.Queue()
        assert process.stdout is not None and process.stderr is not None
        for stream, lines in ((process.stdout, stdout), (process.stderr, stderr)):
            threading.Thread(target=read_lines, args=(stream, lines), daemon=True).start()
        try:
            banner = stderr.get(timeout=WATCH_TIMEOUT)
            assert banner.startswith("watching"), banner
            # The banner follows the subscription, but resending until a line
            # appears keeps the test independent of when the bus delivers.
            deadline = time.monotonic() + WATCH_TIMEOUT
            line = None
            while line is None and time.monotonic() < deadline:
                sandbox.fire_event("saltpeter/job/x/complete", self.RUN_COMPLETE)
                try:
                    line = stdout.get(timeout=1.0)
                except queue.Empty:
                    continue
            assert line is not None, "watch printed nothing for a fired event"
            process.send_signal(signal.SIGINT)
            yield line, process.wait(timeout=WATCH_TIMEOUT)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()

    def test_watch_prints_run_complete_line(self, watched: tuple[str, int]) -> None:
        pattern = r"\d\d:\d\d:\d\d x  x_1764880265  complete  success  minion-1=0 minion-2=0"
        assert re.fullmatch(pattern, watched[0]), watched[0]

    def test_watch_exits_zero_on_interrupt(self, watched: tuple[str, int]) -> None:
        assert watched[1] == 0


STAMP = "2026-12-04T20:31:05.123456+00:00"


class TestFormatEvent:
    @pytest.mark.parametrize(
        ("tag", "data", "expected"),
        [
            (
                "saltpeter/job/hello_world/minion-2/complete",
                {
                    "job": "hello_world",
                    "run_id": "hello_world_1764880265",
                    "minion": "minion-2",
                    "retcode": 0,
                    "reason": "exit",
                    "output_tail": "starting\nHello from minion-2\n",
                },
                "20:31:05 hello_world  hello_world_1764880265  minion-2  exit 0  "
                "Hello from minion-2",
            ),
            (
                "saltpeter/job/backup/minion-1/complete",
                {
                    "job": "backup",
                    "run_id": "backup_1",
                    "minion": "minion-1",
                    "retcode": 124,
                    "reason": "timeout",
                    "output_tail": "",
                },
                "20:31:05 backup  backup_1  minion-1  timeout 124",
            ),
            (
                "saltpeter/job/backup/minion-1/start",
                {"job": "backup", "run_id": "backup_1", "minion": "minion-1", "pid": 4242},
                "20:31:05 backup  backup_1  minion-1  start  pid 4242",
            ),
            (
                "saltpeter/job/backup/start",
                {
                    "job": "backup",
                    "run_id": "backup_1",
                    "trigger": "schedule",
                    "targets": ["minion-1", "minion-2"],
                    "maintenance": ["minion-3"],
                },
                "20:31:05 backup  backup_1  start  schedule  targets minion-1,minion-2  "
                "maintenance minion-3",
            ),
            (
                "saltpeter/job/backup/complete",
                {
                    "job": "backup",
                    "run_id": "backup_1",
                    "retcodes": {"minion-2": 1, "minion-1": 0},
                    "success": False,
                },
                "20:31:05 backup  backup_1  complete  failure  minion-1=0 minion-2=1",
            ),
            (
                "saltpeter/job/backup/skipped",
                {"job": "backup", "reason": "overlap", "running": ["backup_1"]},
                "20:31:05 backup  -  skipped  overlap  running backup_1",
            ),
            (
                "saltpeter/job/backup/paused",
                {"job": "backup"},
                '20:31:05 saltpeter/job/backup/paused  {"job": "backup"}',
            ),
        ],
        ids=[
            "minion-complete",
            "minion-timeout",
            "minion-start",
            "run-start",
            "run-complete",
            "skipped",
            "unknown-tag",
        ],
    )
    def test_format_event(self, tag: str, data: dict[str, Any], expected: str) -> None:
        assert format_event(tag, {**data, "_stamp": STAMP}) == expected

    def test_missing_stamp_uses_current_time(self) -> None:
        before = dt.datetime.now(dt.timezone.utc).replace(microsecond=0)
        line = format_event("saltpeter/job/a/skipped", {"job": "a", "reason": "no_targets"})
        after = dt.datetime.now(dt.timezone.utc)
        printed = dt.datetime.combine(
            before.date(), dt.time.fromisoformat(line.split()[0]), dt.timezone.utc
        )
        assert before <= printed <= after


class TestDownCommand:
    @pytest.fixture(scope="class")
    def stopped(self, cli_state: dict[str, Any], cli_root: Path) -> Iterator[dict[str, Any]]:
        """Record a fake run on minion-1 (a stand-in wrapper and a command in its own
        process group, as the wrapper leaves them), then run ``down`` twice."""
        statedir = cli_root / "minion-1" / "run"
        wrapper = subprocess.Popen(
            [sys.executable, "-c", "import time; time.sleep(600)", "--statedir", str(statedir)],
            start_new_session=True,
        )
        command = subprocess.Popen(["sleep", "600"], start_new_session=True)
        record = {
            "run": "fake_1",
            "job": "fake",
            "machine": "minion-1",
            "wrapper_pid": wrapper.pid,
            "pid": command.pid,
            "pgid": command.pid,
            "started": dt.datetime.now(dt.timezone.utc).isoformat(),
        }
        (statedir / "fake_1.json").write_text(json.dumps(record))
        try:
            first = run_sandbox("down", "--root", str(cli_root))
            left = processes_naming(cli_root)
            second = run_sandbox("down", "--root", str(cli_root))
            yield {
                "first": first,
                "second": second,
                "left": left,
                "wrapper_status": wrapper.wait(timeout=10),
                "command_status": command.wait(timeout=10),
            }
        finally:
            for process in (wrapper, command):
                if process.poll() is None:
                    process.kill()
                    process.wait()

    def test_down_exits_zero(self, stopped: dict[str, Any]) -> None:
        assert stopped["first"].returncode == 0, stopped["first"].stderr

    def test_down_leaves_no_process_of_root(self, stopped: dict[str, Any]) -> None:
        assert stopped["left"] == {}

    def test_down_stops_recorded_wrapper(self, stopped: dict[str, Any]) -> None:
        assert stopped["wrapper_status"] == -signal.SIGTERM

    def test_down_stops_recorded_command_group(self, stopped: dict[str, Any]) -> None:
        assert stopped["command_status"] == -signal.SIGTERM

    def test_down_keeps_root_files(self, stopped: dict[str, Any], cli_root: Path) -> None:
        assert (cli_root / "master" / "master.log").is_file()

    def test_second_down_exits_zero(self, stopped: dict[str, Any]) -> None:
        assert stopped["second"].returncode == 0, stopped["second"].stderr
