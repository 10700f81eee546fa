"""Runs and per-minion results: the engine's state model.

A run is one firing of a job. It targets a set of minions, and each minion's
part of it is a :class:`MachineRun` that moves through :class:`MachineState`.
Only the engine's :class:`~saltpeter.manager.RunManager` mutates these objects.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from saltpeter.config import Job

# Exit codes that Saltpeter records itself, following the original Saltpeter.
RETCODE_TIMEOUT = 124
RETCODE_KILLED = 143
RETCODE_LOST = 253
RETCODE_NOT_STARTED = 255


class MachineState(str, enum.Enum):
    """State of one minion's part of a run."""

    PENDING = "pending"  # launch published, no return from the minion yet
    LAUNCHED = "launched"  # the execution module started the wrapper
    RUNNING = "running"  # the wrapper reported that the command started
    DONE = "done"  # a result is recorded
    MAINTENANCE = "maintenance"  # matched the target but left out: under maintenance

    @property
    def in_flight(self) -> bool:
        return self in _IN_FLIGHT


_IN_FLIGHT = frozenset({MachineState.PENDING, MachineState.LAUNCHED, MachineState.RUNNING})


class RunStatus(str, enum.Enum):
    RUNNING = "running"
    SUCCEEDED = "succeeded"  # every minion's retcode is 0
    FAILED = "failed"  # at least one minion's retcode is not 0
    SKIPPED = "skipped"  # the slot or request started nothing
    MISSED = "missed"  # the slot passed while the engine was down and was not run


class Reason(str, enum.Enum):
    """Cause of a minion's result."""

    EXIT = "exit"
    SIGNAL = "signal"
    TIMEOUT = "timeout"
    KILLED = "killed"
    START_FAILED = "start_failed"
    LOST = "lost"
    NO_RESPONSE = "no_response"
    LAUNCH_FAILED = "launch_failed"
    MAINTENANCE = "maintenance"


class SkipReason(str, enum.Enum):
    OVERLAP = "overlap"
    MAINTENANCE = "maintenance"
    NO_TARGETS = "no_targets"


class Trigger(str, enum.Enum):
    SCHEDULE = "schedule"
    MANUAL = "manual"
    CATCH_UP = "catch_up"  # a slot that passed while the engine was down


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def isoformat(instant: datetime | None) -> str | None:
    return instant.isoformat() if instant is not None else None


@dataclass
class MachineRun:
    """One minion's part of a run."""

    run_id: str
    machine: str
    state: MachineState = MachineState.PENDING
    retcode: int | None = None
    reason: Reason | None = None
    started_at: datetime | None = None
    ended_at: datetime | None = None
    pid: int | None = None
    # Highest sequenced wrapper frame stored; see docs/protocol.md.
    last_seq: int = 0
    # time.monotonic() of the last sign of life: the launch, the launch's
    # return, or any frame from the wrapper.
    last_seen: float = 0.0
    kill_requested: bool = False
    # The last characters of output, for events; the store keeps the rest.
    output_tail: str = ""
    # The wrapper's own result when it arrived after the engine had already
    # recorded one (253 lost, or 255 when the minion did not respond in time).
    late_retcode: int | None = None
    late_reason: Reason | None = None
    # The open WebSocket connection of this minion's wrapper, if any.
    connection: Any = None

    @property
    def done(self) -> bool:
        return not self.state.in_flight


@dataclass
class Run:
    """One firing of a job."""

    run_id: str
    job_name: str
    trigger: Trigger
    scheduled_at: datetime | None
    started_at: datetime
    token_hash: str
    machines: dict[str, MachineRun] = field(default_factory=dict)
    # The definition the run was started with. It contains the environment,
    # which never goes into the store, so a run reloaded after an engine
    # restart has None here and the wrapper gets the current definition.
    job: Job | None = None
    jid: str | None = None
    timeout: int | None = None  # seconds, 0 = no limit; None when not known
    ended_at: datetime | None = None
    status: RunStatus = RunStatus.RUNNING
    # The minions in order, and how many at its front have a result. A result
    # once recorded stays, so in_flight never looks at those again.
    _order: list[MachineRun] = field(default_factory=list, repr=False, compare=False)
    _done_front: int = field(default=0, repr=False, compare=False)

    @property
    def in_flight(self) -> bool:
        """Return True while any minion has no result yet.

        Checked after each result. Skipping the minions already found done
        keeps a run of thousands of minions from scanning all of them for
        every result that arrives.
        """
        if len(self._order) != len(self.machines):
            self._order = list(self.machines.values())
            self._done_front = 0
        order = self._order
        while self._done_front < len(order):
            if order[self._done_front].state.in_flight:
                return True
            self._done_front += 1
        return False

    def retcodes(self) -> dict[str, int]:
        return {
            name: machine.retcode
            for name, machine in sorted(self.machines.items())
            if machine.retcode is not None
        }

    def final_status(self) -> RunStatus:
        codes = self.retcodes()
        return RunStatus.SUCCEEDED if codes and not any(codes.values()) else RunStatus.FAILED
