"""
Manage Saltpeter job definitions in the engine's job directory.

Each state writes or removes one job in a YAML file that the Saltpeter engine
reads (by default ``<config_dir>/<name>.yaml``). A definition is validated
with the engine's own validator first, so an invalid job fails the state
with the engine's message and nothing is written. The engine picks up a
changed file within about 2 s, without a restart.

The job keys are those of a job file (docs/configuration.md): ``sec``,
``min``, ``hour``, ``dom``, ``mon``, ``dow``, ``year``, ``timezone``,
``utc``, ``targets``, ``target_type``, ``command``, ``user``, ``cwd``,
``env``, ``timeout``, ``allow_overlap``, ``wrapper_path``,
``wrapper_loglevel``, ``wrapper_logdir``, and the other keys that the
engine reads. Keys the engine ignores are reported as warnings in the comment.

The state runs where the job directory is, usually on the master's own
minion, and needs the ``saltpeter`` package in that minion's Python.

.. code-block:: yaml

    backup_databases:
      saltpeter.job_present:
        - min: '0'
        - hour: '2'
        - dom: '*'
        - mon: '*'
        - dow: '*'
        - targets: 'db*'
        - command: /usr/local/bin/backup.sh
        - timeout: 3600

    old_report:
      saltpeter.job_absent
"""

import logging

log = logging.getLogger(__name__)

__virtualname__ = "saltpeter"


def __virtual__():
    try:
        import saltpeter.states  # noqa: F401
    except ImportError as exc:
        return (
            False,
            f"the saltpeter package is not importable ({exc}); install it in this minion's "
            "Python (pip install saltpeter, or salt-pip on onedir installs)",
        )
    return __virtualname__


def _engine_options():
    from saltpeter import states

    try:
        return states.master_engine_options(__opts__)
    except Exception as exc:  # the master config is optional here
        log.warning("saltpeter: reading the master's engine options failed: %s", exc)
        log.debug("saltpeter: reading the master's engine options failed", exc_info=True)
        return {}


def job_present(name, config_dir=None, file=None, mode=None, **job):
    """
    Ensure a Saltpeter job is defined as given.

    name
        The job's name. Letters, digits, ``_``, ``.`` and ``-``.

    config_dir
        The engine's job directory. Default: ``config_dir`` of the saltpeter
        engine in the master config (read from the master config file next to
        this minion's, or from the minion option ``saltpeter_master_config``),
        else ``/etc/saltpeter``.

    file
        The file that contains the job, absolute or relative to ``config_dir``.
        Default: ``<config_dir>/<name>.yaml``. Other jobs in the file are kept,
        but the file is rewritten as YAML, which drops its comments.

    mode
        The file's mode, as quoted octal digits such as ``'0640'``. Default: the
        existing file's mode, or ``'0644'`` for a new file. Use ``'0600'`` or
        ``'0640'`` for jobs whose ``env`` holds secrets, and keep the file
        readable by the user the master runs as.

    Any other keyword is a key of the job definition.
    """
    from saltpeter import states

    options = _engine_options()
    return states.job_present(
        name,
        # Salt keeps its own keywords out of **job; dunder keys are Salt's as well.
        {key: value for key, value in job.items() if not key.startswith("__")},
        config_dir=config_dir or options.get("config_dir"),
        file=file,
        mode=mode,
        test=bool(__opts__.get("test")),
        overrides=options.get("settings"),
    )


def job_absent(name, config_dir=None, file=None):
    """
    Ensure a Saltpeter job is not defined in its file.

    The file is removed when no other key is left in it. A job defined in
    another file of the directory fails the state with that file's name.

    name
        The job's name.

    config_dir
        The engine's job directory. Default: as for ``job_present``.

    file
        The file that contains the job. Default: ``<config_dir>/<name>.yaml``.
    """
    from saltpeter import states

    options = _engine_options() if config_dir is None else {}
    return states.job_absent(
        name,
        config_dir=config_dir or options.get("config_dir"),
        file=file,
        test=bool(__opts__.get("test")),
    )
