"""Minion side of Saltpeter as a typed Python API: start, list and kill local runs.

The functions run in the calling process. :func:`launch`, :func:`running` and
:func:`kill_local` are the wrapper's own launcher code (``saltpeter.wrapper``),
which the ``saltpeter`` execution module reaches through the deployed
wrapper's subcommands (``sp_wrapper.py launch``, ``running``, ``kill-local``),
because a minion needs neither this package nor Tornado for them.
docs/protocol.md describes the wrapper's command line, its ready pipe and its
local records in STATEDIR/<run id>.json.
"""

from __future__ import annotations

import os
import subprocess
import sys

from saltpeter.wrapper import (
    DEFAULT_LOGDIR,
    DEFAULT_STATEDIR,
    LOGLEVELS,
    kill_local,
    launch,
    missing_wrapper_message,
    running,
)

__all__ = [
    "DEFAULT_LOGDIR",
    "DEFAULT_STATEDIR",
    "DEFAULT_WRAPPER_PATH",
    "LOGLEVELS",
    "WrapperError",
    "kill_local",
    "launch",
    "running",
    "wrapper_version",
]

DEFAULT_WRAPPER_PATH = "/usr/local/bin/sp_wrapper.py"


class WrapperError(Exception):
    """The wrapper file is missing, or running it failed."""


def wrapper_version(wrapper_path: str, python: str = sys.executable) -> str:
    """Run ``wrapper_path --version`` and return the version it prints.

    Raises WrapperError when the file is missing or the wrapper fails.
    """
    if not os.path.isfile(wrapper_path):
        raise WrapperError(missing_wrapper_message(wrapper_path))
    try:
        proc = subprocess.run(
            [python, wrapper_path, "--version"],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=30,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise WrapperError(f"cannot run {python} {wrapper_path} --version: {exc}") from None
    if proc.returncode != 0:
        stderr = proc.stderr.decode("utf-8", "replace").strip()
        raise WrapperError(
            f"{python} {wrapper_path} --version failed with status {proc.returncode}: {stderr}"
        )
    return proc.stdout.decode("utf-8", "replace").strip()
