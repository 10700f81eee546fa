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

    return _call(control.next_times, __opts__, job, count=count)


def validate(path=None):
    """
    Check a job directory as the engine would load it, without touching the engine.

    Returns ``valid``, the number of valid ``jobs``, the ``errors`` and
    ``warnings``, and ``retcode``. ``salt-run`` exits with status 1 when there
    is any error, so the runner can guard a deployment.

    path
        The directory to check. Default: ``config_dir`` of the saltpeter engine
        in the master config, else ``/etc/saltpeter``.

    CLI Example:

    .. code-block:: bash

        salt-run saltpeter.validate
        salt-run saltpeter.validate path=/srv/saltpeter/jobs
    """
    from saltpeter import admin

    result = _call(admin.validate, __opts__, path=path)
    # salt-run 3008 exits with the "retcode" key of a returned dict. The context
    # retcode marks the runner job as failed in the job cache and on the event bus.
    if result["retcode"]:
        __context__["retcode"] = result["retcode"]
    return result


def history(job, limit=20):
    """
    List the latest runs and skipped slots of a job, newest first, with each
    minion's retcode and reason.

    job
        The job's name.

    limit
        How many runs to list. Default: 20.

    CLI Example:

    .. code-block:: bash

        salt-run saltpeter.history job=backup_databases
        salt-run saltpeter.history job=backup_databases limit=5
    """
    from saltpeter import admin

    try:
        limit = int(limit)
    except (TypeError, ValueError):
        raise SaltRunnerError(f"limit must be a whole number, not {limit!r}") from None
    return _call(admin.history, __opts__, str(job), limit=limit)


def maintenance(add=None, remove=None, **kwargs):
    """
    Show maintenance, or change it in ``saltpeter_maintenance.yaml`` in the job
    directory. The engine applies a change within about 2 s: no new run starts
    under global maintenance, and minions under maintenance are left out of
    every run. Sections in other job files still count: any ``global: true``
    wins and the lists of minions add up, which the returned ``notes`` point out.

    global
        ``True`` or ``False``: set or clear global maintenance in the file.
        Default: unchanged.

    add
        Minion ids to put under maintenance, comma-separated. Default: none.

    remove
        Minion ids to take out of maintenance, comma-separated. Default: none.

    CLI Example:

    .. code-block:: bash

        salt-run saltpeter.maintenance
        salt-run saltpeter.maintenance global=True
        salt-run saltpeter.maintenance add=web1,web2
        salt-run saltpeter.maintenance remove=web1
    """
    from saltpeter import admin

    # `global` is a Python keyword, so it arrives in kwargs.
    return _call(admin.maintenance, __opts__, global_=kwargs.get("global"), add=add, remove=remove)
