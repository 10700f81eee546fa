"""A real Saltpeter engine in its own process, with a stand-in for the Salt master.

The process runs :class:`saltpeter.engine.Engine` unchanged: config loader and
watcher, scheduler, dispatch, run manager, SQLite store, metrics and the
machines WebSocket on 127.0.0.1. :class:`BenchBridge` subclasses the engine's
:class:`saltpeter.saltbridge.SaltBridge` and keeps its target resolution,
which runs Salt's own ``CkMinions`` against a key directory holding one
accepted key per benchmark minion. It replaces only what needs a running
salt-master:

- ``publish`` records the call and its lateness, and then, depending on
  ``--launch``, answers it as a minion would (see LAUNCH_MODES);
- events for the Salt bus are counted and dropped.

The benchmark driver talks to the process over stdin and stdout, one JSON
object per line: it writes a command ({"command": "stats"}, "reset",
{"command": "run", "job": NAME}, {"command": "memory", "trim": BOOL}, "quit")
and reads the reply. Lateness is recorded when ``publish`` is called, the
same instant the engine's ``saltpeter_dispatch_lateness_seconds`` histogram
observes, but exact instead of bucketed.

For finding what costs time or memory, the host also records, into its
``stats``: garbage collections over 5 ms; with ``--lag-probe``, how late the
event loop runs, and with ``--stall-stacks`` too, every thread's stack while
it is over 50 ms behind; with ``--store-timing``, the store's writes over
2 ms, with their CPU time and the size of the write-ahead log before and
after. ``memory`` reports malloc's figures, Python's small-object arenas
and the largest mappings, and with ``PYTHONTRACEMALLOC=N`` in the
environment the call paths holding the most.

Command line::

    python -m benchmarks.engine_host --config-dir DIR --store FILE --port N --state-dir DIR
        [--minions N] [--launch answer-failed|answer-started|local-wrapper|none]
        [--lag-probe [--stall-stacks]] [--store-timing]
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import ctypes
import gc
import json
import logging
import os
import pwd
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import tracemalloc
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable
from datetime import datetime
from pathlib import Path
from typing import Any

import salt.config
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from saltpeter import wrapper
from saltpeter.engine import Engine
from saltpeter.runs import utcnow
from saltpeter.saltbridge import SaltBridge

log = logging.getLogger(__name__)

# What the stand-in does with a `saltpeter.launch` publish:
# - answer-failed: each minion returns {"started": false} after --answer-delay
#   seconds, as a minion without the wrapper would, so the run ends with 255;
# - answer-started: each minion returns {"started": true} after --answer-delay
#   seconds, and the benchmark's own clients connect as the wrappers;
# - local-wrapper: runs the real wrapper's `launch` subcommand on this host, as
#   the execution module does on a minion, and returns what it prints;
# - none: nothing answers.
LAUNCH_MODES = ("answer-failed", "answer-started", "local-wrapper", "none")

EventHandler = Callable[[str, dict[str, Any]], Awaitable[None] | None]


class BenchBridge(SaltBridge):
    """SaltBridge without a Salt master: minions answer the launch as LAUNCH_MODES says."""

    def __init__(
        self,
        engine: Engine,
        opts: dict[str, Any],
        executor: concurrent.futures.Executor,
        minions: list[str],
        launch_mode: str,
        answer_delay: float,
        state_dir: Path,
        launches_file: Path | None,
    ) -> None:
        super().__init__(opts, executor)
        self.engine = engine
        self.minions = minions
        self.launch_mode = launch_mode
        self.answer_delay = answer_delay
        self.state_dir = state_dir
        self.launches_file = launches_file
        self.on_event: EventHandler | None = None
        self.lateness: list[float] = []
        # (scheduled instant as a UNIX time, lateness in seconds) of each launch.
        self.fires: list[tuple[float, float]] = []
        self.publishes: Counter[str] = Counter()
        self.events: Counter[str] = Counter()
        self._tasks: set[asyncio.Task[Any]] = set()

    async def start(self, on_event: EventHandler) -> None:
        self.on_event = on_event

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()

    def fire(self, tag: str, data: dict[str, Any]) -> None:
        parts = tag.split("/")
        self.events[parts[-1] if len(parts) > 3 else tag] += 1

    async def flush_events(self, timeout: float = 5.0) -> None:
        return None

    async def accepted_minions(self) -> list[str]:
        return []

    async def publish(
        self,
        minions: Iterable[str],
        fun: str,
        arg: list[Any],
        kwarg: dict[str, Any] | None = None,
        jid: str = "",
    ) -> dict[str, Any]:
        now = utcnow()
        minions = list(minions)
        self.publishes[fun] += 1
        if fun == "saltpeter.launch":
            self._on_launch(now, minions, arg, jid)
        # A real publish (LocalClient.run_job_async) waits for the master's
        # reply over the network, so the other launches of a batch are handed
        # over before this one's caller goes on. Yielding once does the same.
        await asyncio.sleep(0)
        return {"jid": jid, "minions": minions}

    def _on_launch(self, now: datetime, minions: list[str], arg: list[Any], jid: str) -> None:
        run_id, job_name, url, token = arg
        assert self.engine.manager is not None
        run = self.engine.manager.runs.get(run_id)
        if run is not None and run.scheduled_at is not None:
            lateness = (now - run.scheduled_at).total_seconds()
            self.lateness.append(lateness)
            self.fires.append((run.scheduled_at.timestamp(), lateness))
        if self.launches_file is not None:
            record = {
                "run": run_id,
                "job": job_name,
                "url": url,
                "token": token,
                "key": str(minion_key_path(self.opts)),
            }
            with self.launches_file.open("a") as handle:
                handle.write(json.dumps({**record, "minions": minions}) + "\n")
        if self.launch_mode in ("answer-failed", "answer-started"):
            started = self.launch_mode == "answer-started"
            self._spawn(self._answer(jid, minions, started))
        elif self.launch_mode == "local-wrapper":
            for minion in minions:
                self._spawn(self._launch_locally(jid, minion, run_id, job_name, url, token))

    def _spawn(self, coroutine: Any) -> None:
        task = asyncio.create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _answer(self, jid: str, minions: list[str], started: bool) -> None:
        await asyncio.sleep(self.answer_delay)
        ret = (
            {"started": True, "pid": 0}
            if started
            else {
                "started": False,
                "error": "benchmark stand-in minion: no wrapper here",
            }
        )
        for minion in minions:
            await self._deliver(f"salt/job/{jid}/ret/{minion}", {"return": ret, "id": minion})

    async def _launch_locally(
        self, jid: str, minion: str, run_id: str, job_name: str, url: str, token: str
    ) -> None:
        """Run the wrapper's launcher as the execution module would, and return its answer."""
        argv = [
            sys.executable,
            wrapper.__file__,
            "launch",
            f"--run={run_id}",
            f"--job={job_name}",
            f"--machine={minion}",
            f"--url={url}",
            "--loglevel=normal",
            f"--logdir={self.state_dir / 'wrapper-logs'}",
            f"--statedir={self.state_dir / 'wrapper-run'}",
            f"--key={minion_key_path(self.opts)}",
        ]

        def launch() -> dict[str, Any]:
            proc = subprocess.run(
                argv,
                env={**os.environ, "SP_RUN_TOKEN": token},
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
            )
            try:
                return dict(json.loads(proc.stdout))
            except ValueError:
                return {"started": False, "error": f"launcher printed {proc.stdout!r}"}

        ret = await asyncio.get_running_loop().run_in_executor(self.executor, launch)
        await self._deliver(f"salt/job/{jid}/ret/{minion}", {"return": ret, "id": minion})

    async def _deliver(self, tag: str, data: dict[str, Any]) -> None:
        if self.on_event is None:
            return
        result = self.on_event(tag, data)
        if asyncio.iscoroutine(result):
            await result


def _top_allocations(count: int = 15) -> list[str]:
    """Return the source lines holding the most memory, when PYTHONTRACEMALLOC is set."""
    if not tracemalloc.is_tracing():
        return []
    statistics = tracemalloc.take_snapshot().statistics("lineno")
    return [str(statistic) for statistic in statistics[:count]]


def _top_tracebacks(count: int = 5) -> list[list[str]]:
    """Return the call paths holding the most memory, when PYTHONTRACEMALLOC is set."""
    if not tracemalloc.is_tracing():
        return []
    statistics = tracemalloc.take_snapshot().statistics("traceback")
    return [[str(statistic), *statistic.traceback.format()] for statistic in statistics[:count]]


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        )
    ]


def _rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def malloc_figures(trim: bool = False) -> dict[str, Any]:
    """Return glibc's heap figures (mallinfo2) and RSS; with TRIM, after malloc_trim(0).

    ``in_use`` is what the program holds through malloc, ``free_held`` what
    malloc keeps free in its heaps, ``mmapped`` the large blocks it mapped
    on their own. A large ``free_held`` with a small ``in_use`` means memory
    that was allocated for a while and freed, and not given back.
    """
    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = _MallInfo2
    figures: dict[str, Any] = {"rss_before": _rss_bytes()}
    if trim:
        libc.malloc_trim(ctypes.c_size_t(0))
    info = libc.mallinfo2()
    figures.update(
        {
            "rss": _rss_bytes(),
            "heap": info.arena,
            "in_use": info.uordblks,
            "free_held": info.fordblks,
            "mmapped": info.hblkhd,
            "mmapped_blocks": info.hblks,
        }
    )
    if tracemalloc.is_tracing():
        figures["traced"], figures["traced_peak"] = tracemalloc.get_traced_memory()
        figures["top_tracebacks"] = _top_tracebacks()
    figures["pymalloc"] = _pymalloc_summary()
    figures["largest_mappings"] = _largest_mappings()
    figures["threads"] = threading.active_count()
    return figures


def _pymalloc_summary() -> dict[str, int]:
    """Return the arena figures of Python's small-object allocator.

    Its arenas are mapped on their own, so malloc's figures leave them out.
    ``sys._debugmallocstats`` writes them to the C-level stderr, which is
    caught in a temporary file.
    """
    with tempfile.TemporaryFile() as caught:
        saved = os.dup(2)
        os.dup2(caught.fileno(), 2)
        try:
            sys._debugmallocstats()
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        caught.seek(0)
        text = caught.read().decode("utf-8", "replace")
    labels = ("arenas allocated current", "bytes in allocated blocks", "bytes in available blocks")
    summary = {}
    for line in text.splitlines():
        label, _, value = line.rpartition("=")
        label = label.strip().lstrip("#").strip()
        if label in labels:
            summary[label] = int(value.strip().replace(",", ""))
    return summary


def _largest_mappings(count: int = 6) -> list[str]:
    """Return the mappings of this process with the most resident memory."""
    mappings = []
    current = ""
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            if line[0] in "0123456789abcdef" and "-" in line.split(" ", 1)[0]:
                current = line.strip()
            elif line.startswith("Rss:"):
                mappings.append((int(line.split()[1]), current))
    mappings.sort(reverse=True)
    return [f"{kib} KiB {name}" for kib, name in mappings[:count]]


def minion_key_path(opts: dict[str, Any]) -> Path:
    """Return the private key that every benchmark minion signs its run credential with."""
    return Path(opts["pki_dir"]).parent / "bench-minion.pem"


def master_opts(directory: Path, minions: list[str]) -> dict[str, Any]:
    """Return Salt master opts whose key directory has MINIONS accepted.

    CkMinions resolves targets against these keys, and the engine checks
    each wrapper's hello against them. All benchmark minions share one RSA
    key (minion_key_path), because generating 2,000 keys would take minutes.
    """
    accepted = directory / "pki" / "minions"
    accepted.mkdir(parents=True, exist_ok=True)
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    (directory / "bench-minion.pem").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    for minion in minions:
        (accepted / minion).write_bytes(public)
    config = directory / "master"
    config.write_text(
        "\n".join(
            f"{key}: {value}"
            for key, value in (
                ("root_dir", directory),
                ("pki_dir", directory / "pki"),
                ("cachedir", directory / "cache"),
                ("sock_dir", directory / "sock"),
                ("log_file", directory / "master.log"),
                ("user", pwd.getpwuid(os.getuid()).pw_name),
            )
        )
        + "\n"
    )
    return dict(salt.config.master_config(str(config)))


class Timings:
    """Wall-clock instants and durations of the engine's config loads and applies."""

    def __init__(self) -> None:
        self.records: list[dict[str, Any]] = []

    def wrap(self, what: str, function: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            started_wall = time.time()
            started = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                self.records.append(
                    {
                        "what": what,
                        "start": started_wall,
                        "seconds": time.perf_counter() - started,
                    }
                )

        return timed

    def wrap_async(self, what: str, function: Callable[..., Awaitable[Any]]) -> Callable[..., Any]:
        async def timed(*args: Any, **kwargs: Any) -> Any:
            started_wall = time.time()
            started = time.perf_counter()
            try:
                return await function(*args, **kwargs)
            finally:
                self.records.append(
                    {
                        "what": what,
                        "start": started_wall,
                        "seconds": time.perf_counter() - started,
                    }
                )

        return timed


def _file_size(path: str) -> int:
    try:
        return os.stat(path).st_size
    except OSError:
        return -1


class SlowCalls:
    """Times the store's write calls: totals per method, and each call over THRESHOLD seconds.

    Each record has the wall time and the CPU time of the calling thread, so a
    slow call shows whether it worked or waited (for the disk, a lock or the
    GIL).
    """

    THRESHOLD = 0.002
    METHODS = ("update_machine", "append_output", "finish_run", "insert_runs", "commit_batch")
    RECORDS_MAX = 5000

    def __init__(self) -> None:
        self.records: list[dict[str, Any]] = []
        # method -> [calls, wall seconds, CPU seconds], over every call
        self.totals: dict[str, list[float]] = {}

    def install(self) -> None:
        from saltpeter.store import RunStore

        for name in self.METHODS:
            setattr(RunStore, name, self._wrap(name, getattr(RunStore, name)))

    def _wrap(self, name: str, method: Callable[..., Any]) -> Callable[..., Any]:
        def timed(store: Any, *args: Any, **kwargs: Any) -> Any:
            wall, cpu = time.perf_counter(), time.thread_time()
            try:
                return method(store, *args, **kwargs)
            finally:
                seconds = time.perf_counter() - wall
                cpu_seconds = time.thread_time() - cpu
                total = self.totals.setdefault(name, [0, 0.0, 0.0])
                total[0] += 1
                total[1] += seconds
                total[2] += cpu_seconds
                if seconds > self.THRESHOLD and len(self.records) < self.RECORDS_MAX:
                    self.records.append(
                        {
                            "call": name,
                            "at": time.time(),
                            "seconds": seconds,
                            "cpu_seconds": cpu_seconds,
                            # Read after slow calls only, so the timing adds
                            # no system call to the engine's other writes.
                            "wal_bytes_after": _file_size(f"{store.path}-wal"),
                        }
                    )

        return timed


class GcPauses:
    """Records every garbage collection that takes longer than THRESHOLD seconds."""

    THRESHOLD = 0.005
    RECORDS_MAX = 2000

    def __init__(self) -> None:
        self.records: list[dict[str, Any]] = []
        self.counts = Counter()
        self._started = 0.0
        gc.callbacks.append(self._callback)

    def _callback(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
            return
        seconds = time.perf_counter() - self._started
        self.counts[info["generation"]] += 1
        if seconds > self.THRESHOLD and len(self.records) < self.RECORDS_MAX:
            self.records.append(
                {
                    "at": time.time(),
                    "generation": info["generation"],
                    "seconds": seconds,
                    "collected": info["collected"],
                }
            )


class LagProbe:
    """Measures how late the event loop runs a callback scheduled every INTERVAL seconds.

    With STALL_STACKS, a thread also watches the probe's last turn. While the
    loop is more than STALL_SECONDS behind, it records the stack of every
    thread every STALL_SAMPLE_SECONDS, so a stall can be traced to the code
    that held the loop or the GIL. The thread needs the GIL too, so a sample
    may come late. While it samples it slows the loop down, so the firing
    benchmark's bursts run without it.
    """

    STALL_SECONDS = 0.05
    STALL_SAMPLE_SECONDS = 0.005
    STALL_SAMPLES_MAX = 400

    def __init__(self, interval: float = 0.01, stall_stacks: bool = False) -> None:
        self.interval = interval
        self.stall_stacks = stall_stacks
        self.samples: list[tuple[float, float]] = []  # (wall time, lag in seconds)
        self.stalls: list[dict[str, Any]] = []
        self._beat = time.monotonic()
        self._loop_thread = threading.get_ident()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        if self.stall_stacks:
            threading.Thread(target=self._watch, name="stall-sampler", daemon=True).start()
        while True:
            expected = loop.time() + self.interval
            self._beat = time.monotonic()
            await asyncio.sleep(self.interval)
            self._beat = time.monotonic()
            lag = loop.time() - expected
            if lag > 0.005:
                self.samples.append((time.time(), lag))

    def _watch(self) -> None:
        me = threading.get_ident()
        names = {}
        while True:
            time.sleep(self.STALL_SAMPLE_SECONDS)
            behind = time.monotonic() - self._beat - self.interval
            if behind < self.STALL_SECONDS or len(self.stalls) >= self.STALL_SAMPLES_MAX:
                continue
            if len(names) != threading.active_count():
                names = {thread.ident: thread.name for thread in threading.enumerate()}
            stacks = {}
            for ident, frame in sys._current_frames().items():
                if ident == me:
                    continue
                name = "loop" if ident == self._loop_thread else names.get(ident, str(ident))
                stacks[name] = [
                    f"{entry.filename}:{entry.lineno} {entry.name}"
                    for entry in traceback.extract_stack(frame)[-12:]
                ]
            self.stalls.append({"at": time.time(), "behind": behind, "stacks": stacks})


class Host:
    """The engine, its stand-in bridge and the control channel on stdin and stdout."""

    def __init__(self, args: argparse.Namespace) -> None:
        settings = {
            "machines_ws_port": args.port,
            "machines_ws_bind_addr": "127.0.0.1",
            "default_saltpeter_server_host": "127.0.0.1",
            "logdir": str(args.state_dir / "logs"),
            "startup_wait": 0,
            **json.loads(args.settings),
        }
        minions = [f"{args.minion_prefix}{number:04d}" for number in range(1, args.minions + 1)]
        opts = master_opts(args.state_dir / "master", minions)
        self.engine = Engine(
            opts, config_dir=str(args.config_dir), store_path=str(args.store), settings=settings
        )
        self.bridge = BenchBridge(
            self.engine,
            opts,
            self.engine.executor,
            minions,
            args.launch,
            args.answer_delay,
            args.state_dir,
            args.launches_file,
        )
        self.engine.bridge = self.bridge  # type: ignore[assignment]
        self.timings = Timings()
        self.slow_calls = SlowCalls()
        if args.store_timing:
            self.slow_calls.install()
        self.gc_pauses = GcPauses()
        self.engine.loader.load = self.timings.wrap("load", self.engine.loader.load)  # type: ignore[method-assign]
        # A reload is applied in slices with the event loop running between
        # them, so "apply" is the time from the first slice to the last.
        # Engines older than the slices (measured with run.py --tree) record no
        # "apply" time.
        if hasattr(self.engine, "_apply_jobs"):
            self.engine._apply_jobs = self.timings.wrap_async(  # type: ignore[method-assign]
                "apply", self.engine._apply_jobs
            )
        self.lag_probe = LagProbe(stall_stacks=args.stall_stacks) if args.lag_probe else None
        self.started_wall = time.time()
        self.ready_wall: float | None = None

    async def main(self) -> None:
        engine_task = asyncio.create_task(self.engine.run())
        tasks = [engine_task, asyncio.create_task(self._control())]
        if self.lag_probe is not None:
            tasks.append(asyncio.create_task(self.lag_probe.run()))
        tasks.append(asyncio.create_task(self._watch_ready()))
        done, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        for task in done:
            if task.exception() is not None:
                raise task.exception()  # type: ignore[misc]

    async def _watch_ready(self) -> None:
        while not (self.engine.ready and self.engine.scheduler is not None):
            await asyncio.sleep(0.01)
        self.ready_wall = time.time()
        self._reply({"event": "ready"})
        await asyncio.Event().wait()

    async def _control(self) -> None:
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader()
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
        while True:
            line = await reader.readline()
            if not line:
                return
            request = json.loads(line)
            command = request.get("command")
            if command == "quit":
                return
            if command == "run":
                # Runs wait for the dispatch, which must not block this channel.
                task = asyncio.create_task(self._run_job(str(request.get("job"))))
                self.bridge._tasks.add(task)
                task.add_done_callback(self.bridge._tasks.discard)
                continue
            if command == "reset":
                self.bridge.lateness.clear()
                self.bridge.fires.clear()
                self.timings.records.clear()
                if self.lag_probe is not None:
                    self.lag_probe.samples.clear()
                    self.lag_probe.stalls.clear()
                self.slow_calls.records.clear()
                self.slow_calls.totals.clear()
                self.gc_pauses.records.clear()
                self.gc_pauses.counts.clear()
                self._reply({"ok": True})
            elif command == "memory":
                self._reply(malloc_figures(trim=bool(request.get("trim"))))
            elif command == "stats":
                self._reply(self.stats())
            else:
                self._reply({"error": f"unknown command {command!r}"})

    async def _run_job(self, name: str) -> None:
        try:
            self._reply(await self.engine.run_job(name))
        except Exception as exc:
            self._reply({"error": f"run {name} failed: {exc}"})

    def stats(self) -> dict[str, Any]:
        manager = self.engine.manager
        registry = self.engine.metrics.registry
        buckets = {}
        for sample in registry.collect():
            if sample.name != "saltpeter_dispatch_lateness_seconds":
                continue
            for point in sample.samples:
                if point.name.endswith("_bucket"):
                    buckets[point.labels["le"]] = point.value
        return {
            "pid": os.getpid(),
            "started_wall": self.started_wall,
            "ready_wall": self.ready_wall,
            "lateness": list(self.bridge.lateness),
            "fires": list(self.bridge.fires),
            "publishes": dict(self.bridge.publishes),
            "events": dict(self.bridge.events),
            "histogram_buckets": buckets,
            "timings": list(self.timings.records),
            "lag": list(self.lag_probe.samples) if self.lag_probe is not None else [],
            "stalls": list(self.lag_probe.stalls) if self.lag_probe is not None else [],
            "slow_store_calls": list(self.slow_calls.records),
            "store_call_totals": dict(self.slow_calls.totals),
            "gc_pauses": list(self.gc_pauses.records),
            "gc_counts": dict(self.gc_pauses.counts),
            "runs_in_flight": len(manager.runs) if manager is not None else 0,
            "jobs": len(self.engine.jobs),
            "allocations": _top_allocations(),
        }

    def _reply(self, data: dict[str, Any]) -> None:
        sys.stdout.write(json.dumps(data) + "\n")
        sys.stdout.flush()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config-dir", type=Path, required=True, help="job directory")
    parser.add_argument("--store", type=Path, required=True, help="SQLite store file")
    parser.add_argument("--port", type=int, required=True, help="machines WebSocket port")
    parser.add_argument("--state-dir", type=Path, required=True, help="logs and wrapper files")
    parser.add_argument("--minions", type=int, default=1, help="minion names targets match")
    parser.add_argument("--minion-prefix", default="bench-minion-", help="minion name prefix")
    parser.add_argument("--launch", choices=LAUNCH_MODES, default="answer-failed")
    parser.add_argument(
        "--answer-delay", type=float, default=0.5, help="seconds before minions answer"
    )
    parser.add_argument(
        "--launches-file", type=Path, default=None, help="append each launch here as JSON"
    )
    parser.add_argument(
        "--settings", default="{}", help="JSON object of engine settings to override"
    )
    parser.add_argument("--lag-probe", action="store_true", help="record event loop lag over 5 ms")
    parser.add_argument(
        "--stall-stacks",
        action="store_true",
        help="with --lag-probe, record every thread's stack while the loop is 50 ms behind",
    )
    parser.add_argument(
        "--store-timing", action="store_true", help="record store writes slower than 2 ms"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.state_dir.mkdir(parents=True, exist_ok=True)
    handler = logging.StreamHandler(sys.stderr)
    handler.setLevel(logging.WARNING)
    logging.basicConfig(level=logging.WARNING, handlers=[handler])
    host = Host(args)
    asyncio.run(host.main())
    return 0


if __name__ == "__main__":
    sys.exit(main())


class EngineProcess:
    """The driver's handle on an engine host process: start, query, stop."""

    def __init__(
        self,
        work_dir: Path,
        config_dir: Path,
        minions: int = 1,
        launch: str = "answer-failed",
        answer_delay: float = 0.5,
        settings: dict[str, Any] | None = None,
        lag_probe: bool = False,
        launches_file: Path | None = None,
        store_timing: bool = False,
        stall_stacks: bool = False,
    ) -> None:
        import queue
        import threading

        from benchmarks.common import PYTHON, REPO_ROOT, free_port

        work_dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.store_path = work_dir / "saltpeter.db"
        command = [
            PYTHON,
            "-m",
            "benchmarks.engine_host",
            f"--config-dir={config_dir}",
            f"--store={self.store_path}",
            f"--port={self.port}",
            f"--state-dir={work_dir}",
            f"--minions={minions}",
            f"--launch={launch}",
            f"--answer-delay={answer_delay}",
            f"--settings={json.dumps(settings or {})}",
        ]
        if lag_probe:
            command.append("--lag-probe")
        if store_timing:
            command.append("--store-timing")
        if stall_stacks:
            command.append("--stall-stacks")
        if launches_file is not None:
            command.append(f"--launches-file={launches_file}")
        self._stderr = (work_dir / "engine-host.stderr").open("w")
        self.proc = subprocess.Popen(
            command,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            text=True,
            cwd=REPO_ROOT,
        )
        self._lines: queue.Queue[str] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.stderr_path = work_dir / "engine-host.stderr"

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._lines.put(line)

    def _next_line(self, timeout: float) -> dict[str, Any]:
        import queue

        try:
            return dict(json.loads(self._lines.get(timeout=timeout)))
        except queue.Empty:
            raise TimeoutError(
                f"the engine host sent nothing for {timeout:g} s; see {self.stderr_path}"
            ) from None

    def wait_ready(self, timeout: float = 120.0) -> None:
        while self._next_line(timeout).get("event") != "ready":
            pass

    def command(self, name: str, timeout: float = 60.0, **fields: Any) -> dict[str, Any]:
        """Send a command ("stats", "reset", "run" with job=NAME) and return the reply."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"command": name, **fields}) + "\n")
        self.proc.stdin.flush()
        while True:
            reply = self._next_line(timeout)
            if "event" not in reply:
                return reply

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                assert self.proc.stdin is not None
                self.proc.stdin.write(json.dumps({"command": "quit"}) + "\n")
                self.proc.stdin.flush()
                self.proc.wait(20)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()
        self._stderr.close()
