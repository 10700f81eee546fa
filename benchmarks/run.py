"""Run Saltpeter's benchmarks and print a table of their figures.

Usage, from the repository root::

    .venv/bin/python benchmarks/run.py                    # every benchmark, in order
    .venv/bin/python benchmarks/run.py firing --bursts 3  # one benchmark, with its options
    .venv/bin/python benchmarks/run.py soak --help

Each run writes its figures and raw data to benchmarks/results/. The
benchmarks start their own servers and Salt daemons on 127.0.0.1 and stop
them at the end; docs/benchmarks.md describes each one.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

if __package__ in (None, ""):
    # Run as a script: make the repository importable as the package root.
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import Result, format_table, save_result

# Benchmark name to module, in the order "all" runs them. The soak runs last
# because it takes an hour.
BENCHMARKS = {
    "firing": "benchmarks.firing",
    "salt-schedule": "benchmarks.salt_schedule",
    "following": "benchmarks.following",
    "heavy-output": "benchmarks.heavy_output",
    "fanout": "benchmarks.fanout",
    "launch-cost": "benchmarks.launch_cost",
    "soak": "benchmarks.soak",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="benchmarks/run.py",
        description="Run Saltpeter's benchmarks on 127.0.0.1 and print their figures.",
    )
    parser.add_argument("--verbose", action="store_true", help="log progress at debug level")
    parser.add_argument(
        "--tree",
        type=Path,
        default=None,
        help="measure the Saltpeter of this checkout (for example a git worktree) instead of "
        "the one this Python imports; it is put first on PYTHONPATH for every process",
    )
    commands = parser.add_subparsers(dest="benchmark", metavar="BENCHMARK")
    commands.add_parser("all", help="run every benchmark with its defaults (about 2 hours)")
    for name, module_name in BENCHMARKS.items():
        module = importlib.import_module(module_name)
        summary = (module.__doc__ or "").strip().splitlines()[0]
        sub = commands.add_parser(name, help=summary, description=module.__doc__)
        module.add_arguments(sub)
    return parser


def measured_tree() -> dict[str, str]:
    """Return where the measured saltpeter package is and its checkout's commit, if any."""
    import saltpeter

    package = Path(saltpeter.__file__).resolve().parent
    commit = subprocess.run(
        ["git", "-C", str(package), "describe", "--always", "--dirty"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    return {"saltpeter": str(package), "commit": commit}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.tree is not None:
        source = str((args.tree / "salt").resolve())
        if os.environ.get("PYTHONPATH", "").split(os.pathsep)[0] != source:
            # Daemons, engine hosts and wrappers are separate processes, so the
            # tree must be on PYTHONPATH before anything imports saltpeter.
            os.environ["PYTHONPATH"] = os.pathsep.join(
                part for part in (source, os.environ.get("PYTHONPATH", "")) if part
            )
            os.execv(sys.executable, [sys.executable, *sys.argv])
    # A SIGTERM ends the run through SystemExit, so each benchmark stops what it started.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(name)s: %(message)s",
    )
    # Salt and Tornado log every connection and daemon step at INFO.
    for noisy in ("salt", "tornado", "saltpeter"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    names = list(BENCHMARKS) if args.benchmark in (None, "all") else [args.benchmark]
    results: list[Result] = []
    for name in names:
        module = importlib.import_module(BENCHMARKS[name])
        if args.benchmark in (None, "all"):
            sub_parser = argparse.ArgumentParser()
            module.add_arguments(sub_parser)
            module_args = sub_parser.parse_args([])
        else:
            module_args = args
        logging.getLogger("benchmarks").info("running %s", name)
        result = module.run(module_args)
        result.details["measured"] = measured_tree()
        path = save_result(result)
        logging.getLogger("benchmarks").info("%s: results in %s", name, path)
        results.append(result)
    print(format_table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
