"""The wrapper as a real process, started by minion.launch, against a scripted peer.

The peer in wrapper_peer.py is not the engine. It is a Tornado WebSocket
server on 127.0.0.1 that each test starts. It follows the engine's rules by
default. Switches make it inject faults that the real engine never would, such
as dropping the connection mid-output, losing frames, withholding acks, acking
twice, and sending kill and error frames at chosen moments. The commands are real shell commands,
and the checks read real processes through /proc. The tests run as root,
because they switch users and read every process's environment.
"""

from __future__ import annotations

import json
import os
import pwd
import secrets
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from wrapper_peer import (
    MACHINE_ID,
    ScriptedPeer,
    WrapperProcess,
    job_processes,
    process_group,
    read_proc,
)

from saltpeter import wrapper

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="switches users and reads /proc as root")

TERM_IGNORING_COMMAND = "trap '' TERM; sh -c 'trap \"\" TERM; sleep 30' & echo child $!; sleep 30"


def job(command: str, **fields: Any) -> dict[str, Any]:
    return {
        "name": "testjob",
        "command": command,
        "user": None,
        "cwd": "/tmp",
        "env": {},
        "timeout": 0,
        "kill_grace": 1,
        **fields,
    }


@pytest.fixture
def peer() -> Iterator[ScriptedPeer]:
    scripted = ScriptedPeer(token=secrets.token_hex(16))
    scripted.start()
    yield scripted
    scripted.stop()


@pytest.fixture
def run(peer: ScriptedPeer, tmp_path: Path) -> Iterator[WrapperProcess]:
    process = WrapperProcess(peer, tmp_path)
    yield process
    process.cleanup()


def run_to_completion(peer: ScriptedPeer, run: WrapperProcess, command: str, **fields: Any) -> str:
    """Run ``command`` through the wrapper, check that it completed, and return its output."""
    peer.job = job(command, **fields)
    run.start()
    peer.wait_complete()
    assert run.wait_exit() == 0
    return peer.output()


def sequenced_on(peer: ScriptedPeer, connection: int) -> list[int]:
    """Return the seqs that arrived on one connection, in arrival order."""
    return [
        frame["seq"] for number, frame in peer.received if number == connection and "seq" in frame
    ]


def assert_group_gone(pgid: int, run_id: str) -> None:
    assert process_group(pgid) == []
    assert job_processes(run_id) == []
    with pytest.raises(ProcessLookupError):
        os.killpg(pgid, 0)


class TestOutput:
    def test_stdout_and_stderr_keep_order(self, peer: ScriptedPeer, run: WrapperProcess) -> None:
        command = "echo out1; echo err1 >&2; echo out2; echo err2 >&2"
        assert run_to_completion(peer, run, command) == "out1\nerr1\nout2\nerr2\n"

    def test_large_output_arrives_whole(self, peer: ScriptedPeer, run: WrapperProcess) -> None:
        output = run_to_completion(peer, run, "seq 1 100000")
        assert output == "".join(f"{i}\n" for i in range(1, 100001))
        frames = peer.stored_of("output")
        assert len(frames) > 1
        assert max(len(frame["data"]) for frame in frames) <= wrapper.FLUSH_CHARS

    def test_utf8_character_split_across_writes(
        self, peer: ScriptedPeer, run: WrapperProcess
    ) -> None:
        # The euro sign is E2 82 AC; the pause makes the wrapper read E2 82 alone.
        command = r"printf '\342\202'; sleep 0.3; printf '\254\n'"
        assert run_to_completion(peer, run, command) == "€\n"

    def test_invalid_bytes_become_replacement(
        self, peer: ScriptedPeer, run: WrapperProcess
    ) -> None:
        assert run_to_completion(peer, run, r"printf 'a\377b\n'") == "a\ufffdb\n"

    def test_sequenced_frames_start_with_start(
        self, peer: ScriptedPeer, run: WrapperProcess
    ) -> None:
        run_to_completion(peer, run, "echo one; sleep 0.2; echo two")
        seqs = [frame["seq"] for frame in peer.stored]
        assert peer.stored[0]["type"] == "start"
        assert isinstance(peer.stored[0]["pid"], int)
        assert seqs == list(range(1, len(seqs) + 1))
        assert peer.stored[-1]["type"] == "complete"

    def test_stdin_is_dev_null(self, peer: ScriptedPeer, run: WrapperProcess) -> None:
        assert run_to_completion(peer, run, "readlink /proc/self/fd/0") == "/dev/null\n"

    def test_command_inherits_only_stdio(self, peer: ScriptedPeer, run: WrapperProcess) -> None:
        # The inner shell lists its own descriptors: no script pipe, no socket.
        output = run_to_completion(peer, run, "sh -c 'ls /proc/$$/fd'")
        assert output == "0\n1\n2\n"


OUTPUT_LIMIT = 64 * 1024
HEAD_BYTES = OUTPUT_LIMIT // 2
TAIL_BYTES = OUTPUT_LIMIT - HEAD_BYTES


def skip_positions(frames: list[dict[str, Any]], expected: str) -> list[int]:
    """Check that ``frames`` carry ``expected`` in order, apart from the bytes they
    report as skipped, and return the offset of each skip. ``expected`` is ASCII."""
    position = 0
    skips = []
    for frame in frames:
        if frame.get("skipped"):
            skips.append(position)
            position += frame["skipped"]
        data = frame["data"]
        assert expected[position : position + len(data)] == data
        position += len(data)
    assert position == len(expected)
    return skips


class TestOutputLimit:
    def test_flood_keeps_the_exact_start_and_end(
        self, peer: ScriptedPeer, run: WrapperProcess
    ) -> None:
        peer.output_limit = OUTPUT_LIMIT
        run_to_completion(peer, run, "seq 1 2000000")
        expected = "".join(f"{i}\n" for i in range(1, 2000001))
        skips = skip_positions(peer.stored_of("output"), expected)
        assert skips, "a flood of 14 MB past a 32 KiB tail should skip output"
        assert skips[0] >= HEAD_BYTES
        # Everything after the last skip arrived, and it covers the whole tail.
        last_frame = [frame for frame in peer.stored_of("output") if frame.get("skipped")][-1]
        assert len(expected) - skips[-1] - last_frame["skipped"] >= TAIL_BYTES

    def test_output_past_the_head_streams_live(
        self, peer: ScriptedPeer, run: WrapperProcess, tmp_path: Path
    ) -> None:
        peer.output_limit = OUTPUT_LIMIT
        go_on = tmp_path / "go-on"
        # 40,000 bytes go past the head but fit the tail, so none can be skipped.
        peer.job = job(
            f"head -c 40000 /dev/zero | tr '\\0' y; "
            f"while [ ! -e {go_on} ]; do sleep 0.05; done; echo done"
        )
        run.start()
        peer.wait_for(lambda: len(peer.output()) >= 40000, "the output while the command runs")
        go_on.touch()
        peer.wait_complete()
        assert run.wait_exit() == 0
        assert peer.output() == "y" * 40000 + "done\n"
        assert not any(frame.get("skipped") for frame in peer.stored_of("output"))

    def test_silent_engine_never_blocks_nor_fills_the_spool(
        self, peer: ScriptedPeer, run: WrapperProcess, tmp_path: Path
    ) -> None:
        total = 20_000_000
        finished = tmp_path / "writer-finished"
        peer.output_limit = OUTPUT_LIMIT
        peer.withhold_acks = True
        peer.job = job(f"head -c {total} /dev/zero | tr '\\0' x; touch {finished}")
        run.start()
        peer.wait_for(finished.exists, "the command to finish without acks", timeout=60)
        spooled = sum(path.stat().st_size for path in Path(run.statedir).glob("*.spool"))
        assert spooled <= 2 * OUTPUT_LIMIT
        peer.release_acks()
        peer.wait_complete(timeout=60)
        assert run.wait_exit() == 0
        skips = skip_positions(peer.stored_of("output"), "x" * total)
        assert skips and skips[0] >= HEAD_BYTES


class TestResend:
    LINES_COMMAND = "for i in 1 2 3 4 5 6 7 8; do echo line$i; sleep 0.1; done"
    LINES = "".join(f"line{i}\n" for i in range(1, 9))

    def test_lost_frames_resent_after_reconnect(
        self, peer: ScriptedPeer, run: WrapperProcess
    ) -> None:
        peer.store_limit = 2
        peer.close_after = 5
        output = run_to_completion(peer, run, self.LINES_COMMAND)
        assert output == self.LINES
        assert peer.connection_count == 2
        resent = sequenced_on(peer, 2)
        assert resent[0] == 3
        assert resent == list(range(3, 3 + len(resent)))

    def test_stored_frames_not_resent(self, peer: ScriptedPeer, run: WrapperProcess) -> None:
        # The first connection stores everything but acks nothing, so only the
        # welcome's `acked` informs the wrapper of what arrived.
        peer.store_limit = 10_000
        peer.close_after = 3
        output = run_to_completion(peer, run, self.LINES_COMMAND)
        assert output == self.LINES
        resent = sequenced_on(peer, 2)
        assert resent[0] == 4
        assert resent == list(range(4, 4 + len(resent)))

    def test_duplicate_acks_are_harmless(self, peer: ScriptedPeer, run: WrapperProcess) -> None:
        peer.duplicate_acks = True
        assert run_to_completion(peer, run, self.LINES_COMMAND) == self.LINES
        assert peer.connection_count == 1

    def test_every_frame_sent_once_without_faults(
        self, peer: ScriptedPeer, run: WrapperProcess
    ) -> None:
        run_to_completion(peer, run, self.LINES_COMMAND)
        sent = [frame["seq"] for _, frame in peer.received if "seq" in frame]
        assert sent == list(range(1, len(sent) + 1))


class TestSpooling:
    def test_withheld_acks_never_block_the_command(
        self, peer: ScriptedPeer, run: WrapperProcess, tmp_path: Path
    ) -> None:
        total = 20_000_000
        marker = tmp_path / "writer-finished"
        peer.withhold_acks = True
        peer.job = job(f"head -c {total} /dev/zero | tr '\\0' x; touch {marker}")
        run.start()

        def received_bytes() -> int:
            return sum(len(frame["data"]) for _, frame in peer.received if "data" in frame)

        peer.wait_for(marker.exists, "the command to finish without acks", timeout=60)
        # Only the send window went out; the rest waits in the spool file.
        assert received_bytes() <= wrapper.WINDOW_OUTPUT_BYTES + wrapper.FLUSH_CHARS
        spools = list(Path(run.statedir).glob("*.spool"))
        assert len(spools) == 1
        assert spools[0].stat().st_size > total // 2

        peer.release_acks()
        peer.wait_complete(timeout=60)
        assert run.wait_exit() == 0
        output = peer.output()
        assert len(output) == total
        assert output.count("x") == total
        assert not spools[0].exists()


class TestHeartbeat:
    def test_heartbeats_follow_welcome_interval(
        self, peer: ScriptedPeer, run: WrapperProcess
    ) -> None:
        peer.heartbeat_interval = 0.2
        run_to_completion(peer, run, "sleep 1.5")
        heartbeats = peer.frames("heartbeat")
        assert len(heartbeats) >= 3
        for heartbeat in heartbeats:
            assert datetime.fromisoformat(heartbeat["time"]).utcoffset() == timedelta(0)

    def test_heartbeats_are_not_sequenced(self, peer: ScriptedPeer, run: WrapperProcess) -> None:
        peer.heartbeat_interval = 0.1
        run_to_completion(peer, run, "sleep 0.5")
        assert all("seq" not in heartbeat for heartbeat in peer.frames("heartbeat"))


class TestTimeoutAndKill:
    def test_timeout_kills_group_that_ignores_sigterm(
        self, peer: ScriptedPeer, run: WrapperProcess
    ) -> None:
        peer.job = job(TERM_IGNORING_COMMAND, timeout=1, kill_grace=1)
        run.start()
        pgid = peer.wait_start()["pid"]
        complete = peer.wait_complete()
        assert complete["reason"] == "timeout"
        assert complete["retcode"] == 124
        assert "signal" not in complete
        assert_group_gone(pgid, run.run_id)
        assert run.wait_exit() == 0

    def test_kill_frame_kills_group_that_ignores_sigterm(
        self, peer: ScriptedPeer, run: WrapperProcess
    ) -> None:
        peer.job = job(TERM_IGNORING_COMMAND, kill_grace=1)
        run.start()
        pgid = peer.wait_start()["pid"]
        peer.wait_for(lambda: "child" in peer.output(), "the background child's pid")
        child = int(peer.output().split()[1])
        peer.send({"type": "kill"})
        complete = peer.wait_complete()
        assert complete["reason"] == "killed"
        assert complete["retcode"] == 143
        assert_group_gone(pgid, run.run_id)
        assert read_proc(str(child), "stat") == b""
        assert run.wait_exit() == 0

    def test_kill_frame_stops_cooperative_command(
        self, peer: ScriptedPeer, run: WrapperProcess
    ) -> None:
        peer.job = job("sleep 30", kill_grace=30)
        run.start()
        pgid = peer.wait_start()["pid"]
        peer.send({"type": "kill"})
        # SIGTERM ends sleep at once, long before the 30 s grace.
        complete = peer.wait_complete(timeout=15)
        assert complete["retcode"] == 143
        assert_group_gone(pgid, run.run_id)

    def test_kill_after_exit_keeps_exit_status(
        self, peer: ScriptedPeer, run: WrapperProcess
    ) -> None:
        # The shell exits at once, but its background child keeps the output
        # pipe open, so the kill arrives before the result.
        peer.job = job("sleep 30 & echo started; exit 4")
        run.start()
        pgid = peer.wait_start()["pid"]
        peer.wait_for(lambda: "started" in peer.output(), "the command's output")
        peer.send({"type": "kill"})
        complete = peer.wait_complete()
        assert complete["reason"] == "exit"
        assert complete["retcode"] == 4
        assert_group_gone(pgid, run.run_id)


class TestExitStatus:
    def test_exit_status_reported(self, peer: ScriptedPeer, run: WrapperProcess) -> None:
        run_to_completion(peer, run, "exit 3")
        complete = peer.complete()
        assert complete is not None
        assert complete["reason"] == "exit"
        assert complete["retcode"] == 3
        assert "signal" not in complete

    def test_success_is_zero(self, peer: ScriptedPeer, run: WrapperProcess) -> None:
        run_to_completion(peer, run, "true")
        complete = peer.complete()
        assert complete is not None
        assert complete["retcode"] == 0

    def test_death_by_signal(self, peer: ScriptedPeer, run: WrapperProcess) -> None:
        run_to_completion(peer, run, "kill -USR1 $$")
        complete = peer.complete()
        assert complete is not None
        assert complete["reason"] == "signal"
        assert complete["retcode"] == 128 + 10
        assert complete["signal"] == "SIGUSR1"

    def test_complete_time_is_utc(self, peer: ScriptedPeer, run: WrapperProcess) -> None:
        run_to_completion(peer, run, "true")
        complete = peer.complete()
        assert complete is not None
        assert datetime.fromisoformat(complete["time"]).utcoffset() == timedelta(0)

    LEFTOVER_NOTE = "[saltpeter: stopped the processes the command left running]\n"

    def test_background_child_holding_pipe(self, peer: ScriptedPeer, run: WrapperProcess) -> None:
        # 5 s after the shell exits the wrapper stops the child that holds the pipe.
        output = run_to_completion(peer, run, "sleep 30 & echo started")
        complete = peer.complete()
        assert complete is not None
        assert complete["retcode"] == 0
        assert output == "started\n" + self.LEFTOVER_NOTE
        assert run.job_processes() == []

    def test_background_child_without_pipe(self, peer: ScriptedPeer, run: WrapperProcess) -> None:
        output = run_to_completion(peer, run, "sleep 30 >/dev/null 2>&1 & echo started")
        assert output == "started\n" + self.LEFTOVER_NOTE
        assert run.job_processes() == []

    def test_leftover_ignoring_sigterm_is_killed(
        self, peer: ScriptedPeer, run: WrapperProcess
    ) -> None:
        command = "(trap '' TERM; sleep 60) >/dev/null 2>&1 & exit 3"
        run_to_completion(peer, run, command)
        complete = peer.complete()
        assert complete is not None
        assert complete["retcode"] == 3
        assert run.job_processes() == []

    def test_no_note_without_leftovers(self, peer: ScriptedPeer, run: WrapperProcess) -> None:
        assert run_to_completion(peer, run, "echo alone") == "alone\n"


class TestUserAndEnvironment:
    def test_runs_as_nobody(self, peer: ScriptedPeer, run: WrapperProcess) -> None:
        command = "id -u; id -g; id -G; pwd; echo $HOME $USER $LOGNAME $SHELL"
        output = run_to_completion(peer, run, command, user="nobody", cwd="/tmp")
        nobody = pwd.getpwnam("nobody")
        groups = " ".join(str(gid) for gid in os.getgrouplist("nobody", nobody.pw_gid))
        assert output.splitlines() == [
            str(nobody.pw_uid),
            str(nobody.pw_gid),
            groups,
            "/tmp",
            f"{nobody.pw_dir} nobody nobody /bin/sh",
        ]

    def test_default_cwd_is_home(self, peer: ScriptedPeer, run: WrapperProcess) -> None:
        output = run_to_completion(peer, run, "pwd", cwd=None)
        assert output == f"{pwd.getpwuid(os.geteuid()).pw_dir}\n"

    def test_environment_is_built_not_inherited(
        self, peer: ScriptedPeer, run: WrapperProcess, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setenv("LANG", "C.UTF-8")
        monkeypatch.setenv("SP_TEST_WRAPPER_ONLY", "leak")
        env = {"FOO": "bar baz", "PATH": "/usr/bin:/bin:/opt/custom"}
        output = run_to_completion(peer, run, "env", env=env, cwd="/tmp")
        seen = dict(line.split("=", 1) for line in output.splitlines())
        assert seen.pop("PWD") == "/tmp"
        assert seen == {
            "HOME": pwd.getpwuid(os.geteuid()).pw_dir,
            "USER": "root",
            "LOGNAME": "root",
            "SHELL": "/bin/sh",
            "PATH": "/usr/bin:/bin:/opt/custom",
            "LANG": "C.UTF-8",
            "FOO": "bar baz",
            "SP_JOB_NAME": "testjob",
            "SP_JOB_INSTANCE": run.run_id,
            "SP_MACHINE_ID": MACHINE_ID,
        }


class TestSecrecy:
    def test_command_text_and_secrets_stay_out_of_proc(
        self, peer: ScriptedPeer, run: WrapperProcess
    ) -> None:
        command_marker = f"cmdmarker{secrets.token_hex(8)}"
        env_secret = f"envsecret{secrets.token_hex(8)}"
        peer.job = job(
            f": {command_marker}; echo ready; sh -c 'sleep 3'; sleep 3",
            env={"SECRET_VALUE": env_secret},
        )
        run.start()
        peer.wait_for(lambda: "ready" in peer.output(), "the command to start")
        job_pids = set(run.job_processes())
        assert len(job_pids) >= 2

        holders: dict[str, set[int]] = {"command": set(), "secret": set(), "token": set()}
        for pid in filter(str.isdigit, os.listdir("/proc")):
            cmdline = read_proc(pid, "cmdline")
            environ = read_proc(pid, "environ")
            assert command_marker.encode() not in cmdline
            assert env_secret.encode() not in cmdline
            assert peer.token.encode() not in cmdline
            for name, value in (
                ("command", command_marker),
                ("secret", env_secret),
                ("token", peer.token),
            ):
                if value.encode() in environ:
                    holders[name].add(int(pid))

        assert holders["command"] == set()
        assert holders["token"] == set()
        # The job's own processes have the variable, because it is their environment.
        assert holders["secret"] == job_pids


class TestStartFailed:
    def assert_start_failed(self, peer: ScriptedPeer, run: WrapperProcess, reason: str) -> None:
        complete = peer.wait_complete()
        assert complete["reason"] == "start_failed"
        assert complete["retcode"] == 255
        assert peer.start_frame() is None
        assert reason in peer.output()
        assert run.wait_exit() == 0

    def test_unknown_user(self, peer: ScriptedPeer, run: WrapperProcess) -> None:
        peer.job = job("true", user="no-such-user-sp")
        run.start()
        self.assert_start_failed(peer, run, "user 'no-such-user-sp' not found")

    def test_missing_cwd(self, peer: ScriptedPeer, run: WrapperProcess) -> None:
        peer.job = job("true", cwd="/no/such/directory")
        run.start()
        self.assert_start_failed(peer, run, "cwd '/no/such/directory' not found")

    def test_missing_home_as_default_cwd(self, peer: ScriptedPeer, run: WrapperProcess) -> None:
        peer.job = job("true", user="nobody", cwd=None)
        run.start()
        self.assert_start_failed(peer, run, "home directory of user 'nobody'")

    def test_exec_failure(self, peer: ScriptedPeer, run: WrapperProcess) -> None:
        # Linux rejects a single environment string over 128 KiB with E2BIG.
        peer.job = job("true", env={"HUGE": "x" * 200_000})
        run.start()
        self.assert_start_failed(peer, run, "Argument list too long")

    def test_invalid_job_definition(self, peer: ScriptedPeer, run: WrapperProcess) -> None:
        peer.job = job("true", env=["A=1"])
        run.start()
        self.assert_start_failed(peer, run, "field 'env' is not an object")

    def test_output_names_job_and_minion(self, peer: ScriptedPeer, run: WrapperProcess) -> None:
        peer.job = job("true", user="no-such-user-sp")
        run.start()
        self.assert_start_failed(peer, run, f"job 'testjob' did not start on {MACHINE_ID}")


def _python_for_nobody() -> str | None:
    """Return a Python 3.10+ that the user ``nobody`` can run (not one under /root), if any."""
    for candidate in ("/usr/bin/python3", "/usr/local/bin/python3"):
        if not os.path.exists(candidate):
            continue
        check = subprocess.run(
            [candidate, "-c", "import sys; sys.exit(sys.version_info < (3, 10))"],
            check=False,
            capture_output=True,
        )
        if check.returncode == 0:
            return candidate
    return None


@pytest.fixture
def nobody_wrapper() -> Iterator[Path]:
    """A directory for the user ``nobody``: the wrapper, a copy of Tornado, and a launcher.

    ``python`` in that directory runs the system Python as ``nobody`` with the
    copied Tornado on its path, for minion.launch's ``python`` argument.
    """
    python = _python_for_nobody()
    setpriv = shutil.which("setpriv")
    if python is None or setpriv is None:
        pytest.skip("needs setpriv and a Python 3.10+ outside /root")
    import tornado

    top = Path(tempfile.mkdtemp(prefix="sp-nobody-"))
    try:
        top.chmod(0o755)
        shutil.copytree(Path(tornado.__file__).parent, top / "lib" / "tornado")
        shutil.copy(wrapper.__file__, top / "sp_wrapper.py")
        launcher = top / "python"
        launcher.write_text(
            "#!/bin/sh\n"
            f"exec {setpriv} --reuid=nobody --regid=nogroup --clear-groups "
            f'env PYTHONPATH={top / "lib"} {python} "$@"\n'
        )
        launcher.chmod(0o755)
        for name in ("state", "log"):
            (top / name).mkdir()
            os.chown(top / name, pwd.getpwnam("nobody").pw_uid, -1)
        yield top
    finally:
        shutil.rmtree(top)


def start_as_nobody(run: WrapperProcess, top: Path) -> None:
    run.statedir = top / "state"
    run.logdir = top / "log"
    run.start(wrapper_path=str(top / "sp_wrapper.py"), python=str(top / "python"))


class TestNonRootWrapper:
    def test_other_user_fails_to_start(
        self, peer: ScriptedPeer, run: WrapperProcess, nobody_wrapper: Path
    ) -> None:
        peer.job = job("true", user="root", cwd="/")
        start_as_nobody(run, nobody_wrapper)
        complete = peer.wait_complete()
        assert complete["reason"] == "start_failed"
        assert "not root, so it cannot run the command as user 'root'" in peer.output()
        assert run.wait_exit() == 0

    def test_own_user_runs(
        self, peer: ScriptedPeer, run: WrapperProcess, nobody_wrapper: Path
    ) -> None:
        peer.job = job("id -u", user="nobody", cwd="/")
        start_as_nobody(run, nobody_wrapper)
        peer.wait_complete()
        assert peer.output() == f"{pwd.getpwnam('nobody').pw_uid}\n"
        assert run.wait_exit() == 0


class TestLocalRecord:
    def test_record_lifecycle(self, peer: ScriptedPeer, run: WrapperProcess) -> None:
        peer.job = job("echo ready; sleep 1")
        run.start()
        start = peer.wait_start()
        peer.wait_for(lambda: "ready" in peer.output(), "the command's output")
        record = json.loads(run.record_path.read_text())
        assert record["run"] == run.run_id
        assert record["job"] == "testjob"
        assert record["machine"] == MACHINE_ID
        assert record["wrapper_pid"] == run.pid
        assert record["pid"] == start["pid"]
        assert record["pgid"] == start["pid"]
        assert datetime.fromisoformat(record["started"]).utcoffset() == timedelta(0)
        assert stat.S_IMODE(run.record_path.stat().st_mode) == 0o600
        assert stat.S_IMODE(run.statedir.stat().st_mode) == 0o700

        peer.wait_complete()
        assert run.wait_exit() == 0
        assert not run.record_path.exists()
        assert list(run.statedir.iterdir()) == []

    def test_second_wrapper_for_same_run_rejected(
        self, peer: ScriptedPeer, run: WrapperProcess, tmp_path: Path
    ) -> None:
        peer.job = job("sleep 2")
        run.start()
        peer.wait_start()
        twin = WrapperProcess(peer, tmp_path)
        twin.run_id = run.run_id
        result = twin.launch()
        assert result["started"] is False
        assert "already in flight" in str(result["error"])
        peer.wait_complete()
        assert run.wait_exit() == 0


class TestEngineErrors:
    @pytest.mark.parametrize(
        "code", ["auth_failed", "unknown_run", "protocol_version", "job_unavailable"]
    )
    def test_fatal_error_at_hello_stops(
        self, peer: ScriptedPeer, run: WrapperProcess, code: str
    ) -> None:
        peer.hello_error = code
        peer.job = job("true")
        run.start()
        assert run.wait_exit() == 1
        assert peer.connection_count == 1
        assert peer.stored == []
        assert not run.record_path.exists()
        assert f"the engine rejected the run: {code}" in run.log_path.read_text()

    def test_fatal_error_mid_run_lets_command_finish(
        self, peer: ScriptedPeer, run: WrapperProcess, tmp_path: Path
    ) -> None:
        marker = tmp_path / "finished"
        peer.job = job(f"sleep 1; touch {marker}; exit 5")
        run.start()
        peer.wait_start()
        peer.send({"type": "error", "code": "unknown_run", "message": "scripted"})
        assert run.wait_exit() == 1
        assert marker.exists()
        assert peer.connection_count == 1
        log = run.log_path.read_text()
        assert "command finished: reason exit, retcode 5" in log
        assert "not reconnecting after error unknown_run" in log

    def test_bad_message_reconnects(self, peer: ScriptedPeer, run: WrapperProcess) -> None:
        peer.job = job("sleep 1; echo done")
        run.start()
        peer.wait_start()
        peer.send({"type": "error", "code": "bad_message", "message": "scripted"})
        peer.wait_complete()
        assert run.wait_exit() == 0
        assert peer.connection_count == 2
        assert peer.output() == "done\n"

    def test_rejected_hello_retries_with_backoff(
        self, peer: ScriptedPeer, run: WrapperProcess
    ) -> None:
        peer.hello_error = "bad_message"
        peer.job = job("echo ran")
        run.start()
        peer.wait_for(lambda: len(peer.frames("hello")) >= 2, "two rejected hellos")
        peer.hello_error = None
        peer.wait_complete()
        assert run.wait_exit() == 0
        assert peer.output() == "ran\n"
        assert len(peer.frames("hello")) >= 3

    def test_welcome_without_job_stops(self, peer: ScriptedPeer, run: WrapperProcess) -> None:
        peer.job = None
        run.start()
        assert run.wait_exit() == 1
        assert peer.stored == []
        assert "sent no job definition" in run.log_path.read_text()


class TestLogging:
    def test_normal_log_has_lifecycle_without_secrets(
        self, peer: ScriptedPeer, run: WrapperProcess
    ) -> None:
        env_secret = f"envsecret{secrets.token_hex(8)}"
        peer.heartbeat_interval = 0.1
        peer.job = job("echo hi; sleep 0.3", env={"SECRET_VALUE": env_secret})
        run.start(loglevel="normal")
        peer.wait_complete()
        assert run.wait_exit() == 0
        log = run.log_path.read_text()
        assert f"wrapper {wrapper.__version__} started" in log
        assert "command started as pid" in log
        assert "command finished: reason exit, retcode 0" in log
        assert "sent heartbeat" not in log
        assert peer.token not in log
        assert env_secret not in log

    def test_debug_log_has_frame_traffic(self, peer: ScriptedPeer, run: WrapperProcess) -> None:
        peer.heartbeat_interval = 0.1
        run_to_completion(peer, run, "sleep 0.3")
        log = run.log_path.read_text()
        assert "sent hello (need_job True)" in log
        assert "sent heartbeat" in log
        assert "received ack 1" in log
        assert peer.token not in log

    def test_off_writes_no_log(self, peer: ScriptedPeer, run: WrapperProcess) -> None:
        peer.job = job("true")
        run.start(loglevel="off")
        peer.wait_complete()
        assert run.wait_exit() == 0
        assert not run.log_path.exists()

    def test_uncreatable_logdir_does_not_fail_run(
        self, peer: ScriptedPeer, run: WrapperProcess, tmp_path: Path
    ) -> None:
        blocker = tmp_path / "a-file"
        blocker.write_text("")
        run.logdir = blocker / "log"
        assert run_to_completion(peer, run, "echo hi") == "hi\n"
