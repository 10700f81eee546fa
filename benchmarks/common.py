"""Helpers shared by the benchmarks: statistics, process sampling, results and the machine.

Process figures come from psutil (a dependency of Salt), which reads /proc.
CPU time is user plus system time of one process, so "percent of a core" is
CPU seconds divided by wall seconds, times 100.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import resource
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TypeVar

import psutil

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = Path(__file__).resolve().parent / "results"
PYTHON = sys.executable
LOCALHOST = "127.0.0.1"

T = TypeVar("T")


# -- statistics ----------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """Return the q-th percentile (0-100) by linear interpolation between closest ranks.

    This is the default method of numpy.percentile. Raises ValueError on an empty sequence.
    """
    if not values:
        raise ValueError("percentile of an empty sequence")
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100.0
    low = math.floor(position)
    high = math.ceil(position)
    if low == high:
        return ordered[low]
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def summarize(values: Sequence[float]) -> dict[str, float]:
    """Return n, p50, p99 and max of ``values``, or only n when there are none."""
    if not values:
        return {"n": 0}
    return {
        "n": len(values),
        "p50": percentile(values, 50),
        "p99": percentile(values, 99),
        "max": max(values),
    }


def median(values: Iterable[float]) -> float:
    return statistics.median(list(values))


# -- results -------------------------------------------------------------------


@dataclass
class Figure:
    """One measured figure and its target, for the summary table."""

    name: str
    value: float
    unit: str
    # Human-readable target, such as "<= 0.050"; empty for figures without one.
    target: str = ""
    # None for figures without a target.
    met: bool | None = None
    # Repetitions or samples behind the value, and how it was reduced ("median of 5").
    basis: str = ""


@dataclass
class Result:
    """The figures of one benchmark run and the raw data behind them."""

    benchmark: str
    figures: list[Figure] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)
    started: str = field(default_factory=lambda: utc_stamp())

    def add(
        self,
        name: str,
        value: float,
        unit: str,
        target: str = "",
        met: bool | None = None,
        basis: str = "",
    ) -> None:
        self.figures.append(Figure(name, value, unit, target, met, basis))


def utc_stamp() -> str:
    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")


def save_result(result: Result) -> Path:
    """Write the result as JSON to benchmarks/results/<benchmark>-<UTC time>.json."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{result.benchmark}-{result.started}.json"
    data = asdict(result)
    data["machine"] = machine_info()
    path.write_text(json.dumps(data, indent=2, default=str) + "\n")
    return path


def format_value(value: float) -> str:
    if value == 0 or abs(value) >= 100:
        return f"{value:.0f}"
    if abs(value) >= 1:
        return f"{value:.2f}"
    return f"{value:.4f}"


def format_table(results: Sequence[Result]) -> str:
    """Return a plain-text table with one line per figure."""
    header = ("benchmark", "figure", "value", "unit", "target", "met", "basis")
    rows = [header]
    for result in results:
        for figure in result.figures:
            met = "" if figure.met is None else ("yes" if figure.met else "NO")
            rows.append(
                (
                    result.benchmark,
                    figure.name,
                    format_value(figure.value),
                    figure.unit,
                    figure.target,
                    met,
                    figure.basis,
                )
            )
    widths = [max(len(row[column]) for row in rows) for column in range(len(header))]
    lines = [
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True))
        for row in rows
    ]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(line.rstrip() for line in lines)


# -- the machine ---------------------------------------------------------------


def machine_info() -> dict[str, Any]:
    """Return the facts docs/benchmarks.md lists for the machine a figure came from."""
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    versions: dict[str, str] = {}
    with contextlib.suppress(ImportError):
        import salt.version

        versions["salt"] = salt.version.__version__
    with contextlib.suppress(ImportError):
        import tornado

        versions["tornado"] = tornado.version
    return {
        "nproc": os.cpu_count(),
        "cpu_model": model,
        "memory_bytes": psutil.virtual_memory().total,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "load_average": os.getloadavg(),
        **versions,
    }


def system_busy_seconds() -> float:
    """Return the CPU seconds all cores spent busy since boot (everything but idle and iowait)."""
    times = psutil.cpu_times()
    return sum(times) - times.idle - getattr(times, "iowait", 0.0)


# -- processes -----------------------------------------------------------------


@dataclass(frozen=True)
class ProcessSample:
    """One reading of a process: CPU seconds so far, resident memory and open descriptors."""

    at: float  # time.monotonic()
    cpu_seconds: float
    rss_bytes: int
    fds: int


def sample_process(pid: int) -> ProcessSample:
    """Read CPU time, RSS and descriptor count of PID; raises psutil.NoSuchProcess."""
    process = psutil.Process(pid)
    with process.oneshot():
        times = process.cpu_times()
        return ProcessSample(
            at=time.monotonic(),
            cpu_seconds=times.user + times.system,
            rss_bytes=process.memory_info().rss,
            fds=process.num_fds(),
        )


def cpu_percent_between(first: ProcessSample, second: ProcessSample) -> float:
    """Return the percent of one core the process used between two samples."""
    wall = second.at - first.at
    return 100.0 * (second.cpu_seconds - first.cpu_seconds) / wall if wall > 0 else 0.0


@dataclass(frozen=True)
class CpuSnapshot:
    """The machine's busy CPU seconds so far, and the CPU seconds of each Salt daemon process."""

    busy: float
    # PID to (kind, CPU seconds); kind is "engine", "master" or "minion".
    salt: dict[int, tuple[str, float]]


def _salt_kind(cmdline: str) -> str | None:
    if "salt-master" in cmdline:
        return "engine" if "saltpeter" in cmdline and "Engine" in cmdline else "master"
    return "minion" if "salt-minion" in cmdline else None


def cpu_snapshot() -> CpuSnapshot:
    """Read the machine's busy CPU seconds and those of every running Salt process."""
    salt = {}
    for process in psutil.process_iter(["cmdline", "cpu_times"]):
        kind = _salt_kind(" ".join(process.info["cmdline"] or []))
        times = process.info["cpu_times"]
        if kind is not None and times is not None:
            salt[process.pid] = (kind, times.user + times.system)
    return CpuSnapshot(system_busy_seconds(), salt)


def cpu_by_kind(first: CpuSnapshot, second: CpuSnapshot) -> dict[str, float]:
    """Split the busy CPU seconds between two snapshots by kind of process.

    "engine", "master" and "minion" count the Salt processes that ran at both
    snapshots: the Saltpeter engine's, the rest of the master's, and the minion
    daemons'. "other" is the remainder: processes that started or ended in
    between, such as Salt's job processes, wrappers and commands, and the kernel.
    """
    kinds = {"engine": 0.0, "master": 0.0, "minion": 0.0}
    for pid, (kind, seconds) in second.salt.items():
        if pid in first.salt:
            kinds[kind] += seconds - first.salt[pid][1]
    kinds["other"] = max(0.0, second.busy - first.busy - sum(kinds.values()))
    return kinds


def pid_listening_on(port: int, address: str = LOCALHOST) -> int | None:
    """Return the PID of the process with a TCP socket listening on ADDRESS:PORT, or None."""
    for connection in psutil.net_connections(kind="tcp"):
        if (
            connection.status == psutil.CONN_LISTEN
            and connection.laddr
            and connection.laddr.port == port
            and connection.laddr.ip in (address, "0.0.0.0")
            and connection.pid
        ):
            return connection.pid
    return None


def raise_open_files_limit(wanted: int) -> int:
    """Raise this process's soft RLIMIT_NOFILE towards WANTED (up to the hard limit).

    Child processes inherit the new limit. Returns the soft limit now in force.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if target > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = target
    return soft


def free_port() -> int:
    """Return a TCP port that was free on 127.0.0.1 a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOCALHOST, 0))
        return int(sock.getsockname()[1])


def scratch_dir(prefix: str) -> Path:
    """Create a fresh directory under /tmp, with a short path for Salt's Unix sockets."""
    return Path(tempfile.mkdtemp(prefix=f"spb-{prefix}-", dir="/tmp"))


def wait_until(condition: Callable[[], T | None], timeout: float, what: str) -> T:
    """Call CONDITION every 0.1 s until it returns a truthy value, and return that value.

    Raises TimeoutError naming WHAT when TIMEOUT seconds pass first.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.1)


# -- job files -----------------------------------------------------------------


def render_job_files(
    jobs: dict[str, dict[str, Any]], jobs_per_file: int, prefix: str = "jobs"
) -> dict[str, str]:
    """Return file name to YAML text for JOBS (name to definition), JOBS_PER_FILE per file.

    Rendering 10,000 jobs takes seconds with PyYAML, so callers that time a
    write render first.
    """
    import yaml

    names = sorted(jobs)
    files = {}
    for start in range(0, len(names), jobs_per_file):
        chunk = {name: jobs[name] for name in names[start : start + jobs_per_file]}
        files[f"{prefix}-{start // jobs_per_file:05d}.yaml"] = yaml.safe_dump(
            chunk, default_flow_style=False, sort_keys=False
        )
    return files


def write_rendered(directory: Path, files: dict[str, str]) -> list[Path]:
    """Write rendered job files into DIRECTORY and return their paths.

    Each file is written to a temporary name first, and all are renamed at the
    end, so the engine never reads half a file and sees the whole set change
    at once.
    """
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, text in files.items():
        path = directory / name
        path.with_suffix(".tmp").write_text(text)
        paths.append(path)
    for path in paths:
        path.with_suffix(".tmp").rename(path)
    return paths


def write_job_files(
    directory: Path, jobs: dict[str, dict[str, Any]], jobs_per_file: int, prefix: str = "jobs"
) -> list[Path]:
    """Write JOBS (name to definition) as YAML files of JOBS_PER_FILE jobs each."""
    return write_rendered(directory, render_job_files(jobs, jobs_per_file, prefix))


def cron_fields(sec: str, minute: str = "*", hour: str = "*") -> dict[str, str]:
    """Return the seven schedule fields of a job, every day of every month and year."""
    return {
        "sec": sec,
        "min": minute,
        "hour": hour,
        "dom": "*",
        "mon": "*",
        "dow": "*",
        "year": "*",
    }
