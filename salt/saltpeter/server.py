"""The machines WebSocket: where wrappers on the minions report their runs.

One :class:`WrapperHandler` serves one wrapper connection. It parses every
frame with :mod:`saltpeter.protocol` and hands it to the
:class:`~saltpeter.manager.RunManager`; it keeps no run state of its own.

The endpoint faces every minion, so it assumes peers may be broken or
hostile: frames over 1 MiB close the connection, a connection must say hello
within HELLO_TIMEOUT_SECONDS, a token bucket bounds the frame rate, and a
peer that stops reading its acks is dropped before its unsent frames pile up.
Every rejection is counted by code; the log gets one line per peer and code
per minute, with the number of repeats it left out.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import logging
import sqlite3
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import tornado.httpserver
import tornado.web
import tornado.websocket

from saltpeter import protocol
from saltpeter.manager import RunManager
from saltpeter.protocol import BAD_MESSAGE, Heartbeat, Hello, ProtocolError
from saltpeter.runs import MachineRun, Run

log = logging.getLogger(__name__)

WRAPPER_PATH = "/wrapper"

HELLO_TIMEOUT_SECONDS = 10.0
# A wrapper sends about 20 frames a second while output flows (one per 50 ms
# flush) and resends at most 64 MiB of 64 KiB frames after a reconnect, about
# 1,000 frames at once. The bucket allows well over both.
FRAME_RATE_PER_SECOND = 500.0
FRAME_BURST = 5000.0
# Frames written to a peer that the network has not taken yet. A wrapper
# reads every ack at once, so a peer with this many pending is not reading.
MAX_PENDING_WRITES = 1000
REJECTION_LOG_INTERVAL_SECONDS = 60.0

# Codes the server adds to the protocol's own error codes, for counting.
TOO_LARGE = "too_large"
FLOOD = "flood"
HELLO_TIMEOUT = "hello_timeout"
SLOW_CLIENT = "slow_client"
BROWSER_ORIGIN = "browser_origin"


@dataclass
class TokenBucket:
    """Rate limit with a burst: ``take()`` is false once the peer exceeds it.

    Times come from time.monotonic().
    """

    rate: float
    capacity: float
    tokens: float
    updated: float

    def take(self, now: float) -> bool:
        self.tokens = min(self.capacity, self.tokens + (now - self.updated) * self.rate)
        self.updated = now
        if self.tokens < 1.0:
            return False
        self.tokens -= 1.0
        return True


class RejectionLog:
    """Counts rejections by code and logs each peer and code at most once a minute."""

    def __init__(
        self,
        counts: collections.Counter[str],
        clock: Callable[[], float] = time.monotonic,
        interval: float = REJECTION_LOG_INTERVAL_SECONDS,
    ) -> None:
        self.counts = counts
        self.clock = clock
        self.interval = interval
        self._last_logged: dict[tuple[str, str], float] = {}
        self._suppressed: collections.Counter[tuple[str, str]] = collections.Counter()

    def record(self, peer: str, where: str, code: str, message: str) -> None:
        self.counts[code] += 1
        key = (peer, code)
        now = self.clock()
        last = self._last_logged.get(key)
        if last is not None and now - last < self.interval:
            self._suppressed[key] += 1
            return
        repeats = self._suppressed.pop(key, 0)
        self._last_logged[key] = now
        if len(self._last_logged) > 10000:
            # Forget the oldest peers so a scan from many addresses cannot grow this.
            for stale in sorted(self._last_logged, key=self._last_logged.__getitem__)[:5000]:
                del self._last_logged[stale]
        log.warning(
            "peer %s (%s): rejected: %s: %s%s",
            peer,
            where,
            code,
            message,
            f" ({repeats} more from this peer since the last line)" if repeats else "",
        )


class _Protocol(tornado.websocket.WebSocketProtocol13):
    """Tornado's protocol, remembering the code when it closes a connection itself.

    Tornado closes a connection with 1009 when a frame exceeds the size limit,
    before the handler sees the frame, and the handler's ``close_code`` only
    holds codes the peer sent. Checked against Tornado 6.5 and 6.6.
    """

    def close(self, code: int | None = None, reason: str | None = None) -> None:
        handler = self.handler
        if isinstance(handler, WrapperHandler) and handler.server_close_code is None:
            handler.server_close_code = code
        super().close(code, reason)


class WrapperHandler(tornado.websocket.WebSocketHandler):
    """One wrapper's connection."""

    manager: RunManager
    rejection_log: RejectionLog

    def initialize(self, manager: RunManager, rejection_log: RejectionLog) -> None:
        self.manager = manager
        self.rejection_log = rejection_log
        self.run: Run | None = None
        self.machine: MachineRun | None = None
        self.bucket = TokenBucket(FRAME_RATE_PER_SECOND, FRAME_BURST, FRAME_BURST, time.monotonic())
        self.pending_writes = 0
        self.rejected = False
        self.hello_timer: asyncio.TimerHandle | None = None
        self.server_close_code: int | None = None

    def get_websocket_protocol(self) -> tornado.websocket.WebSocketProtocol | None:
        protocol13 = super().get_websocket_protocol()
        if isinstance(protocol13, tornado.websocket.WebSocketProtocol13):
            protocol13.__class__ = _Protocol
        return protocol13

    def check_origin(self, origin: str) -> bool:
        # Wrappers send no Origin header; one that does is a browser page,
        # which has no business on this endpoint.
        self.rejection_log.record(
            self.peer, "before hello", BROWSER_ORIGIN, f"Origin {origin[:100]!r} is not allowed"
        )
        return False

    @property
    def peer(self) -> str:
        return str(self.request.remote_ip)

    def where(self) -> str:
        if self.run is not None and self.machine is not None:
            return f"job {self.run.job_name} run {self.run.run_id} minion {self.machine.machine}"
        return "before hello"

    def open(self, *args: str, **kwargs: str) -> None:
        loop = asyncio.get_running_loop()
        self.hello_timer = loop.call_later(HELLO_TIMEOUT_SECONDS, self._hello_timed_out)

    def _hello_timed_out(self) -> None:
        if self.run is None:
            self.reject(
                ProtocolError(
                    HELLO_TIMEOUT, f"no hello within {HELLO_TIMEOUT_SECONDS:g} s of connecting"
                )
            )

    def send_frame(self, text: str) -> None:
        if self.pending_writes >= MAX_PENDING_WRITES:
            if not self.rejected:
                self.rejected = True
                self.rejection_log.record(
                    self.peer,
                    self.where(),
                    SLOW_CLIENT,
                    f"{self.pending_writes} frames are waiting to be sent; the peer is not reading",
                )
                self.close(code=1008, reason=SLOW_CLIENT)
            return
        try:
            future = self.write_message(text)
        except tornado.websocket.WebSocketClosedError:
            log.debug("peer %s: connection closed before a frame could be sent", self.peer)
            return
        self.pending_writes += 1
        future.add_done_callback(self._write_done)

    def _write_done(self, future: asyncio.Future[Any]) -> None:
        self.pending_writes -= 1
        if not future.cancelled():
            future.exception()  # a closed connection; on_close handles it

    def reject(self, error: ProtocolError) -> None:
        if self.rejected:
            return
        self.rejected = True
        self.rejection_log.record(self.peer, self.where(), error.code, error.message)
        self.send_frame(protocol.encode("error", code=error.code, message=error.message))
        self.close(code=1008, reason=error.code)

    def on_message(self, message: str | bytes) -> None:
        if self.rejected:
            return
        if not self.bucket.take(time.monotonic()):
            self.reject(
                ProtocolError(
                    FLOOD, f"more than {FRAME_RATE_PER_SECOND:g} frames per second sustained"
                )
            )
            return
        try:
            frame = protocol.parse_frame(message)
            if self.run is None or self.machine is None:
                self._on_hello(frame)
                return
            if isinstance(frame, Hello):
                raise ProtocolError(BAD_MESSAGE, "hello sent twice on one connection")
            if isinstance(frame, Heartbeat):
                self.manager.touch(self.machine)
                log.debug(
                    "job %s run %s minion %s: heartbeat",
                    self.run.job_name,
                    self.run.run_id,
                    self.machine.machine,
                )
                return
            store = self.manager.store
            if store.begin_batch():
                # Frames handled until the loop's next pass share one commit.
                asyncio.get_running_loop().call_soon(store.commit_batch)
            try:
                acked = self.manager.on_frame(self.run, self.machine, frame)
            except sqlite3.Error as exc:
                log.error(
                    "job %s run %s minion %s: storing frame %d failed: %s",
                    self.run.job_name,
                    self.run.run_id,
                    self.machine.machine,
                    frame.seq,
                    exc,
                )
                store.fail_batch(exc)
                self.manager.reload_run(self.run)
                return
            # An ack promises the frame is stored, so it waits for the commit.
            # NOTE: with synchronous=NORMAL a commit survives a crash of the
            # engine, not a power loss.
            store.after_commit(
                functools.partial(self._ack, acked),
                functools.partial(self.manager.reload_run, self.run),
            )
        except ProtocolError as error:
            self.reject(error)

    def _ack(self, seq: int) -> None:
        self.send_frame(protocol.encode("ack", seq=seq))

    def drop(self, reason: str) -> None:
        # Frames still arriving refer to the run state the engine discarded.
        self.rejected = True
        self.close(code=1011, reason=reason)

    def _on_hello(self, frame: protocol.Frame) -> None:
        if not isinstance(frame, Hello):
            raise ProtocolError(BAD_MESSAGE, "the first frame must be hello")
        run, machine = self.manager.authenticate(frame)
        welcome = self.manager.welcome(run, machine, frame.need_job)
        self.run, self.machine = run, machine
        if self.hello_timer is not None:
            self.hello_timer.cancel()
        log.debug(
            "job %s run %s minion %s: wrapper %s connected from %s, acked %d",
            run.job_name,
            run.run_id,
            machine.machine,
            frame.wrapper_version,
            self.peer,
            machine.last_seq,
        )
        self.send_frame(protocol.encode("welcome", **welcome))
        self.manager.attach(run, machine, self)

    def on_close(self) -> None:
        if self.hello_timer is not None:
            self.hello_timer.cancel()
        if self.server_close_code == 1009 and not self.rejected:
            self.rejected = True
            self.rejection_log.record(
                self.peer,
                self.where(),
                TOO_LARGE,
                f"a frame exceeded {protocol.MAX_FRAME_BYTES} bytes",
            )
        if self.machine is not None:
            self.manager.detach(self.machine, self)


def make_app(manager: RunManager, rejection_log: RejectionLog) -> tornado.web.Application:
    return tornado.web.Application(
        [(WRAPPER_PATH, WrapperHandler, {"manager": manager, "rejection_log": rejection_log})],
        websocket_max_message_size=protocol.MAX_FRAME_BYTES,
    )


def listen(
    manager: RunManager,
    port: int,
    address: str,
    ssl_options: ssl.SSLContext | None = None,
    rejections: collections.Counter[str] | None = None,
) -> tornado.httpserver.HTTPServer:
    """Serve the machines WebSocket on ``address``:``port`` on the running loop."""
    rejection_log = RejectionLog(rejections if rejections is not None else collections.Counter())
    app = make_app(manager, rejection_log)
    server = tornado.httpserver.HTTPServer(app, ssl_options=ssl_options, xheaders=False)
    server.listen(port, address)
    log.info(
        "machines WebSocket listening on %s://%s:%d%s",
        "wss" if ssl_options is not None else "ws",
        address,
        port,
        WRAPPER_PATH,
    )
    return server
