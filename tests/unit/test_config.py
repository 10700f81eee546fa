"""Tests for saltpeter.config: job files, settings, maintenance and reloading."""

from __future__ import annotations

import json
import logging
import os
import pickle
import textwrap
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest
import yaml

from saltpeter.config import (
    DEFAULT_TIMEOUT,
    TARGET_TYPES,
    ConfigError,
    ConfigLoader,
    ConfigSnapshot,
    Job,
    Maintenance,
    Settings,
    load_directory,
    parse_job,
    parse_settings,
)
from saltpeter.schedule import FIELD_NAMES

NOW = datetime(2026, 12, 4, 20, 0, 0, tzinfo=timezone.utc)

# A complete job that every test changes in one place.
BASE_JOB: dict[str, Any] = {
    "min": "0",
    "hour": "2",
    "dom": "*",
    "mon": "*",
    "dow": "*",
    "targets": "db*",
    "command": "/usr/local/bin/backup.sh",
}

_DROP = object()


def job(**changes: Any) -> dict[str, Any]:
    """Return BASE_JOB with ``changes`` applied. A value of _DROP removes the key."""
    definition = dict(BASE_JOB)
    for key, value in changes.items():
        if value is _DROP:
            definition.pop(key, None)
        else:
            definition[key] = value
    return definition


def write_text(directory: Path, name: str, text: str, *, age: float = 10.0) -> Path:
    """Write a file and set its mtime ``age`` seconds in the past.

    An mtime within 2 s of a load makes the loader read the file again at the next load,
    so files that a test expects to stay unchanged get an older mtime.
    """
    path = directory / name
    path.write_text(textwrap.dedent(text))
    past = time.time() - age
    os.utime(path, (past, past))
    return path


def write_yaml(directory: Path, name: str, document: object, *, age: float = 10.0) -> Path:
    return write_text(directory, name, yaml.safe_dump(document, sort_keys=False), age=age)


def make_loader(directory: Path, **kwargs: Any) -> ConfigLoader:
    return ConfigLoader(directory, clock=lambda: NOW, **kwargs)


def load(directory: Path, **kwargs: Any) -> ConfigSnapshot:
    return make_loader(directory, **kwargs).load()


def error_texts(snapshot: ConfigSnapshot) -> list[str]:
    return [str(error) for error in snapshot.errors]


def only_error(snapshot: ConfigSnapshot) -> ConfigError:
    assert len(snapshot.errors) == 1, error_texts(snapshot)
    return snapshot.errors[0]


def load_one_job_error(directory: Path, definition: object, name: str = "backup") -> ConfigError:
    write_yaml(directory, "db.yaml", {name: definition})
    snapshot = load(directory)
    assert name not in snapshot.jobs
    return only_error(snapshot)


def load_one_job(directory: Path, definition: object, name: str = "backup") -> Job:
    write_yaml(directory, "db.yaml", {name: definition})
    snapshot = load(directory)
    assert snapshot.errors == [], error_texts(snapshot)
    return snapshot.jobs[name]


# The examples from the original Saltpeter's README, verbatim apart from trailing spaces.
README_HELLO_WORLD = """\
hello_world:
  # Schedule: Every 5 minutes
  min: '*/5'
  hour: '*'
  dom: '*'
  mon: '*'
  dow: '*'

  # Targeting
  targets: '*'
  target_type: 'glob'

  # Command to run
  command: 'echo "Hello from $(hostname) at $(date)"'
  user: 'root'
  cwd: '/tmp'

  # Timeout (in seconds)
  timeout: 300
"""

README_BACKUP_DATABASES = """\
backup_databases:
  # Unique job name

  # Schedule (cron syntax)
  year: '*'
  mon: '*'
  dow: '*'
  dom: '*'
  hour: '2'
  min: '0'
  sec: '0'

  # Command execution
  command: '/usr/local/bin/backup_script.sh --full'
  user: 'backup'
  cwd: '/var/backups'

  # Custom environment variables (optional)
  env:
    BACKUP_TYPE: 'full'
    RETENTION_DAYS: '30'
    DEBUG: '1'

  # Targeting
  targets: 'db-server*'
  target_type: 'glob'

  # Timeout handling
  timeout: 3600  # 1 hour

  # Optional: Custom wrapper path
  wrapper_path: '/opt/custom/sp_wrapper.py'
"""

README_MAINTENANCE = """\
saltpeter_maintenance:
  # Global maintenance - stops ALL new job execution
  global: false

  # Per-machine maintenance - excludes specific hosts
  machines:
    - server01.example.com
    - server02.example.com
    - db-primary.example.com
"""

README_SETTINGS = """\
saltpeter_config:
  # Logging
  logdir: '/var/log/saltpeter'
  debug: false  # Enable verbose debug logging (hot-reloadable)

  # UI WebSocket API
  api_ws: true
  api_ws_port: 8888
  api_ws_bind_addr: '0.0.0.0'

  # Machines WebSocket (for wrapper connections)
  machines_ws_port: 8889
  machines_ws_bind_addr: '0.0.0.0'
  default_saltpeter_server_host: 'saltpeter.example.com'  # Hostname wrappers connect to

  # Wrapper deployment
  default_wrapper_path: '/usr/local/bin/sp_wrapper.py'
  default_wrapper_loglevel: 'normal'  # normal, debug, or off
  default_wrapper_logdir: '/var/log/sp_wrapper'

  # Elasticsearch logging (optional)
  elasticsearch: 'http://elasticsearch:9200'
  elasticsearch_index: 'saltpeter'

  # OpenSearch logging (optional)
  opensearch: 'http://opensearch:9200'
  opensearch_index: 'saltpeter'
"""


@pytest.fixture
def readme_dir(tmp_path: Path) -> Path:
    write_text(tmp_path, "my_first_job.yaml", README_HELLO_WORLD)
    write_text(tmp_path, "databases.yaml", README_BACKUP_DATABASES)
    write_text(tmp_path, "maintenance.yaml", README_MAINTENANCE)
    write_text(tmp_path, "config.yaml", README_SETTINGS)
    return tmp_path


class TestReadmeExamples:
    def test_examples_load_without_errors(self, readme_dir: Path) -> None:
        snapshot = load(readme_dir)
        assert snapshot.errors == []
        assert snapshot.warnings == []
        assert sorted(snapshot.jobs) == ["backup_databases", "hello_world"]

    def test_hello_world_fields(self, readme_dir: Path) -> None:
        hello = load(readme_dir).jobs["hello_world"]
        assert hello.schedule_fields == {
            "sec": "0",
            "min": "*/5",
            "hour": "*",
            "dom": "*",
            "mon": "*",
            "dow": "*",
            "year": "*",
        }
        assert hello.targets == "*"
        assert hello.target_type == "glob"
        assert hello.command == 'echo "Hello from $(hostname) at $(date)"'
        assert hello.user == "root"
        assert hello.cwd == "/tmp"
        assert hello.timeout == 300
        assert hello.group == "my_first_job"
        assert hello.source == readme_dir / "my_first_job.yaml"

    def test_backup_databases_fields(self, readme_dir: Path) -> None:
        backup = load(readme_dir).jobs["backup_databases"]
        assert backup.schedule_fields["hour"] == "2"
        assert backup.schedule_fields["sec"] == "0"
        assert dict(backup.env) == {"BACKUP_TYPE": "full", "RETENTION_DAYS": "30", "DEBUG": "1"}
        assert backup.targets == "db-server*"
        assert backup.timeout == 3600
        assert backup.wrapper_path == "/opt/custom/sp_wrapper.py"
        assert backup.wrapper_loglevel is None
        assert backup.allow_overlap is False
        assert backup.group == "databases"

    def test_backup_databases_fires_at_two(self, readme_dir: Path) -> None:
        backup = load(readme_dir).jobs["backup_databases"]
        assert backup.schedule.next_after(NOW) == datetime(2026, 12, 5, 2, 0, tzinfo=timezone.utc)

    def test_maintenance_example(self, readme_dir: Path) -> None:
        maintenance = load(readme_dir).maintenance
        assert maintenance == Maintenance(
            global_=False,
            machines=frozenset(
                {"server01.example.com", "server02.example.com", "db-primary.example.com"}
            ),
        )

    def test_settings_example(self, readme_dir: Path) -> None:
        settings = load(readme_dir).settings
        assert settings.api_ws is True
        assert settings.api_ws_bind_addr == "0.0.0.0"
        assert settings.default_saltpeter_server_host == "saltpeter.example.com"
        assert settings.elasticsearch == "http://elasticsearch:9200"
        assert settings.opensearch == "http://opensearch:9200"
        assert settings.logdir == "/var/log/saltpeter"

    def test_original_example_with_unquoted_seconds(self, tmp_path: Path) -> None:
        write_text(
            tmp_path,
            "example.yaml",
            """\
            example:
                year: '*'
                mon: '*'
                dow: '*'
                dom: '*'
                hour: '1-23'
                min: '*'
                sec: 0,15,30,45
                cwd: '/home/user'
                user: 'user'
                command: 'hostname; whoami; /usr/bin/touch /tmp/example_cron'
                targets: 'G@roles:webserver or G@host:testhost1'
                target_type: compound
            """,
        )
        snapshot = load(tmp_path)
        assert snapshot.errors == []
        assert snapshot.jobs["example"].schedule_fields["sec"] == "0,15,30,45"


class TestJobNames:
    @pytest.mark.parametrize("name", ["backup", "Backup_2", "db.nightly", "7-days", "a"])
    def test_valid_name_accepted(self, tmp_path: Path, name: str) -> None:
        assert load_one_job(tmp_path, job(), name=name).name == name

    @pytest.mark.parametrize("name", ["bad name", "_hidden", "-x", "a/b", "job:1", "ünï"])
    def test_invalid_name_rejected(self, tmp_path: Path, name: str) -> None:
        error = load_one_job_error(tmp_path, job(), name=name)
        assert str(error) == (
            f"{tmp_path / 'db.yaml'}: job name {name!r} is invalid: names start with a letter "
            "or digit and contain only letters, digits, '_', '.' and '-'"
        )
        assert error.value == name

    def test_numeric_name_rejected(self, tmp_path: Path) -> None:
        write_text(tmp_path, "db.yaml", "2024:\n  command: x\n")
        error = only_error(load(tmp_path))
        assert str(error) == (
            f"{tmp_path / 'db.yaml'}: job name 2024 is a number; quote it to use it as a name"
        )

    def test_invalid_name_does_not_stop_others(self, tmp_path: Path) -> None:
        write_yaml(tmp_path, "db.yaml", {"bad name": job(), "good": job()})
        assert list(load(tmp_path).jobs) == ["good"]


class TestScheduleValidation:
    def test_out_of_range_hour(self, tmp_path: Path) -> None:
        error = load_one_job_error(tmp_path, job(hour="25"))
        assert str(error) == (
            f"job 'backup' in {tmp_path / 'db.yaml'}: field 'hour': 25 is out of range 0-23"
        )
        assert error.file == tmp_path / "db.yaml"
        assert error.job == "backup"
        assert error.field == "hour"
        assert error.value == "25"

    def test_unknown_month_name(self, tmp_path: Path) -> None:
        error = load_one_job_error(tmp_path, job(mon="foo"))
        assert str(error) == (
            f"job 'backup' in {tmp_path / 'db.yaml'}: field 'mon': 'foo' is not a month name "
            "(jan-dec)"
        )

    def test_unknown_weekday_name(self, tmp_path: Path) -> None:
        error = load_one_job_error(tmp_path, job(dow="funday"))
        assert error.message == "'funday' is not a weekday name (sun-sat)"
        assert error.field == "dow"

    def test_malformed_field(self, tmp_path: Path) -> None:
        error = load_one_job_error(tmp_path, job(min="*/0"))
        assert str(error) == (
            f"job 'backup' in {tmp_path / 'db.yaml'}: field 'min': step 0 in '*/0' must be at "
            "least 1"
        )

    def test_year_in_past_never_fires(self, tmp_path: Path) -> None:
        error = load_one_job_error(tmp_path, job(year="2020"))
        assert str(error) == (
            f"job 'backup' in {tmp_path / 'db.yaml'}: field 'year': 2020 is in the past"
        )

    def test_impossible_date_never_fires(self, tmp_path: Path) -> None:
        error = load_one_job_error(tmp_path, job(dom="31", mon="2"))
        assert str(error) == (
            f"job 'backup' in {tmp_path / 'db.yaml'}: field 'dom': 31 never occurs in February"
        )

    def test_never_fires_uses_clock(self, tmp_path: Path) -> None:
        write_yaml(tmp_path, "db.yaml", {"backup": job(year="2026", mon="1")})
        error = only_error(load(tmp_path))
        assert error.message == (
            "no remaining time in 2026 matches the other fields"
        )

    @pytest.mark.parametrize("missing", ["min", "hour", "dom", "mon", "dow"])
    def test_missing_required_field(self, tmp_path: Path, missing: str) -> None:
        error = load_one_job_error(tmp_path, job(**{missing: _DROP}))
        assert str(error) == (
            f"job 'backup' in {tmp_path / 'db.yaml'}: field '{missing}': the field is missing; "
            "every job needs min, hour, dom, mon and dow"
        )

    def test_null_required_field_is_missing(self, tmp_path: Path) -> None:
        error = load_one_job_error(tmp_path, job(hour=None))
        assert error.message == "the field is missing; every job needs min, hour, dom, mon and dow"

    def test_sec_and_year_default(self, tmp_path: Path) -> None:
        found = load_one_job(tmp_path, job())
        assert found.schedule_fields["sec"] == "0"
        assert found.schedule_fields["year"] == "*"

    def test_schedule_fields_cover_every_name(self, tmp_path: Path) -> None:
        assert tuple(load_one_job(tmp_path, job()).schedule_fields) == FIELD_NAMES

    def test_unquoted_integers_accepted(self, tmp_path: Path) -> None:
        write_text(
            tmp_path,
            "db.yaml",
            """\
            backup:
              sec: 30
              min: 0
              hour: 2
              dom: '*'
              mon: '*'
              dow: '*'
              year: 2030
              targets: '*'
              command: 'true'
            """,
        )
        found = load(tmp_path).jobs["backup"]
        assert found.schedule_fields == {
            "sec": "30",
            "min": "0",
            "hour": "2",
            "dom": "*",
            "mon": "*",
            "dow": "*",
            "year": "2030",
        }

    def test_whitespace_and_names_normalized(self, tmp_path: Path) -> None:
        found = load_one_job(tmp_path, job(dow="MON, Fri", mon=" Jan-Mar "))
        assert found.schedule_fields["dow"] == "mon,fri"
        assert found.schedule_fields["mon"] == "jan-mar"

    def test_list_value_rejected(self, tmp_path: Path) -> None:
        error = load_one_job_error(tmp_path, job(min=[0, 30]))
        assert str(error) == (
            f"job 'backup' in {tmp_path / 'db.yaml'}: field 'min': [0, 30] is invalid: expected "
            "a cron field such as '*/5' or 0"
        )

    def test_boolean_value_rejected(self, tmp_path: Path) -> None:
        error = load_one_job_error(tmp_path, job(dom=True))
        assert error.message == "true is invalid: expected a cron field such as '*/5' or 0"

    def test_every_field_error_reported(self, tmp_path: Path) -> None:
        write_yaml(tmp_path, "db.yaml", {"backup": job(min=_DROP, command="", timeout=-1)})
        fields = sorted(error.field for error in load(tmp_path).errors)
        assert fields == ["command", "min", "timeout"]


class TestJobFields:
    def test_missing_command(self, tmp_path: Path) -> None:
        error = load_one_job_error(tmp_path, job(command=_DROP))
        assert str(error) == (
            f"job 'backup' in {tmp_path / 'db.yaml'}: field 'command': the field is missing; "
            "set the shell command to run"
        )

    def test_empty_command(self, tmp_path: Path) -> None:
        error = load_one_job_error(tmp_path, job(command="  "))
        assert str(error) == (
            f"job 'backup' in {tmp_path / 'db.yaml'}: field 'command': the field is empty; "
            "set the shell command to run"
        )

    def test_command_not_string(self, tmp_path: Path) -> None:
        error = load_one_job_error(tmp_path, job(command=["ls", "-l"]))
        assert error.message == "the value is a list; expected the shell command as a string"

    def test_missing_targets(self, tmp_path: Path) -> None:
        error = load_one_job_error(tmp_path, job(targets=_DROP))
        assert str(error) == (
            f"job 'backup' in {tmp_path / 'db.yaml'}: field 'targets': the field is missing; "
            "set a Salt target such as '*'"
        )

    def test_empty_targets(self, tmp_path: Path) -> None:
        error = load_one_job_error(tmp_path, job(targets=""))
        assert str(error) == (
            f"job 'backup' in {tmp_path / 'db.yaml'}: field 'targets': the field is empty; "
            "set a Salt target such as '*'"
        )

    def test_targets_list_for_list_type(self, tmp_path: Path) -> None:
        found = load_one_job(tmp_path, job(targets=["web1", "web2"], target_type="list"))
        assert found.targets == "web1,web2"

    def test_targets_list_for_glob_rejected(self, tmp_path: Path) -> None:
        error = load_one_job_error(tmp_path, job(targets=["web1", "web2"]))
        assert error.message == (
            "['web1', 'web2'] is invalid: expected a Salt target string, got a list"
        )

    def test_target_type_defaults_to_glob(self, tmp_path: Path) -> None:
        assert load_one_job(tmp_path, job()).target_type == "glob"

    @pytest.mark.parametrize("target_type", TARGET_TYPES)
    def test_every_target_type_accepted(self, tmp_path: Path, target_type: str) -> None:
        assert load_one_job(tmp_path, job(target_type=target_type)).target_type == target_type

    def test_unknown_target_type(self, tmp_path: Path) -> None:
        error = load_one_job_error(tmp_path, job(target_type="regex"))
        assert str(error) == (
            f"job 'backup' in {tmp_path / 'db.yaml'}: field 'target_type': 'regex' is invalid: "
            "expected one of glob, pcre, list, grain, grain_pcre, pillar, pillar_pcre, "
            "nodegroup, ipcidr, compound"
        )

    def test_timeout_defaults(self, tmp_path: Path) -> None:
        assert load_one_job(tmp_path, job()).timeout == DEFAULT_TIMEOUT

    def test_timeout_zero_means_no_limit(self, tmp_path: Path) -> None:
        assert load_one_job(tmp_path, job(timeout=0)).timeout == 0

    def test_negative_timeout(self, tmp_path: Path) -> None:
        error = load_one_job_error(tmp_path, job(timeout=-5))
        assert str(error) == (
            f"job 'backup' in {tmp_path / 'db.yaml'}: field 'timeout': -5 is invalid: must be 0 "
            "(no limit) or more"
        )

    @pytest.mark.parametrize("value", ["300", 1.5, True])
    def test_non_integer_timeout(self, tmp_path: Path, value: object) -> None:
        error = load_one_job_error(tmp_path, job(timeout=value))
        assert error.field == "timeout"
        assert error.message.endswith("is invalid: expected a whole number of seconds")

    def test_hard_timeout_alias(self, tmp_path: Path) -> None:
        assert load_one_job(tmp_path, job(hard_timeout=120)).timeout == 120

    def test_timeout_wins_over_hard_timeout(self, tmp_path: Path) -> None:
        assert load_one_job(tmp_path, job(hard_timeout=120, timeout=60)).timeout == 60

    def test_invalid_hard_timeout_named(self, tmp_path: Path) -> None:
        error = load_one_job_error(tmp_path, job(hard_timeout=-1))
        assert error.field == "hard_timeout"

    def test_env_values_converted_to_text(self, tmp_path: Path) -> None:
        found = load_one_job(tmp_path, job(env={"A": 1, "B": 2.5, "C": True, "D": "x"}))
        assert dict(found.env) == {"A": "1", "B": "2.5", "C": "True", "D": "x"}

    def test_env_not_mapping(self, tmp_path: Path) -> None:
        error = load_one_job_error(tmp_path, job(env=["A=1"]))
        assert str(error) == (
            f"job 'backup' in {tmp_path / 'db.yaml'}: field 'env': the value is a list; "
            "expected a mapping of variable names to values"
        )

    def test_env_nested_value(self, tmp_path: Path) -> None:
        error = load_one_job_error(tmp_path, job(env={"API_KEY": {"nested": "secret"}}))
        assert str(error) == (
            f"job 'backup' in {tmp_path / 'db.yaml'}: field 'env': the value of API_KEY is a "
            "mapping; expected a string or a number"
        )
        assert error.value == "API_KEY"

    def test_env_null_value(self, tmp_path: Path) -> None:
        error = load_one_job_error(tmp_path, job(env={"TOKEN": None}))
        assert error.message == "the value of TOKEN is null; expected a string or a number"

    def test_env_error_hides_value(self, tmp_path: Path) -> None:
        error = load_one_job_error(tmp_path, job(env={"TOKEN": "s3cr3t\0x"}))
        assert "s3cr3t" not in str(error)

    @pytest.mark.parametrize("name", [5, "", "A=B"])
    def test_env_invalid_name(self, tmp_path: Path, name: object) -> None:
        error = load_one_job_error(tmp_path, job(env={name: "x"}))
        assert error.message == (
            f"variable name {name!r} is invalid: expected a non-empty string without '=' or NUL"
        )

    def test_bad_wrapper_loglevel(self, tmp_path: Path) -> None:
        error = load_one_job_error(tmp_path, job(wrapper_loglevel="verbose"))
        assert str(error) == (
            f"job 'backup' in {tmp_path / 'db.yaml'}: field 'wrapper_loglevel': 'verbose' is "
            "invalid: expected one of normal, debug, off"
        )

    def test_wrapper_overrides_kept(self, tmp_path: Path) -> None:
        found = load_one_job(
            tmp_path,
            job(wrapper_loglevel="debug", wrapper_logdir="/var/log/my_job", wrapper_path="/w.py"),
        )
        assert found.wrapper_loglevel == "debug"
        assert found.wrapper_logdir == "/var/log/my_job"
        assert found.wrapper_path == "/w.py"

    def test_allow_overlap_defaults_false(self, tmp_path: Path) -> None:
        assert load_one_job(tmp_path, job()).allow_overlap is False

    def test_allow_overlap_true(self, tmp_path: Path) -> None:
        assert load_one_job(tmp_path, job(allow_overlap=True)).allow_overlap is True

    def test_allow_overlap_original_phrase(self, tmp_path: Path) -> None:
        found = load_one_job(tmp_path, job(allow_overlap="i know what i am doing!"))
        assert found.allow_overlap is True

    def test_allow_overlap_not_bool(self, tmp_path: Path) -> None:
        error = load_one_job_error(tmp_path, job(allow_overlap="yes please"))
        assert str(error) == (
            f"job 'backup' in {tmp_path / 'db.yaml'}: field 'allow_overlap': 'yes please' is "
            "invalid: expected true or false"
        )

    def test_user_and_cwd_default_none(self, tmp_path: Path) -> None:
        found = load_one_job(tmp_path, job())
        assert found.user is None
        assert found.cwd is None

    def test_user_not_string(self, tmp_path: Path) -> None:
        error = load_one_job_error(tmp_path, job(user=1000))
        assert error.message == "1000 is invalid: expected a string, got a number"
        assert error.field == "user"

    def test_definition_not_mapping(self, tmp_path: Path) -> None:
        error = load_one_job_error(tmp_path, "echo hi")
        assert str(error) == (
            f"job 'backup' in {tmp_path / 'db.yaml'}: the definition is a string; expected a "
            "mapping with schedule fields, targets and command"
        )

    def test_empty_definition(self, tmp_path: Path) -> None:
        error = load_one_job_error(tmp_path, None)
        assert error.message.startswith("the definition is null;")


class TestFiles:
    def test_top_level_not_mapping(self, tmp_path: Path) -> None:
        write_text(tmp_path, "db.yaml", "- backup\n- restore\n")
        error = only_error(load(tmp_path))
        assert str(error) == (
            f"{tmp_path / 'db.yaml'}: the top level is a list; expected a mapping of job names "
            "to job definitions"
        )

    def test_yaml_syntax_error_names_line(self, tmp_path: Path) -> None:
        write_text(tmp_path, "db.yaml", "backup:\n  min: '0'\n  hour: [2\n")
        error = only_error(load(tmp_path))
        assert str(error).startswith(f"{tmp_path / 'db.yaml'}: invalid YAML at line 4, column 1:")

    def test_yaml_error_in_one_file_keeps_others(self, tmp_path: Path) -> None:
        write_text(tmp_path, "bad.yaml", "backup: [\n")
        write_yaml(tmp_path, "good.yaml", {"restore": job()})
        assert list(load(tmp_path).jobs) == ["restore"]

    def test_empty_file_is_valid(self, tmp_path: Path) -> None:
        write_text(tmp_path, "empty.yaml", "# nothing here yet\n")
        snapshot = load(tmp_path)
        assert snapshot.errors == []
        assert snapshot.jobs == {}

    def test_duplicate_key_with_merge_warns(self, tmp_path: Path) -> None:
        write_text(
            tmp_path,
            "db.yaml",
            """\
            restore: &defaults
              min: '0'
              hour: '2'
              dom: '*'
              mon: '*'
              dow: '*'
              targets: '*'
              command: restore.sh
            backup:
              <<: *defaults
              command: first
              command: second
            """,
        )
        snapshot = load(tmp_path)
        assert snapshot.jobs["backup"].command == "second"
        assert snapshot.errors == []
        assert snapshot.warnings == [
            f"{tmp_path / 'db.yaml'}: line 12: duplicate key 'command' (first at line 11); the "
            "later value is used"
        ]

    def test_plain_scalar_types_repeatable(self, tmp_path: Path) -> None:
        text = """\
            backup:
              min: 0
              hour: 2
              dom: '*'
              mon: '*'
              dow: '*'
              targets: web
              command: run
              env: {A: yes, B: 12, C: 1.5, D: 0x10, E: web, F: 'yes'}
            """
        for attempt in range(2):
            write_text(tmp_path, f"db{attempt}.yaml", text.replace("backup", f"backup{attempt}"))
        jobs = load(tmp_path).jobs
        for name in ("backup0", "backup1"):
            assert dict(jobs[name].env) == {
                "A": "True",
                "B": "12",
                "C": "1.5",
                "D": "16",
                "E": "web",
                "F": "yes",
            }

    def test_python_tags_rejected(self, tmp_path: Path) -> None:
        marker = tmp_path / "executed"
        write_text(
            tmp_path,
            "evil.yaml",
            f"backup: !!python/object/apply:os.system ['touch {marker}']\n",
        )
        error = only_error(load(tmp_path))
        assert error.message.startswith("invalid YAML at line 1")
        assert not marker.exists()

    def test_yml_extension_read(self, tmp_path: Path) -> None:
        write_yaml(tmp_path, "db.yml", {"backup": job()})
        assert load(tmp_path).jobs["backup"].group == "db"

    def test_group_keeps_inner_dots(self, tmp_path: Path) -> None:
        write_yaml(tmp_path, "team.db.yaml", {"backup": job()})
        assert load(tmp_path).jobs["backup"].group == "team.db"

    @pytest.mark.parametrize("name", [".hidden.yaml", "db.yaml~", "db.yaml.bak", "db.json"])
    def test_other_names_ignored(self, tmp_path: Path, name: str) -> None:
        write_yaml(tmp_path, name, {"backup": job()})
        assert load(tmp_path).jobs == {}

    def test_subdirectory_not_read(self, tmp_path: Path) -> None:
        (tmp_path / "sub.yaml").mkdir()
        write_yaml(tmp_path / "sub.yaml", "db.yaml", {"backup": job()})
        snapshot = load(tmp_path)
        assert snapshot.jobs == {}
        assert snapshot.errors == []

    def test_symlink_followed(self, tmp_path: Path) -> None:
        config_dir = tmp_path / "conf"
        config_dir.mkdir()
        target = write_yaml(tmp_path, "shared.yaml", {"backup": job()})
        (config_dir / "linked.yaml").symlink_to(target)
        found = load(config_dir).jobs["backup"]
        assert found.group == "linked"
        assert found.source == config_dir / "linked.yaml"

    def test_dangling_symlink_reported(self, tmp_path: Path) -> None:
        (tmp_path / "gone.yaml").symlink_to(tmp_path / "missing.yaml")
        error = only_error(load(tmp_path))
        assert str(error) == f"{tmp_path / 'gone.yaml'}: cannot be read: No such file or directory"

    def test_missing_directory_reported(self, tmp_path: Path) -> None:
        error = only_error(load(tmp_path / "absent"))
        assert str(error) == (
            f"{tmp_path / 'absent'}: the config directory cannot be read: No such file or directory"
        )

    def test_duplicate_yaml_key_warns(self, tmp_path: Path) -> None:
        write_text(
            tmp_path,
            "db.yaml",
            """\
            backup:
              min: '0'
              hour: '2'
              dom: '*'
              mon: '*'
              dow: '*'
              targets: '*'
              command: first
              command: second
            """,
        )
        snapshot = load(tmp_path)
        assert snapshot.jobs["backup"].command == "second"
        assert snapshot.warnings == [
            f"{tmp_path / 'db.yaml'}: line 9: duplicate key 'command' (first at line 8); the "
            "later value is used"
        ]

    def test_merge_keys_do_not_warn(self, tmp_path: Path) -> None:
        write_text(
            tmp_path,
            "db.yaml",
            """\
            restore: &defaults
              min: '0'
              hour: '2'
              dom: '*'
              mon: '*'
              dow: '*'
              targets: '*'
              command: restore.sh
            backup:
              <<: *defaults
              hour: '3'
              command: backup.sh
            """,
        )
        snapshot = load(tmp_path)
        assert snapshot.jobs["backup"].schedule_fields["hour"] == "3"
        assert snapshot.jobs["backup"].command == "backup.sh"
        assert snapshot.jobs["restore"].schedule_fields["hour"] == "2"
        assert snapshot.errors == []
        assert snapshot.warnings == []


class TestTimezones:
    def test_default_zone_is_utc(self, tmp_path: Path) -> None:
        assert load_one_job(tmp_path, job()).timezone == "UTC"

    def test_job_timezone_key(self, tmp_path: Path) -> None:
        found = load_one_job(tmp_path, job(timezone="Europe/Berlin"))
        assert found.timezone == "Europe/Berlin"
        # 02:00 in Berlin in December is 01:00 UTC.
        assert found.schedule.next_after(NOW) == datetime(2026, 12, 5, 1, 0, tzinfo=timezone.utc)

    def test_utc_true_means_utc(self, tmp_path: Path) -> None:
        write_yaml(tmp_path, "config.yaml", {"saltpeter_config": {"timezone": "Asia/Tokyo"}})
        write_yaml(tmp_path, "db.yaml", {"backup": job(utc=True)})
        assert load(tmp_path).jobs["backup"].timezone == "UTC"

    def test_utc_false_means_settings_zone(self, tmp_path: Path) -> None:
        write_yaml(tmp_path, "config.yaml", {"saltpeter_config": {"timezone": "Asia/Tokyo"}})
        write_yaml(tmp_path, "db.yaml", {"backup": job(utc=False)})
        assert load(tmp_path).jobs["backup"].timezone == "Asia/Tokyo"

    def test_timezone_key_wins_over_utc(self, tmp_path: Path) -> None:
        found = load_one_job(tmp_path, job(utc=True, timezone="America/New_York"))
        assert found.timezone == "America/New_York"

    def test_unknown_timezone(self, tmp_path: Path) -> None:
        error = load_one_job_error(tmp_path, job(timezone="Mars/Olympus"))
        assert str(error) == (
            f"job 'backup' in {tmp_path / 'db.yaml'}: field 'timezone': 'Mars/Olympus' is not a "
            "known IANA time zone name"
        )

    def test_utc_not_bool(self, tmp_path: Path) -> None:
        error = load_one_job_error(tmp_path, job(utc="yes"))
        assert str(error) == (
            f"job 'backup' in {tmp_path / 'db.yaml'}: field 'utc': 'yes' is invalid: expected "
            "true or false"
        )

    def test_settings_zone_change_revalidates(self, tmp_path: Path) -> None:
        loader = make_loader(tmp_path)
        write_yaml(tmp_path, "db.yaml", {"backup": job()})
        write_yaml(tmp_path, "config.yaml", {"saltpeter_config": {"timezone": "UTC"}})
        assert loader.load().jobs["backup"].timezone == "UTC"
        write_yaml(tmp_path, "config.yaml", {"saltpeter_config": {"timezone": "Europe/Paris"}})
        found = loader.load().jobs["backup"]
        assert found.timezone == "Europe/Paris"
        assert found.schedule.next_after(NOW) == datetime(2026, 12, 5, 1, 0, tzinfo=timezone.utc)


class TestSettings:
    def test_defaults(self, tmp_path: Path) -> None:
        settings = load(tmp_path).settings
        assert settings == Settings()
        assert settings.timezone == "UTC"
        assert settings.api_ws_bind_addr == "127.0.0.1"
        assert settings.default_saltpeter_server_host == os.uname().nodename

    def test_later_file_overrides_with_warning(self, tmp_path: Path) -> None:
        write_yaml(tmp_path, "a.yaml", {"saltpeter_config": {"api_ws_port": 9000, "debug": True}})
        write_yaml(tmp_path, "b.yaml", {"saltpeter_config": {"api_ws_port": 9001}})
        snapshot = load(tmp_path)
        assert snapshot.settings.api_ws_port == 9001
        assert snapshot.settings.debug is True
        assert snapshot.warnings == [
            f"{tmp_path / 'b.yaml'}: saltpeter_config key 'api_ws_port' is also set in "
            f"{tmp_path / 'a.yaml'}; the value from {tmp_path / 'b.yaml'} is used"
        ]

    def test_overrides_take_precedence(self, tmp_path: Path) -> None:
        write_yaml(tmp_path, "a.yaml", {"saltpeter_config": {"api_ws_port": 9000}})
        snapshot = load(tmp_path, overrides={"api_ws_port": 9100, "startup_wait": 5})
        assert snapshot.settings.api_ws_port == 9100
        assert snapshot.settings.startup_wait == 5.0
        assert snapshot.warnings == []

    def test_invalid_override_reported(self, tmp_path: Path) -> None:
        snapshot = load(tmp_path, overrides={"machines_ws_port": 0})
        assert error_texts(snapshot) == [
            "field 'machines_ws_port': 0 is out of range 1-65535 (engine settings in the "
            "master config)"
        ]
        assert snapshot.settings.machines_ws_port == 8889

    def test_unknown_override_warns(self, tmp_path: Path) -> None:
        snapshot = load(tmp_path, overrides={"colour": "blue"})
        assert snapshot.warnings == [
            "saltpeter_config in the engine's settings: unknown key 'colour' is ignored"
        ]

    def test_unknown_key_warns(self, tmp_path: Path) -> None:
        write_yaml(tmp_path, "a.yaml", {"saltpeter_config": {"api_port": 1}})
        snapshot = load(tmp_path)
        assert snapshot.errors == []
        assert snapshot.warnings == [
            f"{tmp_path / 'a.yaml'}: saltpeter_config: unknown key 'api_port' is ignored"
        ]

    @pytest.mark.parametrize(
        ("key", "value", "message"),
        [
            ("api_ws_port", 70000, "70000 is out of range 1-65535"),
            ("api_ws_port", "http", "'http' is invalid: expected a port number"),
            ("machines_ws_port", True, "true is invalid: expected a port number"),
            ("debug", "false", "'false' is invalid: expected true or false"),
            ("api_ws", 1, "1 is invalid: expected true or false"),
            ("logdir", "", "'' is invalid: must not be empty"),
            ("logdir", 5, "5 is invalid: expected a string, got a number"),
            ("elasticsearch", None, "the value is invalid: expected a string, got null"),
            (
                "default_wrapper_loglevel",
                "trace",
                "'trace' is invalid: expected one of normal, debug, off",
            ),
            ("timezone", "Europe/Nowhere", "'Europe/Nowhere' is not a known IANA time zone name"),
            ("timezone", 2, "2 is invalid: expected an IANA time zone name"),
            ("launch_timeout", 0, "0 is invalid: must be more than 0"),
            ("heartbeat_timeout", "15", "'15' is invalid: expected a number of seconds"),
            ("startup_wait", -1, "-1 is invalid: must be 0 or more"),
            ("max_output_bytes", 0, "0 is invalid: must be at least 1"),
            (
                "machines_ws_url",
                "http://x:8889/wrapper",
                "'http://x:8889/wrapper' is invalid: expected a ws:// or wss:// URL",
            ),
        ],
    )
    def test_invalid_value(self, tmp_path: Path, key: str, value: object, message: str) -> None:
        write_yaml(tmp_path, "a.yaml", {"saltpeter_config": {key: value}})
        snapshot = load(tmp_path)
        assert error_texts(snapshot) == [f"{tmp_path / 'a.yaml'}: field '{key}': {message}"]
        assert getattr(snapshot.settings, key) == getattr(Settings(), key)

    def test_port_digit_string_accepted(self, tmp_path: Path) -> None:
        write_yaml(tmp_path, "a.yaml", {"saltpeter_config": {"machines_ws_port": "9889"}})
        assert load(tmp_path).settings.machines_ws_port == 9889

    def test_section_not_mapping(self, tmp_path: Path) -> None:
        write_yaml(tmp_path, "a.yaml", {"saltpeter_config": ["debug"]})
        error = only_error(load(tmp_path))
        assert str(error) == (
            f"{tmp_path / 'a.yaml'}: field 'saltpeter_config': the section is a list; expected "
            "a mapping of keys to values"
        )

    def test_invalid_value_keeps_last_valid(self, tmp_path: Path) -> None:
        loader = make_loader(tmp_path)
        write_yaml(tmp_path, "a.yaml", {"saltpeter_config": {"api_ws_port": 9000}})
        loader.load()
        write_yaml(tmp_path, "a.yaml", {"saltpeter_config": {"api_ws_port": 0}})
        snapshot = loader.load()
        assert snapshot.settings.api_ws_port == 9000
        assert len(snapshot.errors) == 1

    def test_parse_settings_returns_settings(self) -> None:
        settings = parse_settings({"debug": True, "timezone": "Europe/Rome"}, None)
        assert settings.debug is True
        assert settings.timezone == "Europe/Rome"

    def test_parse_settings_raises(self) -> None:
        with pytest.raises(ConfigError) as caught:
            parse_settings({"api_ws_port": -1}, Path("/etc/saltpeter/c.yaml"))
        assert str(caught.value) == (
            "/etc/saltpeter/c.yaml: field 'api_ws_port': -1 is out of range 1-65535"
        )

    def test_wrapper_url_built(self) -> None:
        settings = Settings(default_saltpeter_server_host="master.example", machines_ws_port=9)
        assert settings.wrapper_url() == "ws://master.example:9/wrapper"

    def test_wrapper_url_ipv6(self) -> None:
        settings = Settings(default_saltpeter_server_host="::1")
        assert settings.wrapper_url() == "ws://[::1]:8889/wrapper"

    def test_wrapper_url_explicit(self) -> None:
        settings = Settings(machines_ws_url="wss://sp.example/wrapper")
        assert settings.wrapper_url() == "wss://sp.example/wrapper"


class TestMaintenance:
    def test_default_off(self, tmp_path: Path) -> None:
        assert load(tmp_path).maintenance == Maintenance()

    def test_global_true_in_any_file_wins(self, tmp_path: Path) -> None:
        write_yaml(tmp_path, "a.yaml", {"saltpeter_maintenance": {"global": True}})
        write_yaml(tmp_path, "b.yaml", {"saltpeter_maintenance": {"global": False}})
        assert load(tmp_path).maintenance.global_ is True

    def test_machines_union(self, tmp_path: Path) -> None:
        write_yaml(tmp_path, "a.yaml", {"saltpeter_maintenance": {"machines": ["m1", "m2"]}})
        write_yaml(tmp_path, "b.yaml", {"saltpeter_maintenance": {"machines": ["m2", "m3"]}})
        assert load(tmp_path).maintenance.machines == frozenset({"m1", "m2", "m3"})

    def test_empty_entries_accepted(self, tmp_path: Path) -> None:
        write_text(tmp_path, "m.yaml", "saltpeter_maintenance:\n  global:\n  machines:\n")
        snapshot = load(tmp_path)
        assert snapshot.errors == []
        assert snapshot.maintenance == Maintenance()

    def test_global_not_bool(self, tmp_path: Path) -> None:
        write_yaml(tmp_path, "m.yaml", {"saltpeter_maintenance": {"global": "on"}})
        error = only_error(load(tmp_path))
        assert str(error) == (
            f"{tmp_path / 'm.yaml'}: field 'global': 'on' is invalid: expected true or false"
        )

    def test_machines_not_list(self, tmp_path: Path) -> None:
        write_yaml(tmp_path, "m.yaml", {"saltpeter_maintenance": {"machines": "m1,m2"}})
        error = only_error(load(tmp_path))
        assert str(error) == (
            f"{tmp_path / 'm.yaml'}: field 'machines': 'm1,m2' is invalid: expected a list of "
            "minion ids, got a string"
        )

    def test_machine_not_string(self, tmp_path: Path) -> None:
        write_yaml(tmp_path, "m.yaml", {"saltpeter_maintenance": {"machines": ["m1", 7]}})
        error = only_error(load(tmp_path))
        assert error.message == "item 7 is invalid: expected a minion id (a string)"

    def test_unknown_key_warns(self, tmp_path: Path) -> None:
        write_yaml(tmp_path, "m.yaml", {"saltpeter_maintenance": {"hosts": ["m1"]}})
        assert load(tmp_path).warnings == [
            f"{tmp_path / 'm.yaml'}: saltpeter_maintenance: unknown key 'hosts' is ignored"
        ]

    def test_broken_file_keeps_maintenance(self, tmp_path: Path) -> None:
        loader = make_loader(tmp_path)
        write_yaml(tmp_path, "m.yaml", {"saltpeter_maintenance": {"global": True}})
        loader.load()
        write_text(tmp_path, "m.yaml", "saltpeter_maintenance: [\n")
        assert loader.load().maintenance.global_ is True

    def test_invalid_global_keeps_last_valid(self, tmp_path: Path) -> None:
        loader = make_loader(tmp_path)
        write_yaml(tmp_path, "m.yaml", {"saltpeter_maintenance": {"global": True}})
        loader.load()
        write_yaml(tmp_path, "m.yaml", {"saltpeter_maintenance": {"global": "yes"}})
        assert loader.load().maintenance.global_ is True


class TestRetention:
    def test_file_turns_invalid_keeps_jobs(self, tmp_path: Path) -> None:
        loader = make_loader(tmp_path)
        write_yaml(tmp_path, "db.yaml", {"backup": job(), "restore": job(hour="3")})
        first = loader.load()
        write_text(tmp_path, "db.yaml", "backup: [\n")
        second = loader.load()
        assert second.jobs == first.jobs
        assert len(second.errors) == 1
        assert second.errors[0].message.startswith("invalid YAML")

    def test_file_turns_non_mapping_keeps_jobs(self, tmp_path: Path) -> None:
        loader = make_loader(tmp_path)
        write_yaml(tmp_path, "db.yaml", {"backup": job()})
        first = loader.load()
        write_text(tmp_path, "db.yaml", "just a string\n")
        assert loader.load().jobs == first.jobs

    def test_one_job_turns_invalid(self, tmp_path: Path) -> None:
        loader = make_loader(tmp_path)
        write_yaml(tmp_path, "db.yaml", {"backup": job(), "restore": job(hour="3")})
        first = loader.load()
        write_yaml(tmp_path, "db.yaml", {"backup": job(hour="25"), "restore": job(hour="4")})
        second = loader.load()
        assert second.jobs["backup"] == first.jobs["backup"]
        assert second.jobs["restore"].schedule_fields["hour"] == "4"
        assert [error.job for error in second.errors] == ["backup"]

    def test_invalid_job_stays_reported(self, tmp_path: Path) -> None:
        loader = make_loader(tmp_path)
        write_yaml(tmp_path, "db.yaml", {"backup": job()})
        loader.load()
        write_yaml(tmp_path, "db.yaml", {"backup": job(hour="25")})
        loader.load()
        third = loader.load()
        assert [error.field for error in third.errors] == ["hour"]
        assert "backup" in third.jobs

    def test_job_fixed_after_invalid(self, tmp_path: Path) -> None:
        loader = make_loader(tmp_path)
        write_yaml(tmp_path, "db.yaml", {"backup": job(hour="25")})
        assert loader.load().jobs == {}
        write_yaml(tmp_path, "db.yaml", {"backup": job(hour="5")})
        snapshot = loader.load()
        assert snapshot.errors == []
        assert snapshot.jobs["backup"].schedule_fields["hour"] == "5"

    def test_job_removed_from_valid_file(self, tmp_path: Path) -> None:
        loader = make_loader(tmp_path)
        write_yaml(tmp_path, "db.yaml", {"backup": job(), "restore": job()})
        loader.load()
        write_yaml(tmp_path, "db.yaml", {"restore": job()})
        assert list(loader.load().jobs) == ["restore"]

    def test_file_deleted(self, tmp_path: Path) -> None:
        loader = make_loader(tmp_path)
        write_yaml(tmp_path, "db.yaml", {"backup": job()})
        write_yaml(tmp_path, "web.yaml", {"deploy": job()})
        loader.load()
        (tmp_path / "db.yaml").unlink()
        assert list(loader.load().jobs) == ["deploy"]

    def test_deleted_invalid_file_forgets_jobs(self, tmp_path: Path) -> None:
        loader = make_loader(tmp_path)
        write_yaml(tmp_path, "db.yaml", {"backup": job()})
        loader.load()
        write_text(tmp_path, "db.yaml", "backup: [\n")
        loader.load()
        (tmp_path / "db.yaml").unlink()
        snapshot = loader.load()
        assert snapshot.jobs == {}
        assert snapshot.errors == []

    def test_job_moved_to_other_file(self, tmp_path: Path) -> None:
        loader = make_loader(tmp_path)
        write_yaml(tmp_path, "a.yaml", {"backup": job()})
        loader.load()
        (tmp_path / "a.yaml").unlink()
        write_yaml(tmp_path, "b.yaml", {"backup": job()})
        found = loader.load().jobs["backup"]
        assert found.source == tmp_path / "b.yaml"
        assert found.group == "b"

    def test_unchanged_file_not_reparsed(self, tmp_path: Path) -> None:
        loader = make_loader(tmp_path)
        write_yaml(tmp_path, "db.yaml", {"backup": job()})
        write_yaml(tmp_path, "web.yaml", {"deploy": job()})
        first = loader.load()
        write_yaml(tmp_path, "web.yaml", {"deploy": job(hour="7")})
        second = loader.load()
        assert second.jobs["backup"] is first.jobs["backup"]
        assert second.jobs["deploy"] is not first.jobs["deploy"]


class TestDuplicateNames:
    def test_first_file_in_name_order_wins(self, tmp_path: Path) -> None:
        write_yaml(tmp_path, "b.yaml", {"backup": job(command="from b")})
        write_yaml(tmp_path, "a.yaml", {"backup": job(command="from a")})
        snapshot = load(tmp_path)
        assert snapshot.jobs["backup"].command == "from a"
        assert error_texts(snapshot) == [
            f"job 'backup' in {tmp_path / 'b.yaml'}: already defined in {tmp_path / 'a.yaml'}, "
            "which keeps it; rename one of them"
        ]

    def test_previous_owner_keeps_name(self, tmp_path: Path) -> None:
        loader = make_loader(tmp_path)
        write_yaml(tmp_path, "m.yaml", {"backup": job(command="from m")})
        loader.load()
        write_yaml(tmp_path, "a.yaml", {"backup": job(command="from a")})
        snapshot = loader.load()
        assert snapshot.jobs["backup"].command == "from m"
        assert snapshot.errors[0].file == tmp_path / "a.yaml"

    def test_other_file_takes_over_after_removal(self, tmp_path: Path) -> None:
        loader = make_loader(tmp_path)
        write_yaml(tmp_path, "m.yaml", {"backup": job(command="from m")})
        write_yaml(tmp_path, "z.yaml", {"backup": job(command="from z")})
        loader.load()
        (tmp_path / "m.yaml").unlink()
        snapshot = loader.load()
        assert snapshot.jobs["backup"].command == "from z"
        assert snapshot.errors == []

    def test_invalid_owner_keeps_last_definition(self, tmp_path: Path) -> None:
        loader = make_loader(tmp_path)
        write_yaml(tmp_path, "a.yaml", {"backup": job(command="from a")})
        loader.load()
        write_yaml(tmp_path, "a.yaml", {"backup": job(command="")})
        write_yaml(tmp_path, "b.yaml", {"backup": job(command="from b")})
        snapshot = loader.load()
        assert snapshot.jobs["backup"].command == "from a"
        assert sorted(str(error.file.name) for error in snapshot.errors) == ["a.yaml", "b.yaml"]


class TestWarnings:
    def test_unknown_job_key(self, tmp_path: Path) -> None:
        write_yaml(tmp_path, "db.yaml", {"backup": job(tiemout=5)})
        snapshot = load(tmp_path)
        assert "backup" in snapshot.jobs
        assert snapshot.warnings == [
            f"job 'backup' in {tmp_path / 'db.yaml'}: unknown key 'tiemout' is ignored"
        ]

    def test_ignored_original_key(self, tmp_path: Path) -> None:
        write_yaml(tmp_path, "db.yaml", {"backup": job(number_of_targets=2)})
        assert load(tmp_path).warnings == [
            f"job 'backup' in {tmp_path / 'db.yaml'}: key 'number_of_targets' is ignored: every "
            "matched minion runs the job; random subsets are not supported"
        ]

    def test_group_key_warns(self, tmp_path: Path) -> None:
        write_yaml(tmp_path, "db.yaml", {"backup": job(group="nightly")})
        snapshot = load(tmp_path)
        assert snapshot.jobs["backup"].group == "db"
        assert snapshot.warnings == [
            f"job 'backup' in {tmp_path / 'db.yaml'}: key 'group' is ignored: the group of a "
            "job is the name of its file without the extension"
        ]

    def test_original_keys_accepted_silently(self, tmp_path: Path) -> None:
        write_yaml(tmp_path, "db.yaml", {"backup": job(utc=True, hard_timeout=60)})
        snapshot = load(tmp_path)
        assert snapshot.warnings == []
        assert snapshot.errors == []

    def test_warning_on_invalid_job_too(self, tmp_path: Path) -> None:
        write_yaml(tmp_path, "db.yaml", {"backup": job(hour="25", colour="red")})
        assert len(load(tmp_path).warnings) == 1


class TestChanged:
    def test_true_before_first_load(self, tmp_path: Path) -> None:
        assert make_loader(tmp_path).changed() is True

    def test_false_after_load(self, tmp_path: Path) -> None:
        write_yaml(tmp_path, "db.yaml", {"backup": job()})
        loader = make_loader(tmp_path)
        loader.load()
        assert loader.changed() is False

    def test_file_added(self, tmp_path: Path) -> None:
        loader = make_loader(tmp_path)
        loader.load()
        write_yaml(tmp_path, "db.yaml", {"backup": job()})
        assert loader.changed() is True

    def test_file_modified_same_size(self, tmp_path: Path) -> None:
        write_yaml(tmp_path, "db.yaml", {"backup": job(hour="2")})
        loader = make_loader(tmp_path)
        loader.load()
        write_yaml(tmp_path, "db.yaml", {"backup": job(hour="3")}, age=20.0)
        assert loader.changed() is True

    def test_file_deleted(self, tmp_path: Path) -> None:
        write_yaml(tmp_path, "db.yaml", {"backup": job()})
        loader = make_loader(tmp_path)
        loader.load()
        (tmp_path / "db.yaml").unlink()
        assert loader.changed() is True

    def test_permission_change_counts(self, tmp_path: Path) -> None:
        path = write_yaml(tmp_path, "db.yaml", {"backup": job()})
        loader = make_loader(tmp_path)
        loader.load()
        # The kernel stamps ctime from a clock that ticks every few milliseconds, so a
        # chmod in the same tick as the write would leave ctime unchanged.
        time.sleep(0.05)
        path.chmod(0o600)
        assert loader.changed() is True

    def test_false_again_after_reload(self, tmp_path: Path) -> None:
        loader = make_loader(tmp_path)
        loader.load()
        write_yaml(tmp_path, "db.yaml", {"backup": job()})
        loader.load()
        assert loader.changed() is False

    def test_ignored_names_do_not_count(self, tmp_path: Path) -> None:
        loader = make_loader(tmp_path)
        loader.load()
        write_yaml(tmp_path, ".db.yaml.swp", {"backup": job()})
        write_yaml(tmp_path, "db.yaml~", {"backup": job()})
        (tmp_path / "notes.txt").write_text("x")
        assert loader.changed() is False

    def test_recent_write_rechecked(self, tmp_path: Path) -> None:
        write_yaml(tmp_path, "db.yaml", {"backup": job()}, age=0.0)
        loader = make_loader(tmp_path)
        loader.load()
        assert loader.changed() is True

    def test_recent_write_reread(self, tmp_path: Path) -> None:
        path = write_yaml(tmp_path, "db.yaml", {"backup": job(hour="2")}, age=0.0)
        stat_before = path.stat()
        loader = make_loader(tmp_path)
        loader.load()
        # A second write of the same size, with the mtime set back to its earlier value.
        write_yaml(tmp_path, "db.yaml", {"backup": job(hour="3")})
        os.utime(path, ns=(stat_before.st_atime_ns, stat_before.st_mtime_ns))
        assert loader.load().jobs["backup"].schedule_fields["hour"] == "3"

    def test_directory_missing_then_created(self, tmp_path: Path) -> None:
        config_dir = tmp_path / "conf"
        loader = make_loader(config_dir)
        loader.load()
        assert loader.changed() is False
        config_dir.mkdir()
        assert loader.changed() is True


class TestDescribe:
    def test_env_values_never_included(self, tmp_path: Path) -> None:
        found = load_one_job(
            tmp_path, job(env={"API_KEY": "value-one-7f3a", "DB_PASSWORD": "value-two-91cc"})
        )
        text = json.dumps(found.describe())
        assert "value-one-7f3a" not in text
        assert "value-two-91cc" not in text

    def test_env_names_included(self, tmp_path: Path) -> None:
        found = load_one_job(tmp_path, job(env={"B": "1", "A": "2"}))
        assert found.describe()["env"] == ["A", "B"]

    def test_every_field_present(self, tmp_path: Path) -> None:
        described = load_one_job(tmp_path, job(timezone="Europe/Oslo")).describe()
        assert described == {
            "name": "backup",
            "source": str(tmp_path / "db.yaml"),
            "group": "db",
            "schedule": {
                "sec": "0",
                "min": "0",
                "hour": "2",
                "dom": "*",
                "mon": "*",
                "dow": "*",
                "year": "*",
            },
            "timezone": "Europe/Oslo",
            "targets": "db*",
            "target_type": "glob",
            "command": "/usr/local/bin/backup.sh",
            "user": None,
            "cwd": None,
            "env": [],
            "timeout": 3600,
            "allow_overlap": False,
            "catch_up": "latest",
            "catch_up_limit": 10,
            "wrapper_path": None,
            "wrapper_loglevel": None,
            "wrapper_logdir": None,
        }


class TestParseJob:
    def test_returns_job(self) -> None:
        found = parse_job("backup", job(), Path("/etc/saltpeter/db.yaml"), Settings(), NOW)
        assert found.group == "db"
        assert found.schedule_fields["hour"] == "2"

    def test_raises_first_error(self) -> None:
        with pytest.raises(ConfigError) as caught:
            parse_job("backup", job(hour="25"), Path("/etc/saltpeter/db.yaml"), Settings(), NOW)
        assert str(caught.value) == (
            "job 'backup' in /etc/saltpeter/db.yaml: field 'hour': 25 is out of range 0-23"
        )

    def test_rejects_invalid_name(self) -> None:
        with pytest.raises(ConfigError) as caught:
            parse_job("a b", job(), Path("/etc/saltpeter/db.yaml"), Settings(), NOW)
        assert caught.value.value == "a b"

    def test_equal_definitions_compare_equal(self) -> None:
        source = Path("/etc/saltpeter/db.yaml")
        first = parse_job("backup", job(), source, Settings(), NOW)
        second = parse_job("backup", job(), source, Settings(), NOW)
        assert first == second


class TestConfigErrorText:
    def test_job_file_and_field(self) -> None:
        error = ConfigError(
            "25 is out of range 0-23",
            file=Path("/etc/saltpeter/db.yaml"),
            job="backup",
            field="hour",
            value="25",
        )
        assert str(error) == (
            "job 'backup' in /etc/saltpeter/db.yaml: field 'hour': 25 is out of range 0-23"
        )

    def test_file_only(self) -> None:
        error = ConfigError("invalid YAML", file=Path("/etc/saltpeter/db.yaml"))
        assert str(error) == "/etc/saltpeter/db.yaml: invalid YAML"

    def test_no_context(self) -> None:
        assert str(ConfigError("broken")) == "broken"

    def test_pickle_keeps_attributes(self) -> None:
        error = ConfigError("bad", file=Path("/etc/saltpeter/a.yaml"), job="j", field="f", value=3)
        copy = pickle.loads(pickle.dumps(error))
        assert str(copy) == str(error)
        assert copy.value == 3


class TestLogging:
    def test_env_values_not_logged(self, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
        write_yaml(tmp_path, "db.yaml", {"backup": job(env={"TOKEN": ["value-5e1d"]})})
        with caplog.at_level(logging.DEBUG, logger="saltpeter.config"):
            snapshot = make_loader(tmp_path).load()
        assert len(snapshot.errors) == 1
        assert "value-5e1d" not in caplog.text
        assert "value-5e1d" not in str(snapshot.errors[0])


class TestLoadDirectory:
    def test_loads_jobs_and_errors(self, tmp_path: Path) -> None:
        write_yaml(tmp_path, "db.yaml", {"backup": job(), "restore": job(hour="25")})
        snapshot = load_directory(tmp_path)
        assert list(snapshot.jobs) == ["backup"]
        assert [error.job for error in snapshot.errors] == ["restore"]

    def test_applies_overrides(self, tmp_path: Path) -> None:
        snapshot = load_directory(tmp_path, overrides={"timezone": "Europe/Lisbon"})
        assert snapshot.settings.timezone == "Europe/Lisbon"


class TestApiToken:
    def test_token_is_read(self, tmp_path: Path) -> None:
        (tmp_path / "c.yaml").write_text("saltpeter_config:\n  api_token: s3cret\n")
        assert load_directory(tmp_path).settings.api_token == "s3cret"

    def test_invalid_token_is_not_shown(self, tmp_path: Path) -> None:
        (tmp_path / "c.yaml").write_text("saltpeter_config:\n  api_token: 987654321\n")
        snapshot = load_directory(tmp_path)
        assert len(snapshot.errors) == 1
        assert "987654321" not in str(snapshot.errors[0])
        assert "api_token" in str(snapshot.errors[0])

    def test_token_is_not_in_repr(self) -> None:
        assert "s3cret" not in repr(Settings(api_token="s3cret"))


class TestCatchUp:
    def test_defaults(self, tmp_path: Path) -> None:
        parsed = load_one_job(tmp_path, job())
        assert parsed.catch_up == "latest"
        assert parsed.catch_up_limit == 10

    @pytest.mark.parametrize(
        ("value", "expected"), [("none", "none"), ("all", "all"), (False, "none")]
    )
    def test_policies(self, tmp_path: Path, value: object, expected: str) -> None:
        assert load_one_job(tmp_path, job(catch_up=value)).catch_up == expected

    def test_unknown_policy(self, tmp_path: Path) -> None:
        (tmp_path / "db.yaml").write_text(yaml.safe_dump({"backup": job(catch_up="some")}))
        errors = [str(error) for error in load_directory(tmp_path).errors]
        assert errors == [
            f"job 'backup' in {tmp_path / 'db.yaml'}: field 'catch_up': 'some' is invalid: "
            "expected one of none, latest, all"
        ]

    @pytest.mark.parametrize("value", [0, -1, "3", True])
    def test_bad_limit(self, tmp_path: Path, value: object) -> None:
        (tmp_path / "db.yaml").write_text(yaml.safe_dump({"backup": job(catch_up_limit=value)}))
        errors = [str(error) for error in load_directory(tmp_path).errors]
        assert len(errors) == 1
        assert "field 'catch_up_limit'" in errors[0]


class TestTlsAndHistorySettings:
    def test_wss_url_with_certificate(self) -> None:
        settings = Settings(
            default_saltpeter_server_host="sp.example.com", machines_ws_certfile="/c.pem"
        )
        assert settings.wrapper_url() == "wss://sp.example.com:8889/wrapper"

    def test_history_settings(self, tmp_path: Path) -> None:
        (tmp_path / "c.yaml").write_text(
            "saltpeter_config:\n  history_days: 7\n  history_runs_per_job: 50\n"
        )
        settings = load_directory(tmp_path).settings
        assert settings.history_days == 7.0
        assert settings.history_runs_per_job == 50

    def test_history_days_must_be_positive(self, tmp_path: Path) -> None:
        (tmp_path / "c.yaml").write_text("saltpeter_config:\n  history_days: 0\n")
        errors = [str(error) for error in load_directory(tmp_path).errors]
        assert "0 is invalid: must be more than 0" in errors[0]


class TestBounds:
    def errors(self, tmp_path: Path, definition: object, name: str = "backup") -> list[str]:
        (tmp_path / "db.yaml").write_text(yaml.safe_dump({name: definition}))
        return [str(error) for error in load_directory(tmp_path).errors]

    def test_huge_timeout(self, tmp_path: Path) -> None:
        errors = self.errors(tmp_path, job(timeout=10**23))
        assert len(errors) == 1
        assert "field 'timeout'" in errors[0]
        assert "must be at most 315360000 (10 years)" in errors[0]

    def test_long_command(self, tmp_path: Path) -> None:
        errors = self.errors(tmp_path, job(command="x" * (300 * 1024)))
        assert "field 'command': the command is 307200 bytes" in errors[0]

    def test_long_job_name(self, tmp_path: Path) -> None:
        errors = self.errors(tmp_path, job(), name="j" * 150)
        assert "is 150 characters long; at most 100 are allowed" in errors[0]

    def test_every_env_problem_is_named(self, tmp_path: Path) -> None:
        env = {"D": {"x": 1}, "E": None, "F=G": "1", "OK": "fine"}
        errors = self.errors(tmp_path, job(env=env))
        assert len(errors) == 1
        assert "the value of D is a mapping" in errors[0]
        assert "The value of E is null" in errors[0]
        assert "'F=G' is invalid" in errors[0]
        assert "fine" not in errors[0]

    def test_env_value_too_big(self, tmp_path: Path) -> None:
        errors = self.errors(tmp_path, job(env={"BIG": "v" * (129 * 1024)}))
        assert "the value of BIG is 132096 bytes" in errors[0]

    def test_utc_must_be_boolean_even_with_timezone(self, tmp_path: Path) -> None:
        errors = self.errors(tmp_path, job(utc="banana", timezone="UTC"))
        assert "field 'utc': 'banana' is invalid: expected true or false" in errors[0]

    def test_catch_up_limit_bound(self, tmp_path: Path) -> None:
        errors = self.errors(tmp_path, job(catch_up_limit=5000))
        assert "field 'catch_up_limit'" in errors[0]


def test_yaml_error_names_where_the_quote_opened(tmp_path: Path) -> None:
    (tmp_path / "bad.yaml").write_text("backup:\n  min: '0\n  hour: 2\n\n")
    errors = [str(error) for error in load_directory(tmp_path).errors]
    assert "while scanning a quoted scalar at line 2" in errors[0]
