"""Heavy output: a job printing 500 MB, under the real wrapper and engine versus bare.

The engine is real and runs in its own process (benchmarks/engine_host.py)
with the stand-in for Salt, which starts the real wrapper on this host the
way the execution module does on a minion (``sp_wrapper.py launch``). The
wrapper runs the command, streams its output over the machines WebSocket, and
the engine stores it under its output cap (``max_output_bytes``, 1 MiB by
default).

Figures, per repetition and as the median of ``--repeat``:

- bare: the command alone through ``/bin/sh -c`` with its output on
  /dev/null, and with its output read from a pipe in 64 KiB chunks by this
  process and discarded (the least any reader costs);
- under the wrapper: from the engine storing the ``start`` frame to storing
  ``complete`` (the wrapper reports ``complete`` once the output pipe is
  closed and every frame was sent);
- the cap: bytes kept (head + tail) and dropped, which must add up to the
  bytes the command printed, with the kept part at most the cap;
- the engine's RSS before the run and its maximum during the run.
"""

from __future__ import annotations

import argparse
import logging
import os
import sqlite3
import subprocess
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from benchmarks.common import (
    Result,
    cpu_percent_between,
    median,
    sample_process,
    scratch_dir,
    write_job_files,
)
from benchmarks.engine_host import EngineProcess
from benchmarks.firing import far_month

log = logging.getLogger(__name__)

RATIO_TARGET = 1.2
LINE = "saltpeter heavy output benchmark: one line of eighty characters, repeated ......"
DEFAULT_CAP = 1048576


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--megabytes", type=int, default=500, help="output in MB of 10^6 bytes (default 500)"
    )
    parser.add_argument("--repeat", type=int, default=3, help="repetitions (default 3)")


def output_command(total_bytes: int) -> str:
    return f"yes '{LINE}' | head -c {total_bytes}"


def time_bare_devnull(command: str) -> float:
    started = time.perf_counter()
    subprocess.run(["/bin/sh", "-c", command], stdout=subprocess.DEVNULL, check=True)
    return time.perf_counter() - started


def time_bare_pipe(command: str) -> tuple[float, int]:
    started = time.perf_counter()
    proc = subprocess.Popen(["/bin/sh", "-c", command], stdout=subprocess.PIPE)
    assert proc.stdout is not None
    total = 0
    fd = proc.stdout.fileno()
    while True:
        chunk = os.read(fd, 65536)
        if not chunk:
            break
        total += len(chunk)
    proc.wait()
    return time.perf_counter() - started, total


def machine_result(store_path: Path, run_id: str) -> dict[str, Any] | None:
    with sqlite3.connect(f"file:{store_path}?mode=ro", uri=True, timeout=10) as db:
        db.row_factory = sqlite3.Row
        row = db.execute(
            "SELECT state, retcode, reason, started_at, ended_at, head_bytes, tail_bytes, "
            "dropped_bytes FROM results WHERE run_id = ?",
            (run_id,),
        ).fetchone()
    return dict(row) if row is not None else None


def run_once(host: EngineProcess, job: str, timeout: float) -> dict[str, Any]:
    """Start a run of JOB, sample the engine until it completes, and return the figures."""
    before = sample_process(host.pid)
    dispatched = time.time()
    reply = host.command("run", job=job)
    if not reply.get("started"):
        raise RuntimeError(f"the run of {job} did not start: {reply}")
    run_id = reply["run_id"]
    peak_rss = before.rss_bytes
    deadline = time.monotonic() + timeout
    row = None
    while time.monotonic() < deadline:
        sample = sample_process(host.pid)
        peak_rss = max(peak_rss, sample.rss_bytes)
        row = machine_result(host.store_path, run_id)
        if row is not None and row["state"] == "done":
            break
        time.sleep(0.1)
    else:
        raise TimeoutError(f"run {run_id} did not complete within {timeout:g} s")
    after = sample_process(host.pid)
    assert row is not None
    started = datetime.fromisoformat(row["started_at"]).timestamp()
    ended = datetime.fromisoformat(row["ended_at"]).timestamp()
    return {
        "run_id": run_id,
        "retcode": row["retcode"],
        "reason": row["reason"],
        "wrapper_seconds": ended - started,
        "dispatch_to_complete_seconds": ended - dispatched,
        "head_bytes": row["head_bytes"],
        "tail_bytes": row["tail_bytes"],
        "dropped_bytes": row["dropped_bytes"],
        "rss_before": before.rss_bytes,
        "rss_peak": peak_rss,
        "engine_cpu_percent": cpu_percent_between(before, after),
    }


def run(args: argparse.Namespace) -> Result:
    total = args.megabytes * 1_000_000
    command = output_command(total)
    root = scratch_dir("heavy")
    jobs_dir = root / "jobs"
    month = far_month(datetime.now())
    write_job_files(
        jobs_dir,
        {
            "heavy": {
                "sec": "0",
                "min": "0",
                "hour": "0",
                "dom": "1",
                "mon": str(month),
                "dow": "*",
                "year": "*",
                "targets": "bench-minion-0001",
                "command": command,
                "timeout": 0,
            }
        },
        1,
    )
    bare_devnull = []
    bare_pipe = []
    for _ in range(args.repeat):
        bare_devnull.append(time_bare_devnull(command))
        seconds, read = time_bare_pipe(command)
        if read != total:
            raise RuntimeError(f"the command printed {read} bytes, not {total}")
        bare_pipe.append(seconds)

    host = EngineProcess(root / "host", jobs_dir, launch="local-wrapper")
    runs = []
    try:
        host.wait_ready()
        for _ in range(args.repeat):
            runs.append(run_once(host, "heavy", timeout=3600))
            log.info("heavy output run: %s", runs[-1])
            time.sleep(2)
    finally:
        host.stop()

    result = Result("heavy-output")
    result.details = {
        "command": command,
        "bytes": total,
        "bare_devnull_seconds": bare_devnull,
        "bare_pipe_seconds": bare_pipe,
        "runs": runs,
    }
    basis = f"median of {args.repeat}"
    wrapper_seconds = median(r["wrapper_seconds"] for r in runs)
    devnull = median(bare_devnull)
    pipe = median(bare_pipe)
    result.add("bare, output to /dev/null", devnull, "s", basis=basis)
    result.add("bare, output read from a pipe", pipe, "s", basis=basis)
    result.add("under the wrapper, start to complete stored", wrapper_seconds, "s", basis=basis)
    ratio = wrapper_seconds / devnull
    result.add(
        "ratio wrapper / bare (/dev/null)",
        ratio,
        "",
        f"<= {RATIO_TARGET:g}",
        ratio <= RATIO_TARGET,
        basis,
    )
    result.add("ratio wrapper / bare (pipe)", wrapper_seconds / pipe, "", basis=basis)
    throughput = total / wrapper_seconds / 1e6
    result.add("throughput under the wrapper", throughput, "MB/s", basis=basis)
    kept = max(r["head_bytes"] + r["tail_bytes"] for r in runs)
    accounted = all(r["head_bytes"] + r["tail_bytes"] + r["dropped_bytes"] == total for r in runs)
    result.add("output kept (max of runs)", kept, "bytes", f"<= {DEFAULT_CAP}", kept <= DEFAULT_CAP)
    result.add("kept + dropped = printed", float(accounted), "", "1", accounted)
    growth = max(r["rss_peak"] - r["rss_before"] for r in runs) / 2**20
    result.add("engine RSS growth during a run (max)", growth, "MiB", basis=f"max of {args.repeat}")
    result.add(
        "engine CPU during a run",
        median(r["engine_cpu_percent"] for r in runs),
        "% of a core",
        basis=basis,
    )
    return result
