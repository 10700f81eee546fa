"""Launch cost: the CPU one run's launch takes on a minion, piece by piece.

The fan-out benchmark measures 50 launches at once on a sandbox, where the
CPU of every short-lived process is counted together. This benchmark takes
one launch apart, on this host, without Salt daemons:

- In Salt's job process. A parent process imports what a minion's job
  process has loaded already (Salt's minion and crypto modules, Tornado,
  asyncio, ``cryptography``), and forks one child per repetition, as the
  minion forks a job process. The child times each step of the execution
  module's launch with ``getrusage``. The steps are compiling the deployed
  wrapper file, running it as a module, signing the run credential, and
  starting a process. Loading the minion's key with the check of its primes
  is timed too, for comparison.
- In the wrapper's process. Separate Python processes, timed with ``wait4``:
  the bare interpreter, the interpreter importing what the wrapper imports
  (asyncio and Tornado's WebSocket client), and the wrapper file itself run
  up to its version line (start-up, compiling the file, its imports).

Every figure is the median of ``--repeat`` repetitions, in milliseconds of
CPU (user plus system). Nothing here listens on a socket.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import resource
import subprocess
import sys
import tempfile
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks.common import PYTHON, REPO_ROOT, Result, median

WRAPPER_FILE = REPO_ROOT / "salt" / "saltpeter" / "wrapper.py"
# Modules a minion's job process has imported before the execution module runs.
JOB_PROCESS_MODULES = (
    "asyncio",
    "cryptography.hazmat.primitives.asymmetric.rsa",
    "salt.crypt",
    "salt.loader",
    "salt.minion",
    "tornado.websocket",
)
WRAPPER_IMPORTS = "import asyncio, tornado.httpclient, tornado.iostream, tornado.websocket"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--repeat", type=int, default=9, help="repetitions (default 9)")
    parser.add_argument(
        "--key-bits", type=int, default=2048, help="size of the minion key (default 2048)"
    )


def _cpu_ms() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return (usage.ru_utime + usage.ru_stime) * 1000.0


def _timed(step: Callable[[], Any]) -> float:
    started = _cpu_ms()
    step()
    return _cpu_ms() - started


def _write_key(directory: Path, bits: int) -> Path:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    path = directory / "minion.pem"
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
    )
    return path


def _job_process_steps(key_path: Path) -> dict[str, float]:
    """Time the launch's steps in this process; it is a fresh fork of the parent."""
    from cryptography.hazmat.primitives import serialization

    source = WRAPPER_FILE.read_bytes()
    figures: dict[str, float] = {}
    code: list[Any] = []
    figures["compile the wrapper file"] = _timed(
        lambda: code.append(compile(source, str(WRAPPER_FILE), "exec"))
    )
    module = types.ModuleType("_launch_cost_wrapper")
    module.__file__ = str(WRAPPER_FILE)
    sys.modules[module.__name__] = module  # dataclasses look their module up while it runs
    figures["run it as a module"] = _timed(lambda: exec(code[0], module.__dict__))
    pem = key_path.read_bytes()
    figures["load the key, primes checked"] = _timed(
        lambda: serialization.load_pem_private_key(pem, password=None)
    )
    figures["sign the credential (key loaded unchecked)"] = _timed(
        lambda: module.sign_credential(str(key_path), "run_1", "minion-1", "token")
    )

    def start_process() -> None:
        # The parent's side of starting the wrapper: fork and exec, as launch() does.
        process = subprocess.Popen(
            [PYTHON, "-c", "pass"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
            close_fds=True,
        )
        started.append(process)

    started: list[subprocess.Popen[bytes]] = []
    figures["start a process"] = _timed(start_process)
    for process in started:
        process.wait()
    return figures


def job_process_figures(repeat: int, key_path: Path) -> list[dict[str, float]]:
    """Fork REPEAT job processes from this one and collect their step timings."""
    for name in JOB_PROCESS_MODULES:
        importlib.import_module(name)
    runs = []
    for _ in range(repeat):
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: time the steps, report, and leave without cleanup
            os.close(read_end)
            try:
                report = json.dumps(_job_process_steps(key_path)).encode()
            except BaseException as exc:
                report = json.dumps({"error": repr(exc)}).encode()
            os.write(write_end, report)
            os._exit(0)
        os.close(write_end)
        with os.fdopen(read_end, "rb") as reader:
            report = json.loads(reader.read() or b"{}")
        os.waitpid(pid, 0)
        if "error" in report:
            error = report["error"]
            raise RuntimeError(f"timing the launch steps in a forked job process failed: {error}")
        runs.append(report)
    return runs


def _process_cpu_ms(argv: list[str]) -> float:
    """Run ARGV to its end and return the CPU it used, from wait4."""
    process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        raise RuntimeError(f"{argv} exited with {process.returncode}")
    return (usage.ru_utime + usage.ru_stime) * 1000.0


def wrapper_process_figures(repeat: int) -> list[dict[str, float]]:
    commands = {
        "interpreter start-up": [PYTHON, "-c", "pass"],
        "start-up and the wrapper's imports": [PYTHON, "-c", WRAPPER_IMPORTS],
        "start-up, compile and run the wrapper file to --version": [
            PYTHON,
            str(WRAPPER_FILE),
            "--version",
        ],
    }
    return [
        {name: _process_cpu_ms(argv) for name, argv in commands.items()} for _ in range(repeat)
    ]


def run(args: argparse.Namespace) -> Result:
    result = Result("launch-cost")
    with tempfile.TemporaryDirectory(prefix="sp-launch-cost-") as scratch:
        key_path = _write_key(Path(scratch), args.key_bits)
        job_runs = job_process_figures(args.repeat, key_path)
    wrapper_runs = wrapper_process_figures(args.repeat)
    result.details = {
        "repeat": args.repeat,
        "key_bits": args.key_bits,
        "wrapper_file": str(WRAPPER_FILE),
        "job_process": job_runs,
        "wrapper_process": wrapper_runs,
    }
    basis = f"median of {args.repeat}"
    for where, runs in (("job process", job_runs), ("wrapper process", wrapper_runs)):
        for name in runs[0]:
            result.add(f"{where}: {name}", median(run[name] for run in runs), "ms CPU", basis=basis)
    steps_now = [
        "compile the wrapper file",
        "run it as a module",
        "sign the credential (key loaded unchecked)",
        "start a process",
    ]
    result.add(
        "job process: the launch's steps, total",
        median(sum(run[step] for step in steps_now) for run in job_runs),
        "ms CPU",
        basis=basis,
    )
    return result
