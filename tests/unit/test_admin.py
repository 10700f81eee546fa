"""Tests of saltpeter.admin, the logic of the validate, history and maintenance runners."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
import yaml

from saltpeter import admin
from saltpeter.control import ControlError
from saltpeter.runs import MachineRun, MachineState, Reason, Run, RunStatus, Trigger
from saltpeter.store import RunStore

JOB: dict[str, Any] = {
    "min": "0",
    "hour": "2",
    "dom": "*",
    "mon": "*",
    "dow": "*",
    "targets": "*",
    "command": "true",
}
START = datetime(2026, 12, 4, 2, 0, tzinfo=timezone.utc)


def master_opts(tmp_path: Path, jobs: Path) -> dict[str, Any]:
    return {
        "cachedir": str(tmp_path / "cache"),
        "engines": [{"saltpeter": {"config_dir": str(jobs)}}],
    }


@pytest.fixture
def jobs(tmp_path: Path) -> Path:
    directory = tmp_path / "jobs"
    directory.mkdir()
    return directory


class TestValidate:
    def test_valid_directory(self, tmp_path: Path, jobs: Path) -> None:
        (jobs / "a.yaml").write_text(yaml.safe_dump({"backup": JOB}))
        result = admin.validate(master_opts(tmp_path, jobs))
        assert result["valid"] is True
        assert result["jobs"] == 1
        assert result["retcode"] == 0

    def test_invalid_job_gives_retcode_1(self, tmp_path: Path, jobs: Path) -> None:
        (jobs / "a.yaml").write_text(yaml.safe_dump({"backup": {**JOB, "hour": "25"}}))
        result = admin.validate(master_opts(tmp_path, jobs))
        assert result["valid"] is False
        assert result["retcode"] == 1
        assert result["errors"][0].startswith(f"job 'backup' in {jobs / 'a.yaml'}: field 'hour'")

    def test_path_overrides_engine_dir(self, tmp_path: Path, jobs: Path) -> None:
        other = tmp_path / "other"
        other.mkdir()
        (other / "b.yaml").write_text(yaml.safe_dump({"one": JOB, "two": JOB}))
        result = admin.validate(master_opts(tmp_path, jobs), path=str(other))
        assert result["path"] == str(other)
        assert result["jobs"] == 2

    def test_missing_directory_is_error(self, tmp_path: Path, jobs: Path) -> None:
        result = admin.validate(master_opts(tmp_path, jobs), path=str(tmp_path / "absent"))
        assert result["retcode"] == 1
        assert "cannot be read" in result["errors"][0]

    def test_ignored_key_is_warning(self, tmp_path: Path, jobs: Path) -> None:
        (jobs / "a.yaml").write_text(yaml.safe_dump({"backup": {**JOB, "batch_size": 3}}))
        result = admin.validate(master_opts(tmp_path, jobs))
        assert result["valid"] is True
        assert "key 'batch_size' is ignored" in result["warnings"][0]


def finished_run(run_id: str, started: datetime, retcodes: dict[str, int]) -> Run:
    run = Run(
        run_id=run_id,
        job_name="backup",
        trigger=Trigger.MANUAL,
        scheduled_at=None,
        started_at=started,
        token_hash="0" * 64,
    )
    for minion, retcode in retcodes.items():
        machine = MachineRun(run_id, minion)
        machine.state = MachineState.DONE
        machine.retcode = retcode
        machine.reason = Reason.EXIT
        run.machines[minion] = machine
    return run


@pytest.fixture
def store_opts(tmp_path: Path, jobs: Path) -> dict[str, Any]:
    opts = master_opts(tmp_path, jobs)
    store = RunStore(Path(opts["cachedir"]) / "saltpeter" / "saltpeter.db")
    store.sync_jobs({"backup": {"command": "true"}, "idle": {"command": "true"}})
    for index, retcodes in enumerate([{"m1": 0, "m2": 0}, {"m1": 0, "m2": 3}]):
        run = finished_run(f"backup_{index}", START + timedelta(hours=index), retcodes)
        store.insert_run(run, list(retcodes), [])
        for machine in run.machines.values():
            store.update_machine(machine)
        run.status = RunStatus.FAILED if any(retcodes.values()) else RunStatus.SUCCEEDED
        run.ended_at = run.started_at + timedelta(minutes=1)
        store.finish_run(run)
    store.close()
    return opts


class TestHistory:
    def test_newest_first(self, store_opts: dict[str, Any]) -> None:
        runs = admin.history(store_opts, "backup")
        assert [run["run_id"] for run in runs] == ["backup_1", "backup_0"]

    def test_per_minion_retcodes(self, store_opts: dict[str, Any]) -> None:
        runs = admin.history(store_opts, "backup")
        assert runs[0]["retcodes"] == {"m1": 0, "m2": 3}
        assert runs[0]["reasons"] == {"m1": "exit", "m2": "exit"}

    def test_limit(self, store_opts: dict[str, Any]) -> None:
        assert len(admin.history(store_opts, "backup", limit=1)) == 1

    def test_known_job_without_runs_is_empty(self, store_opts: dict[str, Any]) -> None:
        assert admin.history(store_opts, "idle") == []

    def test_unknown_job_lists_known_jobs(self, store_opts: dict[str, Any]) -> None:
        with pytest.raises(ControlError, match=r"unknown job 'nope'; known jobs: backup, idle"):
            admin.history(store_opts, "nope")

    def test_invalid_limit(self, store_opts: dict[str, Any]) -> None:
        with pytest.raises(ControlError, match="limit must be"):
            admin.history(store_opts, "backup", limit=0)

    def test_token_hash_not_shown(self, store_opts: dict[str, Any]) -> None:
        assert "token_hash" not in admin.history(store_opts, "backup")[0]


class TestMaintenance:
    def test_show_empty(self, tmp_path: Path, jobs: Path) -> None:
        result = admin.maintenance(master_opts(tmp_path, jobs))
        assert result["global"] is False
        assert result["machines"] == []
        assert not (jobs / admin.MAINTENANCE_FILE).exists()

    def test_set_global(self, tmp_path: Path, jobs: Path) -> None:
        result = admin.maintenance(master_opts(tmp_path, jobs), global_=True)
        assert result["global"] is True
        written = yaml.safe_load((jobs / admin.MAINTENANCE_FILE).read_text())
        assert written == {"saltpeter_maintenance": {"global": True, "machines": []}}

    def test_add_and_remove_minions(self, tmp_path: Path, jobs: Path) -> None:
        opts = master_opts(tmp_path, jobs)
        admin.maintenance(opts, add="web1,web2")
        result = admin.maintenance(opts, remove="web1")
        assert result["machines"] == ["web2"]
        assert result["file_machines"] == ["web2"]

    def test_add_keeps_global(self, tmp_path: Path, jobs: Path) -> None:
        opts = master_opts(tmp_path, jobs)
        admin.maintenance(opts, global_=True)
        assert admin.maintenance(opts, add=["db1"])["global"] is True

    def test_other_file_keeps_global_on(self, tmp_path: Path, jobs: Path) -> None:
        other = jobs / "ops.yaml"
        other.write_text(yaml.safe_dump({"saltpeter_maintenance": {"global": True}}))
        result = admin.maintenance(master_opts(tmp_path, jobs), global_=False)
        assert result["global"] is True
        assert result["notes"] == [
            f"global maintenance stays on, because {other} sets global: true"
        ]

    def test_other_file_keeps_minion(self, tmp_path: Path, jobs: Path) -> None:
        other = jobs / "ops.yaml"
        other.write_text(yaml.safe_dump({"saltpeter_maintenance": {"machines": ["web1"]}}))
        result = admin.maintenance(master_opts(tmp_path, jobs), remove="web1")
        assert result["machines"] == ["web1"]
        assert result["notes"] == [f"web1 stays under maintenance, because {other} lists it"]

    def test_invalid_global(self, tmp_path: Path, jobs: Path) -> None:
        with pytest.raises(ControlError, match="global='yes' is invalid"):
            admin.maintenance(master_opts(tmp_path, jobs), global_="yes")  # type: ignore[arg-type]

    def test_empty_minion_id_rejected(self, tmp_path: Path, jobs: Path) -> None:
        with pytest.raises(ControlError, match="empty minion id"):
            admin.maintenance(master_opts(tmp_path, jobs), add="web1,,web2")


def test_maintenance_survives_invalid_items(tmp_path: Path) -> None:
    from saltpeter import admin

    (tmp_path / "bad.yaml").write_text("saltpeter_maintenance:\n  machines: [{a: 1}, 5, web1]\n")
    opts = {"engines": [{"saltpeter": {"config_dir": str(tmp_path)}}], "cachedir": str(tmp_path)}
    # The engine rejects the invalid section, so nothing is under maintenance.
    assert admin.maintenance(opts)["machines"] == []
    changed = admin.maintenance(opts, add="db1")
    assert changed["machines"] == ["db1"]
    assert changed["file_machines"] == ["db1"]
