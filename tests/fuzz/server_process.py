"""Run the machines WebSocket with the real manager and store, for the fuzz test.

Started by test_protocol_fuzz.py as a separate process so the test can read
the server's memory use from /proc without counting its own. It prints one
JSON line with the port and two runs (id and token) and serves until it is
terminated. Events go to a counter, because no Salt master runs here.
"""

from __future__ import annotations

import asyncio
import json
import sys
from datetime import datetime, timezone
from pathlib import Path

import tornado.netutil

from saltpeter import server
from saltpeter.config import Settings, parse_job
from saltpeter.manager import RunManager
from saltpeter.runs import Trigger
from saltpeter.store import RunStore

MACHINE = "fuzz-minion"


class CountedEvents:
    def __init__(self) -> None:
        self.count = 0

    def fire(self, tag: str, data: dict[str, object]) -> None:
        self.count += 1


async def serve(store_path: Path) -> None:
    store = RunStore(store_path)
    now = datetime.now(timezone.utc)
    raw = {
        "min": "0",
        "hour": "0",
        "dom": "1",
        "mon": "1",
        "dow": "*",
        "targets": MACHINE,
        "command": "echo fuzzed; echo done",
    }
    job = parse_job("fuzzjob", raw, Path("fuzz.yaml"), Settings(), now)
    # A long launch timeout keeps the final run waiting for its wrapper however
    # long the fuzzing takes.
    manager = RunManager(store, CountedEvents(), {job.name: job}.get, launch_timeout=3600)
    fuzz_run, fuzz_token = manager.start_run(job, Trigger.MANUAL, None, [MACHINE], [], "jid-1")
    final_run, final_token = manager.start_run(job, Trigger.MANUAL, None, [MACHINE], [], "jid-2")
    socket = tornado.netutil.bind_sockets(0, "127.0.0.1")[0]
    port = socket.getsockname()[1]
    socket.close()
    server.listen(manager, port, "127.0.0.1")

    async def sweep() -> None:
        while True:
            await asyncio.sleep(1)
            manager.sweep()

    print(
        json.dumps(
            {
                "port": port,
                "fuzz_run": fuzz_run.run_id,
                "fuzz_token": fuzz_token,
                "final_run": final_run.run_id,
                "final_token": final_token,
                "machine": MACHINE,
            }
        ),
        flush=True,
    )
    await sweep()


if __name__ == "__main__":
    asyncio.run(serve(Path(sys.argv[1])))
