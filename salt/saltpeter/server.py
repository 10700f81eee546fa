"""The machines WebSocket: where wrappers on the minions report their runs.

One :class:`WrapperHandler` serves one wrapper connection. It parses every
frame with :mod:`saltpeter.protocol` and hands it to the
:class:`~saltpeter.manager.RunManager`; it keeps no run state of its own.
"""

from __future__ import annotations

import collections
import logging
import ssl
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


class WrapperHandler(tornado.websocket.WebSocketHandler):
    """One wrapper's connection."""

    manager: RunManager
    rejections: collections.Counter[str]

    def initialize(self, manager: RunManager, rejections: collections.Counter[str]) -> None:
        self.manager = manager
        self.rejections = rejections
        self.run: Run | None = None
        self.machine: MachineRun | None = None

    def check_origin(self, origin: str) -> bool:
        # Wrappers send no Origin header; one that does is a browser page,
        # which has no business on this endpoint.
        return False

    @property
    def peer(self) -> str:
        return str(self.request.remote_ip)

    def send_frame(self, text: str) -> None:
        try:
            self.write_message(text)
        except tornado.websocket.WebSocketClosedError:
            log.debug("peer %s: connection closed before a frame could be sent", self.peer)

    def reject(self, error: ProtocolError) -> None:
        self.rejections[error.code] += 1
        where = (
            f"job {self.run.job_name} run {self.run.run_id} minion {self.machine.machine}"
            if self.run is not None and self.machine is not None
            else "before hello"
        )
        log.warning("peer %s (%s): rejected: %s: %s", self.peer, where, error.code, error.message)
        self.send_frame(protocol.encode("error", code=error.code, message=error.message))
        self.close(code=1008, reason=error.code)

    def on_message(self, message: str | bytes) -> None:
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
            acked = self.manager.on_frame(self.run, self.machine, frame)
            self.send_frame(protocol.encode("ack", seq=acked))
        except ProtocolError as error:
            self.reject(error)

    def _on_hello(self, frame: protocol.Frame) -> None:
        if not isinstance(frame, Hello):
            raise ProtocolError(BAD_MESSAGE, "the first frame must be hello")
        run, machine = self.manager.authenticate(frame)
        welcome = self.manager.welcome(run, machine, frame.need_job)
        self.run, self.machine = run, machine
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
        if self.machine is not None:
            self.manager.detach(self.machine, self)


def make_app(manager: RunManager, rejections: collections.Counter[str]) -> tornado.web.Application:
    return tornado.web.Application(
        [(WRAPPER_PATH, WrapperHandler, {"manager": manager, "rejections": rejections})],
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
    app = make_app(manager, rejections if rejections is not None else collections.Counter())
    server_options: dict[str, Any] = {"xheaders": False}
    if ssl_options is not None:
        server_options["ssl_options"] = ssl_options
    server = tornado.httpserver.HTTPServer(app, **server_options)
    server.listen(port, address)
    log.info("machines WebSocket listening on %s:%d%s", address, port, WRAPPER_PATH)
    return server
