"""Fuzz the machines WebSocket with malformed and adversarial frames.

A live server (the real server, run manager and SQLite store, in its own
process from server_process.py, on 127.0.0.1) receives at least 10,000
frames that Hypothesis generates: arbitrary text and bytes, JSON of any
shape, frames of every type with fields of the wrong type or range, hellos
with wrong tokens, runs and minions, and sequenced frames with random
sequence numbers after a valid hello. Afterwards the server must still be
up, run a well-formed job through the real wrapper, and have grown by less
than MEMORY_BOUND_BYTES of resident memory after its warm-up.
"""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import tornado.websocket
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from saltpeter import minion, wrapper

MESSAGES_REQUIRED = 10_000
MEMORY_BOUND_BYTES = 32 * 1024 * 1024
SERVER_SCRIPT = Path(__file__).with_name("server_process.py")

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the final run uses the wrapper as root")


class Server:
    def __init__(self, tmp_path: Path) -> None:
        self.store_path = tmp_path / "fuzz.db"
        self.process = subprocess.Popen(
            [sys.executable, str(SERVER_SCRIPT), str(self.store_path)],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.process.stdout is not None
        self.info: dict[str, Any] = json.loads(self.process.stdout.readline())
        self.url = f"ws://127.0.0.1:{self.info['port']}/wrapper"

    def rss_bytes(self) -> int:
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise AssertionError("no VmRSS in /proc status")

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=10)


@pytest.fixture(scope="module")
def live_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    running = Server(tmp_path_factory.mktemp("fuzz"))
    yield running
    running.stop()


SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=40),
)
JSON_VALUES = st.recursive(
    SCALARS,
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5)
    ),
    max_leaves=20,
)
FRAME_TYPES = st.sampled_from(
    ["hello", "start", "output", "complete", "heartbeat", "ack", "kill", "", "HELLO"]
) | st.text(max_size=12)
FIELD_NAMES = st.sampled_from(
    [
        "protocol",
        "run",
        "machine",
        "token",
        "need_job",
        "seq",
        "pid",
        "data",
        "retcode",
        "reason",
        "time",
        "signal",
    ]
)


def typed_frames() -> st.SearchStrategy[str]:
    fields = st.dictionaries(FIELD_NAMES, JSON_VALUES, max_size=8)
    return st.builds(lambda kind, rest: json.dumps({**rest, "type": kind}), FRAME_TYPES, fields)


def sequenced_frames() -> st.SearchStrategy[str]:
    seq = st.integers(min_value=-5, max_value=50)
    start = st.builds(lambda n: json.dumps({"type": "start", "seq": n, "pid": 1, "time": "t"}), seq)
    output = st.builds(
        lambda n, text: json.dumps({"type": "output", "seq": n, "data": text}),
        seq,
        st.text(max_size=200),
    )
    complete = st.builds(
        lambda n, code, reason: json.dumps(
            {"type": "complete", "seq": n, "retcode": code, "reason": reason, "time": "t"}
        ),
        seq,
        st.integers(min_value=-(2**40), max_value=2**40),
        st.sampled_from(["exit", "signal", "timeout", "killed", "start_failed", "bogus"]),
    )
    return start | output | complete | st.just(json.dumps({"type": "heartbeat"}))


def hello_frames(info: dict[str, Any]) -> st.SearchStrategy[str]:
    def hello(run: str, machine: str, token: str, protocol: object) -> str:
        return json.dumps(
            {
                "type": "hello",
                "protocol": protocol,
                "run": run,
                "machine": machine,
                "token": token,
                "need_job": True,
            }
        )

    return st.builds(
        hello,
        st.sampled_from([info["fuzz_run"], "no_such_run_1"]) | st.text(max_size=20),
        st.sampled_from([info["machine"], "intruder"]),
        st.sampled_from([info["fuzz_token"], info["final_token"], "forged"]),
        st.sampled_from([1, 1, 1, 2, "1", None]),
    )


def garbage() -> st.SearchStrategy[str | bytes]:
    return (
        st.text(max_size=300)
        | st.binary(max_size=300)
        | st.builds(json.dumps, JSON_VALUES)
        | typed_frames()
    )


def conversations(info: dict[str, Any]) -> st.SearchStrategy[list[str | bytes]]:
    """One connection's frames: a hello (valid or not) or garbage first, then anything."""
    opening = hello_frames(info) | garbage()
    body = st.lists(sequenced_frames() | garbage(), max_size=15)
    return st.builds(lambda first, rest: [first, *rest], opening, body)


async def send_conversation(url: str, frames: list[str | bytes]) -> int:
    """Send frames on one connection until the server closes it; return how many went."""
    sent = 0
    try:
        connection = await asyncio.wait_for(tornado.websocket.websocket_connect(url), 10)
    except (OSError, tornado.websocket.WebSocketError) as exc:
        raise AssertionError(f"the server stopped accepting connections: {exc}") from exc
    try:
        for frame in frames:
            try:
                await connection.write_message(frame, binary=isinstance(frame, bytes))
            except tornado.websocket.WebSocketClosedError:
                break
            sent += 1
        # Read whatever the server answers, so its writes do not pile up.
        while True:
            try:
                message = await asyncio.wait_for(connection.read_message(), 0.05)
            except asyncio.TimeoutError:
                break
            if message is None:
                break
    finally:
        connection.close()
    return sent


class Tally:
    sent = 0
    connections = 0
    rss_after_warmup: int | None = None


def test_server_survives_fuzzing(live_server: Server, tmp_path: Path) -> None:
    tally = Tally()
    loop = asyncio.new_event_loop()

    @settings(
        max_examples=2500,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(conversations(live_server.info))
    def fuzz(frames: list[str | bytes]) -> None:
        tally.sent += loop.run_until_complete(send_conversation(live_server.url, frames))
        tally.connections += 1
        if tally.rss_after_warmup is None and tally.sent >= 1000:
            tally.rss_after_warmup = live_server.rss_bytes()
        assert live_server.alive()

    try:
        while tally.sent < MESSAGES_REQUIRED:
            fuzz()
    finally:
        loop.close()

    print(f"fuzz: {tally.sent} frames on {tally.connections} connections")
    assert tally.sent >= MESSAGES_REQUIRED
    assert live_server.alive()
    assert tally.rss_after_warmup is not None
    growth = live_server.rss_bytes() - tally.rss_after_warmup
    print(f"fuzz: server RSS grew by {growth} bytes after the warm-up")
    assert growth < MEMORY_BOUND_BYTES, f"server RSS grew by {growth} bytes"

    info = live_server.info
    launched = minion.launch(
        info["final_run"],
        "fuzzjob",
        live_server.url,
        info["final_token"],
        info["machine"],
        wrapper.__file__,
        "off",
        str(tmp_path / "logs"),
        str(tmp_path / "state"),
    )
    assert launched["started"] is True, launched
    deadline = time.monotonic() + 30
    row = None
    while time.monotonic() < deadline:
        with sqlite3.connect(f"file:{live_server.store_path}?mode=ro", uri=True) as db:
            row = db.execute(
                "SELECT retcode FROM results WHERE run_id = ?", (info["final_run"],)
            ).fetchone()
        if row and row[0] is not None:
            break
        time.sleep(0.1)
    assert row is not None
    assert row[0] == 0
