"""Unit tests of the wrapper's pure parts: timing arithmetic, checks and frame bookkeeping.

The wrapper running as a real process is tested in test_wrapper_run.py.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import pwd
import socket
import subprocess
import sys
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

import saltpeter
from saltpeter import wrapper
from saltpeter.wrapper import (
    BACKOFF_MAX,
    GIVE_UP_AFTER,
    Command,
    EngineLink,
    JobSpec,
    JobStartError,
    LocalRecord,
    Outbox,
    RunIds,
)


class TestBackoffDelay:
    @pytest.mark.parametrize(
        ("attempt", "expected"),
        [(0, 0.5), (1, 1.0), (2, 2.0), (3, 4.0), (4, 8.0), (5, 16.0), (6, 30.0), (7, 30.0)],
    )
    def test_doubles_from_half_second_to_cap(self, attempt: int, expected: float) -> None:
        assert wrapper.backoff_delay(attempt, 0.0) == expected

    def test_huge_attempt_stays_at_cap(self) -> None:
        assert wrapper.backoff_delay(10_000, 0.0) == BACKOFF_MAX

    def test_jitter_takes_off_at_most_quarter(self) -> None:
        assert wrapper.backoff_delay(3, 0.999999) == pytest.approx(3.0, rel=1e-5)

    @given(st.integers(min_value=0, max_value=10_000), st.floats(min_value=0.0, max_value=0.9999))
    def test_stays_within_bounds(self, attempt: int, jitter: float) -> None:
        delay = wrapper.backoff_delay(attempt, jitter)
        assert 0.375 <= delay <= BACKOFF_MAX


class TestHeartbeatWait:
    def test_waits_rest_of_interval(self) -> None:
        assert wrapper.heartbeat_wait(now=102.0, last_sent_at=100.0, interval=5.0) == 3.0

    def test_overdue_heartbeat_is_due_now(self) -> None:
        assert wrapper.heartbeat_wait(now=110.0, last_sent_at=100.0, interval=5.0) == 0.0


class TestTimeoutWait:
    def test_zero_timeout_has_no_deadline(self) -> None:
        assert wrapper.timeout_wait(now=500.0, started_at=0.0, timeout=0) is None

    def test_waits_until_timeout_passes(self) -> None:
        assert wrapper.timeout_wait(now=130.0, started_at=100.0, timeout=60.0) == 30.0

    def test_passed_timeout_is_due_now(self) -> None:
        assert wrapper.timeout_wait(now=161.0, started_at=100.0, timeout=60.0) == 0.0


class TestKillWait:
    def test_waits_rest_of_grace(self) -> None:
        assert wrapper.kill_wait(now=101.0, term_sent_at=100.0, grace=5.0) == 4.0

    def test_passed_grace_is_due_now(self) -> None:
        assert wrapper.kill_wait(now=106.0, term_sent_at=100.0, grace=5.0) == 0.0

    def test_zero_grace_kills_at_once(self) -> None:
        assert wrapper.kill_wait(now=100.0, term_sent_at=100.0, grace=0.0) == 0.0


class TestGiveUpWait:
    def test_running_command_never_gives_up(self) -> None:
        assert wrapper.give_up_wait(now=1e9, disconnected_since=0.0, idle_since=None) is None

    def test_counts_from_later_of_disconnect_and_finish(self) -> None:
        wait = wrapper.give_up_wait(now=1000.0, disconnected_since=100.0, idle_since=400.0)
        assert wait == GIVE_UP_AFTER - 600.0

    def test_counts_from_disconnect_after_finish(self) -> None:
        wait = wrapper.give_up_wait(now=1000.0, disconnected_since=900.0, idle_since=400.0)
        assert wait == GIVE_UP_AFTER - 100.0

    def test_gives_up_after_a_day(self) -> None:
        wait = wrapper.give_up_wait(
            now=100.0 + GIVE_UP_AFTER, disconnected_since=50.0, idle_since=100.0
        )
        assert wait == 0.0


class TestUtcTimestamp:
    def test_is_utc_with_offset_and_microseconds(self) -> None:
        stamp = wrapper.utc_timestamp()
        parsed = datetime.fromisoformat(stamp)
        assert parsed.utcoffset() == timedelta(0)
        assert stamp.endswith("+00:00")
        assert len(stamp.split(".")[1]) == len("123456+00:00")


class TestValidateName:
    @pytest.mark.parametrize("value", ["backup", "run-20261204-abc", "nightly db dump", "a.b"])
    def test_accepts_plain_names(self, value: str) -> None:
        assert wrapper.validate_name("job name", value) == value

    @pytest.mark.parametrize(
        ("value", "reason"),
        [
            ("", "empty"),
            ("a/b", "'/'"),
            ("..", "'..'"),
            ("x..y", "'..'"),
            ("a\nb", "control character"),
            ("a\0b", "control character"),
            ("x" * 201, "longer than 200 bytes"),
        ],
    )
    def test_rejects_unsafe_names(self, value: str, reason: str) -> None:
        with pytest.raises(ValueError, match=reason):
            wrapper.validate_name("run id", value)

    def test_error_names_the_kind(self) -> None:
        with pytest.raises(ValueError, match=r"^run id "):
            wrapper.validate_name("run id", "a/b")


class TestParseJob:
    def test_full_definition(self) -> None:
        spec = wrapper.parse_job(
            {
                "name": "backup",
                "command": "echo hi",
                "user": "nobody",
                "cwd": "/tmp",
                "env": {"A": "1", "PORT": 8080},
                "timeout": 60,
                "kill_grace": 2.5,
            }
        )
        assert spec == JobSpec(
            command="echo hi",
            user="nobody",
            cwd="/tmp",
            env={"A": "1", "PORT": "8080"},
            timeout=60.0,
            kill_grace=2.5,
        )

    def test_defaults_for_missing_fields(self) -> None:
        spec = wrapper.parse_job({"command": "true", "user": None, "cwd": None, "timeout": None})
        assert spec == JobSpec(
            command="true", user=None, cwd=None, env={}, timeout=0.0, kill_grace=5.0
        )

    @pytest.mark.parametrize(
        ("job", "message"),
        [
            ("echo", "not an object"),
            ({}, "field 'command'"),
            ({"command": 3}, "field 'command'"),
            ({"command": "true", "timeout": -1}, "field 'timeout'"),
            ({"command": "true", "timeout": True}, "field 'timeout'"),
            ({"command": "true", "kill_grace": "5"}, "field 'kill_grace'"),
            ({"command": "true", "user": 0}, "field 'user'"),
            ({"command": "true", "env": ["A=1"]}, "field 'env'"),
            ({"command": "true", "env": {"A=B": "1"}}, "'A=B' is not a valid variable name"),
            ({"command": "true", "env": {"A": None}}, "the value of A is not a string"),
        ],
    )
    def test_rejects_invalid_fields(self, job: object, message: str) -> None:
        with pytest.raises(JobStartError, match=message):
            wrapper.parse_job(job)

    def test_error_hides_env_value(self) -> None:
        with pytest.raises(JobStartError) as caught:
            wrapper.parse_job({"command": "true", "env": {"TOKEN": ["hunter2"]}})
        assert "hunter2" not in str(caught.value)


class TestBuildCommandEnv:
    ACCOUNT = pwd.struct_passwd(("alice", "x", 1000, 1000, "", "/home/alice", "/bin/bash"))

    def build(self, wrapper_env: dict[str, str], job_env: dict[str, str]) -> dict[str, str]:
        return wrapper.build_command_env(wrapper_env, job_env, self.ACCOUNT, "backup", "r1", "m1")

    def test_sets_account_and_run_variables(self) -> None:
        env = self.build({}, {})
        assert env == {
            "HOME": "/home/alice",
            "USER": "alice",
            "LOGNAME": "alice",
            "SHELL": "/bin/sh",
            "PATH": wrapper.DEFAULT_PATH,
            "SP_JOB_NAME": "backup",
            "SP_JOB_INSTANCE": "r1",
            "SP_MACHINE_ID": "m1",
        }

    def test_takes_path_and_locale_from_wrapper(self) -> None:
        env = self.build(
            {"PATH": "/opt/bin:/usr/bin", "LANG": "C.UTF-8", "LC_TIME": "de_DE.UTF-8"}, {}
        )
        assert env["PATH"] == "/opt/bin:/usr/bin"
        assert env["LANG"] == "C.UTF-8"
        assert env["LC_TIME"] == "de_DE.UTF-8"

    def test_leaves_out_other_wrapper_variables(self) -> None:
        env = self.build({"SP_RUN_TOKEN": "t", "PYTHONPATH": "/x", "SALT_HOME": "/y"}, {})
        assert "SP_RUN_TOKEN" not in env
        assert "PYTHONPATH" not in env
        assert "SALT_HOME" not in env

    def test_job_env_overrides_path_and_home(self) -> None:
        env = self.build({"PATH": "/usr/bin"}, {"PATH": "/custom/bin", "HOME": "/srv"})
        assert env["PATH"] == "/custom/bin"
        assert env["HOME"] == "/srv"

    def test_job_env_cannot_override_run_variables(self) -> None:
        env = self.build({}, {"SP_JOB_INSTANCE": "forged", "SP_JOB_NAME": "x"})
        assert env["SP_JOB_INSTANCE"] == "r1"
        assert env["SP_JOB_NAME"] == "backup"


class TestPlanLaunch:
    def spec(self, **fields: object) -> JobSpec:
        return wrapper.parse_job({"command": "true", **fields})

    def test_root_switches_to_user_with_groups(self) -> None:
        plan = wrapper.plan_launch(self.spec(user="nobody", cwd="/tmp"), "j", "r", "m", euid=0)
        nobody = pwd.getpwnam("nobody")
        assert plan.switch_user
        assert plan.account.pw_uid == nobody.pw_uid
        assert plan.groups == os.getgrouplist("nobody", nobody.pw_gid)

    def test_default_cwd_is_home(self) -> None:
        plan = wrapper.plan_launch(self.spec(), "j", "r", "m", euid=0)
        assert plan.cwd == pwd.getpwuid(0).pw_dir

    def test_unknown_user_fails(self) -> None:
        with pytest.raises(JobStartError, match="user 'no-such-user-sp' not found"):
            wrapper.plan_launch(self.spec(user="no-such-user-sp"), "j", "r", "m", euid=0)

    def test_missing_cwd_fails(self) -> None:
        with pytest.raises(JobStartError, match="cwd '/no/such/dir' not found"):
            wrapper.plan_launch(self.spec(cwd="/no/such/dir"), "j", "r", "m", euid=0)

    def test_missing_home_fails(self) -> None:
        with pytest.raises(JobStartError, match="home directory of user 'nobody'"):
            wrapper.plan_launch(self.spec(user="nobody"), "j", "r", "m", euid=0)

    def test_non_root_cannot_switch_user(self) -> None:
        with pytest.raises(JobStartError, match="not root, so it cannot run the command as"):
            wrapper.plan_launch(self.spec(user="root", cwd="/"), "j", "r", "m", euid=65534)

    def test_non_root_runs_as_itself(self) -> None:
        plan = wrapper.plan_launch(self.spec(user="nobody", cwd="/"), "j", "r", "m", euid=65534)
        assert not plan.switch_user
        assert plan.groups == []


@pytest.fixture
def outbox() -> Outbox:
    async def make() -> Outbox:
        return Outbox()

    return asyncio.run(make())


class TestOutbox:
    def test_numbers_frames_from_one(self, outbox: Outbox) -> None:
        first = outbox.push("start", pid=10, time="t")
        second = outbox.push("output", data="x")
        assert (first.seq, second.seq) == (1, 2)

    def test_frame_text_is_compact_json(self, outbox: Outbox) -> None:
        frame = outbox.push("output", data="é\n")
        assert json.loads(frame.text) == {"type": "output", "seq": 1, "data": "é\n"}
        assert "é" in frame.text

    def test_counts_output_bytes_as_utf8(self, outbox: Outbox) -> None:
        outbox.push("start", pid=10, time="t")
        outbox.push("output", data="€€")
        assert outbox.unacked_output_bytes == 6

    def test_ack_drops_covered_frames(self, outbox: Outbox) -> None:
        for text in ("a", "bb", "ccc"):
            outbox.push("output", data=text)
        outbox.ack(2)
        remaining = outbox.first_after(0)
        assert remaining is not None
        assert remaining.seq == 3
        assert outbox.unacked_output_bytes == 3

    def test_duplicate_and_stale_acks_change_nothing(self, outbox: Outbox) -> None:
        for text in ("a", "bb", "ccc"):
            outbox.push("output", data=text)
        outbox.ack(2)
        outbox.ack(2)
        outbox.ack(1)
        assert outbox.acked == 2
        assert outbox.unacked_output_bytes == 3

    def test_ack_beyond_last_frame_is_clamped(self, outbox: Outbox) -> None:
        outbox.push("output", data="a")
        outbox.ack(7)
        assert outbox.acked == 1
        assert outbox.first_after(0) is None

    def test_first_after_resumes_in_order(self, outbox: Outbox) -> None:
        for text in ("a", "b", "c", "d"):
            outbox.push("output", data=text)
        outbox.ack(1)
        frame = outbox.first_after(2)
        assert frame is not None
        assert frame.seq == 3

    def test_first_after_skips_acked_gap(self, outbox: Outbox) -> None:
        for text in ("a", "b", "c"):
            outbox.push("output", data=text)
        outbox.ack(2)
        frame = outbox.first_after(0)
        assert frame is not None
        assert frame.seq == 3

    def test_complete_acked_only_after_its_ack(self, outbox: Outbox) -> None:
        outbox.push("output", data="a")
        outbox.push("complete", retcode=0, reason="exit", time="t")
        outbox.ack(1)
        assert not outbox.complete_acked
        outbox.ack(2)
        assert outbox.complete_acked


class TestEngineLinkGiveUp:
    def test_gives_up_without_connection(
        self, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, caplog: pytest.LogCaptureFixture
    ) -> None:
        # The limit is 24 h in production; 1 s keeps the real reconnect loop short.
        monkeypatch.setattr(wrapper, "GIVE_UP_AFTER", 1.0)
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]

        async def run_link() -> int:
            ids = RunIds(run="r1", job="testjob", machine="m1")
            outbox = Outbox()
            command = Command(ids, outbox, LocalRecord(str(tmp_path), ids), script_fd=-1)
            link = EngineLink(f"ws://127.0.0.1:{port}/wrapper", "token", ids, outbox, command)
            return await asyncio.wait_for(link.run(), 30)

        with caplog.at_level(logging.DEBUG, logger=wrapper.__name__):
            status = asyncio.run(run_link())
        assert status == wrapper.EXIT_UNDELIVERED
        assert "giving up. The command did not run." in caplog.text
        assert caplog.text.count("cannot connect to the engine") == 1
        assert "connection attempt 2" in caplog.text


class TestIsWrapperCmdline:
    def test_matches_equals_form(self) -> None:
        cmdline = b"python3\0/usr/local/bin/sp_wrapper.py\0--run=r1\0--job=j\0"
        assert wrapper.is_wrapper_cmdline(cmdline, "r1")

    def test_matches_separate_form(self) -> None:
        assert wrapper.is_wrapper_cmdline(b"python3\0sp_wrapper.py\0--run\0r1\0", "r1")

    def test_rejects_other_run(self) -> None:
        assert not wrapper.is_wrapper_cmdline(b"python3\0sp_wrapper.py\0--run=r10\0", "r1")

    def test_rejects_zombie_empty_cmdline(self) -> None:
        assert not wrapper.is_wrapper_cmdline(b"", "r1")


class TestCommandLine:
    def test_version_matches_package(self) -> None:
        assert wrapper.__version__ == saltpeter.__version__

    def test_version_option_prints_version(self) -> None:
        proc = subprocess.run(
            [sys.executable, wrapper.__file__, "--version"],
            capture_output=True,
            text=True,
            check=False,
        )
        assert proc.returncode == 0
        assert proc.stdout.strip() == wrapper.__version__

    def test_missing_arguments_exit_255(self) -> None:
        proc = subprocess.run(
            [sys.executable, wrapper.__file__, "--run=r1"],
            capture_output=True,
            text=True,
            check=False,
        )
        assert proc.returncode == 255
        assert "the following arguments are required" in proc.stderr

    def test_ready_fd_found_in_rejected_arguments(self) -> None:
        assert wrapper._ready_fd_from_argv(["--bogus", "--ready-fd=7"]) == 7
        assert wrapper._ready_fd_from_argv(["--ready-fd", "9", "--bogus"]) == 9
        assert wrapper._ready_fd_from_argv(["--bogus"]) is None


def drain(outbox: Outbox) -> list[dict[str, Any]]:
    """Acknowledge frames one by one and return every frame, in seq order."""
    frames = []
    while True:
        frame = outbox.first_after(outbox.acked)
        if frame is None:
            return frames
        frames.append(json.loads(frame.text))
        outbox.ack(frame.seq)


class TestTailBuffer:
    def test_keeps_everything_below_the_limit(self) -> None:
        tail = wrapper.TailBuffer(10)
        tail.add(b"abc")
        tail.add(b"def")
        assert len(tail) == 6
        assert tail.take() == (0, b"abcdef")
        assert tail.take() == (0, b"")

    def test_keeps_the_newest_bytes_and_counts_the_rest(self) -> None:
        tail = wrapper.TailBuffer(5)
        for chunk in (b"0123", b"4567", b"89"):
            tail.add(chunk)
        assert tail.take() == (5, b"56789")

    @given(st.lists(st.binary(min_size=1, max_size=40), max_size=30), st.integers(1, 64))
    def test_skipped_plus_kept_is_total(self, chunks: list[bytes], limit: int) -> None:
        tail = wrapper.TailBuffer(limit)
        for chunk in chunks:
            tail.add(chunk)
            # Memory stays bounded by the limit plus one read.
            assert len(tail) < limit + 40
        everything = b"".join(chunks)
        skipped, newest = tail.take()
        assert skipped + len(newest) == len(everything)
        assert newest == everything[len(everything) - min(limit, len(everything)) :]


class TestContinuationBytes:
    @pytest.mark.parametrize(
        ("data", "count"),
        [
            (b"", 0),
            (b"abc", 0),
            ("€".encode()[1:], 2),
            ("😀".encode()[1:] + b"x", 3),
            (b"\x80\x80\x80\x80", 3),
        ],
    )
    def test_counts_leading_continuation_bytes(self, data: bytes, count: int) -> None:
        assert wrapper.continuation_bytes(data) == count


class TestOutputLimitField:
    @pytest.mark.parametrize(
        ("welcome", "limit"),
        [
            ({}, 0),
            ({"output_limit": 1048576}, 1048576),
            ({"output_limit": 0}, 0),
            ({"output_limit": -5}, 0),
            ({"output_limit": True}, 0),
            ({"output_limit": "1024"}, 0),
            ({"output_limit": 1.5}, 0),
        ],
    )
    def test_reads_the_welcome(self, welcome: dict[str, Any], limit: int) -> None:
        assert wrapper._output_limit(welcome, "job_1") == limit


class TestSpooling:
    def make(self, tmp_path: Path | None = None, **sizes: int) -> Outbox:
        async def build() -> Outbox:
            path = str(tmp_path / "run.spool") if tmp_path is not None else None
            return Outbox(path, **sizes)

        return asyncio.run(build())

    def test_output_beyond_window_is_spooled(self) -> None:
        outbox = self.make(window_bytes=4)
        assert outbox.push("output", data="aaaa") is not None
        assert outbox.push("output", data="bbbb") is None
        assert outbox.last_seq == 1

    def test_ack_numbers_spooled_output_in_order(self) -> None:
        outbox = self.make(window_bytes=4)
        outbox.push("start", pid=1, time="t")
        for text in ("aaaa", "bbbb", "cccc"):
            outbox.push("output", data=text)
        outbox.push("complete", retcode=0, reason="exit", time="t")
        frames = drain(outbox)
        assert [frame["seq"] for frame in frames] == [1, 2, 3, 4, 5]
        assert [frame.get("data") for frame in frames[1:4]] == ["aaaa", "bbbb", "cccc"]
        assert frames[-1]["type"] == "complete"
        assert outbox.complete_acked

    def test_dropping_an_entry_counts_what_it_skipped(self) -> None:
        spool = wrapper.Spool(None, 1000)
        spool.append("output", {"data": "ab", "skipped": 10})
        spool.append("output", {"data": "cd"})
        assert spool.drop_oldest_output() == 12
        assert spool.drop_oldest_output() == 2

    def test_full_spool_drops_oldest_and_says_so(self) -> None:
        outbox = self.make(window_bytes=1, spool_max_bytes=60)
        outbox.push("output", data="first\n")
        for number in range(10):
            outbox.push("output", data=f"line {number}\n")
        frames = drain(outbox)
        texts = [frame["data"] for frame in frames]
        assert texts[0] == "first\n"
        assert "bytes of output dropped on the minion" in texts[1]
        assert texts[-1] == "line 9\n"
        assert [frame["seq"] for frame in frames] == list(range(1, len(frames) + 1))
        dropped = int(texts[1].split("[saltpeter: ")[1].split()[0])
        assert dropped == outbox.dropped_total
        kept = "".join(texts[2:])
        assert len(kept) + dropped == sum(len(f"line {n}\n") for n in range(10))

    def test_complete_is_never_dropped(self) -> None:
        outbox = self.make(window_bytes=1, spool_max_bytes=40)
        outbox.push("output", data="x")
        outbox.push("output", data="y" * 30)
        outbox.push("complete", retcode=3, reason="exit", time="t")
        outbox.push("output", data="z" * 30)
        frames = drain(outbox)
        assert any(frame["type"] == "complete" for frame in frames)

    def test_file_spool_is_emptied_and_removed(self, tmp_path: Path) -> None:
        outbox = self.make(tmp_path, window_bytes=4)
        outbox.push("output", data="aaaa")
        outbox.push("output", data="é" * 10)
        spool = tmp_path / "run.spool"
        assert spool.stat().st_size > 0
        assert spool.stat().st_mode & 0o777 == 0o600
        frames = drain(outbox)
        assert frames[1]["data"] == "é" * 10
        assert spool.stat().st_size == 0
        outbox.close(remove=True)
        assert not spool.exists()

    def test_unwritable_spool_keeps_output_and_pauses(self) -> None:
        async def build() -> Outbox:
            return Outbox("/dev/full", window_bytes=1)

        outbox = asyncio.run(build())
        outbox.push("output", data="a")
        assert outbox.push("output", data="b") is None
        assert outbox.accepting is False
        outbox.push("output", data="c")
        assert [frame["data"] for frame in drain(outbox)] == ["a", "b", "c"]
        assert outbox.accepting is True
