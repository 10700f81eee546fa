"""The machines WebSocket with the real run manager, store and wrapper.

The engine's server, manager and SQLite store run on an asyncio loop in a
background thread, listening on 127.0.0.1. Runs are started on the manager
directly, as the engine does after a publish, and the real wrapper is
launched with saltpeter.minion.launch, so everything but Salt's publish is
the production path. Events go to an in-memory recorder, because the Salt
event bus needs a running master (the integration tests use a real one).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import os
import resource
import signal
import ssl
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TypeVar

import pytest
import tornado.httpclient
import tornado.netutil
import tornado.websocket

from saltpeter import minion, protocol, server, wrapper
from saltpeter.config import Settings, parse_job
from saltpeter.manager import RunManager
from saltpeter.runs import Run, Trigger
from saltpeter.store import RunStore

T = TypeVar("T")
MACHINE = "minion-under-test"
WAIT_SECONDS = 30.0

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the wrapper runs jobs as root")


class RecordedEvents:
    def __init__(self) -> None:
        self.events: list[tuple[str, dict[str, Any]]] = []

    def fire(self, tag: str, data: dict[str, Any]) -> None:
        self.events.append((tag, data))


class EngineLoop:
    """The server, manager and store on their own loop thread."""

    def __init__(self, tmp_path: Path, ssl_context: ssl.SSLContext | None = None) -> None:
        self.tmp_path = tmp_path
        self.ssl_context = ssl_context
        self.cafile: str | None = None
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.events = RecordedEvents()
        self.rejections: collections.Counter[str] = collections.Counter()
        self.jobs: dict[str, Any] = {}
        socket = tornado.netutil.bind_sockets(0, "127.0.0.1")[0]
        self.port = socket.getsockname()[1]
        socket.close()

    def start(self) -> None:
        self.thread.start()
        self.call(self._setup)

    def _setup(self) -> None:
        self.store = RunStore(self.tmp_path / "sp.db")
        self.manager = RunManager(
            self.store, self.events, self.jobs.get, launch_timeout=30, heartbeat_timeout=15
        )
        self.http = server.listen(
            self.manager,
            self.port,
            "127.0.0.1",
            ssl_options=self.ssl_context,
            rejections=self.rejections,
        )

    def stop(self) -> None:
        def teardown() -> None:
            self.http.stop()
            self.store.close()

        self.call(teardown)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)

    def call(self, function: Callable[[], T]) -> T:
        async def run() -> T:
            return function()

        return asyncio.run_coroutine_threadsafe(run(), self.loop).result(timeout=10)

    @property
    def url(self) -> str:
        scheme = "wss" if self.ssl_context is not None else "ws"
        return f"{scheme}://127.0.0.1:{self.port}{server.WRAPPER_PATH}"

    def start_run(self, command: str, **fields: Any) -> tuple[Run, str]:
        raw = {
            "sec": "0",
            "min": "0",
            "hour": "0",
            "dom": "1",
            "mon": "1",
            "dow": "*",
            "targets": MACHINE,
            "command": command,
            **fields,
        }
        job = parse_job(
            "component", raw, Path("/etc/saltpeter/c.yaml"), Settings(), datetime.now(timezone.utc)
        )
        self.jobs[job.name] = job
        return self.call(
            lambda: self.manager.start_run(
                job, Trigger.MANUAL, None, [MACHINE], [], f"jid-{time.monotonic_ns()}"
            )
        )

    def launch(self, run: Run, token: str) -> dict[str, object]:
        result = minion.launch(
            run.run_id,
            run.job_name,
            self.url,
            token,
            MACHINE,
            wrapper.__file__,
            "debug",
            str(self.tmp_path / "logs"),
            str(self.tmp_path / "state"),
            cafile=self.cafile,
        )
        assert result["started"] is True, result
        return result

    def result(self, run: Run) -> dict[str, Any]:
        return self.call(lambda: self.store.results(run.run_id)[MACHINE])

    def wait_for_result(self, run: Run) -> dict[str, Any]:
        deadline = time.monotonic() + WAIT_SECONDS
        while time.monotonic() < deadline:
            result = self.result(run)
            if result["retcode"] is not None:
                return result
            time.sleep(0.05)
        raise AssertionError(f"run {run.run_id} has no result after {WAIT_SECONDS} s")

    def wait_for_output(self, run: Run, text: str) -> None:
        deadline = time.monotonic() + WAIT_SECONDS
        while time.monotonic() < deadline:
            if text in self.result(run)["output"]:
                return
            time.sleep(0.05)
        raise AssertionError(f"output of {run.run_id} never contained {text!r}")

    def connect(self, **headers: str) -> tornado.websocket.WebSocketClientConnection:
        async def open_connection() -> tornado.websocket.WebSocketClientConnection:
            request = tornado.httpclient.HTTPRequest(self.url, headers=headers)
            return await tornado.websocket.websocket_connect(request)

        return asyncio.run_coroutine_threadsafe(open_connection(), self.loop).result(timeout=10)

    def exchange(
        self, connection: tornado.websocket.WebSocketClientConnection, frame: str
    ) -> list[dict[str, Any] | None]:
        """Send one frame and collect replies until the server closes or goes quiet."""

        async def talk() -> list[dict[str, Any] | None]:
            await connection.write_message(frame)
            replies: list[dict[str, Any] | None] = []
            while True:
                try:
                    message = await asyncio.wait_for(connection.read_message(), timeout=2)
                except asyncio.TimeoutError:
                    return replies
                replies.append(json.loads(message) if message is not None else None)
                if message is None:
                    return replies

        return asyncio.run_coroutine_threadsafe(talk(), self.loop).result(timeout=15)


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[EngineLoop]:
    loop = EngineLoop(tmp_path)
    loop.start()
    yield loop
    loop.stop()


def hello_frame(run: Run, token: str, machine: str = MACHINE) -> str:
    return json.dumps(
        {
            "type": "hello",
            "protocol": 1,
            "run": run.run_id,
            "machine": machine,
            "token": token,
            "wrapper_version": "test",
            "need_job": True,
        }
    )


class TestRealWrapper:
    def test_output_and_retcode_are_stored(self, engine: EngineLoop) -> None:
        run, token = engine.start_run("printf 'one\\n'; printf 'two\\n' >&2; exit 3")
        engine.launch(run, token)
        result = engine.wait_for_result(run)
        assert result["retcode"] == 3
        assert result["reason"] == "exit"
        assert result["output"] == "one\ntwo\n"

    def test_events_cover_the_run(self, engine: EngineLoop) -> None:
        run, token = engine.start_run("echo hi")
        engine.launch(run, token)
        engine.wait_for_result(run)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            tags = [tag for tag, _ in engine.events.events]
            if "saltpeter/job/component/complete" in tags:
                break
            time.sleep(0.05)
        assert tags == [
            "saltpeter/job/component/start",
            f"saltpeter/job/component/{MACHINE}/start",
            f"saltpeter/job/component/{MACHINE}/complete",
            "saltpeter/job/component/complete",
        ]

    def test_output_arrives_while_running(self, engine: EngineLoop) -> None:
        run, token = engine.start_run("echo first; sleep 3; echo second")
        engine.launch(run, token)
        engine.wait_for_output(run, "first\n")
        assert engine.result(run)["retcode"] is None
        assert engine.wait_for_result(run)["output"] == "first\nsecond\n"

    def test_environment_reaches_the_command(self, engine: EngineLoop) -> None:
        run, token = engine.start_run(
            'echo "$GREETING $SP_JOB_NAME $SP_JOB_INSTANCE $SP_MACHINE_ID"',
            env={"GREETING": "hello"},
        )
        engine.launch(run, token)
        output = engine.wait_for_result(run)["output"]
        assert output == f"hello component {run.run_id} {MACHINE}\n"

    def test_kill_through_manager_gives_143(self, engine: EngineLoop) -> None:
        run, token = engine.start_run("echo started; sleep 60")
        engine.launch(run, token)
        engine.wait_for_output(run, "started\n")
        signalled = engine.call(lambda: engine.manager.kill("component"))
        assert signalled == {run.run_id: [MACHINE]}
        result = engine.wait_for_result(run)
        assert result["retcode"] == 143
        assert result["reason"] == "killed"

    def test_timeout_gives_124(self, engine: EngineLoop) -> None:
        run, token = engine.start_run("echo started; sleep 60", timeout=1)
        engine.launch(run, token)
        result = engine.wait_for_result(run)
        assert result["retcode"] == 124
        assert result["reason"] == "timeout"

    def test_large_output_is_exact(self, engine: EngineLoop) -> None:
        run, token = engine.start_run("seq 1 20000")
        engine.launch(run, token)
        output = engine.wait_for_result(run)["output"]
        assert output == "".join(f"{number}\n" for number in range(1, 20001))


class TestRejections:
    def test_wrong_token(self, engine: EngineLoop) -> None:
        run, _ = engine.start_run("true")
        replies = engine.exchange(engine.connect(), hello_frame(run, "forged"))
        assert replies[0]["type"] == "error"
        assert replies[0]["code"] == "auth_failed"
        assert replies[-1] is None
        assert engine.rejections["auth_failed"] == 1

    def test_minion_outside_the_run(self, engine: EngineLoop) -> None:
        run, token = engine.start_run("true")
        replies = engine.exchange(engine.connect(), hello_frame(run, token, machine="other"))
        assert replies[0]["code"] == "auth_failed"

    def test_malformed_json(self, engine: EngineLoop) -> None:
        replies = engine.exchange(engine.connect(), "{not json")
        assert replies[0]["code"] == "bad_message"
        assert replies[-1] is None

    def test_frame_before_hello(self, engine: EngineLoop) -> None:
        replies = engine.exchange(engine.connect(), json.dumps({"type": "heartbeat"}))
        assert replies[0]["code"] == "bad_message"
        assert "first frame must be hello" in replies[0]["message"]

    def test_browser_origin_is_refused(self, engine: EngineLoop) -> None:
        with pytest.raises(tornado.httpclient.HTTPClientError) as caught:
            engine.connect(Origin="https://evil.example")
        assert caught.value.code == 403

    def test_server_survives_rejections(self, engine: EngineLoop) -> None:
        for _ in range(3):
            engine.exchange(engine.connect(), "garbage")
        run, token = engine.start_run("echo still serving")
        engine.launch(run, token)
        assert engine.wait_for_result(run)["output"] == "still serving\n"

    def test_valid_hello_gets_welcome_with_job(self, engine: EngineLoop) -> None:
        run, token = engine.start_run("echo secret-free", env={"KEY": "value"})
        replies = engine.exchange(engine.connect(), hello_frame(run, token))
        assert replies[0]["type"] == "welcome"
        assert replies[0]["acked"] == 0
        assert replies[0]["job"]["env"] == {"KEY": "value"}


class TestAcks:
    def test_ack_waits_for_the_commit(self, engine: EngineLoop) -> None:
        run, token = engine.start_run("true")
        connection = engine.connect()
        engine.exchange(connection, hello_frame(run, token))
        start = json.dumps({"type": "start", "seq": 1, "pid": 4242, "time": "t"})
        output = json.dumps({"type": "output", "seq": 2, "data": "stored first\n"})
        assert engine.exchange(connection, start) == [{"type": "ack", "seq": 1}]
        # A batch the server did not open waits for the test to commit it.
        engine.call(engine.store.begin_batch)
        assert engine.exchange(connection, output) == []
        with contextlib.closing(RunStore(engine.store.path, readonly=True)) as reader:
            assert reader.output(run.run_id, MACHINE) == ""

        async def commit_and_read() -> Any:
            engine.store.commit_batch()
            return await asyncio.wait_for(connection.read_message(), timeout=5)

        ack = asyncio.run_coroutine_threadsafe(commit_and_read(), engine.loop).result(10)
        assert json.loads(ack) == {"type": "ack", "seq": 2}
        with contextlib.closing(RunStore(engine.store.path, readonly=True)) as reader:
            assert reader.output(run.run_id, MACHINE) == "stored first\n"


    def test_lost_frames_are_sent_again(self, engine: EngineLoop) -> None:
        run, token = engine.start_run("true")
        connection = engine.connect()
        engine.exchange(connection, hello_frame(run, token))
        start = json.dumps({"type": "start", "seq": 1, "pid": 4242, "time": "t"})
        lost = json.dumps({"type": "output", "seq": 2, "data": "x" * 200_000})
        assert engine.exchange(connection, start) == [{"type": "ack", "seq": 1}]
        engine.call(engine.store.begin_batch)
        assert engine.exchange(connection, lost) == []

        def failing_commit() -> None:
            # The log file may not grow, so the commit cannot write its frames.
            soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
            resource.setrlimit(resource.RLIMIT_FSIZE, (8192, hard))
            try:
                engine.store.commit_batch()
            finally:
                resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))

        previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        try:
            engine.call(failing_commit)
        finally:
            signal.signal(signal.SIGXFSZ, previous)
        # The engine closes the connection instead of acknowledging the frame.

        async def read() -> Any:
            return await asyncio.wait_for(connection.read_message(), timeout=5)

        assert asyncio.run_coroutine_threadsafe(read(), engine.loop).result(10) is None
        assert connection.close_code == 1011
        # The new connection's welcome carries the stored sequence number.
        again = engine.connect()
        [welcome] = engine.exchange(again, hello_frame(run, token))
        assert welcome["acked"] == 1
        assert engine.exchange(again, lost) == [{"type": "ack", "seq": 2}]
        with contextlib.closing(RunStore(engine.store.path, readonly=True)) as reader:
            assert reader.output(run.run_id, MACHINE) == "x" * 200_000


class TestHostilePeers:
    def test_oversized_frame_closes_and_counts(self, engine: EngineLoop) -> None:
        replies = engine.exchange(engine.connect(), "x" * (protocol.MAX_FRAME_BYTES + 10))
        assert replies[-1] is None
        wait_until(lambda: engine.rejections["too_large"] == 1)

    def test_silent_connection_is_closed(
        self, engine: EngineLoop, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setattr(server, "HELLO_TIMEOUT_SECONDS", 0.5)
        connection = engine.connect()

        async def read() -> Any:
            first = await asyncio.wait_for(connection.read_message(), timeout=5)
            second = await asyncio.wait_for(connection.read_message(), timeout=5)
            return first, second

        first, second = asyncio.run_coroutine_threadsafe(read(), engine.loop).result(10)
        assert json.loads(first)["code"] == "hello_timeout"
        assert second is None

    def test_flood_is_cut_off(self, engine: EngineLoop) -> None:
        run, token = engine.start_run("true")
        connection = engine.connect()
        engine.exchange(connection, hello_frame(run, token))
        heartbeat = json.dumps({"type": "heartbeat", "time": "t"})

        async def flood() -> None:
            for _ in range(int(server.FRAME_BURST) + 500):
                try:
                    await connection.write_message(heartbeat)
                except tornado.websocket.WebSocketClosedError:
                    return

        asyncio.run_coroutine_threadsafe(flood(), engine.loop).result(timeout=30)
        wait_until(lambda: engine.rejections["flood"] == 1)

    def test_unknown_frame_type_after_hello(self, engine: EngineLoop) -> None:
        run, token = engine.start_run("true")
        connection = engine.connect()
        engine.exchange(connection, hello_frame(run, token))
        replies = engine.exchange(connection, json.dumps({"type": "launch_missiles"}))
        assert replies[0]["code"] == "bad_message"
        assert replies[-1] is None


class TestRejectionLog:
    def test_repeats_are_logged_once_per_interval(self, caplog: pytest.LogCaptureFixture) -> None:
        now = [0.0]
        counts: collections.Counter[str] = collections.Counter()
        rejection_log = server.RejectionLog(counts, clock=lambda: now[0], interval=60)
        with caplog.at_level("WARNING", logger="saltpeter.server"):
            for _ in range(5):
                rejection_log.record("10.0.0.9", "before hello", "auth_failed", "bad token")
            now[0] = 61
            rejection_log.record("10.0.0.9", "before hello", "auth_failed", "bad token")
        assert counts["auth_failed"] == 6
        assert len(caplog.records) == 2
        assert "10.0.0.9" in caplog.records[0].getMessage()
        assert "4 more from this peer" in caplog.records[1].getMessage()


class TestTokenBucket:
    def test_burst_then_rate(self) -> None:
        bucket = server.TokenBucket(rate=10, capacity=3, tokens=3, updated=0.0)
        assert [bucket.take(0.0) for _ in range(4)] == [True, True, True, False]
        assert bucket.take(0.1) is True
        assert bucket.take(0.1) is False


def wait_until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.05)


@pytest.fixture
def tls_engine(tmp_path: Path) -> Iterator[EngineLoop]:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
            "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
            "-keyout", str(key), "-out", str(cert),
        ],
        check=True,
        capture_output=True,
    )  # fmt: skip
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    loop = EngineLoop(tmp_path, ssl_context=context)
    loop.cafile = str(cert)
    loop.start()
    yield loop
    loop.stop()


class TestTls:
    def test_wrapper_reports_over_wss(self, tls_engine: EngineLoop) -> None:
        run, token = tls_engine.start_run("echo over tls")
        tls_engine.launch(run, token)
        result = tls_engine.wait_for_result(run)
        assert result["retcode"] == 0
        assert result["output"] == "over tls\n"

    def test_plain_client_cannot_talk_to_tls_server(self, tls_engine: EngineLoop) -> None:
        plain = f"ws://127.0.0.1:{tls_engine.port}{server.WRAPPER_PATH}"

        async def connect() -> None:
            await tornado.websocket.websocket_connect(plain, connect_timeout=5)

        with pytest.raises(Exception):  # noqa: B017 - any failure to connect is the point
            asyncio.run_coroutine_threadsafe(connect(), tls_engine.loop).result(timeout=15)
