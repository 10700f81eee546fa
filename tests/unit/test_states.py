"""Tests of saltpeter.states, the logic of the saltpeter.job_present and job_absent states."""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

import pytest
import yaml

from saltpeter import states

JOB: dict[str, Any] = {
    "min": "*/5",
    "hour": "*",
    "dom": "*",
    "mon": "*",
    "dow": "*",
    "targets": "web*",
    "command": "echo hello",
}


def file_mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


class TestJobPresent:
    def test_writes_new_file(self, tmp_path: Path) -> None:
        ret = states.job_present("hello", JOB, config_dir=tmp_path)
        assert ret["result"] is True
        assert yaml.safe_load((tmp_path / "hello.yaml").read_text()) == {"hello": JOB}

    def test_new_file_has_header_and_mode(self, tmp_path: Path) -> None:
        states.job_present("hello", JOB, config_dir=tmp_path)
        path = tmp_path / "hello.yaml"
        assert path.read_text().startswith(states.MANAGED_HEADER)
        assert file_mode(path) == 0o644

    def test_reports_diff(self, tmp_path: Path) -> None:
        ret = states.job_present("hello", JOB, config_dir=tmp_path)
        assert "+  command: echo hello" in ret["changes"]["diff"]

    def test_second_run_changes_nothing(self, tmp_path: Path) -> None:
        states.job_present("hello", JOB, config_dir=tmp_path)
        ret = states.job_present("hello", JOB, config_dir=tmp_path)
        assert ret["result"] is True
        assert ret["changes"] == {}
        assert "already as defined" in ret["comment"]

    def test_changed_field_shows_in_diff(self, tmp_path: Path) -> None:
        states.job_present("hello", JOB, config_dir=tmp_path)
        ret = states.job_present("hello", {**JOB, "command": "echo bye"}, config_dir=tmp_path)
        assert "-  command: echo hello" in ret["changes"]["diff"]
        assert "+  command: echo bye" in ret["changes"]["diff"]

    def test_test_mode_writes_nothing(self, tmp_path: Path) -> None:
        ret = states.job_present("hello", JOB, config_dir=tmp_path, test=True)
        assert ret["result"] is None
        assert ret["comment"].startswith("Job 'hello' would be written to")
        assert "diff" in ret["changes"]
        assert not (tmp_path / "hello.yaml").exists()

    def test_test_mode_without_changes_is_true(self, tmp_path: Path) -> None:
        states.job_present("hello", JOB, config_dir=tmp_path)
        ret = states.job_present("hello", JOB, config_dir=tmp_path, test=True)
        assert ret["result"] is True

    def test_invalid_field_fails_with_engine_message(self, tmp_path: Path) -> None:
        ret = states.job_present("hello", {**JOB, "hour": "25"}, config_dir=tmp_path)
        assert ret["result"] is False
        assert ret["comment"].startswith(f"job 'hello' in {tmp_path / 'hello.yaml'}: field 'hour'")
        assert not (tmp_path / "hello.yaml").exists()

    def test_missing_command_fails(self, tmp_path: Path) -> None:
        definition = {key: value for key, value in JOB.items() if key != "command"}
        ret = states.job_present("hello", definition, config_dir=tmp_path)
        assert ret["result"] is False
        assert "field 'command'" in ret["comment"]

    def test_invalid_name_writes_nothing(self, tmp_path: Path) -> None:
        ret = states.job_present("../escape", JOB, config_dir=tmp_path / "jobs")
        assert ret["result"] is False
        assert "job name '../escape' is invalid" in ret["comment"]
        assert list(tmp_path.iterdir()) == []

    def test_section_name_rejected(self, tmp_path: Path) -> None:
        ret = states.job_present("saltpeter_config", JOB, config_dir=tmp_path)
        assert ret["result"] is False

    def test_unknown_key_is_warning(self, tmp_path: Path) -> None:
        ret = states.job_present("hello", {**JOB, "batch_size": 2}, config_dir=tmp_path)
        assert ret["result"] is True
        assert "key 'batch_size' is ignored" in ret["comment"]

    def test_none_values_are_left_out(self, tmp_path: Path) -> None:
        states.job_present("hello", {**JOB, "user": None}, config_dir=tmp_path)
        assert "user" not in yaml.safe_load((tmp_path / "hello.yaml").read_text())["hello"]

    def test_shared_file_keeps_other_jobs(self, tmp_path: Path) -> None:
        shared = tmp_path / "web.yaml"
        shared.write_text(yaml.safe_dump({"other": JOB}))
        states.job_present("hello", JOB, config_dir=tmp_path, file="web.yaml")
        assert set(yaml.safe_load(shared.read_text())) == {"other", "hello"}

    def test_duplicate_in_other_file_fails(self, tmp_path: Path) -> None:
        (tmp_path / "web.yaml").write_text(yaml.safe_dump({"hello": JOB}))
        ret = states.job_present("hello", JOB, config_dir=tmp_path)
        assert ret["result"] is False
        assert f"already defined in {tmp_path / 'web.yaml'}" in ret["comment"]
        assert not (tmp_path / "hello.yaml").exists()

    def test_hidden_files_do_not_count_as_duplicates(self, tmp_path: Path) -> None:
        (tmp_path / ".hello.yaml.swp").write_text(yaml.safe_dump({"hello": JOB}))
        ret = states.job_present("hello", JOB, config_dir=tmp_path)
        assert ret["result"] is True

    def test_file_that_is_not_a_mapping_fails(self, tmp_path: Path) -> None:
        (tmp_path / "hello.yaml").write_text("- a list\n")
        ret = states.job_present("hello", JOB, config_dir=tmp_path)
        assert ret["result"] is False
        assert "does not contain a YAML mapping" in ret["comment"]

    def test_identical_hand_written_file_kept(self, tmp_path: Path) -> None:
        path = tmp_path / "hello.yaml"
        text = "# written by hand\n" + yaml.safe_dump({"hello": JOB})
        path.write_text(text)
        ret = states.job_present("hello", JOB, config_dir=tmp_path)
        assert ret["changes"] == {}
        assert path.read_text() == text

    def test_mode_applied_and_reported(self, tmp_path: Path) -> None:
        states.job_present("hello", JOB, config_dir=tmp_path)
        ret = states.job_present("hello", JOB, config_dir=tmp_path, mode="0600")
        assert ret["changes"] == {"mode": "0600"}
        assert file_mode(tmp_path / "hello.yaml") == 0o600

    def test_existing_mode_kept_without_mode(self, tmp_path: Path) -> None:
        states.job_present("hello", JOB, config_dir=tmp_path, mode="0640")
        states.job_present("hello", {**JOB, "command": "true"}, config_dir=tmp_path)
        assert file_mode(tmp_path / "hello.yaml") == 0o640

    def test_creates_missing_config_dir(self, tmp_path: Path) -> None:
        ret = states.job_present("hello", JOB, config_dir=tmp_path / "new" / "jobs")
        assert ret["result"] is True
        assert (tmp_path / "new" / "jobs" / "hello.yaml").is_file()

    def test_no_temporary_file_left(self, tmp_path: Path) -> None:
        states.job_present("hello", JOB, config_dir=tmp_path)
        assert sorted(os.listdir(tmp_path)) == ["hello.yaml"]


class TestJobAbsent:
    def test_removes_file_of_single_job(self, tmp_path: Path) -> None:
        states.job_present("hello", JOB, config_dir=tmp_path)
        ret = states.job_absent("hello", config_dir=tmp_path)
        assert ret["result"] is True
        assert ret["changes"]["removed"] == str(tmp_path / "hello.yaml")
        assert not (tmp_path / "hello.yaml").exists()

    def test_keeps_other_jobs_in_file(self, tmp_path: Path) -> None:
        shared = tmp_path / "web.yaml"
        shared.write_text(yaml.safe_dump({"hello": JOB, "other": JOB}))
        ret = states.job_absent("hello", config_dir=tmp_path, file=str(shared))
        assert ret["result"] is True
        assert set(yaml.safe_load(shared.read_text())) == {"other"}

    def test_already_absent(self, tmp_path: Path) -> None:
        ret = states.job_absent("hello", config_dir=tmp_path)
        assert ret["result"] is True
        assert ret["changes"] == {}

    def test_test_mode_removes_nothing(self, tmp_path: Path) -> None:
        states.job_present("hello", JOB, config_dir=tmp_path)
        ret = states.job_absent("hello", config_dir=tmp_path, test=True)
        assert ret["result"] is None
        assert (tmp_path / "hello.yaml").exists()

    def test_job_in_other_file_fails(self, tmp_path: Path) -> None:
        (tmp_path / "web.yaml").write_text(yaml.safe_dump({"hello": JOB}))
        ret = states.job_absent("hello", config_dir=tmp_path)
        assert ret["result"] is False
        assert f"pass file={tmp_path / 'web.yaml'}" in ret["comment"]


class TestParseMode:
    @pytest.mark.parametrize(("mode", "expected"), [("0640", 0o640), ("600", 0o600), (644, 0o644)])
    def test_reads_octal_digits(self, mode: object, expected: int) -> None:
        assert states.parse_mode(mode) == expected

    @pytest.mark.parametrize("mode", ["rw-r--r--", "0999", True, 1.5, "77777"])
    def test_rejects_invalid(self, mode: object) -> None:
        with pytest.raises(ValueError, match="mode"):
            states.parse_mode(mode)


class TestMasterEngineOptions:
    def test_master_opts_used_directly(self) -> None:
        opts = {"__role": "master", "engines": [{"saltpeter": {"config_dir": "/srv/jobs"}}]}
        assert states.master_engine_options(opts) == {"config_dir": "/srv/jobs"}

    def test_minion_reads_master_config_next_to_its_own(self, tmp_path: Path) -> None:
        (tmp_path / "master").write_text(
            yaml.safe_dump({"engines": [{"saltpeter": {"config_dir": "/srv/jobs"}}]})
        )
        opts = {"__role": "minion", "conf_file": str(tmp_path / "minion")}
        assert states.master_engine_options(opts)["config_dir"] == "/srv/jobs"

    def test_master_config_option_wins(self, tmp_path: Path) -> None:
        other = tmp_path / "elsewhere.conf"
        other.write_text(yaml.safe_dump({"engines": [{"saltpeter": {"config_dir": "/x"}}]}))
        opts = {"__role": "minion", "saltpeter_master_config": str(other)}
        assert states.master_engine_options(opts)["config_dir"] == "/x"

    def test_no_master_config_gives_nothing(self, tmp_path: Path) -> None:
        opts = {"__role": "minion", "conf_file": str(tmp_path / "minion")}
        assert states.master_engine_options(opts) == {}
