"""Tests of saltpeter.minion, the wrapper's launcher subcommands and the execution module.

Runs that need a connected wrapper use the scripted WebSocket peer from
wrapper_peer.py, a stand-in for the engine that the test starts on 127.0.0.1
(the real engine is not involved). The stand-ins for a broken wrapper are small
Python scripts written by the tests.
"""

from __future__ import annotations

import importlib.util
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from salt.exceptions import CommandExecutionError
from wrapper_peer import (
    MACHINE_ID,
    WRAPPER_PATH,
    ScriptedPeer,
    WrapperProcess,
    job_processes,
    new_run_id,
    read_proc,
)

from saltpeter import minion, wrapper

MODULE_PATH = Path(__file__).resolve().parents[2] / "_modules" / "saltpeter.py"
TERM_IGNORING_COMMAND = "trap '' TERM; sh -c 'trap \"\" TERM; sleep 30' & sleep 30"

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="reads other processes' /proc entries")


def job(command: str, **fields: object) -> dict[str, object]:
    return {"name": "testjob", "command": command, "cwd": "/tmp", "kill_grace": 1, **fields}


@pytest.fixture
def peer() -> Iterator[ScriptedPeer]:
    scripted = ScriptedPeer(token=secrets.token_hex(16))
    scripted.start()
    yield scripted
    scripted.stop()


@pytest.fixture
def run(peer: ScriptedPeer, tmp_path: Path) -> Iterator[WrapperProcess]:
    process = WrapperProcess(peer, tmp_path)
    yield process
    process.cleanup()


def process_parent(pid: int) -> int:
    stat = read_proc(str(pid), "stat").decode()
    return int(stat[stat.rindex(")") + 2 :].split()[1])


def wait_gone(pid: int, timeout: float = 30.0) -> None:
    """Wait until process ``pid`` has exited (a zombie counts as exited)."""
    deadline = time.monotonic() + timeout
    while True:
        stat = read_proc(str(pid), "stat").decode()
        if not stat or stat[stat.rindex(")") + 2] == "Z":
            return
        if time.monotonic() >= deadline:
            raise AssertionError(f"process {pid} still runs after {timeout:g} s")
        time.sleep(0.05)


def fake_wrapper(tmp_path: Path, body: str) -> str:
    """Write a Python script to use as a broken wrapper and return its path."""
    path = tmp_path / "fake_wrapper.py"
    path.write_text(body)
    return str(path)


def launch_args(tmp_path: Path, **overrides: object) -> dict[str, object]:
    args: dict[str, object] = {
        "run_id": new_run_id(),
        "job": "testjob",
        "url": "ws://127.0.0.1:9/wrapper",
        "token": "token-for-test",
        "machine_id": MACHINE_ID,
        "wrapper_path": WRAPPER_PATH,
        "loglevel": "normal",
        "logdir": str(tmp_path / "log"),
        "statedir": str(tmp_path / "state"),
    }
    args.update(overrides)
    return args


class TestLaunch:
    def test_starts_detached_wrapper(self, peer: ScriptedPeer, run: WrapperProcess) -> None:
        peer.job = job("sleep 1")
        result = run.launch()
        assert result == {"started": True, "pid": run.pid}
        stat = read_proc(str(run.pid), "stat").decode()
        session = int(stat[stat.rindex(")") + 2 :].split()[3])
        assert session == run.pid
        for fd in (0, 1, 2):
            assert os.readlink(f"/proc/{run.pid}/fd/{fd}") == "/dev/null"
        peer.wait_complete()
        assert run.wait_exit() == 0

    def test_token_not_in_wrapper_argv(self, peer: ScriptedPeer, run: WrapperProcess) -> None:
        peer.job = job("sleep 1")
        run.start()
        assert peer.token.encode() not in read_proc(str(run.pid), "cmdline")
        peer.wait_complete()
        assert run.wait_exit() == 0

    def test_missing_wrapper_says_apply_state(self, tmp_path: Path) -> None:
        missing = str(tmp_path / "sp_wrapper.py")
        result = minion.launch(**launch_args(tmp_path, wrapper_path=missing))  # type: ignore[arg-type]
        assert result["started"] is False
        assert f"wrapper not found at {missing}" in str(result["error"])
        assert "state.apply saltpeter" in str(result["error"])

    @pytest.mark.parametrize(
        ("field", "value", "message"),
        [
            ("run_id", "../etc", "invalid argument: run id '../etc' contains '/' or '..'"),
            ("job", "a/b", "invalid argument: job name 'a/b' contains '/' or '..'"),
            ("machine_id", "", "invalid argument: machine id is empty"),
            ("loglevel", "verbose", "invalid loglevel 'verbose'"),
        ],
    )
    def test_rejects_invalid_arguments(
        self, tmp_path: Path, field: str, value: str, message: str
    ) -> None:
        result = minion.launch(**launch_args(tmp_path, **{field: value}))  # type: ignore[arg-type]
        assert result["started"] is False
        assert str(result["error"]).startswith(message)
        assert not (tmp_path / "state").exists()

    def test_reports_wrapper_error_line(self, tmp_path: Path) -> None:
        result = minion.launch(**launch_args(tmp_path, url="http://127.0.0.1/"))  # type: ignore[arg-type]
        assert result == {
            "started": False,
            "error": "invalid --url 'http://127.0.0.1/': expected a ws:// or wss:// URL",
        }

    def test_reports_missing_token(self, tmp_path: Path) -> None:
        result = minion.launch(**launch_args(tmp_path, token=""))  # type: ignore[arg-type]
        assert result["started"] is False
        assert "SP_RUN_TOKEN" in str(result["error"])

    def test_reports_unwritable_statedir(self, tmp_path: Path) -> None:
        blocker = tmp_path / "a-file"
        blocker.write_text("")
        result = minion.launch(**launch_args(tmp_path, statedir=str(blocker / "state")))  # type: ignore[arg-type]
        assert result["started"] is False
        assert f"cannot create state directory {blocker / 'state'}" in str(result["error"])

    def test_ready_timeout_kills_wrapper(self, tmp_path: Path) -> None:
        pid_file = tmp_path / "pid"
        script = fake_wrapper(
            tmp_path,
            f"import os, time\nopen({str(pid_file)!r}, 'w').write(str(os.getpid()))\n"
            "time.sleep(60)\n",
        )
        result = minion.launch(
            **launch_args(tmp_path, wrapper_path=script),  # type: ignore[arg-type]
            ready_timeout=1.0,
        )
        assert result == {
            "started": False,
            "error": "the wrapper sent no ready line within 1 s and was killed",
        }
        assert read_proc(pid_file.read_text(), "stat") == b""

    def test_reports_exit_without_ready_line(self, tmp_path: Path) -> None:
        script = fake_wrapper(tmp_path, "import sys\nsys.exit(3)\n")
        result = minion.launch(**launch_args(tmp_path, wrapper_path=script))  # type: ignore[arg-type]
        assert result == {
            "started": False,
            "error": "the wrapper exited with status 3 after no ready line",
        }


class TestRunning:
    def test_lists_live_run(self, peer: ScriptedPeer, run: WrapperProcess) -> None:
        peer.job = job("sleep 1")
        run.start()
        start = peer.wait_start()
        records = minion.running(str(run.statedir))
        assert len(records) == 1
        assert records[0]["run"] == run.run_id
        assert records[0]["wrapper_alive"] is True
        assert records[0]["wrapper_pid"] == run.pid
        assert records[0]["pid"] == start["pid"]
        peer.wait_complete()
        assert run.wait_exit() == 0
        assert minion.running(str(run.statedir)) == []

    def test_skips_stale_and_broken_records(self, tmp_path: Path) -> None:
        exited = subprocess.Popen(["true"])
        exited.wait()
        (tmp_path / "stale.json").write_text(
            json.dumps({"run": "stale", "wrapper_pid": exited.pid, "pgid": None})
        )
        # A live pid that belongs to another program, as after pid reuse.
        (tmp_path / "reused.json").write_text(
            json.dumps({"run": "reused", "wrapper_pid": os.getpid()})
        )
        (tmp_path / "broken.json").write_text("{not json")
        assert minion.running(str(tmp_path)) == []

    def test_missing_statedir_lists_nothing(self, tmp_path: Path) -> None:
        assert minion.running(str(tmp_path / "absent")) == []


class TestOrphans:
    def test_dead_wrappers_processes_are_listed(
        self, peer: ScriptedPeer, run: WrapperProcess
    ) -> None:
        peer.job = job("sleep 30")
        run.start()
        peer.wait_start()
        assert run.pid is not None
        os.kill(run.pid, signal.SIGKILL)
        run.wait_exit()
        records = minion.running(str(run.statedir))
        assert [record["run"] for record in records] == [run.run_id]
        assert records[0]["wrapper_alive"] is False
        result = minion.kill_local(run.run_id, str(run.statedir), orphaned_only=True)
        assert result["killed"] is True
        assert job_processes(run.run_id) == []
        assert minion.running(str(run.statedir)) == []

    def test_orphaned_only_leaves_live_wrapper(
        self, peer: ScriptedPeer, run: WrapperProcess
    ) -> None:
        peer.job = job("sleep 30", kill_grace=1)
        run.start()
        peer.wait_start()
        result = minion.kill_local(run.run_id, str(run.statedir), orphaned_only=True)
        assert result["killed"] is False
        assert "still runs" in str(result["error"])
        assert job_processes(run.run_id) != []
        assert minion.running(str(run.statedir))[0]["wrapper_alive"] is True
        minion.kill_local(run.run_id, str(run.statedir))
        assert peer.wait_complete()["retcode"] == 143


class TestKillLocal:
    def test_wrapper_kills_and_reports(self, peer: ScriptedPeer, run: WrapperProcess) -> None:
        peer.job = job(TERM_IGNORING_COMMAND, kill_grace=1)
        run.start()
        pgid = peer.wait_start()["pid"]
        result = minion.kill_local(run.run_id, str(run.statedir), grace=10)
        assert result == {
            "killed": True,
            "run": run.run_id,
            "wrapper_pid": run.pid,
            "pgid": pgid,
            "forced": False,
        }
        assert job_processes(run.run_id) == []
        complete = peer.wait_complete()
        assert complete["reason"] == "killed"
        assert complete["retcode"] == 143
        assert run.wait_exit() == 0

    def test_stopped_wrapper_forces_sigkill(self, peer: ScriptedPeer, run: WrapperProcess) -> None:
        peer.job = job(TERM_IGNORING_COMMAND, kill_grace=30)
        run.start()
        peer.wait_start()
        assert run.pid is not None
        os.kill(run.pid, signal.SIGSTOP)
        try:
            result = minion.kill_local(run.run_id, str(run.statedir), grace=0.5)
        finally:
            os.kill(run.pid, signal.SIGCONT)
        assert result["killed"] is True
        assert result["forced"] is True
        assert "error" not in result
        assert job_processes(run.run_id) == []
        complete = peer.wait_complete()
        assert complete["reason"] == "killed"
        assert run.wait_exit() == 0

    def test_dead_wrapper_leaves_processes_to_kill(
        self, peer: ScriptedPeer, run: WrapperProcess
    ) -> None:
        peer.job = job("sleep 30")
        run.start()
        peer.wait_start()
        assert run.pid is not None
        os.kill(run.pid, signal.SIGKILL)
        run.wait_exit()
        assert job_processes(run.run_id)
        result = minion.kill_local(run.run_id, str(run.statedir))
        assert result["killed"] is True
        assert result["forced"] is True
        assert job_processes(run.run_id) == []
        assert not run.record_path.exists()

    def test_stale_record_without_processes(self, tmp_path: Path) -> None:
        record = tmp_path / "r1.json"
        record.write_text(json.dumps({"run": "r1", "wrapper_pid": 2**22 + 1, "pgid": 2**22 + 1}))
        result = minion.kill_local("r1", str(tmp_path))
        assert result["killed"] is False
        assert result["error"] == "run r1 is not running; removed its stale record"
        assert not record.exists()

    def test_unknown_run(self, tmp_path: Path) -> None:
        result = minion.kill_local("r2", str(tmp_path))
        assert result == {
            "killed": False,
            "run": "r2",
            "error": f"no local record of run r2 in {tmp_path}",
        }

    def test_invalid_run_id(self, tmp_path: Path) -> None:
        result = minion.kill_local("../x", str(tmp_path))
        assert result["killed"] is False
        assert "contains '/' or '..'" in str(result["error"])


def run_launcher(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, WRAPPER_PATH, *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )


class TestLauncherCommands:
    def test_launch_prints_started(self, peer: ScriptedPeer, tmp_path: Path) -> None:
        peer.job = job("sleep 0.5")
        env = {**os.environ, "SP_RUN_TOKEN": peer.token}
        proc = run_launcher(
            "launch",
            f"--run={new_run_id()}",
            "--job=testjob",
            f"--machine={MACHINE_ID}",
            f"--url={peer.url}",
            f"--logdir={tmp_path / 'log'}",
            f"--statedir={tmp_path / 'state'}",
            env=env,
        )
        assert proc.returncode == 0
        result = json.loads(proc.stdout)
        assert result["started"] is True
        try:
            assert peer.wait_complete()["retcode"] == 0
        finally:
            wait_gone(int(result["pid"]))

    def test_launch_without_token_fails(self, tmp_path: Path) -> None:
        env = {key: value for key, value in os.environ.items() if key != "SP_RUN_TOKEN"}
        proc = run_launcher(
            "launch",
            "--run=r1",
            "--job=testjob",
            f"--machine={MACHINE_ID}",
            "--url=ws://127.0.0.1:9/wrapper",
            f"--statedir={tmp_path / 'state'}",
            env=env,
        )
        assert proc.returncode == 1
        assert "SP_RUN_TOKEN" in json.loads(proc.stdout)["error"]

    def test_running_prints_list(self, tmp_path: Path) -> None:
        proc = run_launcher("running", f"--statedir={tmp_path}")
        assert proc.returncode == 0
        assert json.loads(proc.stdout) == []

    def test_kill_local_unknown_run_exits_1(self, tmp_path: Path) -> None:
        proc = run_launcher("kill-local", "r9", f"--statedir={tmp_path}")
        assert proc.returncode == 1
        assert json.loads(proc.stdout)["error"] == f"no local record of run r9 in {tmp_path}"

    def test_invalid_arguments_exit_2_with_json(self) -> None:
        proc = run_launcher("kill-local")
        assert proc.returncode == 2
        assert json.loads(proc.stdout)["error"].startswith("invalid arguments:")

    @pytest.mark.parametrize(
        "arguments",
        [["running", "--statedir=/nonexistent"], ["kill-local", "r9"], ["--version"]],
    )
    def test_does_not_import_tornado(self, arguments: list[str]) -> None:
        proc = subprocess.run(
            [sys.executable, "-X", "importtime", WRAPPER_PATH, *arguments],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        # -X importtime writes one "import time: ... | module" line per import to stderr.
        imported = [line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines()]
        assert "json" in imported
        assert not [name for name in imported if name.startswith("tornado")]


class TestWrapperVersion:
    def test_returns_version(self) -> None:
        assert minion.wrapper_version(WRAPPER_PATH) == wrapper.__version__

    def test_missing_wrapper_raises(self, tmp_path: Path) -> None:
        with pytest.raises(minion.WrapperError, match=r"state\.apply saltpeter"):
            minion.wrapper_version(str(tmp_path / "sp_wrapper.py"))

    def test_failing_wrapper_raises(self, tmp_path: Path) -> None:
        script = fake_wrapper(tmp_path, "import sys\nsys.exit('broken install')\n")
        with pytest.raises(minion.WrapperError, match="failed with status 1: broken install"):
            minion.wrapper_version(script)


@pytest.fixture
def module(tmp_path: Path) -> ModuleType:
    """The execution module with the dunders that Salt's loader would inject."""
    spec = importlib.util.spec_from_file_location("saltpeter_exec_module", MODULE_PATH)
    assert spec is not None
    assert spec.loader is not None
    loaded = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(loaded)
    # A minion's own key pair, which the wrapper signs the run credential with.
    pki_dir = tmp_path / "pki"
    pki_dir.mkdir()
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    (pki_dir / "minion.pem").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
    )
    loaded.__opts__ = {  # type: ignore[attr-defined]
        "id": MACHINE_ID,
        "pki_dir": str(pki_dir),
        "saltpeter_statedir": str(tmp_path / "state"),
        "saltpeter_wrapper_path": WRAPPER_PATH,
    }
    loaded.__context__ = {}  # type: ignore[attr-defined]
    return loaded


class TestExecutionModule:
    def test_virtual_name(self, module: ModuleType) -> None:
        assert module.__virtual__() == "saltpeter"

    @pytest.mark.parametrize("name", ["launch", "running", "kill_local", "wrapper_version"])
    def test_docstring_has_cli_example(self, module: ModuleType, name: str) -> None:
        assert "CLI Example:" in getattr(module, name).__doc__

    def test_launch_failure_sets_retcode(self, module: ModuleType, tmp_path: Path) -> None:
        result = module.launch(
            "r1", "testjob", "ws://127.0.0.1:9/wrapper", "tok", wrapper_path=str(tmp_path / "x")
        )
        assert result["started"] is False
        assert module.__context__["retcode"] == 1

    def test_launch_uses_minion_id_and_statedir(
        self, module: ModuleType, peer: ScriptedPeer, tmp_path: Path
    ) -> None:
        peer.job = job("sleep 0.5")
        run_id = new_run_id()
        result = module.launch(
            run_id,
            "testjob",
            peer.url,
            peer.token,
            wrapper_path=WRAPPER_PATH,
            logdir=str(tmp_path / "log"),
        )
        assert result["started"] is True
        pid = int(result["pid"])
        try:
            peer.wait_for(lambda: bool(peer.received), "the wrapper's hello")
            assert peer.frames("hello")[0]["machine"] == MACHINE_ID
            assert [record["run"] for record in module.running()] == [run_id]
            peer.wait_complete()
        finally:
            # The launcher subcommand exited, so the wrapper is no child of this process.
            wait_gone(pid)
        assert "retcode" not in module.__context__

    def test_launch_starts_wrapper_in_process(
        self, module: ModuleType, peer: ScriptedPeer, tmp_path: Path
    ) -> None:
        peer.job = job("sleep 0.5")
        result = module.launch(
            new_run_id(), "testjob", peer.url, peer.token, logdir=str(tmp_path / "log")
        )
        pid = int(result["pid"])
        try:
            # No launcher process in between: the Salt job process is the parent.
            assert process_parent(pid) == os.getpid()
            peer.wait_complete()
        finally:
            wait_gone(pid)

    def test_wrapper_outlives_the_job_process(
        self, module: ModuleType, peer: ScriptedPeer, tmp_path: Path
    ) -> None:
        peer.job = job("sleep 1")
        read_end, write_end = os.pipe()
        job_process = os.fork()
        if job_process == 0:
            # The Salt job process: launch, report, and exit as Salt's would.
            try:
                result = module.launch(
                    new_run_id(), "testjob", peer.url, peer.token, logdir=str(tmp_path / "log")
                )
                os.write(write_end, json.dumps(result).encode())
            finally:
                os._exit(0)
        os.close(write_end)
        with os.fdopen(read_end, "rb") as pipe:
            result = json.loads(pipe.read())
        os.waitpid(job_process, 0)
        pid = int(result["pid"])
        try:
            assert process_parent(pid) not in (job_process, os.getpid())
            assert peer.wait_complete()["retcode"] == 0
        finally:
            wait_gone(pid)

    def test_threaded_minion_uses_launcher_subcommand(
        self, module: ModuleType, peer: ScriptedPeer, tmp_path: Path
    ) -> None:
        module.__opts__["multiprocessing"] = False
        peer.job = job("sleep 0.5")
        result = module.launch(
            new_run_id(), "testjob", peer.url, peer.token, logdir=str(tmp_path / "log")
        )
        pid = int(result["pid"])
        try:
            # The launcher subcommand started the wrapper and exited.
            assert process_parent(pid) != os.getpid()
            assert peer.wait_complete()["retcode"] == 0
        finally:
            wait_gone(pid)

    def test_wrapper_without_key_path_uses_subcommand(
        self, module: ModuleType, tmp_path: Path
    ) -> None:
        script = fake_wrapper(
            tmp_path,
            "import json\n"
            "def launch(run_id, job, url, token, machine_id, wrapper_path, loglevel, logdir,\n"
            "           statedir):\n"
            "    raise AssertionError('called in process')\n"
            "if __name__ == '__main__':\n"
            "    print(json.dumps({'started': False, 'error': 'launched by the subcommand'}))\n",
        )
        result = module.launch("r1", "testjob", "ws://127.0.0.1:9/", "tok", wrapper_path=script)
        assert result == {"started": False, "error": "launched by the subcommand"}
        assert module.__context__["retcode"] == 1

    def test_launch_token_not_in_any_argv(
        self, module: ModuleType, peer: ScriptedPeer, tmp_path: Path
    ) -> None:
        peer.job = job("sleep 0.5")
        result = module.launch(
            new_run_id(), "testjob", peer.url, peer.token, logdir=str(tmp_path / "log")
        )
        pid = int(result["pid"])
        try:
            assert peer.token.encode() not in read_proc(str(pid), "cmdline")
            assert peer.token.encode() not in read_proc(str(pid), "environ")
            peer.wait_complete()
        finally:
            wait_gone(pid)

    def test_launch_reports_wrapper_error(self, module: ModuleType) -> None:
        result = module.launch("r1", "testjob", "http://127.0.0.1:9/", "tok")
        assert result == {
            "started": False,
            "error": "invalid --url 'http://127.0.0.1:9/': expected a ws:// or wss:// URL",
        }
        assert module.__context__["retcode"] == 1

    def test_launch_with_old_wrapper_says_update(self, module: ModuleType, tmp_path: Path) -> None:
        script = fake_wrapper(tmp_path, "import sys\nsys.exit(2)\n")
        result = module.launch("r1", "testjob", "ws://127.0.0.1:9/", "tok", wrapper_path=script)
        assert result["started"] is False
        assert "apply the saltpeter state to update it" in result["error"]

    def test_running_lists_nothing_without_runs(self, module: ModuleType) -> None:
        assert module.running() == []

    def test_running_missing_wrapper_raises(self, module: ModuleType, tmp_path: Path) -> None:
        with pytest.raises(CommandExecutionError, match=r"state\.apply saltpeter"):
            module.running(wrapper_path=str(tmp_path / "sp_wrapper.py"))

    def test_kill_local_stops_run(
        self, module: ModuleType, peer: ScriptedPeer, tmp_path: Path
    ) -> None:
        peer.job = job("sleep 30")
        run_id = new_run_id()
        result = module.launch(run_id, "testjob", peer.url, peer.token, logdir=str(tmp_path / "l"))
        pid = int(result["pid"])
        try:
            peer.wait_start()
            killed = module.kill_local(run_id)
            assert killed["killed"] is True
            assert peer.wait_complete()["reason"] == "killed"
        finally:
            wait_gone(pid)
        assert "retcode" not in module.__context__

    def test_kill_local_unknown_run_sets_retcode(self, module: ModuleType) -> None:
        result = module.kill_local("nope")
        assert result["killed"] is False
        assert module.__context__["retcode"] == 1

    def test_wrapper_version_missing_raises(self, module: ModuleType, tmp_path: Path) -> None:
        with pytest.raises(CommandExecutionError, match="wrapper not found"):
            module.wrapper_version(str(tmp_path / "sp_wrapper.py"))

    def test_wrapper_version(self, module: ModuleType) -> None:
        assert module.wrapper_version(WRAPPER_PATH) == wrapper.__version__
