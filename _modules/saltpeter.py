"""
Start and control Saltpeter runs on a minion.

The Saltpeter engine on the master calls :py:func:`launch` to start the
wrapper (``sp_wrapper.py``) for one run. The wrapper then fetches the job over
the engine's WebSocket, runs it and reports back, as docs/protocol.md in the
Saltpeter repository describes. :py:func:`running` and :py:func:`kill_local`
work from the wrapper's local records, without the engine.

The logic lives in ``saltpeter.minion``, so the ``saltpeter`` package must be
installed in the minion's Python (with ``salt-pip`` on onedir installs).

:configuration: The minion option ``saltpeter_statedir`` sets the directory of
    the wrapper's local records:

    .. code-block:: yaml

        saltpeter_statedir: /var/run/saltpeter
"""

import logging

from salt.exceptions import CommandExecutionError

try:
    from saltpeter import minion

    HAS_SALTPETER = True
except ImportError:
    HAS_SALTPETER = False

log = logging.getLogger(__name__)

__virtualname__ = "saltpeter"


def __virtual__():
    if not HAS_SALTPETER:
        return (
            False,
            "the saltpeter package is not importable in the minion's Python; "
            "install it there (with salt-pip on onedir installs)",
        )
    return __virtualname__


def _statedir():
    return __opts__.get("saltpeter_statedir") or minion.DEFAULT_STATEDIR


def launch(
    run_id, job, url, token, wrapper_path=None, loglevel="normal", logdir="/var/log/sp_wrapper"
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
        Path of the wrapper on the minion. Default: ``/usr/local/bin/sp_wrapper.py``.

    loglevel
        ``normal``, ``debug`` or ``off``. Default: ``normal``.

    logdir
        Directory of the wrapper's log files, one per job. Default: ``/var/log/sp_wrapper``.

    CLI Example:

    .. code-block:: bash

        salt '*' saltpeter.launch 3f2a9c backup ws://master:8889/wrapper TOKEN loglevel=debug
    """
    result = minion.launch(
        run_id=str(run_id),
        job=str(job),
        url=str(url),
        token=str(token),
        machine_id=__opts__["id"],
        wrapper_path=wrapper_path or minion.DEFAULT_WRAPPER_PATH,
        loglevel=loglevel,
        logdir=logdir,
        statedir=_statedir(),
    )
    if not result.get("started"):
        log.error("saltpeter: run %s of job %s did not start: %s", run_id, job, result.get("error"))
        __context__["retcode"] = 1
    return result


def running():
    """
    List the runs whose wrapper still runs on this minion.

    Returns the local records: ``run``, ``job``, ``machine``, ``wrapper_pid``,
    ``pid``, ``pgid`` and ``started``. Takes no parameters. The records are
    read from the directory that the minion option ``saltpeter_statedir``
    sets (default: ``/var/run/saltpeter``).

    CLI Example:

    .. code-block:: bash

        salt '*' saltpeter.running
    """
    return minion.running(_statedir())


def kill_local(run):
    """
    Stop a run on this minion without going through the engine.

    The wrapper stops the command as it does for the engine's kill and reports
    the run as killed. Processes of the run still alive 5 s later get SIGKILL.

    run
        The run id.

    CLI Example:

    .. code-block:: bash

        salt 'web1' saltpeter.kill_local 3f2a9c
    """
    result = minion.kill_local(str(run), _statedir())
    if not result.get("killed"):
        __context__["retcode"] = 1
    return result


def wrapper_version(wrapper_path=None):
    """
    Return the version of the wrapper installed on this minion.

    wrapper_path
        Path of the wrapper on the minion. Default: ``/usr/local/bin/sp_wrapper.py``.

    CLI Example:

    .. code-block:: bash

        salt '*' saltpeter.wrapper_version
    """
    try:
        return minion.wrapper_version(wrapper_path or minion.DEFAULT_WRAPPER_PATH)
    except minion.WrapperError as exc:
        raise CommandExecutionError(str(exc)) from exc
