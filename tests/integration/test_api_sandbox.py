"""The HTTP API and the /ws WebSocket of the engine in a real sandbox.

The sandbox runs a real salt-master with the Saltpeter engine (``api_ws: true``
and an ``api_token``) and three real minions. The tests compare the API with the
``saltpeter.status`` runner, start and kill runs through HTTP and the WebSocket,
and check that streamed output equals the output the engine stored.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import tornado.httpclient
import tornado.websocket
import yaml

from saltpeter.sandbox import Sandbox

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="jobs run as other users")

TOKEN = "integration-api-token-8d1e"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
WAIT_SECONDS = 60.0
DORMANT = {"sec": 0, "min": 0, "hour": 0, "dom": 1, "mon": 1, "dow": "*", "year": 2099}

JOBS: dict[str, dict[str, Any]] = {
    "chatty": {
        **DORMANT,
        "targets": "minion-1,minion-2",
        "target_type": "list",
        "command": 'for i in $(seq 1 5); do seq 1 400; echo "step $i on $SP_MACHINE_ID" >&2; '
        "sleep 0.3; done; printf 'no newline at the end'",
    },
    "sleeper": {
        **DORMANT,
        "targets": "minion-3",
        "target_type": "list",
        "command": "echo started; sleep 300",
    },
    "quick": {
        **DORMANT,
        "targets": "*",
        "command": 'echo "hello from $SP_MACHINE_ID"',
    },
}


@pytest.fixture(scope="module")
def jobs_dir(short_tmp_dir: Callable[[str], Path]) -> Path:
    directory = short_tmp_dir("jobs")
    (directory / "api.yaml").write_text(yaml.safe_dump(JOBS))
    return directory


@pytest.fixture(scope="module")
def sandbox_settings() -> dict[str, object]:
    return {"api_ws": True, "api_token": TOKEN}


class Response:
    def __init__(self, status: int, body: bytes) -> None:
        self.status = status
        self.body = body

    def json(self) -> Any:
        return json.loads(self.body)


def request(
    sandbox: Sandbox,
    method: str,
    path: str,
    body: object = None,
    headers: dict[str, str] | None = None,
) -> Response:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(
        f"http://127.0.0.1:{sandbox.api_port}{path}",
        data=data,
        method=method,
        headers=AUTH if headers is None else headers,
    )
    try:
        with urllib.request.urlopen(req, timeout=WAIT_SECONDS) as answer:
            return Response(answer.status, answer.read())
    except urllib.error.HTTPError as error:
        return Response(error.code, error.read())


class LiveClient:
    """A /ws client on its own event loop, driven from the test thread."""

    def __init__(self, sandbox: Sandbox) -> None:
        self.loop = asyncio.new_event_loop()
        req = tornado.httpclient.HTTPRequest(f"ws://127.0.0.1:{sandbox.api_port}/ws", headers=AUTH)

        async def connect() -> tornado.websocket.WebSocketClientConnection:
            return await tornado.websocket.websocket_connect(req)

        self.connection = self.loop.run_until_complete(asyncio.wait_for(connect(), 30))

    def send(self, message: object) -> None:
        async def write() -> None:
            await self.connection.write_message(json.dumps(message))

        self.loop.run_until_complete(write())

    def receive_until(
        self, done: Callable[[dict[str, Any]], bool], timeout: float = WAIT_SECONDS
    ) -> list[dict[str, Any]]:
        """Collect messages up to and including the first one for which ``done`` is true."""

        async def read(remaining: float) -> Any:
            return await asyncio.wait_for(self.connection.read_message(), remaining)

        messages: list[dict[str, Any]] = []
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                kinds = [message.get("type") for message in messages]
                raise AssertionError(f"no expected message within {timeout:g} s; got {kinds}")
            text = self.loop.run_until_complete(read(remaining))
            if text is None:
                raise AssertionError("the server closed the connection")
            messages.append(json.loads(text))
            if done(messages[-1]):
                return messages

    def close(self) -> None:
        async def shut() -> None:
            # Inside the loop: closing writes a frame, which needs a running loop.
            self.connection.close()
            await asyncio.sleep(0.05)

        self.loop.run_until_complete(shut())
        self.loop.close()


@pytest.fixture
def live(sandbox: Sandbox) -> Iterator[LiveClient]:
    client = LiveClient(sandbox)
    yield client
    client.close()


def is_event(tag: str) -> Callable[[dict[str, Any]], bool]:
    return lambda message: message.get("type") == "event" and message.get("tag") == tag


def is_result(action: str) -> Callable[[dict[str, Any]], bool]:
    return lambda message: message.get("type") == "result" and message.get("action") == action


def wait_for_run(sandbox: Sandbox, run_id: str) -> dict[str, Any]:
    deadline = time.monotonic() + WAIT_SECONDS
    while time.monotonic() < deadline:
        run = request(sandbox, "GET", f"/runs/{run_id}").json()
        if run["status"] != "running":
            return run
        time.sleep(0.3)
    raise AssertionError(f"run {run_id} did not finish within {WAIT_SECONDS:g} s")


def wait_for_output(sandbox: Sandbox, run_id: str, machine: str, text: str) -> None:
    deadline = time.monotonic() + WAIT_SECONDS
    while time.monotonic() < deadline:
        results = request(sandbox, "GET", f"/runs/{run_id}").json()["results"]
        if text in results.get(machine, {}).get("output", ""):
            return
        time.sleep(0.3)
    raise AssertionError(f"output of {run_id} on {machine} never contained {text!r}")


class TestStatus:
    def test_matches_the_runner(self, sandbox: Sandbox) -> None:
        runner = sandbox.salt_run("saltpeter.status")
        response = request(sandbox, "GET", "/status")
        assert response.status == 200
        assert response.json() == runner

    def test_job_filter_matches_the_runner(self, sandbox: Sandbox) -> None:
        runner = sandbox.salt_run("saltpeter.status", "job=quick")
        assert request(sandbox, "GET", "/status?job=quick").json() == runner

    def test_token_is_required(self, sandbox: Sandbox) -> None:
        assert request(sandbox, "GET", "/status", headers={}).status == 401

    def test_dashboard_is_served(self, sandbox: Sandbox) -> None:
        response = request(sandbox, "GET", "/", headers={})
        assert response.status == 200
        assert b"<title>Saltpeter</title>" in response.body


class TestHttp:
    def test_run_reaches_every_minion(self, sandbox: Sandbox) -> None:
        response = request(sandbox, "POST", "/run", {"job": "quick"})
        assert response.status == 200
        run = wait_for_run(sandbox, response.json()["run_id"])
        assert run["status"] == "succeeded"
        assert {machine: result["output"] for machine, result in run["results"].items()} == {
            name: f"hello from {name}\n" for name in sandbox.minion_ids
        }

    def test_run_and_kill(self, sandbox: Sandbox) -> None:
        run_id = request(sandbox, "POST", "/run", {"job": "sleeper"}).json()["run_id"]
        wait_for_output(sandbox, run_id, "minion-3", "started\n")
        overlap = request(sandbox, "POST", "/run", {"job": "sleeper"})
        killed = request(sandbox, "POST", "/kill", {"job": "sleeper"})
        run = wait_for_run(sandbox, run_id)
        assert overlap.status == 409
        assert overlap.json()["reason"] == "overlap"
        assert killed.status == 200
        assert killed.json()["signalled"] == {run_id: ["minion-3"]}
        assert run["results"]["minion-3"]["retcode"] == 143

    def test_kill_without_run_is_409(self, sandbox: Sandbox) -> None:
        assert request(sandbox, "POST", "/kill", {"job": "quick"}).status == 409

    def test_history_lists_the_runs(self, sandbox: Sandbox) -> None:
        run_id = request(sandbox, "POST", "/run", {"job": "quick"}).json()["run_id"]
        wait_for_run(sandbox, run_id)
        runs = request(sandbox, "GET", "/runs?job=quick&limit=1").json()["runs"]
        assert [run["run_id"] for run in runs] == [run_id]


class TestWebSocket:
    def test_streamed_output_equals_stored_output(self, sandbox: Sandbox, live: LiveClient) -> None:
        live.send({"subscribe": "chatty"})
        live.send({"run": "chatty"})
        messages = live.receive_until(is_event("saltpeter/job/chatty/complete"))
        result = next(message for message in messages if is_result("run")(message))
        run_id = result["run_id"]
        stored = request(sandbox, "GET", f"/runs/{run_id}").json()["results"]
        for machine in ("minion-1", "minion-2"):
            streamed = "".join(
                message["data"]
                for message in messages
                if message["type"] == "output" and message["machine"] == machine
            )
            assert streamed == stored[machine]["output"]
            assert streamed.endswith("no newline at the end")

    def test_events_match_the_event_bus(
        self, sandbox: Sandbox, live: LiveClient, events: Any
    ) -> None:
        live.send({"subscribe": "quick"})
        live.send({"run": "quick"})
        messages = live.receive_until(is_event("saltpeter/job/quick/complete"))
        run_id = next(message for message in messages if is_result("run")(message))["run_id"]
        events.wait("saltpeter/job/quick/complete")
        on_bus = [
            tag for tag, data in events.all("saltpeter/job/quick/.*") if data["run_id"] == run_id
        ]
        on_ws = [message["tag"] for message in messages if message["type"] == "event"]
        assert sorted(on_ws) == sorted(on_bus)

    def test_run_and_kill(self, sandbox: Sandbox, live: LiveClient) -> None:
        live.send({"subscribe": "sleeper"})
        live.send({"run": "sleeper", "id": "start"})
        started = live.receive_until(
            lambda message: message.get("type") == "output" and "started" in message["data"]
        )
        result = next(message for message in started if is_result("run")(message))
        live.send({"killCron": "sleeper", "id": "stop"})
        finished = live.receive_until(is_event("saltpeter/job/sleeper/minion-3/complete"))
        kill = next(message for message in finished if is_result("kill")(message))
        assert result["code"] == 200
        assert result["id"] == "start"
        assert kill["code"] == 200
        assert kill["signalled"] == {result["run_id"]: ["minion-3"]}
        assert finished[-1]["data"]["retcode"] == 143
        wait_for_run(sandbox, result["run_id"])


class TestEveryEndpoint:
    """Each endpoint and each error status, against the engine in the sandbox."""

    def test_jobs_lists_definitions(self, sandbox: Sandbox) -> None:
        body = request(sandbox, "GET", "/jobs").json()
        text = json.dumps(body)
        assert "chatty" in text
        assert "sleeper" in text
        assert "quick" in text

    def test_runs_history_and_limit(self, sandbox: Sandbox) -> None:
        run_id = request(sandbox, "POST", "/run", {"job": "quick"}).json()["run_id"]
        wait_for_run(sandbox, run_id)
        response = request(sandbox, "GET", "/runs?job=quick&limit=1")
        assert response.status == 200
        assert run_id in json.dumps(response.json())

    @pytest.mark.parametrize("limit", ["0", "1001", "many"])
    def test_runs_bad_limit_is_400(self, sandbox: Sandbox, limit: str) -> None:
        assert request(sandbox, "GET", f"/runs?job=quick&limit={limit}").status == 400

    def test_unknown_run_id_is_404(self, sandbox: Sandbox) -> None:
        assert request(sandbox, "GET", "/runs/quick_0000000000").status == 404

    def test_metrics_are_prometheus_text(self, sandbox: Sandbox) -> None:
        run_id = request(sandbox, "POST", "/run", {"job": "quick"}).json()["run_id"]
        wait_for_run(sandbox, run_id)
        text = request(sandbox, "GET", "/metrics").body.decode()
        assert 'saltpeter_runs_started_total{job="quick",trigger="manual"}' in text
        assert "saltpeter_dispatch_lateness_seconds_bucket" in text

    def test_config_shows_maintenance_and_debug(self, sandbox: Sandbox) -> None:
        body = request(sandbox, "GET", "/config").json()
        assert "debug" in json.dumps(body)
        assert "maintenance" in json.dumps(body)

    @pytest.mark.parametrize("path", ["/run", "/kill"])
    @pytest.mark.parametrize("body", [b"not json", b"[]", b'{"job": 5}', b"{}"])
    def test_malformed_body_is_400(self, sandbox: Sandbox, path: str, body: bytes) -> None:
        req = urllib.request.Request(
            f"http://127.0.0.1:{sandbox.api_port}{path}", data=body, method="POST", headers=AUTH
        )
        with pytest.raises(urllib.error.HTTPError) as caught:
            urllib.request.urlopen(req, timeout=WAIT_SECONDS)
        assert caught.value.code == 400

    @pytest.mark.parametrize(("method", "path"), [("POST", "/run"), ("POST", "/kill")])
    def test_unknown_job_is_404(self, sandbox: Sandbox, method: str, path: str) -> None:
        response = request(sandbox, method, path, {"job": "no_such_job"})
        assert response.status == 404
        assert "no_such_job" in response.json()["message"]

    def test_unknown_job_status_is_404(self, sandbox: Sandbox) -> None:
        assert request(sandbox, "GET", "/status?job=no_such_job").status == 404

    def test_overlapping_run_is_409(self, sandbox: Sandbox) -> None:
        run_id = request(sandbox, "POST", "/run", {"job": "sleeper"}).json()["run_id"]
        try:
            response = request(sandbox, "POST", "/run", {"job": "sleeper"})
            assert response.status == 409
            assert "overlap" in json.dumps(response.json())
        finally:
            assert request(sandbox, "POST", "/kill", {"job": "sleeper"}).status == 200
        assert wait_for_run(sandbox, run_id)["status"] == "failed"


async def open_websocket(
    req: tornado.httpclient.HTTPRequest,
) -> tornado.websocket.WebSocketClientConnection:
    return await tornado.websocket.websocket_connect(req)


class TestAccess:
    def test_wrong_token_is_401(self, sandbox: Sandbox) -> None:
        headers = {"Authorization": "Bearer wrong"}
        assert request(sandbox, "GET", "/jobs", headers=headers).status == 401

    def test_login_cookie_grants_access(self, sandbox: Sandbox) -> None:
        opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor())
        base = f"http://127.0.0.1:{sandbox.api_port}"
        login = urllib.request.Request(
            f"{base}/login", data=json.dumps({"token": TOKEN}).encode(), method="POST"
        )
        with opener.open(login, timeout=WAIT_SECONDS) as answer:
            assert answer.status == 200
        with opener.open(f"{base}/jobs", timeout=WAIT_SECONDS) as answer:
            assert answer.status == 200

    def test_wrong_login_is_401(self, sandbox: Sandbox) -> None:
        assert request(sandbox, "POST", "/login", {"token": "wrong"}, headers={}).status == 401

    def test_foreign_origin_post_is_403(self, sandbox: Sandbox) -> None:
        headers = {**AUTH, "Origin": "https://evil.example"}
        assert request(sandbox, "POST", "/run", {"job": "quick"}, headers=headers).status == 403

    def test_foreign_origin_websocket_is_refused(self, sandbox: Sandbox) -> None:
        req = tornado.httpclient.HTTPRequest(
            f"ws://127.0.0.1:{sandbox.api_port}/ws",
            headers={**AUTH, "Origin": "https://evil.example"},
        )
        with pytest.raises(tornado.httpclient.HTTPClientError) as caught:
            asyncio.run(open_websocket(req))
        assert caught.value.code == 403

    def test_websocket_without_token_is_refused(self, sandbox: Sandbox) -> None:
        req = tornado.httpclient.HTTPRequest(f"ws://127.0.0.1:{sandbox.api_port}/ws")
        with pytest.raises(tornado.httpclient.HTTPClientError) as caught:
            asyncio.run(open_websocket(req))
        assert caught.value.code == 401
