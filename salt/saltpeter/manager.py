"""The run manager: the one owner of runs in flight.

Every change to a run goes through :class:`RunManager`, on the engine's event
loop: starting a run, the minions' returns from the launch, the wrapper's
frames, kill requests, and the sweep that turns silence into results. Each
change is written to the store before it is announced on the event bus.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
import sqlite3
import time
import weakref
from collections.abc import Callable, Iterable
from datetime import datetime
from typing import TYPE_CHECKING, Any, Protocol

from saltpeter import protocol
from saltpeter.protocol import (
    AUTH_FAILED,
    JOB_UNAVAILABLE,
    UNKNOWN_RUN,
    Complete,
    Output,
    ProtocolError,
    SequencedFrame,
    Start,
)
from saltpeter.runs import (
    RETCODE_LOST,
    RETCODE_NOT_STARTED,
    MachineRun,
    MachineState,
    Reason,
    Run,
    RunStatus,
    SkipReason,
    Trigger,
    isoformat,
    utcnow,
)
from saltpeter.store import RunStore

if TYPE_CHECKING:
    from saltpeter.config import Job

log = logging.getLogger(__name__)

OUTPUT_TAIL_CHARS = 1024
KILL_GRACE_SECONDS = 5
# Extra silence allowed to the minions of runs reloaded after an engine
# restart: a wrapper retries with backoff of up to 30 s (docs/protocol.md),
# so it may need that long to notice the engine is back.
RECONNECT_GRACE_SECONDS = 30.0

# Results the engine records on its own; a wrapper may still report later.
ENGINE_DECIDED_REASONS = frozenset({Reason.LOST, Reason.NO_RESPONSE, Reason.LAUNCH_FAILED})


class EventSink(Protocol):
    def fire(self, tag: str, data: dict[str, Any]) -> None: ...


class RunObserver(Protocol):
    """An in-process consumer of run events and output, such as the HTTP API."""

    def on_event(self, tag: str, data: dict[str, Any]) -> None: ...

    def on_output(self, job: str, run_id: str, minion: str, data: str) -> None: ...


class Connection(Protocol):
    def send_frame(self, text: str) -> None: ...

    def drop(self, reason: str) -> None:
        """Close the connection and ignore what else arrives on it, so the wrapper reconnects."""


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def job_tag(job: str, *parts: str) -> str:
    return "/".join(("saltpeter", "job", job, *parts))


def sanitize_text(text: str) -> str:
    """Replace lone surrogates, which JSON allows but UTF-8 and SQLite do not."""
    return text.encode("utf-8", "replace").decode("utf-8")


class RunManager:
    """Owns the runs in flight and records everything that happens to them."""

    def __init__(
        self,
        store: RunStore,
        events: EventSink,
        job_lookup: Callable[[str], Job | None],
        launch_timeout: float = 30.0,
        heartbeat_timeout: float = 15.0,
        clock: Callable[[], float] = time.monotonic,
        kill_fallback: Callable[[Run, list[str]], None] | None = None,
        verify_signature: Callable[[str, bytes, str | None], bool] | None = None,
        lost_cleanup: Callable[[Run, list[str]], None] | None = None,
    ) -> None:
        self.store = store
        self.events = events
        self.job_lookup = job_lookup
        self.launch_timeout = launch_timeout
        self.heartbeat_timeout = heartbeat_timeout
        self.clock = clock
        self.kill_fallback = kill_fallback
        # Checks a hello's signature against the minion's accepted Salt key.
        # None skips the check, for tests that run without Salt's keys.
        self.verify_signature = verify_signature
        # Stops processes that a dead wrapper left on a minion recorded as lost.
        self.lost_cleanup = lost_cleanup
        self.runs: dict[str, Run] = {}
        self.observers: list[RunObserver] = []
        self._jids: dict[str, str] = {}
        self._late_warned: set[tuple[str, str]] = set()
        # Finished runs still in memory, by run id, for instance because a
        # connected wrapper refers to one. The wrappers of a run that report
        # late share one copy, instead of loading every minion of the run
        # again for each connection.
        self._finished: weakref.WeakValueDictionary[str, Run] = weakref.WeakValueDictionary()

    def _announce(self, tag: str, data: dict[str, Any]) -> None:
        """Fire an event on the bus and hand it to every observer."""
        self.events.fire(tag, data)
        for observer in self.observers:
            try:
                observer.on_event(tag, data)
            except Exception:
                log.exception("observer %r failed on event %s", observer, tag)

    def _stream_output(self, run: Run, machine: MachineRun, data: str) -> None:
        machine.output_tail = (machine.output_tail + data)[-OUTPUT_TAIL_CHARS:]
        for observer in self.observers:
            try:
                observer.on_output(run.job_name, run.run_id, machine.machine, data)
            except Exception:
                log.exception(
                    "job %s run %s minion %s: observer %r failed on output",
                    run.job_name,
                    run.run_id,
                    machine.machine,
                    observer,
                )

    # -- starting runs ------------------------------------------------------

    def running(self, job_name: str) -> list[Run]:
        return [run for run in self.runs.values() if run.job_name == job_name]

    def new_run_id(self, job_name: str, instant: datetime) -> str:
        return self.new_run_ids([(job_name, instant)])[0]

    def new_run_ids(self, requests: Iterable[tuple[str, datetime]]) -> list[str]:
        """Return a run id for each (job, instant), unique among stored runs,
        runs in flight and the other ids of this call.

        The id is ``JOB_EPOCHSECONDS``, with ``_2``, ``_3``... when taken.
        """
        bases = [f"{name}_{int(instant.timestamp())}" for name, instant in requests]
        stored = self.store.run_ids_taken(bases)
        given: set[str] = set()
        ids = []
        for base in bases:
            run_id, counter = base, 1
            while (
                run_id in given
                or run_id in self.runs
                or (run_id in stored if counter == 1 else self.store.run_id_taken(run_id))
            ):
                counter += 1
                run_id = f"{base}_{counter}"
            given.add(run_id)
            ids.append(run_id)
        return ids

    def record_missed(self, job_name: str, scheduled_at: datetime) -> None:
        """Record and announce a slot that passed while the engine was down."""
        run_id = self.new_run_id(job_name, scheduled_at) + "_missed"
        if not self.store.insert_missed(run_id, job_name, scheduled_at, utcnow()):
            return
        self._announce(
            job_tag(job_name, "missed"),
            {"job": job_name, "run_id": run_id, "scheduled": isoformat(scheduled_at)},
        )

    def record_skip(
        self, job_name: str, trigger: Trigger, scheduled_at: datetime | None, reason: SkipReason
    ) -> str:
        now = utcnow()
        run_id = self.new_run_id(job_name, scheduled_at or now) + "_skipped"
        running = [run.run_id for run in self.running(job_name)]
        self.store.insert_skip(run_id, job_name, trigger, scheduled_at, now, reason)
        log.info(
            "job %s: skipped the %s slot: %s%s",
            job_name,
            isoformat(scheduled_at) or "manual",
            reason.value,
            f" (running: {', '.join(running)})" if running else "",
        )
        self._announce(
            job_tag(job_name, "skipped"),
            {
                "job": job_name,
                "run_id": run_id,
                "reason": reason.value,
                "scheduled": isoformat(scheduled_at),
                "running": running,
            },
        )
        return run_id

    def start_run(
        self,
        job: Job,
        trigger: Trigger,
        scheduled_at: datetime | None,
        targets: Iterable[str],
        maintenance: Iterable[str],
        jid: str,
    ) -> tuple[Run, str]:
        """Create, store and announce a run; return it with its token.

        Raises sqlite3.IntegrityError when the slot already has a run.
        """
        run_id = self.new_run_id(job.name, scheduled_at or utcnow())
        run, token = self.new_run(run_id, job, trigger, scheduled_at, targets, maintenance, jid)
        if not self.start_runs([run]):
            raise sqlite3.IntegrityError(
                f"job {job.name}: the {isoformat(scheduled_at)} slot already has a run"
            )
        return run, token

    def new_run(
        self,
        run_id: str,
        job: Job,
        trigger: Trigger,
        scheduled_at: datetime | None,
        targets: Iterable[str],
        maintenance: Iterable[str],
        jid: str,
    ) -> tuple[Run, str]:
        """Build a run and the token its wrappers present; nothing is stored yet."""
        token = secrets.token_urlsafe(32)
        run = Run(
            run_id=run_id,
            job_name=job.name,
            trigger=trigger,
            scheduled_at=scheduled_at,
            started_at=utcnow(),
            token_hash=hash_token(token),
            job=job,
            jid=jid,
            timeout=job.timeout,
        )
        seen = self.clock()
        for machine in sorted(targets):
            run.machines[machine] = MachineRun(run.run_id, machine, last_seen=seen)
        for machine in sorted(maintenance):
            run.machines[machine] = MachineRun(
                run.run_id, machine, state=MachineState.MAINTENANCE, reason=Reason.MAINTENANCE
            )
        return run, token

    def start_runs(self, runs: list[Run]) -> list[Run]:
        """Store runs made by :meth:`new_run`, take them in flight and announce them.

        All are stored in one transaction. A run whose slot already has one
        is left out with a warning. Returns the runs started.
        """
        return self._take_in_flight(self._insert(runs, prepared=False))

    def prepare_runs(self, runs: list[Run]) -> list[Run]:
        """Store runs made by :meth:`new_run` ahead of their instant; return those stored.

        They stay out of the history and out of flight until
        :meth:`activate_runs`. A run whose slot already has one is left out.
        """
        return [run for run, _, _ in self._insert(runs, prepared=True)]

    def activate_runs(self, runs: list[Run]) -> list[Run]:
        """Take runs stored by :meth:`prepare_runs` in flight and announce them.

        Their ``started_at`` becomes now, and the store marks them running.
        """
        now = utcnow()
        seen = self.clock()
        for run in runs:
            run.started_at = now
            for machine in run.machines.values():
                if machine.state is MachineState.PENDING:
                    machine.last_seen = seen
        self.store.activate_runs(runs)
        return self._take_in_flight(
            [(run, launch_targets(run), maintenance_targets(run)) for run in runs]
        )

    def discard_prepared(self, runs: Iterable[Run]) -> None:
        """Delete prepared runs that are not going to start."""
        self.store.drop_prepared(run.run_id for run in runs)

    def _insert(self, runs: list[Run], prepared: bool) -> list[tuple[Run, list[str], list[str]]]:
        entries = [(run, launch_targets(run), maintenance_targets(run)) for run in runs]
        try:
            self.store.insert_runs(entries, prepared=prepared)
            return entries
        except sqlite3.IntegrityError:
            pass
        # Rare: a slot was taken since the caller checked. Store the runs one
        # by one to keep all the others.
        stored = []
        for entry in entries:
            try:
                self.store.insert_runs([entry], prepared=prepared)
            except sqlite3.IntegrityError:
                run = entry[0]
                log.warning(
                    "job %s: the %s slot already has a run",
                    run.job_name,
                    isoformat(run.scheduled_at),
                )
            else:
                stored.append(entry)
        return stored

    def _take_in_flight(self, stored: list[tuple[Run, list[str], list[str]]]) -> list[Run]:
        for run, targets, maintenance in stored:
            for machine in maintenance:
                self.store.append_output(run.run_id, machine, 0, "target under maintenance\n")
                log.info(
                    "job %s run %s minion %s: target under maintenance",
                    run.job_name,
                    run.run_id,
                    machine,
                )
            self.runs[run.run_id] = run
            if run.jid:
                self._jids[run.jid] = run.run_id
            self._announce(
                job_tag(run.job_name, "start"),
                {
                    "job": run.job_name,
                    "run_id": run.run_id,
                    "trigger": run.trigger.value,
                    "scheduled": isoformat(run.scheduled_at),
                    "targets": targets,
                    "maintenance": maintenance,
                },
            )
        started = [run for run, _, _ in stored]
        return started

    def publish_failed(self, run: Run, error: str) -> None:
        """Record 255 on every minion still waiting when the publish itself failed."""
        for machine in run.machines.values():
            if machine.state is MachineState.PENDING:
                self._finish(
                    run,
                    machine,
                    RETCODE_NOT_STARTED,
                    Reason.LAUNCH_FAILED,
                    f"publish failed: {error}",
                )

    def load_in_flight(self) -> int:
        """Reload runs the store has as running, after an engine restart.

        Their minions get the heartbeat window plus RECONNECT_GRACE_SECONDS to
        reconnect before they are recorded as lost.
        """
        for row in self.store.running_runs():
            run = self._reloaded(row)
            log.info(
                "job %s run %s: reloaded from the store, still in flight", run.job_name, run.run_id
            )
        return len(self.runs)

    def reload_run(self, run: Run) -> None:
        """Replace ``run`` in memory with the store's copy, after writes for it were lost.

        The engine's memory is then ahead of the store: sequence numbers,
        results, the run's end. Every wrapper of the run is disconnected. It
        reconnects, reads in its welcome the sequence number the store has,
        and sends the rest again. A run already replaced is left alone.
        """
        if self.runs.get(run.run_id, run) is not run:
            return
        self.runs.pop(run.run_id, None)
        self._finished.pop(run.run_id, None)
        if run.jid:
            self._jids.pop(run.jid, None)
        for machine in run.machines.values():
            connection, machine.connection = machine.connection, None
            if connection is not None:
                connection.drop("store_failed")
        row = self.store.run(run.run_id)
        if row is None or row["status"] != RunStatus.RUNNING.value:
            log.error(
                "job %s run %s: writes for the run were lost, and the store has it %s",
                run.job_name,
                run.run_id,
                "as " + row["status"] if row else "no more",
            )
            return
        self._reloaded(row).job = run.job
        log.error(
            "job %s run %s: writes for the run were lost; reloaded it from the store, "
            "and its wrappers reconnect to send them again",
            run.job_name,
            run.run_id,
        )

    def _reloaded(self, row: dict[str, Any]) -> Run:
        """Take the stored run ``row`` in flight, with time for its wrappers to reconnect."""
        run = self._run_from_row(row)
        seen = self.clock() + RECONNECT_GRACE_SECONDS
        for machine in run.machines.values():
            machine.last_seen = seen
        self.runs[run.run_id] = run
        if run.jid:
            self._jids[run.jid] = run.run_id
        return run

    def _run_from_row(self, row: dict[str, Any]) -> Run:
        run = Run(
            run_id=row["run_id"],
            job_name=row["job"],
            trigger=Trigger(row["trigger"]),
            scheduled_at=_parse(row["scheduled_at"]),
            started_at=_parse(row["started_at"]) or utcnow(),
            token_hash=row["token_hash"] or "",
            jid=row["jid"],
            timeout=row["timeout"],
            status=RunStatus(row["status"]),
        )
        for machine in self.store.machine_runs(run.run_id):
            run.machines[machine.machine] = machine
        return run

    # -- the launch's return ------------------------------------------------

    def run_for_jid(self, jid: str) -> Run | None:
        run_id = self._jids.get(jid)
        return self.runs.get(run_id) if run_id else None

    def on_launch_return(self, jid: str, minion: str, data: dict[str, Any]) -> None:
        run = self.run_for_jid(jid)
        if run is None:
            return
        machine = run.machines.get(minion)
        if machine is None or machine.state is not MachineState.PENDING:
            return
        ret = data.get("return")
        if isinstance(ret, dict) and ret.get("started"):
            machine.state = MachineState.LAUNCHED
            machine.last_seen = self.clock()
            self.store.update_machine(machine)
            log.debug("job %s run %s minion %s: wrapper launched", run.job_name, run.run_id, minion)
            return
        if isinstance(ret, dict):
            error = str(ret.get("error") or "the execution module did not start the wrapper")
        else:
            error = str(ret)
        self._finish(run, machine, RETCODE_NOT_STARTED, Reason.LAUNCH_FAILED, error)

    # -- the wrapper's connection ------------------------------------------

    def authenticate(self, hello: protocol.Hello) -> tuple[Run, MachineRun]:
        run = self.runs.get(hello.run)
        if run is None:
            run = self._finished_run(hello.run)
        if run is None:
            raise ProtocolError(UNKNOWN_RUN, f"run {hello.run} is not known to this engine")
        expected = run.token_hash.encode()
        if not hmac.compare_digest(expected, hash_token(hello.token).encode()):
            raise ProtocolError(AUTH_FAILED, f"the token does not belong to run {hello.run}")
        machine = run.machines.get(hello.machine)
        if machine is None or machine.state is MachineState.MAINTENANCE:
            raise ProtocolError(
                AUTH_FAILED, f"minion {hello.machine} is not a target of run {hello.run}"
            )
        if self.verify_signature is not None:
            # Every minion sees a publish's arguments, token included, so only a
            # signature by the minion's own key proves who is connecting.
            message = protocol.credential_message(hello.run, hello.machine, hello.token)
            if not self.verify_signature(hello.machine, message, hello.signature):
                raise ProtocolError(
                    AUTH_FAILED,
                    f"the hello for run {hello.run} is not signed by the accepted key of "
                    f"minion {hello.machine}",
                )
        return run, machine

    def _finished_run(self, run_id: str) -> Run | None:
        """Return a run that is no longer in flight, for a wrapper that reports late.

        A run still in memory is shared, and any other is loaded from the
        store. Each copy contains every minion of the run. A copy per
        connection would cost the square of the run's minions when they all
        report late, and a late result recorded through one copy would be
        missing from the others. The store decides either way, so a run
        pruned from it is unknown even while a copy is still in memory.
        """
        row = self.store.run(run_id)
        if row is None or row["status"] in (RunStatus.SKIPPED.value, RunStatus.MISSED.value):
            self._finished.pop(run_id, None)
            return None
        run = self._finished.get(run_id)
        if run is None:
            run = self._run_from_row(row)
            self._finished[run_id] = run
        return run

    def welcome(self, run: Run, machine: MachineRun, need_job: bool) -> dict[str, Any]:
        """Build the welcome frame, with the job definition when the wrapper needs it.

        A wrapper that starts after the engine recorded 255 for its minion (the
        launch was answered too late) still gets the job, and its result is
        stored as a late result. A minion whose wrapper already reported its
        own result gets none, so a stale wrapper exits without running anything.
        """
        job_spec = None
        # A wrapper that already started the command has the job; nobody else
        # gets it again, so its environment goes out at most once per start.
        may_run = machine.state in (MachineState.PENDING, MachineState.LAUNCHED) or (
            machine.done
            and machine.reason in ENGINE_DECIDED_REASONS
            and machine.late_retcode is None
            and machine.pid is None
        )
        if need_job and may_run:
            job = run.job or self.job_lookup(run.job_name)
            if job is None:
                raise ProtocolError(
                    JOB_UNAVAILABLE, f"job {run.job_name} is no longer defined on this engine"
                )
            job_spec = {
                "name": job.name,
                "command": job.command,
                "user": job.user,
                "cwd": job.cwd,
                "env": dict(job.env),
                "timeout": job.timeout,
                "kill_grace": KILL_GRACE_SECONDS,
            }
        return {
            "acked": machine.last_seq,
            "job": job_spec,
            "heartbeat_interval": 5,
            "output_limit": self.store.max_output_bytes,
        }

    def attach(self, run: Run, machine: MachineRun, connection: Connection) -> None:
        machine.connection = connection
        self.touch(machine)
        if machine.kill_requested and not machine.done:
            connection.send_frame(protocol.encode("kill"))

    def detach(self, machine: MachineRun, connection: Connection) -> None:
        if machine.connection is connection:
            machine.connection = None

    def touch(self, machine: MachineRun) -> None:
        machine.last_seen = self.clock()

    def on_frame(self, run: Run, machine: MachineRun, frame: SequencedFrame) -> int:
        """Store one sequenced frame if it is the next one; return the acked seq."""
        self.touch(machine)
        if frame.seq <= machine.last_seq:
            return machine.last_seq
        if frame.seq != machine.last_seq + 1:
            log.debug(
                "job %s run %s minion %s: dropped frame %d after a gap (stored up to %d)",
                run.job_name,
                run.run_id,
                machine.machine,
                frame.seq,
                machine.last_seq,
            )
            return machine.last_seq
        if machine.done:
            return self._on_late_frame(run, machine, frame)
        if isinstance(frame, Start):
            self._on_start(run, machine, frame)
        elif isinstance(frame, Output):
            self._on_output(run, machine, frame)
        elif isinstance(frame, Complete):
            machine.last_seq = frame.seq
            reason = Reason(frame.reason)
            self._finish(run, machine, frame.retcode, reason, None)
        return machine.last_seq

    def _on_late_frame(self, run: Run, machine: MachineRun, frame: SequencedFrame) -> int:
        """Store what a wrapper reports after the engine recorded a result for it.

        The engine records 253 when a wrapper falls silent and 255 when a minion
        does not answer the launch in time; the wrapper may still be running the
        command and report later. Its output and result are then stored next to
        the recorded one, never in its place, and announced with ``late: true``.
        Frames for a minion whose result came from the wrapper itself, or that
        already has a late result, are acknowledged so the wrapper can exit, and
        dropped.
        """
        engine_decided = machine.reason in ENGINE_DECIDED_REASONS
        if not engine_decided or machine.late_retcode is not None:
            key = (run.run_id, machine.machine)
            if key not in self._late_warned:
                self._late_warned.add(key)
                log.warning(
                    "job %s run %s minion %s: frames arrived after the result was recorded "
                    "(%s); acknowledged and dropped",
                    run.job_name,
                    run.run_id,
                    machine.machine,
                    machine.reason.value if machine.reason else "done",
                )
            return frame.seq
        machine.last_seq = frame.seq
        if isinstance(frame, Start):
            machine.pid = frame.pid
            self.store.update_machine(machine)
            log.warning(
                "job %s run %s minion %s: the wrapper reported a start after the result %d "
                "was recorded; storing what it reports next to that result",
                run.job_name,
                run.run_id,
                machine.machine,
                machine.retcode,
            )
        elif isinstance(frame, Output):
            self._on_output(run, machine, frame)
        elif isinstance(frame, Complete):
            machine.late_retcode = frame.retcode
            machine.late_reason = Reason(frame.reason)
            self.store.set_late_result(machine, utcnow())
            log.warning(
                "job %s run %s minion %s: late result %d (%s) stored next to the recorded %d (%s)",
                run.job_name,
                run.run_id,
                machine.machine,
                frame.retcode,
                frame.reason,
                machine.retcode,
                machine.reason.value if machine.reason else "none",
            )
            self._announce(
                job_tag(run.job_name, machine.machine, "complete"),
                {
                    "job": run.job_name,
                    "run_id": run.run_id,
                    "minion": machine.machine,
                    "retcode": frame.retcode,
                    "reason": frame.reason,
                    "output_tail": machine.output_tail,
                    "late": True,
                    "recorded_retcode": machine.retcode,
                    "recorded_reason": machine.reason.value if machine.reason else None,
                },
            )
        return machine.last_seq

    def _on_start(self, run: Run, machine: MachineRun, frame: Start) -> None:
        machine.last_seq = frame.seq
        machine.state = MachineState.RUNNING
        machine.pid = frame.pid
        machine.started_at = utcnow()
        self.store.update_machine(machine)
        log.info(
            "job %s run %s minion %s: command started as pid %d",
            run.job_name,
            run.run_id,
            machine.machine,
            frame.pid,
        )
        self._announce(
            job_tag(run.job_name, machine.machine, "start"),
            {
                "job": run.job_name,
                "run_id": run.run_id,
                "minion": machine.machine,
                "pid": frame.pid,
                "time": isoformat(machine.started_at),
            },
        )

    def _on_output(self, run: Run, machine: MachineRun, frame: Output) -> None:
        data = sanitize_text(frame.data)
        machine.last_seq = frame.seq
        self.store.append_output(run.run_id, machine.machine, frame.seq, data, frame.skipped)
        if frame.skipped:
            # Followers see where output went missing; the store marks it on read.
            data = f"\n[saltpeter: {frame.skipped} bytes of output skipped on the minion]\n{data}"
        self._stream_output(run, machine, data)

    # -- results ------------------------------------------------------------

    def _finish(
        self, run: Run, machine: MachineRun, retcode: int, reason: Reason, note: str | None
    ) -> None:
        if machine.done:
            return
        if note:
            text = note if note.endswith("\n") else note + "\n"
            self.store.append_output(run.run_id, machine.machine, machine.last_seq, text)
            self._stream_output(run, machine, text)
        machine.state = MachineState.DONE
        machine.retcode = retcode
        machine.reason = reason
        machine.ended_at = utcnow()
        self.store.update_machine(machine)
        log_level = logging.INFO if retcode == 0 else logging.WARNING
        log.log(
            log_level,
            "job %s run %s minion %s: finished with retcode %d (%s)%s",
            run.job_name,
            run.run_id,
            machine.machine,
            retcode,
            reason.value,
            f": {note.strip()}" if note else "",
        )
        self._announce(
            job_tag(run.job_name, machine.machine, "complete"),
            {
                "job": run.job_name,
                "run_id": run.run_id,
                "minion": machine.machine,
                "retcode": retcode,
                "reason": reason.value,
                "output_tail": machine.output_tail,
            },
        )
        if not run.in_flight:
            self._finish_run(run)

    def _finish_run(self, run: Run) -> None:
        run.ended_at = utcnow()
        run.status = run.final_status()
        self.store.finish_run(run)
        self.runs.pop(run.run_id, None)
        self._finished[run.run_id] = run
        if run.jid:
            self._jids.pop(run.jid, None)
        retcodes = run.retcodes()
        log.info(
            "job %s run %s: finished, %s: %s",
            run.job_name,
            run.run_id,
            run.status.value,
            ", ".join(f"{name}={code}" for name, code in retcodes.items()),
        )
        self._announce(
            job_tag(run.job_name, "complete"),
            {
                "job": run.job_name,
                "run_id": run.run_id,
                "retcodes": retcodes,
                "success": run.status is RunStatus.SUCCEEDED,
                "started": isoformat(run.started_at),
                "ended": isoformat(run.ended_at),
            },
        )

    def sweep(self) -> None:
        """Turn silence past its deadline into results; called about once a second."""
        now = self.clock()
        for run in list(self.runs.values()):
            for machine in list(run.machines.values()):
                verdict = sweep_verdict(
                    machine.state,
                    now - machine.last_seen,
                    self.launch_timeout,
                    self.heartbeat_timeout,
                )
                if verdict is None and machine.connection is not None:
                    # Only a connected wrapper can be stuck; a silent one is
                    # handled by the heartbeat rule, with its reconnect grace.
                    verdict = overrun_verdict(
                        machine, run.timeout, utcnow(), self.heartbeat_timeout
                    )
                    if verdict is not None:
                        machine.connection.send_frame(protocol.encode("kill"))
                if verdict is not None:
                    retcode, reason, note = verdict
                    self._finish(run, machine, retcode, reason, note)
                    if reason is Reason.LOST and self.lost_cleanup is not None:
                        self.lost_cleanup(run, [machine.machine])

    # -- kill ---------------------------------------------------------------

    def kill(self, job_name: str) -> dict[str, list[str]]:
        """Ask every in-flight minion of the job's runs to stop; return who was signalled."""
        signalled: dict[str, list[str]] = {}
        for run in self.running(job_name):
            fallback: list[str] = []
            for machine in run.machines.values():
                if not machine.state.in_flight:
                    continue
                machine.kill_requested = True
                signalled.setdefault(run.run_id, []).append(machine.machine)
                if machine.connection is not None:
                    machine.connection.send_frame(protocol.encode("kill"))
                elif machine.state is MachineState.RUNNING:
                    fallback.append(machine.machine)
                log.info(
                    "job %s run %s minion %s: kill requested (%s)",
                    job_name,
                    run.run_id,
                    machine.machine,
                    "sent to the wrapper"
                    if machine.connection is not None
                    else "wrapper not connected",
                )
            if fallback and self.kill_fallback is not None:
                self.kill_fallback(run, sorted(fallback))
        return {run_id: sorted(machines) for run_id, machines in signalled.items()}


def sweep_verdict(
    state: MachineState, silent_for: float, launch_timeout: float, heartbeat_timeout: float
) -> tuple[int, Reason, str] | None:
    """Decide whether a minion's silence of ``silent_for`` seconds ends its run.

    A minion that never returned from the launch gets ``launch_timeout``; a wrapper
    that was launched but never connected, or stopped sending frames, gets
    ``heartbeat_timeout``. Durations come from time.monotonic().
    """
    if state is MachineState.PENDING and silent_for > launch_timeout:
        return (
            RETCODE_NOT_STARTED,
            Reason.NO_RESPONSE,
            f"target did not respond to the launch within {launch_timeout:g} s",
        )
    if state is MachineState.LAUNCHED and silent_for > heartbeat_timeout:
        return (
            RETCODE_NOT_STARTED,
            Reason.LAUNCH_FAILED,
            f"the wrapper started but did not connect to the engine within "
            f"{heartbeat_timeout:g} s; check that the minion can reach machines_ws_port",
        )
    if state is MachineState.RUNNING and silent_for > heartbeat_timeout:
        return (
            RETCODE_LOST,
            Reason.LOST,
            f"no heartbeat from the wrapper for {heartbeat_timeout:g} s",
        )
    return None


def overrun_verdict(
    machine: MachineRun, timeout: int | None, now: datetime, heartbeat_timeout: float
) -> tuple[int, Reason, str] | None:
    """Decide whether a running minion has gone past any result it could still send.

    The wrapper enforces the job's timeout itself and reports within
    ``timeout`` plus the kill grace. A wrapper that keeps sending heartbeats
    but no result for a heartbeat window longer than that is stuck, and is
    recorded as lost, so no run stays in flight forever. ``now`` is wall-clock
    UTC, because the start time survives engine restarts only as a timestamp.
    """
    if machine.state is not MachineState.RUNNING or not timeout or machine.started_at is None:
        return None
    limit = timeout + KILL_GRACE_SECONDS + heartbeat_timeout
    if (now - machine.started_at).total_seconds() <= limit:
        return None
    return (
        RETCODE_LOST,
        Reason.LOST,
        f"no result from the wrapper within the timeout of {timeout} s plus "
        f"{KILL_GRACE_SECONDS + heartbeat_timeout:g} s; the engine asked it to stop",
    )


def _parse(text: str | None) -> datetime | None:
    return datetime.fromisoformat(text) if text else None


def launch_targets(run: Run) -> list[str]:
    """Return the minions a new run is launched on: its machines not under maintenance."""
    return [
        name
        for name, machine in run.machines.items()
        if machine.state is not MachineState.MAINTENANCE
    ]


def maintenance_targets(run: Run) -> list[str]:
    """Return the minions of a new run that were left out because of maintenance."""
    return [
        name for name, machine in run.machines.items() if machine.state is MachineState.MAINTENANCE
    ]
