"""Many wrapper protocol clients in one process, for the "following many runs" benchmark.

Each client plays one wrapper of docs/protocol.md (version 1) against the
engine's machines WebSocket: ``hello`` with the run's token, ``start``, then
``output`` frames of ``--frame-bytes`` characters every ``--frame-interval``
seconds and a ``heartbeat`` every 5 s, and finally ``complete``. Like the
real wrapper it keeps every sequenced frame until an ``ack`` covers it. It
does not run a command: the output is generated text.

The client records, for every sequenced frame, the time from handing it to
the socket to receiving the ack that covers it, and the output bytes the
engine acknowledged. The process writes one JSON document with its clients'
figures to ``--out`` when ``--seconds`` of streaming have passed.

Command line::

    python -m benchmarks.swarm --launches FILE --worker I --workers N --out FILE
        [--frame-bytes 16384] [--frame-interval 1.0] [--seconds 60] [--connect-rate 200]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import tornado.websocket

from saltpeter.wrapper import sign_credential

HEARTBEAT_INTERVAL = 5.0
# Tornado's client default; the wrapper uses the same limit.
MAX_FRAME_BYTES = 1024 * 1024


@dataclass
class Phase:
    """When every client of the process starts and stops streaming."""

    go: asyncio.Event = field(default_factory=asyncio.Event)
    done: asyncio.Event = field(default_factory=asyncio.Event)
    stop_at: float = float("inf")  # loop.time() when streaming stops


@dataclass
class ClientStats:
    """Counters and latencies of one client."""

    connected: bool = False
    welcomed: bool = False
    completed: bool = False
    error: str | None = None
    acked_output_bytes: int = 0
    # (frame type, monotonic send time, latency) of every acknowledged frame
    ack_samples: list[tuple[str, float, float]] = field(default_factory=list)
    heartbeats: int = 0


def stamp() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="microseconds")


class Client:
    """One fake wrapper: a run id, a minion id and its token."""

    def __init__(
        self, url: str, run: str, machine: str, token: str, key: str, args: argparse.Namespace
    ):
        self.url = url
        self.run_id = run
        self.machine = machine
        self.token = token
        # Signed as the launcher signs it, with the key all benchmark minions share.
        self.signature = sign_credential(key, run, machine, token)
        self.args = args
        self.stats = ClientStats()
        self.seq = 0
        # seq -> (monotonic send time, output bytes, frame type)
        self.unacked: dict[int, tuple[float, int, str]] = {}
        self.acked = 0
        self.payload = ("x" * 99 + "\n") * (args.frame_bytes // 100) + "y" * (
            args.frame_bytes % 100
        )

    async def connect(self) -> tornado.websocket.WebSocketClientConnection:
        conn = await tornado.websocket.websocket_connect(
            self.url, connect_timeout=60, max_message_size=MAX_FRAME_BYTES
        )
        self.stats.connected = True
        hello = {
            "type": "hello",
            "protocol": 1,
            "run": self.run_id,
            "machine": self.machine,
            "token": self.token,
            "signature": self.signature,
            "wrapper_version": "benchmark-swarm",
            "need_job": True,
        }
        await conn.write_message(json.dumps(hello))
        welcome = await conn.read_message()
        if welcome is None:
            raise ConnectionError("the engine closed the connection after hello")
        frame = json.loads(welcome)
        if frame.get("type") != "welcome":
            raise ConnectionError(f"expected a welcome, got {frame}")
        self.stats.welcomed = True
        return conn

    async def send_sequenced(
        self, conn: tornado.websocket.WebSocketClientConnection, kind: str, **fields: Any
    ) -> None:
        self.seq += 1
        text = json.dumps({"type": kind, "seq": self.seq, **fields}, separators=(",", ":"))
        output_bytes = len(fields.get("data", ""))
        self.unacked[self.seq] = (time.monotonic(), output_bytes, kind)
        await conn.write_message(text)

    async def read_acks(self, conn: tornado.websocket.WebSocketClientConnection) -> None:
        while True:
            message = await conn.read_message()
            if message is None:
                return
            frame = json.loads(message)
            if frame.get("type") != "ack":
                if frame.get("type") == "error":
                    self.stats.error = f"{frame.get('code')}: {frame.get('message')}"
                continue
            seq = int(frame["seq"])
            now = time.monotonic()
            for covered in range(self.acked + 1, seq + 1):
                sent = self.unacked.pop(covered, None)
                if sent is not None:
                    self.stats.ack_samples.append((sent[2], sent[0], now - sent[0]))
                    self.stats.acked_output_bytes += sent[1]
            self.acked = max(self.acked, seq)

    async def heartbeats(self, conn: tornado.websocket.WebSocketClientConnection) -> None:
        await asyncio.sleep(random.uniform(0, HEARTBEAT_INTERVAL))
        while True:
            await conn.write_message(json.dumps({"type": "heartbeat", "time": stamp()}))
            self.stats.heartbeats += 1
            await asyncio.sleep(HEARTBEAT_INTERVAL)

    async def stream(self, conn: tornado.websocket.WebSocketClientConnection, phase: Phase) -> None:
        await asyncio.sleep(random.uniform(0, self.args.frame_interval))
        loop = asyncio.get_running_loop()
        next_at = loop.time()
        while loop.time() < phase.stop_at:
            await self.send_sequenced(conn, "output", data=self.payload)
            next_at += self.args.frame_interval
            await asyncio.sleep(max(0.0, next_at - loop.time()))

    async def run(self, phase: Phase) -> None:
        try:
            conn = await self.connect()
        except Exception as exc:  # the figure counts it; one failure must not stop the others
            self.stats.error = f"connect: {exc!r}"
            return
        reader = asyncio.create_task(self.read_acks(conn))
        beats = asyncio.create_task(self.heartbeats(conn))
        try:
            await self.send_sequenced(conn, "start", pid=10000, time=stamp())
            await phase.go.wait()
            await self.stream(conn, phase)
            await phase.done.wait()
            await self.send_sequenced(conn, "complete", retcode=0, reason="exit", time=stamp())
            deadline = time.monotonic() + 30
            while self.acked < self.seq and time.monotonic() < deadline and not reader.done():
                await asyncio.sleep(0.05)
            self.stats.completed = self.acked >= self.seq
        except tornado.websocket.WebSocketClosedError:
            self.stats.error = self.stats.error or "connection closed by the engine"
        finally:
            beats.cancel()
            reader.cancel()
            conn.close()


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    launches = [json.loads(line) for line in args.launches.read_text().splitlines() if line]
    pairs = [(launch, minion) for launch in launches for minion in launch["minions"]]
    mine = pairs[args.worker :: args.workers]
    clients = [
        Client(launch["url"], launch["run"], minion, launch["token"], launch["key"], args)
        for launch, minion in mine
    ]
    loop = asyncio.get_running_loop()
    phase = Phase()
    tasks = []
    for client in clients:
        tasks.append(asyncio.create_task(client.run(phase)))
        await asyncio.sleep(1.0 / args.connect_rate)
    connect_deadline = loop.time() + 120
    while loop.time() < connect_deadline and not all(
        c.stats.welcomed or c.stats.error for c in clients
    ):
        await asyncio.sleep(0.1)
    connected_at = time.time()
    args.out.with_suffix(".ready").write_text(str(connected_at))
    # The driver writes the start time to the go file once every worker is connected.
    while not args.go_file.exists():
        await asyncio.sleep(0.05)
    go_time = float(args.go_file.read_text())
    await asyncio.sleep(max(0.0, go_time - time.time()))
    go_monotonic = time.monotonic()
    phase.stop_at = loop.time() + args.seconds
    phase.go.set()
    await asyncio.sleep(args.seconds + 1)
    phase.done.set()
    await asyncio.gather(*tasks, return_exceptions=True)
    return {
        "worker": args.worker,
        "clients": len(clients),
        "connected_at": connected_at,
        "welcomed": sum(c.stats.welcomed for c in clients),
        "completed": sum(c.stats.completed for c in clients),
        "errors": [c.stats.error for c in clients if c.stats.error][:20],
        "error_count": sum(1 for c in clients if c.stats.error),
        "acked_output_bytes": sum(c.stats.acked_output_bytes for c in clients),
        "heartbeats": sum(c.stats.heartbeats for c in clients),
        # (frame type, seconds from the start of streaming to the send, latency)
        "ack_samples": [
            (kind, round(sent - go_monotonic, 4), round(latency, 6))
            for c in clients
            for kind, sent, latency in c.stats.ack_samples
        ],
    }


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--launches", type=Path, required=True, help="JSON lines of launches")
    parser.add_argument("--worker", type=int, required=True, help="this worker's index")
    parser.add_argument("--workers", type=int, required=True, help="number of workers")
    parser.add_argument("--out", type=Path, required=True, help="where to write the figures")
    parser.add_argument("--go-file", type=Path, required=True, help="file holding the start time")
    parser.add_argument("--frame-bytes", type=int, default=16384, help="characters per frame")
    parser.add_argument(
        "--frame-interval", type=float, default=1.0, help="seconds between output frames"
    )
    parser.add_argument("--seconds", type=float, default=60.0, help="seconds of streaming")
    parser.add_argument(
        "--connect-rate", type=float, default=200.0, help="new connections per second"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    figures = asyncio.run(main_async(args))
    args.out.write_text(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
