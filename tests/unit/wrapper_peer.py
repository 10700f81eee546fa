"""A scripted stand-in for the engine's machines WebSocket, and helpers to run the wrapper.

The wrapper's tests run the real wrapper as a real process, started through
``saltpeter.minion.launch``, against this peer. The peer is not the engine.
By default it follows the engine's rules from docs/protocol.md: check the
token, store a sequenced frame only if it is the next one, and ack the
highest stored seq. Switches inject faults that the real engine never
produces, such as dropping frames, withholding acks or acking twice.

The peer runs a Tornado server on 127.0.0.1, on a free port, in a background
thread with its own event loop. Tests read what it received under a lock.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import tornado.httpserver
import tornado.netutil
import tornado.web
import tornado.websocket

from saltpeter import minion, wrapper

WRAPPER_PATH = wrapper.__file__
MACHINE_ID = "minion-under-test"
WAIT_TIMEOUT = 20.0


class PeerHandler(tornado.websocket.WebSocketHandler):
    """One wrapper connection to the scripted peer."""

    def initialize(self, peer: ScriptedPeer) -> None:
        self.peer = peer
        self.number = 0
        self.sequenced = 0

    def open(self, *args: str, **kwargs: str) -> None:
        self.number = self.peer._opened(self)

    def on_message(self, message: str | bytes) -> None:
        self.peer._received(self, message)

    def on_close(self) -> None:
        self.peer._closed(self)


class ScriptedPeer:
    """The engine's side of the wrapper protocol, with switches for faults.

    Switches, read when a frame arrives:

    - ``hello_error``: reply to every hello with this error code and close.
    - ``withhold_acks``: store frames but send no ack.
    - ``duplicate_acks``: send every ack twice.
    - ``store_limit``: on the first connection, store no frame above this seq
      (as if frames were lost in flight), and send no acks there.
    - ``close_after``: close the first connection once it has delivered this
      many sequenced frames.
    - ``output_limit``: the engine's output cap to announce in the welcome;
      None announces none, as an engine before the cap was announced.
    """

    def __init__(self, token: str, heartbeat_interval: float = 5.0) -> None:
        self.token = token
        self.heartbeat_interval = heartbeat_interval
        self.job: dict[str, Any] | None = None
        self.hello_error: str | None = None
        self.withhold_acks = False
        self.duplicate_acks = False
        self.store_limit: int | None = None
        self.close_after: int | None = None
        self.output_limit: int | None = None
        # Everything received: (connection number, frame).
        self.received: list[tuple[int, dict[str, Any]]] = []
        self.stored: list[dict[str, Any]] = []
        self.connection_count = 0
        self._open: dict[int, PeerHandler] = {}
        # Condition() wraps an RLock, so predicates given to wait_for may call
        # the reading methods below, which take the lock again.
        self._lock = threading.Condition()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="scripted-peer", daemon=True)
        self.port = 0

    # -- life cycle (test thread) --------------------------------------------------

    def start(self) -> None:
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("scripted peer did not start listening within 10 s")

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/wrapper"

    def _serve(self) -> None:
        asyncio.run(self._main())

    async def _main(self) -> None:
        app = tornado.web.Application(
            [("/wrapper", PeerHandler, {"peer": self})],
            websocket_max_message_size=wrapper.MAX_FRAME_BYTES,
        )
        sockets = tornado.netutil.bind_sockets(0, "127.0.0.1")
        server = tornado.httpserver.HTTPServer(app)
        server.add_sockets(sockets)
        self.port = sockets[0].getsockname()[1]
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        self._ready.set()
        await self._stop.wait()
        server.stop()
        for handler in list(self._open.values()):
            handler.close()
        await server.close_all_connections()

    # -- reading what arrived (test thread) ------------------------------------------

    def wait_for(
        self, predicate: Callable[[], bool], what: str, timeout: float = WAIT_TIMEOUT
    ) -> None:
        """Wait until ``predicate()`` is true.

        The predicate runs under the lock whenever a frame arrives, and at least every 0.1 s.
        """
        deadline = time.monotonic() + timeout
        with self._lock:
            while not predicate():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
                self._lock.wait(min(remaining, 0.1))

    def frames(self, kind: str, connection: int | None = None) -> list[dict[str, Any]]:
        with self._lock:
            return [
                frame
                for number, frame in self.received
                if frame.get("type") == kind and connection in (None, number)
            ]

    def stored_of(self, kind: str) -> list[dict[str, Any]]:
        with self._lock:
            return [frame for frame in self.stored if frame["type"] == kind]

    def output(self) -> str:
        return "".join(frame["data"] for frame in self.stored_of("output"))

    def complete(self) -> dict[str, Any] | None:
        frames = self.stored_of("complete")
        return frames[0] if frames else None

    def start_frame(self) -> dict[str, Any] | None:
        frames = self.stored_of("start")
        return frames[0] if frames else None

    def wait_complete(self, timeout: float = WAIT_TIMEOUT) -> dict[str, Any]:
        self.wait_for(lambda: bool(self._stored_kinds("complete")), "a complete frame", timeout)
        complete = self.complete()
        assert complete is not None
        return complete

    def wait_start(self, timeout: float = WAIT_TIMEOUT) -> dict[str, Any]:
        self.wait_for(lambda: bool(self._stored_kinds("start")), "a start frame", timeout)
        start = self.start_frame()
        assert start is not None
        return start

    def _stored_kinds(self, kind: str) -> list[dict[str, Any]]:
        return [frame for frame in self.stored if frame["type"] == kind]

    # -- acting on the connection (test thread) ----------------------------------------

    def send(self, frame: dict[str, Any]) -> None:
        """Send a frame on every open connection."""
        assert self._loop is not None
        text = json.dumps(frame)
        self._loop.call_soon_threadsafe(self._send_all, text)

    def release_acks(self) -> None:
        """Stop withholding acks and ack everything stored so far."""
        assert self._loop is not None
        with self._lock:
            self.withhold_acks = False
        self._loop.call_soon_threadsafe(self._ack_all)

    def _send_all(self, text: str) -> None:
        for handler in list(self._open.values()):
            with contextlib.suppress(tornado.websocket.WebSocketClosedError):
                handler.write_message(text)

    def _ack_all(self) -> None:
        self._send_all(json.dumps({"type": "ack", "seq": self._highest()}))

    # -- the server side (peer thread) -----------------------------------------------

    def _highest(self) -> int:
        return self.stored[-1]["seq"] if self.stored else 0

    def _opened(self, handler: PeerHandler) -> int:
        with self._lock:
            self.connection_count += 1
            self._open[self.connection_count] = handler
            self._lock.notify_all()
            return self.connection_count

    def _closed(self, handler: PeerHandler) -> None:
        with self._lock:
            self._open.pop(handler.number, None)
            self._lock.notify_all()

    def _received(self, handler: PeerHandler, message: str | bytes) -> None:
        frame = json.loads(message)
        with self._lock:
            self.received.append((handler.number, frame))
            replies = self._replies(handler, frame)
            self._lock.notify_all()
        for reply in replies:
            if reply is None:
                handler.close()
            else:
                with contextlib.suppress(tornado.websocket.WebSocketClosedError):
                    handler.write_message(json.dumps(reply))

    def _replies(self, handler: PeerHandler, frame: dict[str, Any]) -> list[dict[str, Any] | None]:
        """Return the frames to send back, with None meaning: close the connection."""
        kind = frame.get("type")
        if kind == "hello":
            if self.hello_error is not None:
                return [{"type": "error", "code": self.hello_error, "message": "scripted"}, None]
            if frame.get("token") != self.token:
                return [{"type": "error", "code": "auth_failed", "message": "wrong token"}, None]
            welcome = {
                "type": "welcome",
                "acked": self._highest(),
                "job": self.job if frame.get("need_job") else None,
                "heartbeat_interval": self.heartbeat_interval,
            }
            if self.output_limit is not None:
                welcome["output_limit"] = self.output_limit
            return [welcome]
        if "seq" not in frame:
            return []

        handler.sequenced += 1
        first_connection = handler.number == 1
        lossy = first_connection and self.store_limit is not None
        if frame["seq"] == self._highest() + 1 and not (lossy and frame["seq"] > self.store_limit):
            self.stored.append(frame)

        replies: list[dict[str, Any] | None] = []
        if not self.withhold_acks and not lossy:
            ack = {"type": "ack", "seq": self._highest()}
            replies = [ack, ack] if self.duplicate_acks else [ack]
        if (
            first_connection
            and self.close_after is not None
            and handler.sequenced >= self.close_after
        ):
            replies.append(None)
        return replies


# -- running the wrapper ------------------------------------------------------------


def new_run_id() -> str:
    return f"run-{uuid.uuid4().hex[:16]}"


class WrapperProcess:
    """One wrapper started with minion.launch, and what the test needs to clean it up."""

    def __init__(self, peer: ScriptedPeer, tmp_path: Path, job_name: str = "testjob") -> None:
        self.peer = peer
        self.run_id = new_run_id()
        self.job_name = job_name
        self.statedir = tmp_path / "state"
        self.logdir = tmp_path / "log"
        self.pid: int | None = None
        self.status: int | None = None

    @property
    def record_path(self) -> Path:
        return self.statedir / f"{self.run_id}.json"

    @property
    def log_path(self) -> Path:
        return self.logdir / f"{self.job_name}.log"

    def launch(self, loglevel: str = "debug", **kwargs: Any) -> dict[str, object]:
        result = minion.launch(
            run_id=self.run_id,
            job=self.job_name,
            url=self.peer.url,
            token=self.peer.token,
            machine_id=MACHINE_ID,
            wrapper_path=kwargs.pop("wrapper_path", WRAPPER_PATH),
            loglevel=loglevel,
            logdir=str(self.logdir),
            statedir=str(self.statedir),
            **kwargs,
        )
        if result.get("started"):
            self.pid = int(str(result["pid"]))
        return result

    def start(self, loglevel: str = "debug", **kwargs: Any) -> None:
        result = self.launch(loglevel, **kwargs)
        assert result.get("started"), result

    def alive(self) -> bool:
        if self.pid is None or self.status is not None:
            return False
        pid, status = os.waitpid(self.pid, os.WNOHANG)
        if pid == 0:
            return True
        self.status = os.waitstatus_to_exitcode(status)
        return False

    def wait_exit(self, timeout: float = WAIT_TIMEOUT) -> int:
        """Wait for the wrapper to exit and return its exit status."""
        deadline = time.monotonic() + timeout
        while self.alive():
            if time.monotonic() >= deadline:
                raise AssertionError(f"wrapper {self.pid} still runs after {timeout:g} s")
            time.sleep(0.02)
        assert self.status is not None
        return self.status

    def job_processes(self) -> list[int]:
        return job_processes(self.run_id)

    def cleanup(self) -> None:
        """Kill whatever this test started and left running: job processes, then the wrapper."""
        for pid in self.job_processes():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if self.alive():
            assert self.pid is not None
            os.kill(self.pid, signal.SIGKILL)
            self.wait_exit()


def read_proc(pid: str, name: str) -> bytes:
    try:
        return Path(f"/proc/{pid}/{name}").read_bytes()
    except OSError:
        return b""


def job_processes(run_id: str) -> list[int]:
    """Return the pids whose environment has SP_JOB_INSTANCE set to ``run_id``."""
    marker = f"SP_JOB_INSTANCE={run_id}".encode()
    return [
        int(pid)
        for pid in os.listdir("/proc")
        if pid.isdigit() and marker in read_proc(pid, "environ").split(b"\0")
    ]


def process_group(pgid: int) -> list[int]:
    """Return the pids in process group ``pgid``, zombies included."""
    members = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        stat = read_proc(pid, "stat").decode(errors="replace")
        if not stat:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        if int(fields[2]) == pgid:
            members.append(int(pid))
    return members
