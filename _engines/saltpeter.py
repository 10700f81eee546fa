"""
Saltpeter: distributed cron for the minions of this master.

The engine reads job definitions from YAML files, fires each job on the
minions its target matches, follows every run through the wrapper on each
minion, and publishes what happens under ``saltpeter/job/`` on the event bus.

:configuration:

    .. code-block:: yaml

        engines:
          - saltpeter:
              # Directory of job files (*.yaml, *.yml). Default: /etc/saltpeter
              config_dir: /etc/saltpeter
              # SQLite run store. Default: <cachedir>/saltpeter/saltpeter.db
              store_path: /var/cache/salt/master/saltpeter/saltpeter.db
              # Settings that take precedence over saltpeter_config in the job files.
              settings:
                machines_ws_port: 8889
"""

import logging

log = logging.getLogger(__name__)

__virtualname__ = "saltpeter"


def __virtual__():
    try:
        import saltpeter.engine  # noqa: F401
    except ImportError as exc:
        return (False, f"the saltpeter package is not importable ({exc}); pip install saltpeter")
    return __virtualname__


def start(config_dir="/etc/saltpeter", store_path=None, settings=None):
    """
    Run the Saltpeter engine until the master stops it.
    """
    from saltpeter.engine import run_engine

    run_engine(__opts__, config_dir=config_dir, store_path=store_path, settings=settings)
