"""Operations behind the ``saltpeter.*`` runners.

Reads (status, next fire times) come straight from the run store, so they
work while the engine is busy or down. Actions (kill, run now) are requests
to the engine over the master event bus: the engine owns the runs, so only
it may change them.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

from saltpeter.engine import (
    REPLY_PREFIX,
    REQUEST_PREFIX,
    default_store_path,
    engine_options,
    unknown_job_message,
)
from saltpeter.schedule import FIELD_NAMES, CronSchedule
from saltpeter.store import RunStore

DEFAULT_REQUEST_TIMEOUT = 30.0


class ControlError(Exception):
    """An operator request that cannot be served, with the reason and what to do."""


def open_store(opts: Mapping[str, Any]) -> RunStore:
    options = engine_options(opts)
    path = Path(options["store_path"]) if options.get("store_path") else default_store_path(opts)
    try:
        return RunStore(path, readonly=True)
    except Exception as exc:
        raise ControlError(str(exc)) from None


def _require_job(store: RunStore, job: str | None) -> None:
    if job is None:
        return
    jobs = store.jobs()
    if job not in jobs:
        raise ControlError(unknown_job_message(job, jobs))


def status(opts: Mapping[str, Any], job: str | None = None) -> dict[str, Any]:
    """Build the status document from the store named by the master's opts."""
    store = open_store(opts)
    try:
        return build_status(store, job)
    finally:
        store.close()


def build_status(store: RunStore, job: str | None = None) -> dict[str, Any]:
    """Return the status document: runs in flight, and each job's latest results.

    The shape is the original Saltpeter's ``/status``. ``running`` maps run
    ids to their start, job name and minions. ``state`` maps job names to
    ``next_run``, ``last_run`` and per-minion ``results`` with ``starttime``,
    ``endtime``, ``ret`` and ``retcode``, which are empty strings while a
    minion is still running. Saltpeter adds ``last_run_id``,
    ``last_status`` and each result's ``reason``.
    """
    _require_job(store, job)
    running: dict[str, Any] = {}
    for run in store.running_runs():
        if job is not None and run["job"] != job:
            continue
        running[run["run_id"]] = {
            "started": run["started_at"],
            "name": run["job"],
            "machines": run["targets"],
        }
    state: dict[str, Any] = {}
    for name, row in store.jobs().items():
        if job is not None and name != job:
            continue
        latest = store.latest_run(name)
        results: dict[str, Any] = {}
        if latest is not None:
            for machine, result in store.results(latest["run_id"]).items():
                results[machine] = {
                    "starttime": result["started_at"] or latest["started_at"],
                    "endtime": result["ended_at"] or "",
                    "ret": result["output"],
                    "retcode": "" if result["retcode"] is None else result["retcode"],
                    "reason": result["reason"] or "",
                }
        state[name] = {
            "next_run": row.next_run,
            "last_run": row.last_run,
            "last_run_id": latest["run_id"] if latest else None,
            "last_status": latest["status"] if latest else None,
            "results": results,
        }
    return {"running": running, "state": state}


MAX_NEXT_COUNT = 1000


def next_times(
    opts: Mapping[str, Any], job: str, count: object = 5, now: datetime | None = None
) -> list[str]:
    """Return the next ``count`` fire times of a job, from its stored definition."""
    text = str(count).strip()
    if isinstance(count, bool) or not text.isdigit() or not 1 <= int(text) <= MAX_NEXT_COUNT:
        raise ControlError(
            f"count must be a whole number from 1 to {MAX_NEXT_COUNT}, not {str(count)[:40]!r}"
        )
    count = int(text)
    store = open_store(opts)
    try:
        _require_job(store, job)
        definition = store.jobs()[job].definition
    finally:
        store.close()
    fields = {name: str(definition["schedule"][name]) for name in FIELD_NAMES}
    schedule = CronSchedule.parse(fields, ZoneInfo(definition["timezone"]))
    start = now or datetime.now(timezone.utc)
    return [instant.isoformat() for instant in schedule.next_times(start, count)]


def engine_request(
    opts: Mapping[str, Any],
    kind: str,
    payload: Mapping[str, Any],
    timeout: float = DEFAULT_REQUEST_TIMEOUT,
) -> Any:
    """Send a request to the engine over the event bus and return its result."""
    import salt.utils.event

    request_id = uuid.uuid4().hex
    with salt.utils.event.get_master_event(opts, opts["sock_dir"], listen=True) as bus:
        bus.fire_event({**payload, "request_id": request_id}, REQUEST_PREFIX + kind)
        reply = bus.get_event(wait=timeout, tag=REPLY_PREFIX + request_id, match_type="startswith")
    if reply is None:
        raise ControlError(
            f"the saltpeter engine did not reply within {timeout:g} s; check that the master "
            "runs it (engines: in the master config) and look at its log"
        )
    if not reply.get("ok"):
        raise ControlError(str(reply.get("error", "the engine rejected the request")))
    return reply.get("result")
