"""Operations behind the ``saltpeter.validate``, ``history`` and ``maintenance`` runners.

They work on the master without the engine: ``validate`` and
``maintenance`` read and write the job directory (the engine re-reads a
changed file within about 2 s), and ``history`` reads the run store.
Operator errors raise :class:`saltpeter.control.ControlError`, which the
runners turn into ``SaltRunnerError``.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from saltpeter.config import DEFAULT_CONFIG_DIR, MAINTENANCE_SECTION, load_directory
from saltpeter.control import ControlError, open_store
from saltpeter.engine import engine_options, unknown_job_message
from saltpeter.states import JobFileError, is_config_file_name, read_job_file, write_atomic

MAINTENANCE_FILE = "saltpeter_maintenance.yaml"
MAINTENANCE_HEADER = (
    "# Written by salt-run saltpeter.maintenance. Other files may hold more\n"
    f"# {MAINTENANCE_SECTION} sections: any global true wins, machines add up.\n"
)
DEFAULT_HISTORY_LIMIT = 20


def config_dir(opts: Mapping[str, Any], path: str | None = None) -> Path:
    """Return ``path``, or the engine's job directory from the master's options."""
    if path:
        return Path(path)
    return Path(engine_options(opts).get("config_dir") or DEFAULT_CONFIG_DIR)


# -- validate ------------------------------------------------------------------


def validate(opts: Mapping[str, Any], path: str | None = None) -> dict[str, Any]:
    """Load a job directory as the engine would and return what is wrong with it.

    ``retcode`` is 1 when there is any error, so that ``salt-run`` exits with it.
    """
    directory = config_dir(opts, path)
    snapshot = load_directory(directory, engine_options(opts).get("settings"))
    errors = [str(error) for error in snapshot.errors]
    return {
        "path": str(directory),
        "valid": not errors,
        "jobs": len(snapshot.jobs),
        "errors": errors,
        "warnings": list(snapshot.warnings),
        "retcode": 1 if errors else 0,
    }


# -- history -------------------------------------------------------------------


def history(
    opts: Mapping[str, Any], job: str, limit: int = DEFAULT_HISTORY_LIMIT
) -> list[dict[str, Any]]:
    """Return the latest ``limit`` runs and skipped slots of a job, newest first.

    Each run carries the minions' retcodes and reasons. Raises ControlError for
    a job that the store has never heard of.
    """
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise ControlError(f"limit must be a whole number of at least 1, not {limit!r}")
    store = open_store(opts)
    try:
        runs = store.runs(job, limit)
        if not runs and job not in store.jobs():
            raise ControlError(unknown_job_message(job, store.jobs()))
        entries = []
        for run in runs:
            results = store.results(run["run_id"], with_output=False)
            entries.append(
                {
                    "run_id": run["run_id"],
                    "trigger": run["trigger"],
                    "scheduled_at": run["scheduled_at"],
                    "started_at": run["started_at"],
                    "ended_at": run["ended_at"],
                    "status": run["status"],
                    "skip_reason": run["skip_reason"],
                    "targets": run["targets"],
                    "maintenance": run["maintenance"],
                    "retcodes": {minion: result["retcode"] for minion, result in results.items()},
                    "reasons": {minion: result["reason"] for minion, result in results.items()},
                }
            )
        return entries
    finally:
        store.close()


# -- maintenance ------------------------------------------------------------------


def _minion_list(value: object, option: str) -> list[str]:
    """Return minion ids given as a list or as comma-separated text."""
    if value is None:
        return []
    if isinstance(value, str):
        items: list[object] = list(value.split(","))
    elif isinstance(value, (list, tuple)):
        items = list(value)
    else:
        raise ControlError(f"{option}={value!r} is invalid: expected minion ids")
    minions = [str(item).strip() for item in items]
    if not all(minions):
        raise ControlError(f"{option}={value!r} is invalid: contains an empty minion id")
    return minions


def _machine_names(section: Mapping[str, Any]) -> list[str]:
    """Return the minion ids a maintenance section lists, skipping invalid items.

    The engine reports invalid items as configuration errors; here they are
    only left out, so showing or changing maintenance still works.
    """
    machines = section.get("machines")
    if not isinstance(machines, list):
        return []
    return [machine for machine in machines if isinstance(machine, str) and machine]


def _read_section(path: Path) -> dict[str, Any]:
    try:
        document, _, _ = read_job_file(path)
    except JobFileError as exc:
        raise ControlError(str(exc)) from None
    section = document.get(MAINTENANCE_SECTION) or {}
    if not isinstance(section, dict):
        raise ControlError(f"{path}: {MAINTENANCE_SECTION} is not a mapping; fix or remove it")
    return section


def _other_sections(directory: Path, own: Path) -> dict[Path, dict[str, Any]]:
    """Return the maintenance sections of the other config files, by file."""
    sections: dict[Path, dict[str, Any]] = {}
    if not directory.is_dir():
        return sections
    for path in sorted(directory.iterdir()):
        if path == own or not is_config_file_name(path.name) or not path.is_file():
            continue
        try:
            section = _read_section(path)
        except ControlError:
            continue  # validate reports it
        if section:
            sections[path] = section
    return sections


def maintenance(
    opts: Mapping[str, Any],
    global_: bool | None = None,
    add: object = None,
    remove: object = None,
) -> dict[str, Any]:
    """Show maintenance, or change it in ``<config_dir>/saltpeter_maintenance.yaml``.

    ``global_`` sets global maintenance in that file, ``add`` and ``remove``
    change its list of minions. The result shows the merged maintenance of the
    whole directory, which the engine applies within about 2 s, and notes where
    another file keeps a setting in effect.
    """
    if global_ is not None and not isinstance(global_, bool):
        raise ControlError(f"global={global_!r} is invalid: expected True or False")
    added = _minion_list(add, "add")
    removed = _minion_list(remove, "remove")
    directory = config_dir(opts)
    path = directory / MAINTENANCE_FILE
    section = _read_section(path)

    if global_ is not None or added or removed:
        machines = [machine for machine in _machine_names(section) if machine not in removed]
        machines += [minion for minion in added if minion not in machines]
        new_section: dict[str, Any] = {
            "global": bool(section.get("global")) if global_ is None else global_,
            "machines": machines,
        }
        text = MAINTENANCE_HEADER + yaml.safe_dump(
            {MAINTENANCE_SECTION: new_section}, default_flow_style=False, sort_keys=False
        )
        try:
            write_atomic(path, text, 0o644)
        except OSError as exc:
            raise ControlError(f"writing {path} failed: {exc}") from None
        section = new_section

    merged = load_directory(directory, engine_options(opts).get("settings")).maintenance
    notes = []
    for other, other_section in _other_sections(directory, path).items():
        if other_section.get("global") is True and global_ is False:
            notes.append(f"global maintenance stays on, because {other} sets global: true")
        for minion in sorted(set(removed) & set(_machine_names(other_section))):
            notes.append(f"{minion} stays under maintenance, because {other} lists it")
    return {
        "global": merged.global_,
        "machines": sorted(merged.machines),
        "file": str(path),
        "file_global": bool(section.get("global")),
        "file_machines": _machine_names(section),
        "notes": notes,
    }
