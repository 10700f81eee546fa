"""Logic of the ``saltpeter.job_present`` and ``saltpeter.job_absent`` states.

A job definition is validated with the engine's own validator
(:func:`saltpeter.config.parse_job`) before anything is written, so a state
fails with the message the engine would log and leaves the job directory as
it was. Files are replaced atomically: the new text goes to a hidden
temporary file in the same directory, which the engine skips, and is renamed
over the old one.

The functions return Salt state return dictionaries (``name``, ``result``,
``changes``, ``comment``) but need no Salt daemon, so they are tested as
plain functions.
"""

from __future__ import annotations

import difflib
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import yaml

from saltpeter.config import (
    CONFIG_SUFFIXES,
    DEFAULT_CONFIG_DIR,
    MAINTENANCE_SECTION,
    SETTINGS_SECTION,
    ConfigError,
    key_warnings,
    load_directory,
    parse_job,
)

MANAGED_HEADER = (
    "# Managed by Salt with the saltpeter.job_present state. Local changes are overwritten.\n"
)
DEFAULT_FILE_MODE = 0o644
_SECTIONS = (SETTINGS_SECTION, MAINTENANCE_SECTION)


class JobFileError(Exception):
    """A job file that cannot be read as a mapping of job names to definitions."""


@dataclass(frozen=True)
class FileChange:
    """The planned new state of one job file. ``new_text`` None means removing the file."""

    path: Path
    old_text: str | None
    new_text: str | None
    old_mode: int | None
    new_mode: int

    @property
    def changed(self) -> bool:
        return self.old_text != self.new_text or (
            self.new_text is not None and self.old_mode != self.new_mode
        )

    def diff(self) -> str:
        """Return the change as a unified diff (empty when only the mode changes)."""
        lines = difflib.unified_diff(
            (self.old_text or "").splitlines(keepends=True),
            (self.new_text or "").splitlines(keepends=True),
            fromfile=str(self.path) if self.old_text is not None else "/dev/null",
            tofile=str(self.path) if self.new_text is not None else "/dev/null",
        )
        return "".join(lines)

    def changes(self) -> dict[str, object]:
        """Return the ``changes`` entry of a state return for this change."""
        changes: dict[str, object] = {}
        diff = self.diff()
        if diff:
            changes["diff"] = diff
        if self.new_text is None:
            changes["removed"] = str(self.path)
        elif self.old_mode != self.new_mode:
            changes["mode"] = f"{self.new_mode:04o}"
        return changes


# -- files ---------------------------------------------------------------------


def is_config_file_name(name: str) -> bool:
    """Tell whether the engine reads a directory entry as a config file.

    Hidden files and names ending in "~" are skipped, as saltpeter.config does.
    """
    return not name.startswith(".") and not name.endswith("~") and name.endswith(CONFIG_SUFFIXES)


def read_job_file(path: Path) -> tuple[dict[Any, Any], str | None, int | None]:
    """Return a job file's top-level mapping, its text and its mode, all empty if it is absent.

    Raises JobFileError when the file cannot be read or is not a YAML mapping.
    """
    try:
        text = path.read_text(encoding="utf-8")
        mode = path.stat().st_mode & 0o7777
    except FileNotFoundError:
        return {}, None, None
    except (OSError, UnicodeDecodeError) as exc:
        raise JobFileError(f"{path} cannot be read: {exc}") from None
    try:
        document = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise JobFileError(f"{path} is not valid YAML, so it is left unchanged: {exc}") from None
    if document is None:
        return {}, text, mode
    if not isinstance(document, dict):
        raise JobFileError(f"{path} does not contain a YAML mapping, so it is left unchanged")
    return document, text, mode


def render_job_file(document: Mapping[Any, Any]) -> str:
    """Return the text of a job file: the managed-file header and the mapping as YAML."""
    body = yaml.safe_dump(dict(document), default_flow_style=False, sort_keys=False)
    return MANAGED_HEADER + body


def other_files_defining(config_dir: Path, name: str, skip: Path) -> list[Path]:
    """Return the config files in ``config_dir`` other than ``skip`` that define job ``name``.

    Files that cannot be read or parsed are left out: the engine reports them itself.
    """
    found = []
    try:
        entries = sorted(os.scandir(config_dir), key=lambda entry: entry.name)
    except OSError:
        return []
    for entry in entries:
        path = Path(entry.path)
        if not is_config_file_name(entry.name) or path == skip or not entry.is_file():
            continue
        try:
            document, _, _ = read_job_file(path)
        except JobFileError:
            continue
        if name in document:
            found.append(path)
    return found


def write_atomic(path: Path, text: str, mode: int) -> None:
    """Replace ``path`` with ``text`` in one rename, keeping the old file's owner and group.

    The temporary file's name starts with a dot, so the engine never reads it.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        old = path.stat()
    except FileNotFoundError:
        old = None
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp_name, mode)
        if old is not None:
            os.chown(tmp_name, old.st_uid, old.st_gid)
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise


def apply_change(change: FileChange) -> None:
    if change.new_text is None:
        change.path.unlink(missing_ok=True)
    else:
        write_atomic(change.path, change.new_text, change.new_mode)


# -- planning ----------------------------------------------------------------------


def job_file_path(name: str, config_dir: Path, file: str | None) -> Path:
    """Return the file that contains job ``name``: ``file``, or ``<config_dir>/<name>.yaml``.

    A relative ``file`` is taken relative to ``config_dir``.
    """
    if file:
        path = Path(file)
        return path if path.is_absolute() else config_dir / path
    return config_dir / f"{name}.yaml"


def parse_mode(mode: object) -> int:
    """Return a file mode given as octal digits, as text ("0640") or as a YAML integer (640).

    As in Salt's file states, the digits of an integer are read as octal, so quote
    modes in YAML: an unquoted 0640 is the number 416, whose digits are not a mode.
    """
    if isinstance(mode, bool) or not isinstance(mode, (int, str)):
        raise ValueError(f"mode {mode!r} is invalid: expected octal digits such as '0640'")
    text = str(mode).strip()
    try:
        value = int(text, 8)
    except ValueError:
        raise ValueError(
            f"mode {mode!r} is invalid: expected octal digits such as '0640'"
        ) from None
    if not 0 <= value <= 0o7777:
        raise ValueError(f"mode {mode!r} is out of range 0000-7777")
    return value


def plan_job_present(
    name: str,
    definition: Mapping[str, Any],
    config_dir: Path,
    file: str | None = None,
    mode: object = None,
    overrides: Mapping[str, object] | None = None,
    now: datetime | None = None,
) -> tuple[FileChange, list[str]]:
    """Validate a job definition and plan the file that contains it.

    Returns the planned change and the validator's warnings (unknown or ignored
    keys). Raises ConfigError for an invalid definition, JobFileError for a job
    file that cannot be updated, and ValueError for an invalid ``mode`` or a job
    that another file already defines.
    """
    if name in _SECTIONS:
        raise ValueError(f"{name!r} is the name of a section, not of a job")
    definition = {key: value for key, value in definition.items() if value is not None}
    # The settings matter for defaults such as the time zone, as the engine uses them.
    settings = load_directory(config_dir, overrides).settings
    instant = now or datetime.now(timezone.utc)
    path = job_file_path(name, config_dir, file)
    # parse_job checks the name first, so a name such as "../x" fails here, before
    # the path built from it is used.
    parse_job(name, definition, path, settings, instant)

    others = other_files_defining(config_dir, name, skip=path)
    if others:
        listing = ", ".join(str(other) for other in others)
        raise ValueError(
            f"job {name!r} is already defined in {listing}; the engine keeps one definition "
            f"per name, so remove it there or pass file={others[0]}"
        )

    document, old_text, old_mode = read_job_file(path)
    document[name] = definition
    new_mode = parse_mode(mode) if mode is not None else old_mode or DEFAULT_FILE_MODE
    if old_text is not None and document == _parsed(old_text):
        # Same content: keep the text, so a file written by hand is not reformatted.
        new_text: str | None = old_text
    else:
        new_text = render_job_file(document)
    change = FileChange(path, old_text, new_text, old_mode, new_mode)
    return change, key_warnings(name, definition, path)


def _parsed(text: str) -> object:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return None


def plan_job_absent(name: str, config_dir: Path, file: str | None = None) -> FileChange | None:
    """Plan removing job ``name`` from its file; return None when the file does not define it.

    The file is removed when no other key is left in it. Raises JobFileError for
    a file that cannot be read, and ValueError when only another file defines the job.
    """
    path = job_file_path(name, config_dir, file)
    document, old_text, old_mode = read_job_file(path)
    if name not in document:
        others = other_files_defining(config_dir, name, skip=path)
        if others:
            listing = ", ".join(str(other) for other in others)
            raise ValueError(
                f"job {name!r} is defined in {listing}, not in {path}; pass file={others[0]} "
                "to remove it there"
            )
        return None
    del document[name]
    new_text = render_job_file(document) if document else None
    return FileChange(path, old_text, new_text, old_mode, old_mode or DEFAULT_FILE_MODE)


def master_engine_options(opts: Mapping[str, Any]) -> dict[str, Any]:
    """Return the saltpeter engine's options from the master config.

    ``opts`` are the caller's Salt options. On the master they contain the
    engine's options. On a minion, the master config file is read from the
    minion option ``saltpeter_master_config``, or from ``master`` next to the
    minion's own config file. Returns {} when there is no master config.
    """
    from saltpeter.engine import engine_options

    if opts.get("__role") == "master":
        return engine_options(opts)
    path = opts.get("saltpeter_master_config")
    if not path:
        conf_file = opts.get("conf_file") or "/etc/salt/minion"
        path = os.path.join(os.path.dirname(conf_file), "master")
    if not os.path.isfile(path):
        return {}
    import salt.config

    return engine_options(salt.config.master_config(path))


# -- state returns -----------------------------------------------------------------


def _ret(name: str, result: bool | None, comment: str, changes: dict[str, object] | None = None):
    return {"name": name, "result": result, "changes": changes or {}, "comment": comment}


def job_present(
    name: str,
    definition: Mapping[str, Any],
    config_dir: str | os.PathLike[str] | None = None,
    file: str | None = None,
    mode: object = None,
    test: bool = False,
    overrides: Mapping[str, object] | None = None,
) -> dict[str, Any]:
    """Ensure job ``name`` is defined as ``definition``; return a state return dictionary."""
    directory = Path(config_dir) if config_dir else DEFAULT_CONFIG_DIR
    try:
        change, warnings = plan_job_present(name, definition, directory, file, mode, overrides)
    except (ConfigError, JobFileError, ValueError) as exc:
        return _ret(name, False, str(exc))
    notes = "".join(f"\nWarning: {warning}" for warning in warnings)
    if not change.changed:
        return _ret(name, True, f"Job {name!r} in {change.path} is already as defined.{notes}")
    changes = change.changes()
    if test:
        return _ret(name, None, f"Job {name!r} would be written to {change.path}.{notes}", changes)
    try:
        apply_change(change)
    except OSError as exc:
        return _ret(name, False, f"Writing job {name!r} to {change.path} failed: {exc}")
    return _ret(name, True, f"Job {name!r} written to {change.path}.{notes}", changes)


def job_absent(
    name: str,
    config_dir: str | os.PathLike[str] | None = None,
    file: str | None = None,
    test: bool = False,
) -> dict[str, Any]:
    """Ensure job ``name`` is not defined in its file; return a state return dictionary."""
    directory = Path(config_dir) if config_dir else DEFAULT_CONFIG_DIR
    try:
        change = plan_job_absent(name, directory, file)
    except (JobFileError, ValueError) as exc:
        return _ret(name, False, str(exc))
    if change is None:
        path = job_file_path(name, directory, file)
        return _ret(name, True, f"Job {name!r} is already absent from {path}.")
    changes = change.changes()
    verb = "removed" if change.new_text is None else "rewritten"
    if test:
        return _ret(
            name,
            None,
            f"Job {name!r} would be removed from {change.path}, and the file {verb}.",
            changes,
        )
    try:
        apply_change(change)
    except OSError as exc:
        return _ret(name, False, f"Removing job {name!r} from {change.path} failed: {exc}")
    return _ret(
        name, True, f"Job {name!r} removed from {change.path}, and the file {verb}.", changes
    )
