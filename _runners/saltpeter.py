"""
Inspect and steer Saltpeter jobs from the master.

Status and next fire times are read from the engine's run store; kill and
run-now requests go to the engine over the event bus.
"""

import logging

from salt.exceptions import SaltRunnerError

log = logging.getLogger(__name__)

__virtualname__ = "saltpeter"

# `next` would shadow the builtin inside this module.
__func_alias__ = {"next_": "next"}


def __virtual__():
    try:
        import saltpeter.control  # noqa: F401
    except ImportError as exc:
        return (False, f"the saltpeter package is not importable ({exc}); pip install saltpeter")
    return __virtualname__


def _call(function, *args, **kwargs):
    from saltpeter.control import ControlError

    try:
        return function(*args, **kwargs)
    except ControlError as exc:
        raise SaltRunnerError(str(exc)) from None


def status(job=None):
    """
    Show runs in flight and each job's next run, last run and per-minion results.

    job
        Show only this job. Default: every job.

    CLI Example:

    .. code-block:: bash

        salt-run saltpeter.status
        salt-run saltpeter.status job=backup_databases
    """
    from saltpeter import control

    return _call(control.status, __opts__, job=job)


def kill(job, timeout=30):
    """
    Stop every run of a job that is in flight: SIGTERM to the command's process
    group, SIGKILL 5 s later. The minions record retcode 143.

    job
        The job's name.

    timeout
        Seconds to wait for the engine's reply. Default: 30.

    CLI Example:

    .. code-block:: bash

        salt-run saltpeter.kill job=backup_databases
    """
    from saltpeter import control

    return _call(control.engine_request, __opts__, "kill", {"job": job}, timeout=float(timeout))


def run(job, timeout=30):
    """
    Start a run of a job now, outside its schedule. Overlap and maintenance
    rules apply as for a scheduled run.

    job
        The job's name.

    timeout
        Seconds to wait for the engine's reply. Default: 30.

    CLI Example:

    .. code-block:: bash

        salt-run saltpeter.run job=backup_databases
    """
    from saltpeter import control

    result = _call(control.engine_request, __opts__, "run", {"job": job}, timeout=float(timeout))
    if not result.get("started"):
        reason = result.get("reason")
        detail = ""
        if result.get("running"):
            detail = f" (in flight: {', '.join(result['running'])})"
        raise SaltRunnerError(f"job '{job}' did not start: {reason}{detail}")
    return result


def next_(job, count=5):
    """
    List the next fire times of a job, in UTC.

    job
        The job's name.

    count
        How many fire times to list. Default: 5.

    CLI Example:

    .. code-block:: bash

        salt-run saltpeter.next job=backup_databases count=3
    """
    from saltpeter import control

    return _call(control.next_times, __opts__, job, count=int(count))
