"""The Saltpeter engine: scheduler, machines WebSocket and event listener on one loop.

:func:`run_engine` is what the thin loader module in ``_engines/`` calls. It
blocks for the engine's lifetime, because Salt restarts an engine whose
``start()`` returns. Everything that changes run state happens on the one
asyncio loop this module starts; blocking Salt calls go to a small thread
pool.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import gc
import itertools
import logging
import os
import sqlite3
import ssl
import sys
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from saltpeter import server
from saltpeter.catchup import plan_catch_up
from saltpeter.config import ConfigLoader, ConfigSnapshot, Job, Maintenance, Settings
from saltpeter.manager import RunManager, launch_targets, maintenance_targets
from saltpeter.metrics import Metrics
from saltpeter.runs import Run, SkipReason, Trigger, utcnow
from saltpeter.saltbridge import SaltBridge, parse_return_tag
from saltpeter.scheduler import Scheduler
from saltpeter.shipping import Shipper, shippers_from_settings
from saltpeter.store import RunStore, StoreError

log = logging.getLogger(__name__)

# A request to start a run: job name, what started it, and its slot (None for manual runs).
DispatchRequest = tuple[str, Trigger, datetime | None]

DEFAULT_CONFIG_DIR = "/etc/saltpeter"
REQUEST_PREFIX = "saltpeter/request/"
REPLY_PREFIX = "saltpeter/reply/"
CONFIG_POLL_SECONDS = 1.0
SWEEP_SECONDS = 1.0
PING_ROUND_SECONDS = 5.0
LOG_FILE_NAME = "saltpeter.log"
PRUNE_INTERVAL_SECONDS = 3600.0
# Jobs taken into the store and the scheduler between two turns of the event
# loop when the configuration is reloaded (a few milliseconds of work).
APPLY_SLICE = 100
# Python's switch interval while a reload loads the configuration: how long
# any thread may keep the GIL while another waits for it (Python's default
# is 5 ms). See Engine._reload.
RELOAD_SWITCH_INTERVAL = 0.0001
# Seconds between the scheduler computing next fire times and storing them.
NEXT_RUN_WRITE_DELAY = 0.2
NEXT_RUN_WRITE_BATCH = 500


@dataclass(frozen=True)
class _Prepared:
    """A run stored ahead of its slot, and what it was prepared from."""

    run: Run
    token: str
    job: Job
    maintenance: frozenset[str]


def default_store_path(opts: Mapping[str, Any]) -> Path:
    return Path(opts["cachedir"]) / "saltpeter" / "saltpeter.db"


def engine_options(opts: Mapping[str, Any]) -> dict[str, Any]:
    """Return the options given to the saltpeter engine in the master config.

    Runners use this to find the config directory and the store that the
    engine uses. ``engines`` may be a list of one-key mappings or a mapping.
    """
    engines = opts.get("engines") or []
    if isinstance(engines, Mapping):
        engines = [{name: value} for name, value in engines.items()]
    for entry in engines:
        if isinstance(entry, Mapping) and "saltpeter" in entry:
            return dict(entry["saltpeter"] or {})
        if entry == "saltpeter":
            return {}
    return {}


class Engine:
    def __init__(
        self,
        opts: dict[str, Any],
        config_dir: str = DEFAULT_CONFIG_DIR,
        store_path: str | None = None,
        settings: Mapping[str, Any] | None = None,
    ) -> None:
        self.opts = opts
        self.config_dir = Path(config_dir)
        self.store_path = Path(store_path) if store_path else default_store_path(opts)
        self.loader = ConfigLoader(self.config_dir, overrides=settings)
        self.executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=4, thread_name_prefix="saltpeter"
        )
        self.bridge = SaltBridge(opts, self.executor)
        self.jobs: dict[str, Job] = {}
        self.settings = Settings()
        self.maintenance = Maintenance()
        self.rejections: Counter[str] = Counter()
        self.metrics = Metrics()
        self._reported_errors: set[str] = set()
        self._reported_warnings: set[str] = set()
        self._ready = asyncio.Event()
        self._ping_waiters: dict[str, set[str]] = {}
        self._dispatching: set[str] = set()
        self._due: list[DispatchRequest] = []
        # Runs stored ahead of their slot, by (job, slot); see _prepare.
        self._prepared: dict[tuple[str, datetime], _Prepared] = {}
        # Preparations under way, with the slots each one prepares.
        self._preparing: dict[asyncio.Task[Any], set[tuple[str, datetime]]] = {}
        # Prepared runs to delete whose deletion failed; tried again later.
        self._undropped: list[Run] = []
        self._tasks: set[asyncio.Task[Any]] = set()
        # Next fire times not yet written to the store; see _on_next_fire.
        self._next_runs: dict[str, datetime | None] = {}
        self._log_handler: logging.Handler | None = None
        self.store: RunStore | None = None
        self.manager: RunManager | None = None
        self.scheduler: Scheduler | None = None
        self.shippers: list[Shipper] = []

    # -- lifecycle ----------------------------------------------------------

    async def run(self) -> None:
        snapshot = self.loader.load()
        self._apply_settings(snapshot, first=True)
        self.jobs = dict(snapshot.jobs)
        log.info(
            "saltpeter engine starting: %d job(s) from %s, store %s",
            len(self.jobs),
            self.config_dir,
            self.store_path,
        )
        self.store = RunStore(self.store_path, max_output_bytes=self.settings.max_output_bytes)
        self.manager = self._new_manager(self.store)
        self.manager.observers.append(self.metrics)
        self.metrics.track(
            runs_in_flight=lambda: len(self.manager.runs) if self.manager else 0,
            wrappers_connected=self._connected_wrappers,
            rejections=self.rejections,
        )
        self.shippers = shippers_from_settings(
            self.settings,
            self.store_path.parent / "spool",
            self.store.output,
            self._group_of,
        )
        for shipper in self.shippers:
            self.manager.observers.append(shipper)
            # Started in the background: a slow cluster must not delay the first dispatch.
            self._spawn(shipper.start())
        reloaded = self.manager.load_in_flight()
        if reloaded:
            log.info("%d run(s) were in flight when the engine stopped; waiting for them", reloaded)
        self.store.sync_jobs({name: job.describe() for name, job in self.jobs.items()})

        await self.bridge.start(self._on_event)
        http_server = server.listen(
            self.manager,
            self.settings.machines_ws_port,
            self.settings.machines_ws_bind_addr,
            ssl_options=tls_context(self.settings),
            rejections=self.rejections,
        )
        api_server = None
        if self.settings.api_ws:
            from saltpeter import api

            try:
                api_server = api.listen(
                    self, self.settings.api_ws_port, self.settings.api_ws_bind_addr
                )
            except (api.ApiConfigError, OSError) as exc:
                # Scheduling goes on without the API; the operator fixes the setting.
                log.error("the HTTP API is not served: %s", exc)
        self._catch_up(utcnow())
        self.scheduler = Scheduler(
            self._on_fire, on_next=self._on_next_fire, on_prepare=self._on_prepare
        )
        self.scheduler.update(self.jobs)
        _freeze_long_lived(full=True)
        try:
            await asyncio.gather(
                self.scheduler.run(),
                self._watch_config(),
                self._sweep(),
                self._wait_for_minions(),
                self._prune_history(),
            )
        finally:
            log.info("saltpeter engine stopping; runs in flight continue on the minions")
            http_server.stop()
            if api_server is not None:
                api_server.stop()
            for shipper in self.shippers:
                await shipper.close()
            await self.bridge.close()
            self.store.close()
            self.executor.shutdown(wait=False)

    def _catch_up(self, now: datetime) -> None:
        """Handle the slots that passed while the engine was down, per job policy."""
        assert self.store is not None and self.manager is not None
        latest_slots = self.store.latest_slots()
        for name, job in sorted(self.jobs.items()):
            last_slot = latest_slots.get(name)
            if last_slot is None:
                continue
            plan = plan_catch_up(job.schedule, last_slot, now, job.catch_up, job.catch_up_limit)
            if not plan.run and not plan.total_missed:
                continue
            log.warning(
                "job %s: %s%d slot(s) passed while the engine was down (after %s); "
                "catch_up %s runs %d of them",
                name,
                "at least " if plan.count_is_estimate else "",
                plan.total_missed + len(plan.run),
                last_slot.isoformat(),
                job.catch_up,
                len(plan.run),
            )
            if plan.missed_not_recorded:
                log.warning(
                    "job %s: %s%d older missed slot(s) are counted but not recorded one by one",
                    name,
                    "at least " if plan.count_is_estimate else "",
                    plan.missed_not_recorded,
                )
            for slot in plan.missed:
                self.manager.record_missed(name, slot)
            if plan.run:
                self._spawn(self._run_catch_up(name, plan.run))

    async def _run_catch_up(self, name: str, slots: list[datetime]) -> None:
        """Run missed slots one after the other, oldest first."""
        assert self.manager is not None
        for slot in slots:
            while name in self.jobs and not self.jobs[name].allow_overlap:
                if not self.manager.running(name):
                    break
                await asyncio.sleep(1.0)
            if name not in self.jobs:
                return
            await self._dispatch_logged([(name, Trigger.CATCH_UP, slot)])

    async def _prune_history(self) -> None:
        """Delete old runs now and then, so the store stays bounded."""
        loop = asyncio.get_running_loop()
        while True:
            assert self.store is not None
            cutoff = utcnow() - timedelta(days=self.settings.history_days)
            started = loop.time()
            try:
                deleted = self.store.prune(cutoff, self.settings.history_runs_per_job)
            except sqlite3.Error:
                log.exception("pruning the run history in %s failed", self.store_path)
            else:
                if deleted:
                    log.info(
                        "pruned %d run(s) older than %s or beyond %d per job in %.2f s",
                        deleted,
                        cutoff.isoformat(),
                        self.settings.history_runs_per_job,
                        loop.time() - started,
                    )
            await asyncio.sleep(PRUNE_INTERVAL_SECONDS)

    def _new_manager(self, store: RunStore) -> RunManager:
        return RunManager(
            store,
            self.bridge,
            # Looked up at call time: a reload replaces self.jobs.
            job_lookup=lambda name: self.jobs.get(name),
            launch_timeout=self.settings.launch_timeout,
            heartbeat_timeout=self.settings.heartbeat_timeout,
            kill_fallback=self._kill_through_salt,
            verify_signature=self.bridge.verify_minion_signature,
            lost_cleanup=self._clean_up_lost,
        )

    @property
    def ready(self) -> bool:
        """Whether the start-up wait for minions is over and runs are dispatched."""
        return self._ready.is_set()

    def _group_of(self, name: str) -> str | None:
        job = self.jobs.get(name)
        return job.group if job is not None else None

    def _connected_wrappers(self) -> int:
        if self.manager is None:
            return 0
        return sum(
            1
            for run in self.manager.runs.values()
            for machine in run.machines.values()
            if machine.connection is not None
        )

    def _spawn(self, coroutine: Any) -> asyncio.Task[Any]:
        task = asyncio.create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # -- configuration ------------------------------------------------------

    def _apply_settings(self, snapshot: ConfigSnapshot, first: bool = False) -> None:
        """Report configuration problems and take the settings and maintenance state."""
        errors = {str(error) for error in snapshot.errors}
        for message in sorted(errors - self._reported_errors):
            log.error("configuration: %s", message)
        for message in sorted(self._reported_errors - errors):
            log.info("configuration: resolved: %s", message)
        self._reported_errors = errors
        warnings = set(snapshot.warnings)
        for message in sorted(warnings - self._reported_warnings):
            log.warning("configuration: %s", message)
        self._reported_warnings = warnings

        previous = self.settings
        self.settings = snapshot.settings
        self.maintenance = snapshot.maintenance
        self._configure_logging()
        if not first:
            for key in ("machines_ws_port", "machines_ws_bind_addr"):
                if getattr(previous, key) != getattr(self.settings, key):
                    log.warning(
                        "configuration: %s changed; restart the salt-master to apply it", key
                    )
        if self.manager is not None:
            self.manager.launch_timeout = self.settings.launch_timeout
            self.manager.heartbeat_timeout = self.settings.heartbeat_timeout

    async def _apply_jobs(self, jobs: Mapping[str, Job]) -> None:
        """Take reloaded job definitions into the store and the scheduler.

        The work is done APPLY_SLICE jobs at a time, giving the event loop
        back between slices, so that jobs due meanwhile are dispatched on
        time even when thousands of definitions changed. Until its slice is
        reached, a job keeps its old fire time.
        """
        assert self.store is not None and self.scheduler is not None
        previous = self.jobs
        self.jobs = dict(jobs)
        removed = sorted(set(previous) - set(jobs))
        self.store.update_jobs({}, removed)
        self.scheduler.remove(removed)
        added: list[str] = []
        changed: list[str] = []
        names = list(jobs)
        for start in range(0, len(names), APPLY_SLICE):
            if start:
                await asyncio.sleep(0)
            fresh = {}
            for name in names[start : start + APPLY_SLICE]:
                old = previous.get(name)
                if old is None:
                    added.append(name)
                elif old != jobs[name]:
                    changed.append(name)
                else:
                    continue
                fresh[name] = jobs[name]
            self.store.update_jobs({name: job.describe() for name, job in fresh.items()})
            self.scheduler.put(fresh)
        for label, listed in (("added", added), ("changed", changed), ("removed", removed)):
            if listed:
                log.info("configuration: %s job(s): %s", label, ", ".join(sorted(listed)))
        _freeze_long_lived()

    def _configure_logging(self) -> None:
        package_logger = logging.getLogger("saltpeter")
        package_logger.setLevel(logging.DEBUG if self.settings.debug else logging.INFO)
        path = Path(self.settings.logdir) / LOG_FILE_NAME
        current = self._log_handler
        if isinstance(current, logging.FileHandler) and Path(current.baseFilename) == path:
            return
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            handler: logging.Handler = logging.FileHandler(path)
        except OSError as exc:
            log.warning(
                "cannot write the log file %s: %s; logging to the master log only", path, exc
            )
            return
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        if current is not None:
            package_logger.removeHandler(current)
            current.close()
        package_logger.addHandler(handler)
        self._log_handler = handler

    def _reload(self) -> ConfigSnapshot:
        """Load the configuration again; runs in the executor.

        The loader pauses the garbage collector while it builds the new
        definitions. Once re-enabled, the collector's next pass of the young
        generation would walk every object the load made: hundreds of
        thousands for 10,000 jobs, 8 ms to 120 ms with the GIL held on a
        2-core machine. Jobs due meanwhile would wait. So the collector stays
        off until those objects are frozen out of it, as
        :func:`_freeze_long_lived` does after every load.

        The load is pure Python and keeps the GIL busy. The event loop gives
        the GIL up around every SQLite call and every select, and each time
        it wants it back it waits until the loader's thread is made to drop
        it: the switch interval, 5 ms by default. A store method with a
        dozen such calls then takes a tenth of a second, and the jobs due
        meanwhile wait. So the interval is shortened while the load runs.
        """
        was_enabled = gc.isenabled()
        switch_interval = sys.getswitchinterval()
        gc.disable()
        sys.setswitchinterval(min(switch_interval, RELOAD_SWITCH_INTERVAL))
        try:
            return self.loader.load()
        finally:
            sys.setswitchinterval(switch_interval)
            gc.freeze()
            if was_enabled:
                gc.enable()

    async def _watch_config(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(CONFIG_POLL_SECONDS)
            try:
                if not await loop.run_in_executor(self.executor, self.loader.changed):
                    continue
                snapshot = await loop.run_in_executor(self.executor, self._reload)
            except Exception:
                log.exception("configuration: reloading %s failed", self.config_dir)
                continue
            self._apply_settings(snapshot)
            await self._apply_jobs(snapshot.jobs)

    # -- scheduling and dispatch --------------------------------------------

    def _on_next_fire(self, name: str, fire_at: datetime | None) -> None:
        # Stored a moment later and in batches, so that the jobs due at one
        # instant are dispatched first and do not wait for the write.
        if not self._next_runs:
            asyncio.get_running_loop().call_later(NEXT_RUN_WRITE_DELAY, self._write_next_runs)
        self._next_runs[name] = fire_at

    def _write_next_runs(self) -> None:
        # At most NEXT_RUN_WRITE_BATCH rows per turn of the loop: after a reload
        # of thousands of jobs, one transaction for all of them would hold up
        # the jobs due meanwhile.
        pending = self._next_runs
        batch = {name: pending[name] for name in itertools.islice(pending, NEXT_RUN_WRITE_BATCH)}
        for name in batch:
            del pending[name]
        if pending:
            asyncio.get_running_loop().call_soon(self._write_next_runs)
        if self.store is None:
            return
        try:
            self.store.set_next_runs(batch)
        except sqlite3.Error:
            log.exception("storing the next fire times of %d job(s) failed", len(batch))

    def _on_fire(self, name: str, scheduled_at: datetime) -> None:
        # The scheduler fires all the slots due at one instant in one go. They
        # are collected here and dispatched as one batch, so a second with a
        # thousand due jobs costs one store transaction instead of a thousand.
        if not self._due:
            asyncio.get_running_loop().call_soon(self._dispatch_due)
        self._due.append((name, Trigger.SCHEDULE, scheduled_at))

    def _on_prepare(self, slots: list[tuple[str, datetime]]) -> None:
        # Slots another preparation is still working on are left to it.
        busy = set().union(*self._preparing.values()) if self._preparing else set()
        slots = [slot for slot in slots if slot not in busy and slot not in self._prepared]
        if not slots:
            return
        task = self._spawn(self._prepare_logged(slots))
        self._preparing[task] = set(slots)
        task.add_done_callback(self._preparing.pop)

    async def _prepare_logged(self, slots: list[tuple[str, datetime]]) -> None:
        try:
            await self._prepare(slots)
        except Exception:
            # The slots are dispatched at their instant all the same, without
            # the preparation.
            log.exception("preparing the runs of %d slot(s) failed", len(slots))

    async def _prepare(self, slots: list[tuple[str, datetime]]) -> None:
        """Build and store the runs of scheduled slots ahead of their instant.

        Checking the slots, resolving targets, making ids and tokens and
        inserting the rows take about 23 us per run (measured in one process
        for 1,000 runs), which would otherwise delay every launch of a large
        batch. At the instant, dispatch_many checks maintenance and overlap
        again, marks the prepared runs as running in one write, and publishes
        them. A run prepared from a job definition or a maintenance list that
        changed since is dropped and made again at the instant.
        """
        await self._ready.wait()
        assert self.manager is not None and self.store is not None
        if self.maintenance.global_:
            return
        due = [(job, slot) for name, slot in slots if (job := self.jobs.get(name)) is not None]
        stored = self.store.slots_taken((job.name, slot) for job, slot in due)
        due = [(job, slot) for job, slot in due if (job.name, slot) not in stored]
        if not due:
            return
        matches = await self._match([job for job, _ in due])
        maintenance = self.maintenance.machines
        run_ids = self.manager.new_run_ids((job.name, slot) for job, slot in due)
        tokens: dict[str, tuple[str, Job]] = {}
        runs: list[Run] = []
        for (job, slot), matched, run_id in zip(due, matches, run_ids, strict=True):
            targets = [m for m in matched if m not in maintenance]
            if not targets:
                continue  # the skip is recorded at the instant
            run, token = self.manager.new_run(
                run_id,
                job,
                Trigger.SCHEDULE,
                slot,
                targets,
                [m for m in matched if m in maintenance],
                self.bridge.new_jid(),
            )
            runs.append(run)
            tokens[run_id] = (token, job)
        for run in self.manager.prepare_runs(runs):
            assert run.scheduled_at is not None
            token, job = tokens[run.run_id]
            self._prepared[run.job_name, run.scheduled_at] = _Prepared(run, token, job, maintenance)
        log.debug("prepared %d run(s) of %d slot(s)", len(runs), len(slots))

    def _claim_prepared(self, requests: list[DispatchRequest]) -> dict[int, _Prepared]:
        """Return the prepared runs of ``requests`` that are still valid, by request index.

        A prepared run is dropped instead when it was made from an older job
        definition or maintenance list. So is a prepared run whose slot is
        not in ``requests`` but no later than the latest slot in them: its
        job was removed or rescheduled.
        """
        claimed: dict[int, _Prepared] = {}
        if not self._prepared:
            return claimed
        stale: list[Run] = []
        latest: datetime | None = None
        for index, (name, trigger, slot) in enumerate(requests):
            if slot is None or trigger is not Trigger.SCHEDULE:
                continue
            latest = slot if latest is None else max(latest, slot)
            entry = self._prepared.pop((name, slot), None)
            if entry is None:
                continue
            job = self.jobs.get(name)
            # Identity first: comparing two definitions field by field costs
            # microseconds, paid per run at the instant.
            if (entry.job is job or entry.job == job) and (
                entry.maintenance is self.maintenance.machines
                or entry.maintenance == self.maintenance.machines
            ):
                claimed[index] = entry
            else:
                stale.append(entry.run)
        if latest is not None:
            for key in [key for key in self._prepared if key[1] <= latest]:
                stale.append(self._prepared.pop(key).run)
        self._drop_prepared(stale)
        return claimed

    def _drop_prepared(self, runs: list[Run]) -> None:
        """Delete prepared runs that will not start, with those a failed deletion left.

        If the deletion fails, the runs are kept for the next call (the sweep
        makes one every second). Until they are deleted, their slots stay taken.
        """
        runs, self._undropped = self._undropped + runs, []
        if not runs:
            return
        assert self.manager is not None
        try:
            self.manager.discard_prepared(runs)
        except sqlite3.Error as exc:
            log.error(
                "deleting %d prepared run(s) failed, trying again within a second: %s (runs %s)",
                len(runs),
                exc,
                ", ".join(run.run_id for run in runs),
            )
            self._undropped.extend(runs)

    def _drop_expired_prepared(self) -> None:
        """Delete prepared runs whose slot passed over a second ago without a dispatch.

        That happens when their job was removed or rescheduled after the
        preparation and no other scheduled slot came due since.
        """
        if not self._prepared and not self._undropped:
            return
        cutoff = utcnow() - timedelta(seconds=1)
        expired = [key for key in self._prepared if key[1] < cutoff]
        self._drop_prepared([self._prepared.pop(key).run for key in expired])

    def _dispatch_due(self) -> None:
        due, self._due = self._due, []
        self._spawn(self._dispatch_logged(due))

    async def _dispatch_logged(self, requests: list[DispatchRequest]) -> None:
        """Dispatch slots, logging a failure instead of losing it in a task."""
        try:
            await self.dispatch_many(requests)
        except Exception:
            log.exception(
                "dispatching %s failed",
                ", ".join(
                    f"job {name} slot {scheduled_at.isoformat() if scheduled_at else 'manual'}"
                    for name, _, scheduled_at in requests
                ),
            )

    async def _wait_for_minions(self) -> None:
        """Hold the first dispatch until every accepted minion returns a ping.

        Engines start before minions reconnect to a restarted master, and a
        publish sent then reaches only some of them. The wait ends after
        ``startup_wait`` seconds whether or not every minion returned.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.startup_wait
        accepted = await self.bridge.accepted_minions()
        pending = set(accepted)
        while pending and loop.time() < deadline:
            jid = self.bridge.new_jid()
            self._ping_waiters[jid] = pending
            try:
                await self.bridge.publish(sorted(pending), "test.ping", [], jid=jid)
            except Exception as exc:
                log.debug("startup ping failed: %s", exc)
            round_end = min(deadline, loop.time() + PING_ROUND_SECONDS)
            while pending and loop.time() < round_end:
                await asyncio.sleep(0.1)
            self._ping_waiters.pop(jid, None)
        answered = len(accepted) - len(pending)
        if pending:
            log.warning(
                "%d of %d accepted minion(s) returned the ping within %g s; dispatching anyway "
                "(no return from: %s)",
                answered,
                len(accepted),
                self.settings.startup_wait,
                ", ".join(sorted(pending)),
            )
        else:
            log.info("%d accepted minion(s) returned the ping; dispatching", answered)
        self._ready.set()
        # The task must not end: gather() in run() would then stop waiting on it,
        # which is harmless, but keeping all four tasks alive keeps run() simple.
        await asyncio.Event().wait()

    async def dispatch(
        self, name: str, trigger: Trigger, scheduled_at: datetime | None
    ) -> dict[str, Any]:
        """Start a run of job ``name`` unless maintenance or overlap rules skip it.

        Returns ``started`` and either the run id and targets or the skip reason.
        """
        return (await self.dispatch_many([(name, trigger, scheduled_at)]))[0]

    async def dispatch_many(self, requests: list[DispatchRequest]) -> list[dict[str, Any]]:
        """Start a run for each (job, trigger, slot), as :meth:`dispatch` does for one.

        Everything before the publish is done for all requests together:
        the slot check, target resolution (once per distinct target), and
        storing the new runs in one transaction. Then each launch is handed
        to Salt. This returns once Salt has accepted or rejected every publish.
        """
        await self._ready.wait()
        assert self.manager is not None and self.store is not None
        manager = self.manager
        if self._preparing:
            slots = {(name, slot) for name, _, slot in requests if slot is not None}
            preparing = [task for task, prepares in self._preparing.items() if prepares & slots]
            if preparing:
                await asyncio.wait(preparing)
        prepared = self._claim_prepared(requests)
        results: list[dict[str, Any]] = [{} for _ in requests]
        taken = self.store.slots_taken(
            (name, scheduled_at)
            for index, (name, _, scheduled_at) in enumerate(requests)
            if scheduled_at is not None and index not in prepared
        )
        busy = {run.job_name for run in manager.runs.values()} | self._dispatching
        accepted: list[tuple[int, Job, Trigger, datetime | None]] = []
        ready: list[tuple[int, _Prepared]] = []
        for index, (name, trigger, scheduled_at) in enumerate(requests):
            job = self.jobs.get(name)
            entry = prepared.get(index)
            if entry is not None and (
                self.maintenance.global_ or (not job.allow_overlap and name in busy)
            ):
                # The slot is skipped: its prepared row makes room for the skip's record.
                self._drop_prepared([entry.run])
                entry = None
            if job is None:
                results[index] = {"started": False, "reason": "unknown_job"}
            elif scheduled_at is not None and (name, scheduled_at) in taken:
                log.warning("job %s: the %s slot already has a run", name, scheduled_at.isoformat())
                results[index] = {"started": False, "reason": "slot_taken"}
            elif self.maintenance.global_:
                manager.record_skip(name, trigger, scheduled_at, SkipReason.MAINTENANCE)
                results[index] = {"started": False, "reason": SkipReason.MAINTENANCE.value}
            elif not job.allow_overlap and name in busy:
                manager.record_skip(name, trigger, scheduled_at, SkipReason.OVERLAP)
                running = [run.run_id for run in manager.running(name)]
                results[index] = {
                    "started": False,
                    "reason": SkipReason.OVERLAP.value,
                    "running": running,
                }
            elif entry is not None:
                busy.add(name)
                ready.append((index, entry))
            else:
                busy.add(name)
                accepted.append((index, job, trigger, scheduled_at))
        claimed = {job.name for _, job, _, _ in accepted}
        claimed.update(entry.run.job_name for _, entry in ready)
        self._dispatching |= claimed
        try:
            launches = self._activate(ready, results, accepted)
            launches += await self._start_runs(accepted, results)
        finally:
            self._dispatching -= claimed
        await asyncio.gather(*(self._publish_launch(run, token) for run, token in launches))
        return results

    def _activate(
        self,
        ready: list[tuple[int, _Prepared]],
        results: list[dict[str, Any]],
        accepted: list[tuple[int, Job, Trigger, datetime | None]],
    ) -> list[tuple[Run, str]]:
        """Start the prepared runs of ``ready`` and fill in their results.

        If the store fails to mark them running, they are dropped and added
        to ``accepted``, to be made again as runs that were not prepared.
        """
        if not ready:
            return []
        assert self.manager is not None
        runs = [entry.run for _, entry in ready]
        try:
            self.manager.activate_runs(runs)
        except (StoreError, sqlite3.Error) as exc:
            log.error(
                "starting %d prepared run(s) failed; making them again: %s (runs %s)",
                len(runs),
                exc,
                ", ".join(run.run_id for run in runs),
            )
            self._drop_prepared(runs)
            for index, entry in ready:
                accepted.append((index, entry.job, Trigger.SCHEDULE, entry.run.scheduled_at))
            return []
        launches = []
        for index, entry in ready:
            run = entry.run
            results[index] = _started(run)
            launches.append((run, entry.token))
        return launches

    async def _start_runs(
        self,
        accepted: list[tuple[int, Job, Trigger, datetime | None]],
        results: list[dict[str, Any]],
    ) -> list[tuple[Run, str]]:
        """Resolve targets and store the runs of ``accepted``; fill in their results."""
        assert self.manager is not None
        manager = self.manager
        matches = await self._match([job for _, job, _, _ in accepted])
        now = utcnow()
        run_ids = manager.new_run_ids(
            (job.name, scheduled_at or now) for _, job, _, scheduled_at in accepted
        )
        made: dict[str, tuple[int, str]] = {}
        runs: list[Run] = []
        for (index, job, trigger, scheduled_at), matched, run_id in zip(
            accepted, matches, run_ids, strict=True
        ):
            under_maintenance = [m for m in matched if m in self.maintenance.machines]
            targets = [m for m in matched if m not in self.maintenance.machines]
            if not targets:
                reason = SkipReason.MAINTENANCE if under_maintenance else SkipReason.NO_TARGETS
                manager.record_skip(job.name, trigger, scheduled_at, reason)
                results[index] = {"started": False, "reason": reason.value}
                continue
            run, token = manager.new_run(
                run_id,
                job,
                trigger,
                scheduled_at,
                targets,
                under_maintenance,
                self.bridge.new_jid(),
            )
            runs.append(run)
            made[run.run_id] = (index, token)
            results[index] = {"started": False, "reason": "slot_taken"}
        launches = []
        for run in manager.start_runs(runs):
            index, token = made[run.run_id]
            results[index] = _started(run)
            launches.append((run, token))
        return launches

    async def _match(self, jobs: list[Job]) -> list[list[str]]:
        """Return the minions each of ``jobs`` targets, one resolution per distinct target."""
        by_target: dict[tuple[str, str], list[str]] = {}
        for job in jobs:
            by_target.setdefault((job.targets, job.target_type), []).append(job.name)
        found = await asyncio.gather(
            *(self._resolve(key, names) for key, names in by_target.items())
        )
        resolved = dict(zip(by_target, found, strict=True))
        return [resolved[job.targets, job.target_type] for job in jobs]

    async def _resolve(self, key: tuple[str, str], jobs: list[str]) -> list[str]:
        """Return the minions that target ``key`` (targets, type) of ``jobs`` matches."""
        targets, target_type = key
        try:
            return await self.bridge.resolve_targets(targets, target_type)
        except Exception as exc:
            log.error(
                "job %s: resolving targets %r (%s) failed: %s",
                ", ".join(jobs),
                targets,
                target_type,
                exc,
            )
            return []

    async def _publish_launch(self, run: Run, token: str) -> None:
        """Hand a stored run's launch to Salt; record 255 on its minions if that fails."""
        assert self.manager is not None and run.job is not None
        job = run.job
        targets = launch_targets(run)
        kwarg = {
            "wrapper_path": job.wrapper_path or self.settings.default_wrapper_path,
            "loglevel": job.wrapper_loglevel or self.settings.default_wrapper_loglevel,
            "logdir": job.wrapper_logdir or self.settings.default_wrapper_logdir,
        }
        if self.settings.machines_ws_cafile:
            # Only when set, so minions with an older execution module still launch.
            kwarg["cafile"] = self.settings.machines_ws_cafile
        if run.scheduled_at is not None:
            # Lateness is measured when the launch is handed to Salt, so it
            # covers the scheduler, target resolution and storing the run,
            # but not the publish.
            lateness = (utcnow() - run.scheduled_at).total_seconds()
            self.metrics.dispatch_lateness.observe(max(0.0, lateness))
        try:
            await self.bridge.publish(
                targets,
                "saltpeter.launch",
                [run.run_id, job.name, self.settings.wrapper_url(), token],
                kwarg=kwarg,
                jid=run.jid or "",
            )
        except Exception as exc:
            log.error("job %s run %s: publishing the launch failed: %s", job.name, run.run_id, exc)
            self.manager.publish_failed(run, str(exc))
            return
        log.info(
            "job %s run %s: launched on %d minion(s): %s (Salt job %s)",
            job.name,
            run.run_id,
            len(targets),
            ", ".join(targets),
            run.jid,
        )

    def _kill_through_salt(self, run: Run, minions: list[str]) -> None:
        """Ask the execution module to kill runs whose wrapper is not connected."""
        self._spawn(self._publish_kill_local(run, minions, orphaned_only=False))

    def _clean_up_lost(self, run: Run, minions: list[str]) -> None:
        """Stop what a dead wrapper left behind on minions recorded as lost.

        A wrapper that is only cut off still runs and enforces the timeout, so
        the execution module leaves it alone (``orphaned_only``).
        """
        self._spawn(self._publish_kill_local(run, minions, orphaned_only=True))

    async def _publish_kill_local(self, run: Run, minions: list[str], orphaned_only: bool) -> None:
        job = run.job or self.jobs.get(run.job_name)
        wrapper_path = (job.wrapper_path if job else None) or self.settings.default_wrapper_path
        kwarg: dict[str, Any] = {"wrapper_path": wrapper_path}
        if orphaned_only:
            kwarg["orphaned_only"] = True
        try:
            await self.bridge.publish(minions, "saltpeter.kill_local", [run.run_id], kwarg=kwarg)
            log.info(
                "job %s run %s: %s sent through Salt to %s",
                run.job_name,
                run.run_id,
                "clean-up of orphaned processes" if orphaned_only else "kill",
                ", ".join(minions),
            )
        except Exception as exc:
            log.error(
                "job %s run %s: kill_local through Salt failed: %s", run.job_name, run.run_id, exc
            )

    async def _sweep(self) -> None:
        assert self.manager is not None
        while True:
            await asyncio.sleep(SWEEP_SECONDS)
            try:
                self.manager.sweep()
                self._drop_expired_prepared()
            except Exception:
                log.exception("sweeping runs in flight failed")

    # -- the event bus ------------------------------------------------------

    async def _on_event(self, tag: str, data: dict[str, Any]) -> None:
        if tag.startswith("salt/job/"):
            parsed = parse_return_tag(tag)
            if parsed is None:
                return
            jid, minion = parsed
            waiting = self._ping_waiters.get(jid)
            if waiting is not None:
                waiting.discard(minion)
            elif self.manager is not None:
                self.manager.on_launch_return(jid, minion, data)
        elif tag.startswith(REQUEST_PREFIX):
            await self._on_request(tag[len(REQUEST_PREFIX) :], data)

    async def _on_request(self, kind: str, data: dict[str, Any]) -> None:
        request_id = str(data.get("request_id", ""))
        if not request_id or "/" in request_id:
            log.warning("request %s without a valid request_id; ignored", kind)
            return
        try:
            result = await self._handle_request(kind, data)
            reply: dict[str, Any] = {"ok": True, "result": result}
        except RequestError as exc:
            reply = {"ok": False, "error": str(exc)}
        except Exception as exc:
            log.exception("request %s %s failed", kind, request_id)
            reply = {"ok": False, "error": f"the engine failed to handle the request: {exc}"}
        self.bridge.fire(REPLY_PREFIX + request_id, reply)

    async def _handle_request(self, kind: str, data: dict[str, Any]) -> Any:
        if kind == "kill":
            return self.kill_job(data.get("job"))
        if kind == "run":
            return await self.run_job(data.get("job"))
        if kind == "ping":
            return {"jobs": len(self.jobs), "ready": self._ready.is_set()}
        raise RequestError(f"unknown request '{kind}'")

    def _require_job(self, name: object) -> str:
        if not isinstance(name, str) or name not in self.jobs:
            raise UnknownJobError(unknown_job_message(name, self.jobs))
        return name

    def kill_job(self, name: object) -> dict[str, Any]:
        """Stop every run of a job in flight; raise RequestError if there is none."""
        job = self._require_job(name)
        assert self.manager is not None
        signalled = self.manager.kill(job)
        if not signalled:
            raise NothingRunningError(f"job '{job}' has no run in flight")
        return {"job": job, "signalled": signalled}

    async def run_job(self, name: object) -> dict[str, Any]:
        """Start a run of a job now; the result says whether it started or why not."""
        job = self._require_job(name)
        log.info("job %s: run requested now", job)
        return await self.dispatch(job, Trigger.MANUAL, None)


def _started(run: Run) -> dict[str, Any]:
    return {
        "started": True,
        "run_id": run.run_id,
        "targets": launch_targets(run),
        "maintenance": maintenance_targets(run),
    }


class RequestError(Exception):
    """A request that the engine rejects, with the reason for the operator."""


class UnknownJobError(RequestError):
    """The request names a job that no job file defines."""


class NothingRunningError(RequestError):
    """A kill request for a job with no run in flight."""


def _freeze_long_lived(full: bool = False) -> None:
    """Leave the objects alive now out of Python's cyclic garbage collection.

    They are mostly the job definitions and the modules of Salt and Tornado,
    which live as long as the process. A full collection walks every tracked
    object: with 10,000 jobs that is about 50 ms on the event loop, at
    whichever allocation triggers it, such as in the middle of dispatching
    the jobs due in one second. Frozen objects are still freed when nothing
    refers to them any more, but reference cycles among them stay.

    With ``full`` the garbage is collected first, at start-up. After a
    reload it is not, because even a young-generation pass then walks every
    object the load made (about 45 ms with 10,000 jobs) and would delay the
    jobs due meanwhile. A collection after loading 10,000 valid jobs found no
    unreachable cycles, so usually nothing is kept that a pass would free.
    NOTE: errors with tracebacks from invalid files can form cycles, and
    those stay until the engine restarts. The engine runs in a process of
    its own, so this touches nothing else.
    """
    if full:
        gc.collect()
    gc.freeze()


def unknown_job_message(name: object, jobs: Mapping[str, object]) -> str:
    known = sorted(jobs)
    listing = ", ".join(known[:20]) + (f" and {len(known) - 20} more" if len(known) > 20 else "")
    return f"unknown job {name!r}; known jobs: {listing or 'none'}"


def tls_context(settings: Settings) -> ssl.SSLContext | None:
    """Return the TLS context of the machines WebSocket, or None for plain ws://.

    Raises ValueError when only one of the certificate and key is set, because
    serving plain ws:// then would silently drop the TLS the operator asked for.
    """
    certfile, keyfile = settings.machines_ws_certfile, settings.machines_ws_keyfile
    if not certfile and not keyfile:
        return None
    if not certfile or not keyfile:
        missing = "machines_ws_keyfile" if certfile else "machines_ws_certfile"
        raise ValueError(f"TLS for the machines WebSocket needs both files; set {missing} too")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(certfile, keyfile)
    return context


def run_engine(
    opts: dict[str, Any],
    config_dir: str = DEFAULT_CONFIG_DIR,
    store_path: str | None = None,
    settings: Mapping[str, Any] | None = None,
) -> None:
    """Run the engine until the process is stopped."""
    log.info("saltpeter engine process %d starting", os.getpid())
    engine = Engine(opts, config_dir=config_dir, store_path=store_path, settings=settings)
    # A fresh loop every time: an engine that Salt restarted must not touch a
    # loop object left over from before the fork.
    asyncio.run(engine.run())
