"""The HTTP API, the /ws WebSocket and the dashboard's files against a real engine.

Each fixture runs the real :class:`saltpeter.engine.Engine` on an asyncio loop in a
background thread, with its real config loader, RunStore, RunManager, Metrics,
scheduler, machines WebSocket and this API, all on 127.0.0.1. The stand-in is
:class:`LocalBridge`, which replaces only the engine's Salt bridge: it resolves
targets against a fixed list of minion ids, returns the startup ping, and turns a
publish of ``saltpeter.launch`` into a call of the real launcher
(``saltpeter.minion.launch``), which starts the real wrapper as a process that
connects back to the machines WebSocket. Events go to a list instead of the Salt
event bus. The integration tests run the same API against a real master.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import fnmatch
import json
import logging
import os
import re
import socket
import struct
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
import tornado.httpclient
import tornado.httpserver
import tornado.netutil
import tornado.websocket
import yaml

from saltpeter import api, minion, wrapper
from saltpeter.control import build_status
from saltpeter.engine import Engine

T = TypeVar("T")

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the wrapper runs jobs as root")

MINIONS = ("minion-a", "minion-b")
TOKEN = "unit-test-token-5b9f"
WAIT_SECONDS = 40.0
# A schedule that exists but does not fire while the tests run.
DORMANT = {"sec": 0, "min": 0, "hour": 0, "dom": 1, "mon": 1, "dow": "*", "year": 2099}
# 8,000,000 x characters folded into lines of 100, with no newline after the last.
FLOOD_CHARS = 8_079_999

JOBS: dict[str, dict[str, Any]] = {
    "lines": {
        **DORMANT,
        "targets": "*",
        "command": 'for i in 1 2 3; do echo "line $i from $SP_MACHINE_ID"; sleep 0.2; done',
    },
    "chatty": {
        **DORMANT,
        "targets": "minion-a,minion-b",
        "target_type": "list",
        "command": "seq 1 3000; sleep 0.3; seq 3001 6000 >&2; sleep 0.3; "
        "printf 'tail without newline'",
    },
    "sleeper": {
        **DORMANT,
        "targets": "minion-a",
        "target_type": "list",
        "command": "echo started; sleep 300",
    },
    "slow_start": {
        **DORMANT,
        "targets": "minion-b",
        "target_type": "list",
        "command": "echo first; sleep 3; echo second",
    },
    "flood": {
        **DORMANT,
        "targets": "minion-a",
        "target_type": "list",
        "command": "head -c 8000000 /dev/zero | tr '\\0' x | fold -w 100",
    },
    "secretive": {
        **DORMANT,
        "targets": "minion-b",
        "target_type": "list",
        "env": {"PASSWORD": "hunter2-value"},
        "command": "echo done",
    },
    "nowhere": {
        **DORMANT,
        "targets": "no-such-minion-*",
        "command": "true",
    },
}


# ------------------------------------------------------------------ the engine


class LocalBridge:
    """Stands in for SaltBridge: targets, publishes and events without a Salt master."""

    def __init__(self, root: Path, executor: Any) -> None:
        self.root = root
        self.executor = executor
        self.events: list[tuple[str, dict[str, Any]]] = []
        self.on_event: Callable[[str, dict[str, Any]], Any] | None = None
        self._jid = 0
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self, on_event: Callable[[str, dict[str, Any]], Any]) -> None:
        self.on_event = on_event

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()

    def fire(self, tag: str, data: dict[str, Any]) -> None:
        self.events.append((tag, data))

    def verify_minion_signature(self, minion: str, message: bytes, signature: str | None) -> bool:
        # No minion has a Salt key here. test_minion_keys.py and the sandbox
        # tests check signatures against real keys.
        return True

    def new_jid(self) -> str:
        self._jid += 1
        return f"2099{self._jid:016d}"

    async def accepted_minions(self) -> list[str]:
        return list(MINIONS)

    async def resolve_targets(self, targets: str, target_type: str) -> list[str]:
        if target_type == "list":
            wanted = {name.strip() for name in targets.split(",")}
            return sorted(name for name in MINIONS if name in wanted)
        return sorted(name for name in MINIONS if fnmatch.fnmatchcase(name, targets))

    def statedir(self, minion_id: str) -> str:
        return str(self.root / minion_id / "state")

    async def publish(
        self,
        minions: Iterable[str],
        fun: str,
        arg: list[Any],
        kwarg: dict[str, Any] | None = None,
        jid: str = "",
    ) -> dict[str, Any]:
        targets = list(minions)
        for minion_id in targets:
            task = asyncio.ensure_future(self._execute(minion_id, fun, arg, kwarg or {}, jid))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        return {"jid": jid, "minions": targets}

    async def _execute(
        self, minion_id: str, fun: str, arg: list[Any], kwarg: dict[str, Any], jid: str
    ) -> None:
        loop = asyncio.get_running_loop()
        if fun == "test.ping":
            result: Any = True
        elif fun == "saltpeter.launch":
            run_id, job, url, token = arg
            result = await loop.run_in_executor(
                self.executor,
                lambda: minion.launch(
                    run_id,
                    job,
                    url,
                    token,
                    minion_id,
                    kwarg["wrapper_path"],
                    kwarg["loglevel"],
                    kwarg["logdir"],
                    self.statedir(minion_id),
                ),
            )
        elif fun == "saltpeter.kill_local":
            result = await loop.run_in_executor(
                self.executor, lambda: minion.kill_local(arg[0], self.statedir(minion_id))
            )
        else:
            result = f"'{fun}' is not available"
        assert self.on_event is not None
        await self.on_event(f"salt/job/{jid}/ret/{minion_id}", {"return": result})


def free_port() -> int:
    sock = tornado.netutil.bind_sockets(0, "127.0.0.1")[0]
    port = sock.getsockname()[1]
    sock.close()
    return int(port)


class EngineHarness:
    """The real engine with a LocalBridge, on its own loop thread."""

    def __init__(self, root: Path, settings: dict[str, object] | None = None) -> None:
        self.root = root
        self.jobs_dir = root / "jobs"
        self.jobs_dir.mkdir(parents=True)
        (self.jobs_dir / "jobs.yaml").write_text(yaml.safe_dump(JOBS))
        self.api_port = free_port()
        self.machines_port = free_port()
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)

        overrides: dict[str, object] = {
            "api_ws": True,
            "api_ws_port": self.api_port,
            "api_ws_bind_addr": "127.0.0.1",
            "machines_ws_port": self.machines_port,
            "machines_ws_bind_addr": "127.0.0.1",
            "default_saltpeter_server_host": "127.0.0.1",
            "default_wrapper_path": wrapper.__file__,
            "default_wrapper_logdir": str(root / "wrapper-logs"),
            "default_wrapper_loglevel": "off",
            "logdir": str(root / "logs"),
            "startup_wait": 10,
            # The flood job's output is followed whole: above this cap the
            # wrapper would send only its end.
            "max_output_bytes": 16 * 1024 * 1024,
            **(settings or {}),
        }
        self.engine = Engine(
            {"cachedir": str(root / "cache")},
            config_dir=str(self.jobs_dir),
            store_path=str(root / "saltpeter.db"),
            settings=overrides,
        )

        # Everything but the Salt bridge is the engine's own.
        self.bridge = LocalBridge(root, self.engine.executor)
        self.engine.bridge = self.bridge  # type: ignore[assignment]
        self.task: Any = None

    def start(self) -> None:
        self.thread.start()
        self.task = asyncio.run_coroutine_threadsafe(self.engine.run(), self.loop)
        deadline = time.monotonic() + WAIT_SECONDS
        while time.monotonic() < deadline:
            if self.task.done():
                self.task.result()  # raises the engine's error
            if self.call(lambda: self.engine._ready.is_set()) and self._port_open():
                return
            time.sleep(0.05)
        raise AssertionError(f"the engine was not ready within {WAIT_SECONDS} s")

    def _port_open(self) -> bool:
        try:
            socket.create_connection(("127.0.0.1", self.api_port), timeout=1).close()
        except OSError:
            return False
        return True

    def stop(self) -> None:
        for run_id in self.call(lambda: list(self.engine.manager.runs)):
            job = self.call(lambda run_id=run_id: self.engine.manager.runs[run_id].job_name)
            self.call(lambda job=job: self.engine.manager.kill(job))
        self.loop.call_soon_threadsafe(self.task.cancel)
        with contextlib.suppress(BaseException):  # the cancellation itself
            self.task.result(timeout=15)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
        handler = self.engine._log_handler
        if handler is not None:
            logging.getLogger("saltpeter").removeHandler(handler)
            handler.close()

    def call(self, function: Callable[[], T]) -> T:
        async def run() -> T:
            return function()

        return asyncio.run_coroutine_threadsafe(run(), self.loop).result(timeout=20)

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    def wait_for_result(self, run_id: str) -> dict[str, Any]:
        deadline = time.monotonic() + WAIT_SECONDS
        while time.monotonic() < deadline:
            run = self.call(lambda: self.engine.store.run(run_id))
            if run is not None and run["status"] != "running":
                return run
            time.sleep(0.1)
        raise AssertionError(f"run {run_id} did not finish within {WAIT_SECONDS} s")

    def wait_for_output(self, run_id: str, machine: str, text: str) -> None:
        deadline = time.monotonic() + WAIT_SECONDS
        while time.monotonic() < deadline:
            results = self.call(lambda: self.engine.store.results(run_id))
            if machine in results and text in results[machine]["output"]:
                return
            time.sleep(0.1)
        raise AssertionError(f"output of {run_id} on {machine} never contained {text!r}")

    def wait_idle(self, job: str) -> None:
        deadline = time.monotonic() + WAIT_SECONDS
        while self.call(lambda: self.engine.manager.running(job)):
            if time.monotonic() > deadline:
                raise AssertionError(f"job {job} still has a run in flight")
            time.sleep(0.1)

    def write_config(self, name: str, document: dict[str, Any] | None) -> None:
        path = self.jobs_dir / name
        if document is None:
            path.unlink(missing_ok=True)
        else:
            path.write_text(yaml.safe_dump(document))


@pytest.fixture(scope="module")
def harness(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EngineHarness]:
    running = EngineHarness(tmp_path_factory.mktemp("api"))
    running.start()
    yield running
    running.stop()


@pytest.fixture(scope="module")
def token_harness(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EngineHarness]:
    running = EngineHarness(tmp_path_factory.mktemp("api-token"), {"api_token": TOKEN})
    running.start()
    yield running
    running.stop()


# ------------------------------------------------------------------- clients


class Response:
    def __init__(self, status: int, headers: Any, body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body

    def json(self) -> Any:
        return json.loads(self.body)


def request(
    base: str,
    method: str,
    path: str,
    body: object = None,
    headers: dict[str, str] | None = None,
    raw: bytes | None = None,
) -> Response:
    data = raw
    if data is None and body is not None:
        data = json.dumps(body).encode()
    if data is None and method == "POST":
        data = b""
    req = urllib.request.Request(base + path, data=data, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=WAIT_SECONDS) as answer:
            return Response(answer.status, answer.headers, answer.read())
    except urllib.error.HTTPError as error:
        return Response(error.code, error.headers, error.read())


class LiveClient:
    """A /ws client on its own event loop, driven from the test thread."""

    def __init__(self, url: str, headers: dict[str, str] | None = None) -> None:
        self.loop = asyncio.new_event_loop()
        req = tornado.httpclient.HTTPRequest(url, headers=headers or {})

        async def connect() -> tornado.websocket.WebSocketClientConnection:
            return await tornado.websocket.websocket_connect(req)

        try:
            self.connection = self.loop.run_until_complete(
                asyncio.wait_for(connect(), WAIT_SECONDS)
            )
        except BaseException:
            self.loop.close()
            raise

    def send(self, message: object) -> None:
        text = message if isinstance(message, str) else json.dumps(message)

        async def write() -> None:
            await self.connection.write_message(text)

        self.loop.run_until_complete(write())

    def receive(self, timeout: float = WAIT_SECONDS) -> dict[str, Any] | None:
        async def read() -> Any:
            return await asyncio.wait_for(self.connection.read_message(), timeout)

        text = self.loop.run_until_complete(read())
        return json.loads(text) if text is not None else None

    def receive_until(
        self, done: Callable[[dict[str, Any]], bool], timeout: float = WAIT_SECONDS
    ) -> list[dict[str, Any]]:
        """Collect messages up to and including the first one for which ``done`` is true."""
        messages: list[dict[str, Any]] = []
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                types = [message.get("type") for message in messages]
                raise AssertionError(f"no expected message within {timeout} s; got {types}")
            message = self.receive(remaining)
            if message is None:
                raise AssertionError("the server closed the connection")
            messages.append(message)
            if done(message):
                return messages

    def close(self) -> None:
        async def shut() -> None:
            # Inside the loop: closing writes a frame, which needs a running loop.
            self.connection.close()
            await asyncio.sleep(0.05)

        self.loop.run_until_complete(shut())
        self.loop.close()


def ws_url(harness: EngineHarness) -> str:
    return f"ws://127.0.0.1:{harness.api_port}/ws"


@pytest.fixture
def live(harness: EngineHarness) -> Iterator[LiveClient]:
    client = LiveClient(ws_url(harness))
    yield client
    client.close()


def is_type(kind: str, **fields: Any) -> Callable[[dict[str, Any]], bool]:
    def check(message: dict[str, Any]) -> bool:
        return message.get("type") == kind and all(
            message.get(key) == value for key, value in fields.items()
        )

    return check


def is_event(tag: str) -> Callable[[dict[str, Any]], bool]:
    return lambda message: message.get("type") == "event" and message.get("tag") == tag


def start_run(harness: EngineHarness, job: str) -> str:
    response = request(harness.base, "POST", "/run", {"job": job})
    assert response.status == 200, response.body
    return str(response.json()["run_id"])


class RawWebSocket:
    """A blocking WebSocket client over a plain socket that reads only when a test calls it."""

    def __init__(self, port: int, headers: dict[str, str] | None = None) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        # A small receive buffer, so a client that does not read backs up the server.
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        self.sock.settimeout(WAIT_SECONDS)
        self.sock.connect(("127.0.0.1", port))
        key = base64.b64encode(os.urandom(16)).decode()
        lines = [
            "GET /ws HTTP/1.1",
            f"Host: 127.0.0.1:{port}",
            "Upgrade: websocket",
            "Connection: Upgrade",
            f"Sec-WebSocket-Key: {key}",
            "Sec-WebSocket-Version: 13",
            *(f"{name}: {value}" for name, value in (headers or {}).items()),
        ]
        self.sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        self.buffer = b""
        while b"\r\n\r\n" not in self.buffer:
            chunk = self.sock.recv(4096)
            if not chunk:
                raise AssertionError("the server closed the connection during the handshake")
            self.buffer += chunk
        head, self.buffer = self.buffer.split(b"\r\n\r\n", 1)
        self.status = int(head.split(b" ")[1])

    def send_text(self, text: str) -> None:
        payload = text.encode()
        mask = os.urandom(4)
        header = bytes([0x81])
        if len(payload) < 126:
            header += bytes([0x80 | len(payload)])
        else:
            header += bytes([0x80 | 126]) + struct.pack("!H", len(payload))
        masked = bytes(byte ^ mask[index % 4] for index, byte in enumerate(payload))
        self.sock.sendall(header + mask + masked)

    def _read_exact(self, count: int) -> bytes | None:
        while len(self.buffer) < count:
            chunk = self.sock.recv(65536)
            if not chunk:
                return None
            self.buffer += chunk
        data, self.buffer = self.buffer[:count], self.buffer[count:]
        return data

    def frames(self) -> Iterator[tuple[int, bytes]]:
        """Yield (opcode, payload) until the server closes the connection."""
        while True:
            head = self._read_exact(2)
            if head is None:
                return
            opcode, length = head[0] & 0x0F, head[1] & 0x7F
            if length == 126:
                length = struct.unpack("!H", self._read_exact(2) or b"\0\0")[0]
            elif length == 127:
                length = struct.unpack("!Q", self._read_exact(8) or b"\0" * 8)[0]
            payload = self._read_exact(length)
            if payload is None:
                return
            yield opcode, payload
            if opcode == 0x8:
                return

    def close(self) -> None:
        self.sock.close()


# ---------------------------------------------------------------------- tests


class TestStatus:
    def test_matches_build_status(self, harness: EngineHarness) -> None:
        response = request(harness.base, "GET", "/status")
        expected = harness.call(lambda: build_status(harness.engine.store))
        assert response.status == 200
        assert response.json() == expected

    def test_has_every_job(self, harness: EngineHarness) -> None:
        document = request(harness.base, "GET", "/status").json()
        assert sorted(document["state"]) == sorted(JOBS)

    def test_filter_by_job(self, harness: EngineHarness) -> None:
        document = request(harness.base, "GET", "/status?job=lines").json()
        assert list(document["state"]) == ["lines"]

    def test_unknown_job_is_404(self, harness: EngineHarness) -> None:
        response = request(harness.base, "GET", "/status?job=nope")
        assert response.status == 404
        assert response.json()["status"] == "error"
        assert "unknown job 'nope'" in response.json()["message"]

    def test_content_type_is_json(self, harness: EngineHarness) -> None:
        response = request(harness.base, "GET", "/status")
        assert response.headers["Content-Type"].startswith("application/json")


class TestRequestBodies:
    @pytest.mark.parametrize("path", ["/kill", "/run"])
    @pytest.mark.parametrize(
        ("raw", "fragment"),
        [
            (b"", "empty"),
            (b"{not json", "not valid JSON"),
            (b'["lines"]', "is an array, not a JSON object"),
            (b'{"name": "lines"}', "no 'job' key"),
            (b'{"job": 5}', "not a string"),
        ],
    )
    def test_malformed_body_is_400(
        self, harness: EngineHarness, path: str, raw: bytes, fragment: str
    ) -> None:
        response = request(harness.base, "POST", path, raw=raw)
        assert response.status == 400
        assert response.json()["status"] == "error"
        assert fragment in response.json()["message"]

    @pytest.mark.parametrize("path", ["/kill", "/run"])
    def test_unknown_job_is_404(self, harness: EngineHarness, path: str) -> None:
        response = request(harness.base, "POST", path, {"job": "nope"})
        assert response.status == 404
        assert "unknown job 'nope'" in response.json()["message"]

    def test_unknown_endpoint_is_json_404(self, harness: EngineHarness) -> None:
        response = request(harness.base, "GET", "/nothing-here")
        assert response.status == 404
        assert "no such endpoint" in response.json()["message"]

    def test_wrong_method_is_405(self, harness: EngineHarness) -> None:
        response = request(harness.base, "GET", "/kill")
        assert response.status == 405


class TestKill:
    def test_nothing_running_is_409(self, harness: EngineHarness) -> None:
        response = request(harness.base, "POST", "/kill", {"job": "lines"})
        assert response.status == 409
        assert response.json()["reason"] == "not_running"
        assert "no run in flight" in response.json()["message"]

    def test_kill_gives_143(self, harness: EngineHarness) -> None:
        run_id = start_run(harness, "sleeper")
        harness.wait_for_output(run_id, "minion-a", "started\n")
        response = request(harness.base, "POST", "/kill", {"job": "sleeper"})
        assert response.status == 200
        body = response.json()
        assert body["status"] == "ok"
        assert body["message"] == "Kill signal sent to job: sleeper"
        assert body["signalled"] == {run_id: ["minion-a"]}
        harness.wait_for_result(run_id)
        result = request(harness.base, "GET", f"/runs/{run_id}").json()["results"]["minion-a"]
        assert result["retcode"] == 143
        assert result["reason"] == "killed"


class TestRun:
    def test_run_starts_on_every_target(self, harness: EngineHarness) -> None:
        response = request(harness.base, "POST", "/run", {"job": "lines"})
        body = response.json()
        assert response.status == 200
        assert body["status"] == "ok"
        assert body["targets"] == list(MINIONS)
        assert body["run_id"].startswith("lines_")
        run = harness.wait_for_result(body["run_id"])
        assert run["status"] == "succeeded"

    def test_overlap_is_409(self, harness: EngineHarness) -> None:
        run_id = start_run(harness, "sleeper")
        try:
            response = request(harness.base, "POST", "/run", {"job": "sleeper"})
            body = response.json()
            assert response.status == 409
            assert body["reason"] == "overlap"
            assert body["running"] == [run_id]
            assert "still in flight" in body["message"]
        finally:
            request(harness.base, "POST", "/kill", {"job": "sleeper"})
            harness.wait_for_result(run_id)

    def test_no_targets_is_409(self, harness: EngineHarness) -> None:
        response = request(harness.base, "POST", "/run", {"job": "nowhere"})
        assert response.status == 409
        assert response.json()["reason"] == "no_targets"

    def test_global_maintenance_is_409(self, harness: EngineHarness) -> None:
        harness.write_config("zz-maintenance.yaml", {"saltpeter_maintenance": {"global": True}})
        try:
            wait_for_config(harness, lambda config: config["maintenance"]["global"])
            response = request(harness.base, "POST", "/run", {"job": "lines"})
            assert response.status == 409
            assert response.json()["reason"] == "maintenance"
            assert "global maintenance is on" in response.json()["message"]
        finally:
            harness.write_config("zz-maintenance.yaml", None)
            wait_for_config(harness, lambda config: not config["maintenance"]["global"])

    def test_every_target_in_maintenance_is_409(self, harness: EngineHarness) -> None:
        harness.write_config(
            "zz-maintenance.yaml", {"saltpeter_maintenance": {"machines": ["minion-a"]}}
        )
        try:
            wait_for_config(harness, lambda config: config["maintenance"]["machines"])
            response = request(harness.base, "POST", "/run", {"job": "sleeper"})
            assert response.status == 409
            assert response.json()["reason"] == "maintenance"
            assert "under maintenance" in response.json()["message"]
        finally:
            harness.write_config("zz-maintenance.yaml", None)
            wait_for_config(harness, lambda config: not config["maintenance"]["machines"])


def wait_for_config(harness: EngineHarness, condition: Callable[[dict[str, Any]], Any]) -> None:
    deadline = time.monotonic() + WAIT_SECONDS
    while time.monotonic() < deadline:
        if condition(request(harness.base, "GET", "/config").json()):
            return
        time.sleep(0.2)
    raise AssertionError("GET /config never showed the changed setting")


class TestConfig:
    def test_shows_runtime_settings(self, harness: EngineHarness) -> None:
        config = request(harness.base, "GET", "/config").json()
        assert config["debug"] is False
        assert config["maintenance"] == {"global": False, "machines": []}
        assert config["token_required"] is False
        assert config["jobs"] == len(JOBS)

    def test_debug_change_applies_without_restart(self, harness: EngineHarness) -> None:
        harness.write_config("zz-debug.yaml", {"saltpeter_config": {"debug": True}})
        try:
            wait_for_config(harness, lambda config: config["debug"])
        finally:
            harness.write_config("zz-debug.yaml", None)
            wait_for_config(harness, lambda config: not config["debug"])

    def test_machine_maintenance_is_listed(self, harness: EngineHarness) -> None:
        harness.write_config(
            "zz-machines.yaml", {"saltpeter_maintenance": {"machines": ["minion-b", "minion-a"]}}
        )
        try:
            wait_for_config(
                harness,
                lambda config: config["maintenance"]["machines"] == ["minion-a", "minion-b"],
            )
        finally:
            harness.write_config("zz-machines.yaml", None)
            wait_for_config(harness, lambda config: not config["maintenance"]["machines"])


class TestJobs:
    def test_lists_every_job_in_name_order(self, harness: EngineHarness) -> None:
        jobs = request(harness.base, "GET", "/jobs").json()["jobs"]
        assert [job["name"] for job in jobs] == sorted(JOBS)

    def test_entry_has_definition_and_schedule_text(self, harness: EngineHarness) -> None:
        job = request(harness.base, "GET", "/jobs?job=lines").json()["jobs"][0]
        assert job["definition"]["command"] == JOBS["lines"]["command"]
        assert job["schedule_text"] == "at 00:00 on day 1 of the month in January in 2099 (UTC)"
        assert job["next_run"] == "2099-01-01T00:00:00+00:00"

    def test_env_values_are_not_shown(self, harness: EngineHarness) -> None:
        response = request(harness.base, "GET", "/jobs?job=secretive")
        assert b"hunter2-value" not in response.body
        assert response.json()["jobs"][0]["definition"]["env"] == ["PASSWORD"]

    def test_last_result_after_a_run(self, harness: EngineHarness) -> None:
        run_id = start_run(harness, "secretive")
        harness.wait_for_result(run_id)
        job = request(harness.base, "GET", "/jobs?job=secretive").json()["jobs"][0]
        assert job["last_run_id"] == run_id
        assert job["last_status"] == "succeeded"
        assert job["last_results"]["minion-b"]["retcode"] == 0
        assert job["running"] == []

    def test_unknown_job_filter_is_404(self, harness: EngineHarness) -> None:
        assert request(harness.base, "GET", "/jobs?job=nope").status == 404


class TestRuns:
    def test_history_is_newest_first(self, harness: EngineHarness) -> None:
        first = start_run(harness, "secretive")
        harness.wait_for_result(first)
        second = start_run(harness, "secretive")
        harness.wait_for_result(second)
        runs = request(harness.base, "GET", "/runs?job=secretive&limit=2").json()["runs"]
        assert [run["run_id"] for run in runs] == [second, first]

    def test_history_has_results_without_token_hash(self, harness: EngineHarness) -> None:
        run_id = start_run(harness, "secretive")
        harness.wait_for_result(run_id)
        run = request(harness.base, "GET", "/runs?job=secretive&limit=1").json()["runs"][0]
        assert "token_hash" not in run
        assert run["results"]["minion-b"]["retcode"] == 0
        assert "output" not in run["results"]["minion-b"]

    def test_limit_is_applied(self, harness: EngineHarness) -> None:
        runs = request(harness.base, "GET", "/runs?limit=1").json()["runs"]
        assert len(runs) == 1

    @pytest.mark.parametrize("limit", ["0", "1001", "-5", "ten", "1.5"])
    def test_invalid_limit_is_400(self, harness: EngineHarness, limit: str) -> None:
        response = request(harness.base, "GET", f"/runs?limit={limit}")
        assert response.status == 400
        assert "limit" in response.json()["message"]

    def test_unknown_job_is_404(self, harness: EngineHarness) -> None:
        assert request(harness.base, "GET", "/runs?job=nope").status == 404

    def test_run_detail_has_output(self, harness: EngineHarness) -> None:
        run_id = start_run(harness, "lines")
        harness.wait_for_result(run_id)
        run = request(harness.base, "GET", f"/runs/{run_id}").json()
        assert run["status"] == "succeeded"
        assert run["results"]["minion-b"]["output"] == "".join(
            f"line {number} from minion-b\n" for number in (1, 2, 3)
        )

    def test_unknown_run_is_404(self, harness: EngineHarness) -> None:
        response = request(harness.base, "GET", "/runs/lines_1_nope")
        assert response.status == 404
        assert "not in the store" in response.json()["message"]


class TestMetrics:
    def test_prometheus_text(self, harness: EngineHarness) -> None:
        run_id = start_run(harness, "secretive")
        harness.wait_for_result(run_id)
        response = request(harness.base, "GET", "/metrics")
        assert response.status == 200
        assert response.headers["Content-Type"] == api.METRICS_CONTENT_TYPE
        assert re.search(
            rb'saltpeter_runs_started_total\{job="secretive",trigger="manual"\} [1-9]',
            response.body,
        )


class TestDashboardFiles:
    def test_index_is_served(self, harness: EngineHarness) -> None:
        response = request(harness.base, "GET", "/")
        assert response.status == 200
        assert b"<title>Saltpeter</title>" in response.body

    @pytest.mark.parametrize("name", ["app.js", "style.css"])
    def test_assets_are_served(self, harness: EngineHarness, name: str) -> None:
        assert request(harness.base, "GET", f"/dashboard/{name}").status == 200

    @pytest.mark.parametrize("name", ["index.html", "app.js", "style.css"])
    def test_nothing_loads_from_elsewhere(self, name: str) -> None:
        text = (api.DASHBOARD_DIR / name).read_text()
        assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", text)
        assert not re.search(r"""(fetch|import)\(\s*["'`]https?:""", text)
        assert "url(http" not in text

    def test_content_security_policy(self, harness: EngineHarness) -> None:
        policy = request(harness.base, "GET", "/").headers["Content-Security-Policy"]
        assert "default-src 'self'" in policy
        assert "frame-ancestors 'none'" in policy

    def test_path_outside_dashboard_is_refused(self, harness: EngineHarness) -> None:
        response = request(harness.base, "GET", "/dashboard/..%2F..%2Fapi.py")
        assert response.status in (403, 404)


class TestHostAndOrigin:
    def test_foreign_host_header_is_403(self, harness: EngineHarness) -> None:
        response = request(
            harness.base, "GET", "/status", headers={"Host": f"evil.example:{harness.api_port}"}
        )
        assert response.status == 403
        assert "Host header" in response.json()["message"]

    def test_localhost_host_header_is_accepted(self, harness: EngineHarness) -> None:
        response = request(
            harness.base, "GET", "/status", headers={"Host": f"localhost:{harness.api_port}"}
        )
        assert response.status == 200

    def test_post_from_foreign_origin_is_403(self, harness: EngineHarness) -> None:
        response = request(
            harness.base,
            "POST",
            "/kill",
            {"job": "lines"},
            headers={"Origin": "http://evil.example"},
        )
        assert response.status == 403

    def test_post_from_same_site_other_port_is_403(self, harness: EngineHarness) -> None:
        response = request(
            harness.base,
            "POST",
            "/kill",
            {"job": "lines"},
            headers={"Origin": "http://127.0.0.1:1", "Sec-Fetch-Site": "same-site"},
        )
        assert response.status == 403

    def test_post_from_own_origin_is_accepted(self, harness: EngineHarness) -> None:
        response = request(
            harness.base,
            "POST",
            "/kill",
            {"job": "lines"},
            headers={"Origin": harness.base, "Sec-Fetch-Site": "same-origin"},
        )
        assert response.status == 409

    def test_websocket_from_foreign_origin_is_403(self, harness: EngineHarness) -> None:
        with pytest.raises(tornado.httpclient.HTTPClientError) as caught:
            LiveClient(ws_url(harness), {"Origin": "http://evil.example"})
        assert caught.value.code == 403

    def test_websocket_from_other_port_is_403(self, harness: EngineHarness) -> None:
        with pytest.raises(tornado.httpclient.HTTPClientError) as caught:
            LiveClient(ws_url(harness), {"Origin": f"http://127.0.0.1:{harness.api_port + 1}"})
        assert caught.value.code == 403

    def test_websocket_from_own_origin_is_accepted(self, harness: EngineHarness) -> None:
        client = LiveClient(ws_url(harness), {"Origin": harness.base})
        client.send({"subscribe": "lines"})
        assert client.receive()["type"] == "subscribed"
        client.close()


class TestToken:
    def test_missing_token_is_401(self, token_harness: EngineHarness) -> None:
        response = request(token_harness.base, "GET", "/status")
        assert response.status == 401
        assert response.headers["WWW-Authenticate"].startswith("Bearer")

    def test_wrong_token_is_401(self, token_harness: EngineHarness) -> None:
        headers = {"Authorization": "Bearer wrong"}
        assert request(token_harness.base, "GET", "/status", headers=headers).status == 401

    def test_wrong_scheme_is_401(self, token_harness: EngineHarness) -> None:
        headers = {"Authorization": f"Basic {TOKEN}"}
        assert request(token_harness.base, "GET", "/status", headers=headers).status == 401

    def test_header_token_is_accepted(self, token_harness: EngineHarness) -> None:
        headers = {"Authorization": f"Bearer {TOKEN}"}
        assert request(token_harness.base, "GET", "/status", headers=headers).status == 200

    @pytest.mark.parametrize(
        ("method", "path"),
        [
            ("GET", "/jobs"),
            ("GET", "/runs"),
            ("GET", "/metrics"),
            ("GET", "/config"),
            ("POST", "/kill"),
            ("POST", "/run"),
        ],
    )
    def test_every_endpoint_needs_it(
        self, token_harness: EngineHarness, method: str, path: str
    ) -> None:
        body = {"job": "lines"} if method == "POST" else None
        assert request(token_harness.base, method, path, body).status == 401

    def test_dashboard_files_need_no_token(self, token_harness: EngineHarness) -> None:
        assert request(token_harness.base, "GET", "/").status == 200

    def test_login_sets_strict_httponly_cookie(self, token_harness: EngineHarness) -> None:
        response = request(token_harness.base, "POST", "/login", {"token": TOKEN})
        cookie = response.headers["Set-Cookie"]
        assert response.status == 200
        assert cookie.startswith(f"{api.SESSION_COOKIE}=")
        assert "HttpOnly" in cookie
        assert "SameSite=Strict" in cookie
        assert TOKEN not in cookie

    def test_login_form_post_is_accepted(self, token_harness: EngineHarness) -> None:
        response = request(
            token_harness.base,
            "POST",
            "/login",
            raw=f"token={TOKEN}".encode(),
            headers={"Content-Type": "application/x-www-form-urlencoded"},
        )
        assert response.status == 200

    def test_login_with_wrong_token_is_401(self, token_harness: EngineHarness) -> None:
        response = request(token_harness.base, "POST", "/login", {"token": "wrong"})
        assert response.status == 401
        assert "Set-Cookie" not in response.headers

    def test_cookie_is_accepted(self, token_harness: EngineHarness) -> None:
        cookie = (
            request(token_harness.base, "POST", "/login", {"token": TOKEN})
            .headers["Set-Cookie"]
            .split(";")[0]
        )
        response = request(token_harness.base, "GET", "/status", headers={"Cookie": cookie})
        assert response.status == 200

    def test_wrong_cookie_is_401(self, token_harness: EngineHarness) -> None:
        headers = {"Cookie": f"{api.SESSION_COOKIE}=0123abcd"}
        assert request(token_harness.base, "GET", "/status", headers=headers).status == 401

    def test_logout_clears_cookie(self, token_harness: EngineHarness) -> None:
        response = request(token_harness.base, "POST", "/logout")
        assert response.status == 200
        assert f'{api.SESSION_COOKIE}=""' in response.headers["Set-Cookie"]

    def test_foreign_host_is_accepted_with_token(self, token_harness: EngineHarness) -> None:
        headers = {
            "Authorization": f"Bearer {TOKEN}",
            "Host": f"saltpeter.example:{token_harness.api_port}",
        }
        assert request(token_harness.base, "GET", "/status", headers=headers).status == 200

    def test_websocket_without_token_is_401(self, token_harness: EngineHarness) -> None:
        with pytest.raises(tornado.httpclient.HTTPClientError) as caught:
            LiveClient(ws_url(token_harness))
        assert caught.value.code == 401

    def test_websocket_with_cookie_is_accepted(self, token_harness: EngineHarness) -> None:
        cookie = (
            request(token_harness.base, "POST", "/login", {"token": TOKEN})
            .headers["Set-Cookie"]
            .split(";")[0]
        )
        client = LiveClient(ws_url(token_harness), {"Cookie": cookie})
        client.send({"subscribe": "lines"})
        assert client.receive()["type"] == "subscribed"
        client.close()

    def test_websocket_with_header_is_accepted(self, token_harness: EngineHarness) -> None:
        client = LiveClient(ws_url(token_harness), {"Authorization": f"Bearer {TOKEN}"})
        client.send({"subscribe": "*"})
        assert client.receive()["jobs"] == "*"
        client.close()


class TestBindAddress:
    @pytest.mark.parametrize("address", ["0.0.0.0", "", "192.0.2.10", "::", "saltpeter.example"])
    def test_non_loopback_without_token_is_refused(self, address: str) -> None:
        with pytest.raises(api.ApiConfigError) as caught:
            api.check_bind(address, "")
        assert "api_token" in str(caught.value)

    @pytest.mark.parametrize("address", ["127.0.0.1", "127.0.0.2", "::1", "localhost"])
    def test_loopback_without_token_is_allowed(self, address: str) -> None:
        api.check_bind(address, "")

    def test_non_loopback_with_token_is_allowed(self) -> None:
        api.check_bind("0.0.0.0", "a-token")

    def test_listen_raises_before_binding(self, harness: EngineHarness) -> None:
        port = free_port()
        with pytest.raises(api.ApiConfigError):
            harness.call(lambda: api.listen(harness.engine, port, "0.0.0.0"))


class TestWebSocketMessages:
    def test_subscribe_is_acknowledged(self, live: LiveClient) -> None:
        live.send({"subscribe": ["lines", "sleeper"], "id": 7})
        assert live.receive() == {"type": "subscribed", "id": 7, "jobs": ["lines", "sleeper"]}

    def test_unsubscribe_is_acknowledged(self, live: LiveClient) -> None:
        live.send({"subscribe": ["lines", "sleeper"]})
        live.receive()
        live.send({"unsubscribe": "lines"})
        assert live.receive()["jobs"] == ["sleeper"]

    @pytest.mark.parametrize(
        ("message", "fragment"),
        [
            ("{not json", "not valid JSON"),
            ('["lines"]', "is an array"),
            ('{"subscribe": 5}', "subscribe takes"),
            ('{"unsubscribe": {"a": 1}}', "unsubscribe takes"),
            ('{"subscribe": "nope"}', "unknown job(s): nope"),
            ('{"hello": "lines"}', "unknown keys: hello"),
            ('{"subscribe": "lines", "run": "lines"}', "exactly one"),
            ('{"run": ["lines"]}', "job name as a string"),
        ],
    )
    def test_malformed_message_keeps_connection(
        self, live: LiveClient, message: str, fragment: str
    ) -> None:
        live.send(message)
        error = live.receive()
        assert error["type"] == "error"
        assert fragment in error["message"]
        live.send({"subscribe": "lines"})
        assert live.receive()["type"] == "subscribed"

    def test_kill_without_run_is_409_result(self, live: LiveClient) -> None:
        live.send({"killCron": "lines", "id": "k1"})
        result = live.receive()
        assert result["type"] == "result"
        assert result["action"] == "kill"
        assert result["code"] == 409
        assert result["status"] == "error"
        assert result["id"] == "k1"

    def test_run_unknown_job_is_404_result(self, live: LiveClient) -> None:
        live.send({"run": "nope"})
        result = live.receive()
        assert result["code"] == 404
        assert result["status"] == "error"


class TestWebSocketStreams:
    def test_events_of_a_run(self, harness: EngineHarness, live: LiveClient) -> None:
        live.send({"subscribe": "secretive"})
        live.receive()
        live.send({"run": "secretive"})
        messages = live.receive_until(is_event("saltpeter/job/secretive/complete"))
        tags = [message["tag"] for message in messages if message["type"] == "event"]
        assert tags == [
            "saltpeter/job/secretive/start",
            "saltpeter/job/secretive/minion-b/start",
            "saltpeter/job/secretive/minion-b/complete",
            "saltpeter/job/secretive/complete",
        ]

    def test_run_result_message(self, harness: EngineHarness, live: LiveClient) -> None:
        live.send({"run": "secretive", "id": 3})
        result = live.receive_until(is_type("result"))[-1]
        assert result["action"] == "run"
        assert result["code"] == 200
        assert result["status"] == "ok"
        assert result["id"] == 3
        harness.wait_for_result(result["run_id"])

    def test_output_concatenation_equals_stored_output(
        self, harness: EngineHarness, live: LiveClient
    ) -> None:
        live.send({"subscribe": "chatty"})
        live.receive()
        run_id = start_run(harness, "chatty")
        messages = live.receive_until(is_event("saltpeter/job/chatty/complete"))
        stored = request(harness.base, "GET", f"/runs/{run_id}").json()["results"]
        for machine in MINIONS:
            chunks = [
                message["data"]
                for message in messages
                if message["type"] == "output" and message["machine"] == machine
            ]
            assert len(chunks) > 1
            assert "".join(chunks) == stored[machine]["output"]

    def test_output_message_shape(self, harness: EngineHarness, live: LiveClient) -> None:
        live.send({"subscribe": "secretive"})
        live.receive()
        run_id = start_run(harness, "secretive")
        output = live.receive_until(is_type("output"))[-1]
        assert output == {
            "type": "output",
            "job": "secretive",
            "run_id": run_id,
            "machine": "minion-b",
            "data": "done\n",
        }
        harness.wait_for_result(run_id)

    def test_other_jobs_are_not_streamed(self, harness: EngineHarness, live: LiveClient) -> None:
        live.send({"subscribe": "sleeper"})
        live.receive()
        run_id = start_run(harness, "secretive")
        harness.wait_for_result(run_id)
        live.send({"unsubscribe": "sleeper"})
        reply = live.receive()
        assert reply["type"] == "unsubscribed"

    def test_unsubscribed_job_stops_streaming(
        self, harness: EngineHarness, live: LiveClient
    ) -> None:
        live.send({"subscribe": ["secretive", "sleeper"]})
        live.receive()
        live.send({"unsubscribe": "secretive"})
        live.receive()
        run_id = start_run(harness, "secretive")
        harness.wait_for_result(run_id)
        live.send({"subscribe": "lines"})
        assert live.receive()["type"] == "subscribed"

    def test_late_subscriber_gets_snapshot(self, harness: EngineHarness, live: LiveClient) -> None:
        run_id = start_run(harness, "slow_start")
        harness.wait_for_output(run_id, "minion-b", "first\n")
        live.send({"subscribe": "slow_start"})
        messages = live.receive_until(is_event("saltpeter/job/slow_start/complete"))
        snapshot = next(message for message in messages if message["type"] == "snapshot")
        later = "".join(
            message["data"]
            for message in messages
            if message["type"] == "output" and message["run_id"] == run_id
        )
        assert snapshot["run_id"] == run_id
        assert snapshot["machines"]["minion-b"]["output"] == "first\n"
        assert later == "second\n"

    def test_kill_through_websocket_gives_143(
        self, harness: EngineHarness, live: LiveClient
    ) -> None:
        live.send({"subscribe": "sleeper"})
        live.receive()
        run_id = start_run(harness, "sleeper")
        harness.wait_for_output(run_id, "minion-a", "started\n")
        live.send({"killCron": "sleeper"})
        messages = live.receive_until(is_event("saltpeter/job/sleeper/minion-a/complete"))
        result = next(message for message in messages if message["type"] == "result")
        complete = messages[-1]["data"]
        assert result["code"] == 200
        assert result["signalled"] == {run_id: ["minion-a"]}
        assert complete["retcode"] == 143
        harness.wait_idle("sleeper")

    def test_observer_is_removed_on_close(self, harness: EngineHarness) -> None:
        before = harness.call(lambda: len(harness.engine.manager.observers))
        client = LiveClient(ws_url(harness))
        client.send({"subscribe": "lines"})
        client.receive()
        during = harness.call(lambda: len(harness.engine.manager.observers))
        client.close()
        deadline = time.monotonic() + 10
        while harness.call(lambda: len(harness.engine.manager.observers)) != before:
            assert time.monotonic() < deadline, "the closed client is still an observer"
            time.sleep(0.05)
        assert during == before + 1


class SlowServer:
    """A second API server on the engine's loop with small per-connection limits."""

    def __init__(self, harness: EngineHarness, **limits: int) -> None:
        self.harness = harness
        self.port = free_port()
        # No pings: a client that does not read would miss the pongs and be dropped
        # for that instead.
        context = api.ApiContext(
            engine=harness.engine, address="127.0.0.1", ping_seconds=0, **limits
        )
        self.server = harness.call(lambda: self._listen(context))

    def _listen(self, context: api.ApiContext) -> Any:
        server = tornado.httpserver.HTTPServer(api.make_app(context))
        server.listen(self.port, "127.0.0.1")
        return server

    def stop(self) -> None:
        self.harness.call(self.server.stop)


class TestSlowClients:
    def test_output_is_dropped_and_reported(self, harness: EngineHarness) -> None:
        slow = SlowServer(harness, output_pause_bytes=64 * 1024, output_resume_bytes=16 * 1024)
        client = RawWebSocket(slow.port)
        try:
            assert client.status == 101
            client.send_text(json.dumps({"subscribe": "flood"}))
            run_id = start_run(harness, "flood")
            harness.wait_for_result(run_id)
            received = 0
            dropped = 0
            for opcode, payload in client.frames():
                if opcode != 0x1:
                    continue
                message = json.loads(payload)
                if message["type"] == "output":
                    received += len(message["data"])
                elif message["type"] == "output_dropped":
                    dropped += message["chars"]
                if received + dropped >= FLOOD_CHARS:
                    break
            assert dropped > 0
            assert received + dropped == FLOOD_CHARS
        finally:
            client.close()
            slow.stop()

    def test_client_that_never_reads_is_closed(self, harness: EngineHarness) -> None:
        before = harness.call(lambda: len(harness.engine.manager.observers))
        slow = SlowServer(
            harness,
            output_pause_bytes=64 * 1024 * 1024,
            output_resume_bytes=16 * 1024,
            close_bytes=512 * 1024,
        )
        client = RawWebSocket(slow.port)
        try:
            client.send_text(json.dumps({"subscribe": "flood"}))
            run_id = start_run(harness, "flood")
            harness.wait_for_result(run_id)
            deadline = time.monotonic() + WAIT_SECONDS
            while harness.call(lambda: len(harness.engine.manager.observers)) != before:
                assert time.monotonic() < deadline, "the slow client was never dropped"
                time.sleep(0.1)
        finally:
            client.close()
            slow.stop()


class TestDescribeSchedule:
    @staticmethod
    def words(zone: str = "UTC", **fields: str) -> str:
        schedule = {"sec": "0", "min": "*", "hour": "*", "dom": "*", "mon": "*", "dow": "*"}
        schedule["year"] = "*"
        schedule.update(fields)
        return api.describe_schedule(schedule, zone)

    @pytest.mark.parametrize(
        ("fields", "expected"),
        [
            ({"sec": "*/15"}, "every 15 seconds"),
            ({"sec": "30"}, "at second 30 of every minute"),
            ({}, "every minute"),
            ({"min": "*/5"}, "every 5 minutes"),
            ({"min": "0,30"}, "at minutes 0 and 30 of every hour"),
            ({"min": "30", "hour": "2"}, "at 02:30 (UTC)"),
            ({"sec": "5", "min": "0", "hour": "3"}, "at 03:00:05 (UTC)"),
            (
                {"min": "0", "hour": "9-17", "dow": "1-5"},
                "at minute 0 of hours 9 through 17 on Monday through Friday (UTC)",
            ),
            (
                {"min": "0", "hour": "0", "dow": "mon-fri"},
                "at 00:00 on Monday through Friday (UTC)",
            ),
            ({"min": "0", "hour": "0", "dow": "7"}, "at 00:00 on Sunday (UTC)"),
            (
                {"min": "0", "hour": "0", "dom": "1", "dow": "0"},
                "at 00:00 on day 1 of the month or on Sunday (UTC)",
            ),
            ({"min": "0", "hour": "0", "mon": "jan,jul"}, "at 00:00 in January and July (UTC)"),
            (
                {"min": "*/10", "hour": "8-18/2"},
                "every 10 minutes of every 2 hours from hour 8 through 18 (UTC)",
            ),
        ],
    )
    def test_phrases(self, fields: dict[str, str], expected: str) -> None:
        assert self.words(**fields) == expected

    def test_zone_is_named_for_wall_clock_times(self) -> None:
        assert self.words("Europe/Berlin", min="0", hour="2") == "at 02:00 (Europe/Berlin)"

    def test_zone_is_left_out_for_intervals(self) -> None:
        assert self.words("Europe/Berlin", min="*/5") == "every 5 minutes"
