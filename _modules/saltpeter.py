"""
Start and control Saltpeter runs on a minion.

The Saltpeter engine on the master calls :py:func:`launch` to start the
wrapper (``sp_wrapper.py``) for one run. The wrapper then fetches the job over
the engine's WebSocket, runs it and reports back, as docs/protocol.md in the
Saltpeter repository describes. :py:func:`running` and :py:func:`kill_local`
work from the wrapper's local records, without the engine.

Every function uses the deployed wrapper file, so a minion needs only that
file, which ``salt MINION state.apply saltpeter`` installs, and this module,
which ``saltutil.sync_modules`` or ``pip install saltpeter`` provides. The
``saltpeter`` package itself is not needed here. :py:func:`launch` loads the
wrapper file's launcher code into the Salt job process and starts the
wrapper from there, which saves a Python process per run. It runs the file
as ``sp_wrapper.py launch`` instead when the minion runs jobs in threads
(``multiprocessing: False``), because the wrapper would then stay a child of
the minion itself, or when the deployed file is too old for that. The other
functions run the file with the minion's own Python (``sp_wrapper.py
running``, ``kill-local``, ``--version``).

:configuration: Two minion options set where the wrapper's files are:

    .. code-block:: yaml

        # Directory of the wrapper's local run records. Default: /var/run/saltpeter
        saltpeter_statedir: /var/run/saltpeter
        # Wrapper used by running, kill_local and wrapper_version when no
        # wrapper_path is passed. Default: /usr/local/bin/sp_wrapper.py
        saltpeter_wrapper_path: /usr/local/bin/sp_wrapper.py
"""

import inspect
import json
import logging
import os
import subprocess
import sys
import types

from salt.exceptions import CommandExecutionError

log = logging.getLogger(__name__)

__virtualname__ = "saltpeter"

DEFAULT_WRAPPER_PATH = "/usr/local/bin/sp_wrapper.py"
DEFAULT_STATEDIR = "/var/run/saltpeter"
# Seconds the wrapper gets to report that it started; `sp_wrapper.py launch` kills it after that.
READY_TIMEOUT = 10
# Seconds a subcommand may take beyond its own waits before it is abandoned.
SUBCOMMAND_MARGIN = 20


# The deployed wrapper files loaded into this process, by path and modification time.
_loaded_wrappers = {}


def __virtual__():
    return __virtualname__


def _statedir():
    return __opts__.get("saltpeter_statedir") or DEFAULT_STATEDIR


def _wrapper_path(wrapper_path):
    return wrapper_path or __opts__.get("saltpeter_wrapper_path") or DEFAULT_WRAPPER_PATH


def _missing_wrapper_message(wrapper_path):
    return (
        f"wrapper not found at {wrapper_path}; apply the saltpeter state "
        "(salt MINION state.apply saltpeter) to install it"
    )


def _run_wrapper(wrapper_path, args, timeout, env=None):
    """
    Run ``python WRAPPER_PATH ARGS`` and return the JSON document it prints.

    Raises CommandExecutionError when the wrapper is missing, cannot run, or
    prints no JSON document, as a wrapper older than these subcommands does.
    """
    if not os.path.isfile(wrapper_path):
        raise CommandExecutionError(_missing_wrapper_message(wrapper_path))
    command = [sys.executable, wrapper_path, *args]
    try:
        proc = subprocess.run(
            command,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            env=env,
            timeout=timeout,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise CommandExecutionError(f"cannot run {sys.executable} {wrapper_path}: {exc}") from None
    stdout = proc.stdout.decode("utf-8", "replace").strip()
    try:
        return json.loads(stdout.splitlines()[-1])
    except (IndexError, ValueError):
        stderr = proc.stderr.decode("utf-8", "replace").strip()[-500:]
        raise CommandExecutionError(
            f"{wrapper_path} {args[0]} exited with status {proc.returncode} and printed no "
            f"JSON result; the wrapper may be older than this module, so apply the saltpeter "
            f"state to update it. stderr: {stderr}"
        ) from None


def _load_wrapper(wrapper_path):
    """
    Load the wrapper file as a module and return it, or None when it cannot
    start a run from this process: the file is unreadable, broken, or older
    than its in-process launcher.
    """
    try:
        key = (wrapper_path, os.stat(wrapper_path).st_mtime_ns)
    except OSError:
        return None
    if key in _loaded_wrappers:
        return _loaded_wrappers[key]

    name = "_saltpeter_deployed_wrapper"
    module = types.ModuleType(name)
    module.__file__ = wrapper_path
    # Dataclasses look their module up in sys.modules while the file runs.
    sys.modules[name] = module
    try:
        with open(wrapper_path, "rb") as handle:
            code = compile(handle.read(), wrapper_path, "exec")
        exec(code, module.__dict__)
        parameters = inspect.signature(module.launch).parameters
    except (Exception, SystemExit) as exc:
        # The subcommand then reports the failure with the wrapper's own error output.
        log.debug("saltpeter: cannot load %s in this process: %s", wrapper_path, exc)
        return None
    finally:
        sys.modules.pop(name, None)

    if "key_path" not in parameters:
        return None
    _loaded_wrappers[key] = module
    return module


def launch(
    run_id,
    job,
    url,
    token,
    wrapper_path=None,
    loglevel="normal",
    logdir="/var/log/sp_wrapper",
    cafile=None,
):
    """
    Start the wrapper for one run, detached from this Salt job.

    Returns ``{"started": True, "pid": PID}``, or ``{"started": False,
    "error": REASON}`` and sets the job's retcode to 1.

    run_id
        The run id the engine assigned.

    job
        The job name.

    url
        The engine's WebSocket URL, for example ``ws://master:8889/wrapper``.

    token
        The run's token. The wrapper gets it in its environment, not in its
        command line.

    wrapper_path
        Path of the wrapper on the minion. Default: the minion option
        ``saltpeter_wrapper_path``, or ``/usr/local/bin/sp_wrapper.py``.

    loglevel
        ``normal``, ``debug`` or ``off``. Default: ``normal``.

    logdir
        Directory of the wrapper's log files, one per job. Default: ``/var/log/sp_wrapper``.

    cafile
        CA bundle the wrapper verifies a ``wss://`` engine with. Default: the
        minion's default trust store.

    CLI Example:

    .. code-block:: bash

        salt '*' saltpeter.launch 3f2a9c backup ws://master:8889/wrapper TOKEN loglevel=debug
    """
    path = _wrapper_path(wrapper_path)
    # The run credential is signed with this minion's Salt key, which proves
    # to the engine that the run's token is used by this minion.
    key_path = os.path.join(__opts__["pki_dir"], "minion.pem")
    wrapper = _load_wrapper(path) if __opts__.get("multiprocessing", True) else None
    if wrapper is not None:
        result = wrapper.launch(
            run_id=str(run_id),
            job=str(job),
            url=str(url),
            token=str(token),
            machine_id=__opts__["id"],
            wrapper_path=path,
            loglevel=loglevel,
            logdir=logdir,
            statedir=_statedir(),
            ready_timeout=READY_TIMEOUT,
            cafile=cafile or None,
            key_path=key_path,
        )
    else:
        result = _launch_subcommand(
            path, run_id, job, url, token, loglevel, logdir, cafile, key_path
        )
    if not result.get("started"):
        log.error("saltpeter: run %s of job %s did not start: %s", run_id, job, result.get("error"))
        __context__["retcode"] = 1
    return result


def _launch_subcommand(path, run_id, job, url, token, loglevel, logdir, cafile, key_path):
    """Start the wrapper through ``sp_wrapper.py launch``; return its result."""
    args = [
        "launch",
        f"--run={run_id}",
        f"--job={job}",
        f"--machine={__opts__['id']}",
        f"--url={url}",
        f"--loglevel={loglevel}",
        f"--logdir={logdir}",
        f"--statedir={_statedir()}",
        f"--ready-timeout={READY_TIMEOUT}",
    ]
    if cafile:
        args.append(f"--cafile={cafile}")
    args.append(f"--key={key_path}")
    env = {key: value for key, value in os.environ.items() if key != "SP_RUN_TOKEN"}
    env["SP_RUN_TOKEN"] = str(token)
    try:
        result = _run_wrapper(path, args, READY_TIMEOUT + SUBCOMMAND_MARGIN, env=env)
    except CommandExecutionError as exc:
        result = {"started": False, "error": str(exc)}
    if not isinstance(result, dict):
        result = {"started": False, "error": f"{path} launch printed {result!r}"}
    return result


def running(wrapper_path=None):
    """
    List the runs whose wrapper still runs on this minion.

    Returns the local records: ``run``, ``job``, ``machine``, ``wrapper_pid``,
    ``pid``, ``pgid`` and ``started``. The records are read from the directory
    that the minion option ``saltpeter_statedir`` sets (default:
    ``/var/run/saltpeter``).

    wrapper_path
        Path of the wrapper on the minion. Default: the minion option
        ``saltpeter_wrapper_path``, or ``/usr/local/bin/sp_wrapper.py``.

    CLI Example:

    .. code-block:: bash

        salt '*' saltpeter.running
    """
    args = ["running", f"--statedir={_statedir()}"]
    return _run_wrapper(_wrapper_path(wrapper_path), args, SUBCOMMAND_MARGIN)


def kill_local(run, wrapper_path=None, orphaned_only=False):
    """
    Stop a run on this minion without going through the engine.

    The wrapper stops the command as it does for the engine's kill and reports
    the run as killed. Processes of the run still alive 5 s later get SIGKILL.
    Sets the job's retcode to 1 when nothing was killed.

    run
        The run id.

    wrapper_path
        Path of the wrapper on the minion. Default: the minion option
        ``saltpeter_wrapper_path``, or ``/usr/local/bin/sp_wrapper.py``.

    orphaned_only
        Act only when the run's wrapper is gone, on the processes it left.
        The engine asks for this when it records the minion as lost.
        Default: ``False``.

    CLI Example:

    .. code-block:: bash

        salt 'web1' saltpeter.kill_local 3f2a9c
    """
    args = ["kill-local", str(run), f"--statedir={_statedir()}"]
    if orphaned_only:
        args.append("--orphaned-only")
    # 5 s grace, then up to 5 s for the SIGKILLed processes to go.
    result = _run_wrapper(_wrapper_path(wrapper_path), args, 10 + SUBCOMMAND_MARGIN)
    if not isinstance(result, dict) or not result.get("killed"):
        __context__["retcode"] = 1
    return result


def wrapper_version(wrapper_path=None):
    """
    Return the version of the wrapper installed on this minion.

    wrapper_path
        Path of the wrapper on the minion. Default: the minion option
        ``saltpeter_wrapper_path``, or ``/usr/local/bin/sp_wrapper.py``.

    CLI Example:

    .. code-block:: bash

        salt '*' saltpeter.wrapper_version
    """
    path = _wrapper_path(wrapper_path)
    if not os.path.isfile(path):
        raise CommandExecutionError(_missing_wrapper_message(path))
    try:
        proc = subprocess.run(
            [sys.executable, path, "--version"],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=SUBCOMMAND_MARGIN,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise CommandExecutionError(
            f"cannot run {sys.executable} {path} --version: {exc}"
        ) from None
    if proc.returncode != 0:
        stderr = proc.stderr.decode("utf-8", "replace").strip()
        raise CommandExecutionError(
            f"{sys.executable} {path} --version failed with status {proc.returncode}: {stderr}"
        )
    return proc.stdout.decode("utf-8", "replace").strip()
