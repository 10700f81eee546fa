"""Entry point that shows Salt's loader where Saltpeter's loader modules are."""

from __future__ import annotations

from pathlib import Path

_KINDS = ("engines", "runners", "modules", "states")
_PACKAGE_DIR = Path(__file__).resolve().parent


def loader_dirs() -> dict[str, list[str]]:
    """Return the directories of Saltpeter's loader modules, keyed by loader type.

    Salt calls this through the ``salt.loader`` entry point. A wheel installs the
    modules under ``saltpeter/_ext/<kind>``. An editable install leaves them in
    the checkout's ``_engines/``, ``_runners/``, ``_modules/`` and ``_states/``,
    two levels above this package, because the package's source root is ``salt/``.
    """
    dirs: dict[str, list[str]] = {}
    for kind in _KINDS:
        for candidate in (_PACKAGE_DIR / "_ext" / kind, _PACKAGE_DIR.parents[1] / f"_{kind}"):
            if (candidate / "saltpeter.py").is_file():
                dirs[kind] = [str(candidate)]
                break
    return dirs
