"""The run store: jobs, runs, per-minion results and output in SQLite.

The engine is the only writer. Runners open the same file read-only from
their own processes, which SQLite's write-ahead log allows while the engine
writes. Timestamps are stored as ISO 8601 strings in UTC.

Output kept per minion and run is capped at ``max_output_bytes`` (UTF-8
bytes): the first half is kept as it arrived, and after that only the most
recent half, so the start and the end of a long output both survive. The
read side marks the cut with how many bytes were dropped. The engine sends
each wrapper the cap. Past the first half, a wrapper may leave out output
that it could not send in time, and that output counts as dropped too.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from saltpeter.runs import (
    MachineRun,
    MachineState,
    Reason,
    Run,
    RunStatus,
    SkipReason,
    Trigger,
    isoformat,
)

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1

# The engine's connection does not checkpoint the write-ahead log itself: by
# default SQLite copies the log into the database, with two fsyncs, inside
# whichever commit takes the log past 1,000 pages, and that stalls the event
# loop. A thread of the store checkpoints instead, with its own connection,
# every CHECKPOINT_SECONDS; a pass with nothing to copy costs microseconds.
CHECKPOINT_SECONDS = 0.25
# Once the log is this large, it is copied to its end and starts over
# (see _Checkpointer._checkpoint).
WAL_SIZE_LIMIT_BYTES = 64 * 1024 * 1024
# When the log starts over, its file is truncated to this size, so one burst
# of output does not leave a large file behind. It is well above the size at
# which the log starts over: a file that keeps its blocks costs no truncation
# on the event loop, and its syncs allocate no new blocks.
WAL_TRUNCATE_BYTES = 4 * WAL_SIZE_LIMIT_BYTES
# While the log is past WAL_SIZE_LIMIT_BYTES and growing, the thread
# checkpoints every CATCH_UP_SECONDS. Once a pass had at most CATCH_UP_FRAMES
# to copy, or after CATCH_UP_PASSES passes, it requests the engine's
# connection to copy the frames written since, on the event loop.
CATCH_UP_SECONDS = 0.005
CATCH_UP_FRAMES = 256
CATCH_UP_PASSES = 40
# How long the thread leaves the checkpoint lock to the engine's connection
# after such a request. An engine that writes nothing meanwhile needs no
# copy, so the thread then goes on.
CATCH_UP_WAIT_SECONDS = 1.0
# The write-ahead log's layout: a file header, then per page a frame header
# and the page (https://www.sqlite.org/fileformat.html, "WAL File Format").
_WAL_HEADER_BYTES = 32
_WAL_FRAME_HEADER_BYTES = 24
# Values bound in one IN (...) query, well under SQLite's limit of 32,766.
_QUERY_CHUNK = 500
# The status of a run stored ahead of its instant (insert_runs with
# prepared=True). Reads leave such rows out, and activate_runs makes them
# running runs. A prepared run is never published, so an engine that finds
# one when it opens the store drops it.
PREPARED = "prepared"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS jobs (
    name TEXT PRIMARY KEY,
    definition TEXT NOT NULL,
    next_run TEXT,
    last_run TEXT,
    last_run_id TEXT
);
CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT PRIMARY KEY,
    job TEXT NOT NULL,
    trigger TEXT NOT NULL,
    scheduled_at TEXT,
    started_at TEXT NOT NULL,
    ended_at TEXT,
    status TEXT NOT NULL,
    skip_reason TEXT,
    token_hash TEXT,
    jid TEXT,
    timeout INTEGER,
    targets TEXT NOT NULL DEFAULT '[]',
    maintenance TEXT NOT NULL DEFAULT '[]',
    UNIQUE (job, scheduled_at)
);
CREATE INDEX IF NOT EXISTS runs_by_job ON runs (job, started_at);
CREATE INDEX IF NOT EXISTS runs_by_status ON runs (status);
CREATE TABLE IF NOT EXISTS results (
    run_id TEXT NOT NULL,
    machine TEXT NOT NULL,
    state TEXT NOT NULL,
    retcode INTEGER,
    reason TEXT,
    started_at TEXT,
    ended_at TEXT,
    pid INTEGER,
    last_seq INTEGER NOT NULL DEFAULT 0,
    head_bytes INTEGER NOT NULL DEFAULT 0,
    tail_bytes INTEGER NOT NULL DEFAULT 0,
    dropped_bytes INTEGER NOT NULL DEFAULT 0,
    late_retcode INTEGER,
    late_reason TEXT,
    late_ended_at TEXT,
    PRIMARY KEY (run_id, machine)
);
CREATE TABLE IF NOT EXISTS output (
    id INTEGER PRIMARY KEY,
    run_id TEXT NOT NULL,
    machine TEXT NOT NULL,
    part TEXT NOT NULL,
    data TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS output_by_machine ON output (run_id, machine, id);
"""


# A write's callback after its commit, and the one called if it is lost.
_Waiting = tuple[Callable[[], None], Callable[[], None] | None]


class StoreError(Exception):
    pass


@dataclass
class _OutputCounters:
    head: int
    tail: int
    dropped: int


@dataclass(frozen=True)
class JobRow:
    name: str
    definition: dict[str, Any]
    next_run: str | None
    last_run: str | None
    last_run_id: str | None


def _utf8_len(text: str) -> int:
    return len(text.encode("utf-8"))


def _split_at_bytes(text: str, limit: int) -> tuple[str, str]:
    """Split ``text`` so the first part is at most ``limit`` UTF-8 bytes."""
    head = text.encode("utf-8")[:limit].decode("utf-8", "ignore")
    return head, text[len(head) :]


def _drop_front_bytes(text: str, count: int) -> str:
    """Drop at least ``count`` UTF-8 bytes from the front of ``text``."""
    return text.encode("utf-8")[count:].decode("utf-8", "ignore")


class _Checkpointer:
    """Checkpoints a database's write-ahead log from a thread of its own."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._page_size = 0
        # End of the log's bytes already dropped from the page cache.
        self._dropped_end = 0
        # Set by this thread once it has copied a log past its size limit to
        # the end. The engine's connection then copies the few frames written
        # since, so that its next write starts the log over.
        self.catch_up_requested = False
        # Frames copied as of the previous pass, and passes in a row that
        # found the log past its limit.
        self._copied = 0
        self._large_passes = 0
        self._requested_at = 0.0
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="saltpeter-checkpoint", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        db = sqlite3.connect(self._path, timeout=10, isolation_level=None)
        try:
            pause = CHECKPOINT_SECONDS
            while not self._stopping.wait(pause):
                waited = time.monotonic() - self._requested_at
                if self.catch_up_requested and waited < CATCH_UP_WAIT_SECONDS:
                    # A pass here would hold the checkpoint lock the engine's
                    # connection needs for its own.
                    pause = CATCH_UP_SECONDS
                    continue
                self.catch_up_requested = False
                pause = CATCH_UP_SECONDS if self._checkpoint(db) else CHECKPOINT_SECONDS
            self._checkpoint(db)
        finally:
            db.close()

    def _checkpoint(self, db: sqlite3.Connection) -> bool:
        """Copy the log's frames into the database.

        Returns True while the log is past its limit and still growing, when
        the next pass should come soon.

        The log can start over only at a write that begins while every frame in
        it is copied. The engine writes without pause while output streams in,
        so this thread never catches up alone, and the log would grow without
        bound. Once a pass has copied a large log to its end, the engine's
        connection copies the rest between two of its writes
        (RunStore.catch_up_log).
        """
        try:
            # PASSIVE never blocks the engine's writes; frames it cannot copy
            # yet are copied by a later pass.
            row = db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
            if not self._page_size:
                self._page_size = db.execute("PRAGMA page_size").fetchone()[0]
        except sqlite3.Error as exc:
            log.warning("checkpointing the run store %s failed: %s", self._path, exc)
            return False
        busy, frames, copied = row if row else (1, -1, -1)
        if frames < 0:
            # Another connection was checkpointing (the engine's own, see
            # RunStore.catch_up_log); this pass copied nothing, and the next
            # one comes at the usual pace.
            return False
        frame_bytes = self._page_size + _WAL_FRAME_HEADER_BYTES
        if copied > 0:
            self._drop_copied_from_cache(copied * frame_bytes)
        # The count of copied frames goes back to 0 when the log starts over.
        copied_now = copied - self._copied if copied >= self._copied else copied
        self._copied = copied
        large = frames * frame_bytes > WAL_SIZE_LIMIT_BYTES
        self._large_passes = self._large_passes + 1 if large else 0
        few_left = copied_now <= CATCH_UP_FRAMES or self._large_passes >= CATCH_UP_PASSES
        # A log that stopped growing starts over at the engine's next write
        # without help, however long that takes to come.
        growing = copied_now > 0
        if large and growing and not busy and copied == frames and few_left:
            self._requested_at = time.monotonic()
            self.catch_up_requested = True
        return large and growing

    def _drop_copied_from_cache(self, frame_bytes: int) -> None:
        """Drop the log's copied frames past its truncation size from the page cache.

        Once the log is fully copied, the engine's next commit starts it over
        and truncates a file larger than WAL_TRUNCATE_BYTES, on the event
        loop. A log that a long reader kept from starting over can reach a
        gigabyte, and freeing its cached pages in that truncation took a
        quarter of a second (0.12 s of it CPU in the kernel). The frames copied
        so far were synced by the checkpoint, so dropping them here costs this
        thread alone and leaves the truncation little to free. The bytes below
        the truncation size stay cached, because the log starts over on them
        and a frame written over a page that is not cached would have to read
        it from the disk first.
        """
        end = _WAL_HEADER_BYTES + frame_bytes
        if end < self._dropped_end:
            self._dropped_end = 0  # the log has started over
        start = max(WAL_TRUNCATE_BYTES, self._dropped_end)
        if end <= start or not hasattr(os, "posix_fadvise"):
            return
        try:
            descriptor = os.open(f"{self._path}-wal", os.O_RDONLY)
        except OSError:
            return  # the log was removed or truncated meanwhile
        try:
            os.posix_fadvise(descriptor, start, end - start, os.POSIX_FADV_DONTNEED)
            self._dropped_end = end
        except OSError as exc:
            log.debug("cannot drop the run store's copied log from the cache: %s", exc)
        finally:
            os.close(descriptor)

    def stop(self) -> None:
        self._stopping.set()
        self._thread.join(timeout=30)


class RunStore:
    """SQLite persistence for jobs, runs, results and output."""

    def __init__(self, path: Path, max_output_bytes: int = 1048576, readonly: bool = False) -> None:
        self.path = Path(path)
        self.max_output_bytes = max_output_bytes
        self.readonly = readonly
        self._counters: dict[tuple[str, str], _OutputCounters] = {}
        # While a batch is open: for each write in it, what to call once it is
        # committed, and what to call if the batch is lost instead.
        self._batch: list[_Waiting] | None = None
        self._checkpointer: _Checkpointer | None = None
        if readonly:
            if not self.path.exists():
                raise StoreError(
                    f"run store {self.path} does not exist; the saltpeter engine creates it "
                    "when it starts (is it listed under engines: in the master config?)"
                )
            self._db = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, timeout=10)
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            self._db = sqlite3.connect(self.path, timeout=10, isolation_level=None)
            # Takes effect only when the file is created; prune() then returns
            # freed pages to the file system, so the file shrinks with history.
            self._db.execute("PRAGMA auto_vacuum=INCREMENTAL")
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(_SCHEMA)
            self._db.execute(
                "INSERT OR IGNORE INTO meta (key, value) VALUES ('schema_version', ?)",
                (str(SCHEMA_VERSION),),
            )
            self.path.chmod(0o600)
            self._db.execute("PRAGMA wal_autocheckpoint=0")
            self._db.execute(f"PRAGMA journal_size_limit={WAL_TRUNCATE_BYTES}")
            self._checkpointer = _Checkpointer(self.path)
            dropped = self.drop_prepared()
            if dropped:
                log.info(
                    "run store %s: dropped %d run(s) prepared before the engine stopped",
                    self.path,
                    dropped,
                )
        self._db.row_factory = sqlite3.Row

    def close(self) -> None:
        if self._checkpointer is not None:
            self.commit_batch()
            self._checkpointer.stop()
        self._db.close()

    # -- write batches ------------------------------------------------------

    def begin_batch(self) -> bool:
        """Hold the writes that follow in one transaction until commit_batch().

        One commit per batch instead of one per write: the engine opens a batch
        for the wrapper frames of one pass of its event loop and acknowledges
        them after the commit (after_commit). Writes that must be stored
        before the engine acts on them (new runs, before their publish) commit
        the open batch first. Returns True if this call opened the batch, so
        the caller arranges its commit, and False if one was open already.
        """
        if self._batch is not None:
            return False
        self._db.execute("BEGIN")
        self._batch = []
        return True

    def after_commit(
        self, callback: Callable[[], None], on_lost: Callable[[], None] | None = None
    ) -> None:
        """Call ``callback`` once what was written so far is committed.

        If the open batch is lost instead (fail_batch, or a failed commit),
        ``on_lost`` is called, because the writes made so far are not in the store.
        """
        if self._batch is None:
            callback()
        else:
            self._batch.append((callback, on_lost))

    def commit_batch(self) -> None:
        """Commit the open batch, if any, and call what waited for it."""
        pending = self._batch
        if pending is None:
            return
        self._batch = None
        try:
            self._db.execute("COMMIT")
        except sqlite3.Error as exc:
            self._lose(pending, exc)
            return
        for callback, _ in pending:
            callback()
        self.catch_up_log()

    def fail_batch(self, error: BaseException) -> None:
        """Roll the open batch back after a write failed; none of its writes is kept.

        One failed write can take the whole transaction with it (a full disk,
        an I/O error), so the batch is given up as a whole.
        """
        pending = self._batch
        if pending is None:
            return
        self._batch = None
        self._lose(pending, error)

    def _lose(self, pending: list[_Waiting], error: BaseException) -> None:
        log.error(
            "run store %s: writing failed, so the %d writes of the open batch are lost: %s",
            self.path,
            len(pending),
            error,
        )
        if self._db.in_transaction:
            try:
                self._db.execute("ROLLBACK")
            except sqlite3.Error as exc:
                log.error("run store %s: rolling back failed: %s", self.path, exc)
        # The output counters may count bytes the rollback removed.
        self._counters.clear()
        for _, on_lost in pending:
            if on_lost is not None:
                on_lost()

    @contextmanager
    def _transaction(self, durable: bool = False) -> Iterator[None]:
        """Make the writes inside one atomic unit.

        Inside an open batch that is a savepoint. With ``durable`` the writes
        are committed when the block ends: the open batch is committed first,
        and the block gets a transaction of its own.
        """
        if durable:
            self.commit_batch()
        if self._batch is None:
            with self._db:
                self._db.execute("BEGIN")
                yield
            self.catch_up_log()
            return
        self._db.execute("SAVEPOINT write")
        try:
            yield
        except BaseException as exc:
            self._counters.clear()  # they may count what is undone here
            if self._db.in_transaction:
                self._db.execute("ROLLBACK TO write")
                self._db.execute("RELEASE write")
            else:
                # SQLite rolled the whole transaction back.
                self.fail_batch(exc)
            raise
        self._db.execute("RELEASE write")

    def _write(self, sql: str, parameters: tuple[Any, ...]) -> sqlite3.Cursor:
        """Run one writing statement, committed at once unless a batch is open."""
        try:
            cursor = self._db.execute(sql, parameters)
        except sqlite3.Error as exc:
            if self._batch is not None and not self._db.in_transaction:
                self.fail_batch(exc)  # SQLite rolled the whole transaction back
            raise
        if self._batch is None:
            self.catch_up_log()
        return cursor

    def catch_up_log(self) -> None:
        """Copy the write-ahead log's newest frames if the checkpoint thread requested it.

        Called between writes, outside any transaction. The thread has copied
        all but the frames written since its last pass. Copying those here
        syncs the log and the database on the event loop (39 ms of wall time
        at the median in the following benchmark), and the next write then
        starts the log over.
        """
        checkpointer = self._checkpointer
        if checkpointer is None or not checkpointer.catch_up_requested:
            return
        try:
            row = self._db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        except sqlite3.Error as exc:
            log.warning("checkpointing the run store %s failed: %s", self.path, exc)
            row = None
        # A busy result means the thread was in a pass: this copy is tried
        # again at the next write.
        if row is None or row[1] >= 0:
            checkpointer.catch_up_requested = False

    # -- jobs ---------------------------------------------------------------

    def sync_jobs(self, definitions: Mapping[str, Mapping[str, Any]]) -> None:
        """Make the jobs table hold exactly ``definitions``, keeping run times."""
        known = {row[0] for row in self._db.execute("SELECT name FROM jobs")}
        self.update_jobs(definitions, known - set(definitions))

    def update_jobs(
        self, definitions: Mapping[str, Mapping[str, Any]], removed: Iterable[str] = ()
    ) -> None:
        """Add or replace the rows of ``definitions`` and delete those of ``removed``."""
        with self._transaction(durable=True):
            self._db.executemany("DELETE FROM jobs WHERE name = ?", [(name,) for name in removed])
            self._db.executemany(
                "INSERT INTO jobs (name, definition) VALUES (?, ?) "
                "ON CONFLICT (name) DO UPDATE SET definition = excluded.definition",
                [
                    (name, json.dumps(definition, sort_keys=True))
                    for name, definition in definitions.items()
                ],
            )

    def set_next_run(self, name: str, instant: datetime | None) -> None:
        self._write("UPDATE jobs SET next_run = ? WHERE name = ?", (isoformat(instant), name))

    def set_next_runs(self, instants: Mapping[str, datetime | None]) -> None:
        """Store several jobs' next fire times in one transaction."""
        with self._transaction():
            self._db.executemany(
                "UPDATE jobs SET next_run = ? WHERE name = ?",
                [(isoformat(instant), name) for name, instant in instants.items()],
            )

    def jobs(self) -> dict[str, JobRow]:
        rows = self._db.execute("SELECT * FROM jobs ORDER BY name")
        return {
            row["name"]: JobRow(
                name=row["name"],
                definition=json.loads(row["definition"]),
                next_run=row["next_run"],
                last_run=row["last_run"],
                last_run_id=row["last_run_id"],
            )
            for row in rows
        }

    # -- runs ---------------------------------------------------------------

    def run_id_taken(self, run_id: str) -> bool:
        return bool(self.run_ids_taken([run_id]))

    def run_ids_taken(self, run_ids: Iterable[str]) -> set[str]:
        """Return which of ``run_ids`` the store already holds."""
        taken: set[str] = set()
        wanted = list(run_ids)
        for start in range(0, len(wanted), _QUERY_CHUNK):
            chunk = wanted[start : start + _QUERY_CHUNK]
            marks = ",".join("?" * len(chunk))
            rows = self._db.execute(f"SELECT run_id FROM runs WHERE run_id IN ({marks})", chunk)
            taken.update(row[0] for row in rows)
        return taken

    def slot_taken(self, job: str, scheduled_at: datetime) -> bool:
        return bool(self.slots_taken([(job, scheduled_at)]))

    def slots_taken(self, slots: Iterable[tuple[str, datetime]]) -> set[tuple[str, datetime]]:
        """Return which of the (job, scheduled instant) slots already have a run."""
        by_instant: dict[datetime, list[str]] = {}
        for job, instant in slots:
            by_instant.setdefault(instant, []).append(job)
        taken: set[tuple[str, datetime]] = set()
        for instant, jobs in by_instant.items():
            for start in range(0, len(jobs), _QUERY_CHUNK):
                chunk = jobs[start : start + _QUERY_CHUNK]
                marks = ",".join("?" * len(chunk))
                rows = self._db.execute(
                    f"SELECT job FROM runs WHERE scheduled_at = ? AND job IN ({marks})",
                    (isoformat(instant), *chunk),
                )
                taken.update((row[0], instant) for row in rows)
        return taken

    def insert_run(self, run: Run, targets: Iterable[str], maintenance: Iterable[str]) -> None:
        """Store a new run and a pending result for each of its minions.

        Raises sqlite3.IntegrityError if the job already has a run for the
        same scheduled instant, so a slot never starts twice.
        """
        self.insert_runs([(run, targets, maintenance)])

    def insert_runs(
        self, runs: Iterable[tuple[Run, Iterable[str], Iterable[str]]], prepared: bool = False
    ) -> None:
        """Store several new runs, each with its targets and minions under maintenance.

        One transaction: all are stored or none. Raises sqlite3.IntegrityError
        if any job already has a run for the scheduled instant of its new run.
        With ``prepared`` the runs are stored ahead of their instant: reads
        leave them out until activate_runs() and the jobs' last run is not set.
        """
        status = PREPARED if prepared else RunStatus.RUNNING.value
        run_rows = []
        result_rows = []
        job_rows = []
        for run, targets, maintenance in runs:
            started = isoformat(run.started_at)
            run_rows.append(
                (
                    run.run_id,
                    run.job_name,
                    run.trigger.value,
                    isoformat(run.scheduled_at),
                    started,
                    status,
                    run.token_hash,
                    run.jid,
                    run.timeout,
                    json.dumps(sorted(targets)),
                    json.dumps(sorted(maintenance)),
                )
            )
            result_rows.extend(
                (
                    run.run_id,
                    machine.machine,
                    machine.state.value,
                    machine.retcode,
                    machine.reason.value if machine.reason else None,
                )
                for machine in run.machines.values()
            )
            job_rows.append((started, run.run_id, run.job_name))
        # Committed before this returns: the engine publishes the runs next,
        # and after a crash it must find every run it may have published.
        with self._transaction(durable=True):
            self._db.executemany(
                "INSERT INTO runs (run_id, job, trigger, scheduled_at, started_at, status, "
                "token_hash, jid, timeout, targets, maintenance) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                run_rows,
            )
            self._db.executemany(
                "INSERT INTO results (run_id, machine, state, retcode, reason) "
                "VALUES (?, ?, ?, ?, ?)",
                result_rows,
            )
            if not prepared:
                self._db.executemany(
                    "UPDATE jobs SET last_run = ?, last_run_id = ? WHERE name = ?", job_rows
                )

    def activate_runs(self, runs: Iterable[Run]) -> None:
        """Mark prepared runs as running, with their ``started_at``, and commit.

        Raises StoreError, with nothing changed, if one of them is not stored
        as prepared.
        """
        rows = [(isoformat(run.started_at), run.run_id, run.job_name) for run in runs]
        running = RunStatus.RUNNING.value
        with self._transaction(durable=True):
            cursor = self._db.executemany(
                "UPDATE runs SET status = ?, started_at = ? WHERE run_id = ? AND status = ?",
                [(running, started, run_id, PREPARED) for started, run_id, _ in rows],
            )
            if cursor.rowcount != len(rows):
                raise StoreError(
                    f"run store {self.path}: {len(rows) - cursor.rowcount} of {len(rows)} "
                    "run(s) to start are no longer stored as prepared"
                )
            self._db.executemany(
                "UPDATE jobs SET last_run = ?, last_run_id = ? WHERE name = ?", rows
            )

    def drop_prepared(self, run_ids: Iterable[str] | None = None) -> int:
        """Delete the prepared runs ``run_ids``, or all of them; return how many.

        Committed before this returns, so a failed write batch later cannot
        bring back a row whose slot the engine has given to another record.
        """
        with self._transaction(durable=True):
            if run_ids is None:
                self._db.execute(
                    "DELETE FROM results WHERE run_id IN "
                    "(SELECT run_id FROM runs WHERE status = ?)",
                    (PREPARED,),
                )
                return self._db.execute("DELETE FROM runs WHERE status = ?", (PREPARED,)).rowcount
            dropped = 0
            for run_id in run_ids:
                cursor = self._db.execute(
                    "DELETE FROM runs WHERE run_id = ? AND status = ?", (run_id, PREPARED)
                )
                if cursor.rowcount:
                    self._db.execute("DELETE FROM results WHERE run_id = ?", (run_id,))
                    dropped += 1
            return dropped

    def insert_skip(
        self,
        run_id: str,
        job: str,
        trigger: Trigger,
        scheduled_at: datetime | None,
        at: datetime,
        reason: SkipReason,
    ) -> None:
        self._insert_unrun(run_id, job, trigger, scheduled_at, at, RunStatus.SKIPPED, reason.value)

    def insert_missed(self, run_id: str, job: str, scheduled_at: datetime, at: datetime) -> bool:
        """Record a slot that passed while the engine was down; False if the slot has a row."""
        return self._insert_unrun(
            run_id, job, Trigger.SCHEDULE, scheduled_at, at, RunStatus.MISSED, None
        )

    def _insert_unrun(
        self,
        run_id: str,
        job: str,
        trigger: Trigger,
        scheduled_at: datetime | None,
        at: datetime,
        status: RunStatus,
        reason: str | None,
    ) -> bool:
        with self._transaction(durable=True):
            cursor = self._db.execute(
                "INSERT OR IGNORE INTO runs (run_id, job, trigger, scheduled_at, started_at, "
                "ended_at, status, skip_reason) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    run_id,
                    job,
                    trigger.value,
                    isoformat(scheduled_at),
                    isoformat(at),
                    isoformat(at),
                    status.value,
                    reason,
                ),
            )
        return cursor.rowcount == 1

    def latest_slots(self) -> dict[str, datetime]:
        """Return each job's newest scheduled instant with a row: run, skipped or missed.

        After a restart, slots later than this passed while the engine was down.
        """
        rows = self._db.execute(
            "SELECT job, MAX(scheduled_at) AS slot FROM runs "
            "WHERE scheduled_at IS NOT NULL AND status != ? GROUP BY job",
            (PREPARED,),
        )
        return {row["job"]: datetime.fromisoformat(row["slot"]) for row in rows}

    def set_jid(self, run_id: str, jid: str) -> None:
        self._write("UPDATE runs SET jid = ? WHERE run_id = ?", (jid, run_id))

    def update_machine(self, machine: MachineRun) -> None:
        self._write(
            "UPDATE results SET state = ?, retcode = ?, reason = ?, started_at = ?, "
            "ended_at = ?, pid = ?, last_seq = ? WHERE run_id = ? AND machine = ?",
            (
                machine.state.value,
                machine.retcode,
                machine.reason.value if machine.reason else None,
                isoformat(machine.started_at),
                isoformat(machine.ended_at),
                machine.pid,
                machine.last_seq,
                machine.run_id,
                machine.machine,
            ),
        )

    def set_late_result(self, machine: MachineRun, ended_at: datetime) -> None:
        self._write(
            "UPDATE results SET late_retcode = ?, late_reason = ?, late_ended_at = ?, "
            "last_seq = ? WHERE run_id = ? AND machine = ?",
            (
                machine.late_retcode,
                machine.late_reason.value if machine.late_reason else None,
                isoformat(ended_at),
                machine.last_seq,
                machine.run_id,
                machine.machine,
            ),
        )

    def finish_run(self, run: Run) -> None:
        self._write(
            "UPDATE runs SET status = ?, ended_at = ? WHERE run_id = ?",
            (run.status.value, isoformat(run.ended_at), run.run_id),
        )
        for key in [key for key in self._counters if key[0] == run.run_id]:
            del self._counters[key]

    def prune(self, older_than: datetime, keep_per_job: int) -> int:
        """Delete finished runs started before ``older_than`` or beyond the newest
        ``keep_per_job`` of their job, with their results and output.

        Runs in flight are never deleted. Returns the number of runs deleted.
        """
        running = RunStatus.RUNNING.value
        with self._transaction(durable=True):
            self._db.execute("DROP TABLE IF EXISTS temp.doomed")
            self._db.execute(
                "CREATE TEMP TABLE doomed AS SELECT run_id FROM ("
                "  SELECT run_id, status, started_at, ROW_NUMBER() OVER ("
                "    PARTITION BY job ORDER BY started_at DESC, rowid DESC) AS position"
                "  FROM runs WHERE status != ?"
                ") WHERE status != ? AND (started_at < ? OR position > ?)",
                (PREPARED, running, isoformat(older_than), keep_per_job),
            )
            self._db.execute("DELETE FROM output WHERE run_id IN (SELECT run_id FROM temp.doomed)")
            self._db.execute("DELETE FROM results WHERE run_id IN (SELECT run_id FROM temp.doomed)")
            deleted = self._db.execute(
                "DELETE FROM runs WHERE run_id IN (SELECT run_id FROM temp.doomed)"
            ).rowcount
            self._db.execute("DROP TABLE temp.doomed")
        if deleted:
            self._db.execute("PRAGMA incremental_vacuum")
        return deleted

    def size_bytes(self) -> int:
        """Return the size of the database file and its write-ahead log."""
        wal = self.path.with_name(self.path.name + "-wal")
        return sum(path.stat().st_size for path in (self.path, wal) if path.exists())

    # -- output -------------------------------------------------------------

    def _output_counters(self, run_id: str, machine: str) -> _OutputCounters:
        key = (run_id, machine)
        counters = self._counters.get(key)
        if counters is None:
            row = self._db.execute(
                "SELECT head_bytes, tail_bytes, dropped_bytes FROM results "
                "WHERE run_id = ? AND machine = ?",
                (run_id, machine),
            ).fetchone()
            counters = _OutputCounters(*row) if row else _OutputCounters(0, 0, 0)
            self._counters[key] = counters
        return counters

    def append_output(
        self, run_id: str, machine: str, seq: int, data: str, skipped: int = 0
    ) -> None:
        """Store one output chunk and the frame's sequence number, capping the total.

        ``skipped`` is how many bytes of output the wrapper left out right
        before ``data``. The tail stored so far no longer adjoins what follows,
        so it is counted as dropped too, and ``data`` starts a new tail.
        """
        counters = self._output_counters(run_id, machine)
        head_cap = self.max_output_bytes // 2
        tail_cap = self.max_output_bytes - head_cap
        with self._transaction():
            if skipped:
                self._db.execute(
                    "DELETE FROM output WHERE run_id = ? AND machine = ? AND part = 'tail'",
                    (run_id, machine),
                )
                counters.dropped += counters.tail + skipped
                counters.tail = 0
            # The head takes output only while nothing has gone past it, so a
            # short chunk can never land in the head after later output.
            if counters.head < head_cap and counters.tail == 0 and counters.dropped == 0:
                head, data = _split_at_bytes(data, head_cap - counters.head)
                if head:
                    self._db.execute(
                        "INSERT INTO output (run_id, machine, part, data) VALUES (?, ?, 'head', ?)",
                        (run_id, machine, head),
                    )
                    counters.head += _utf8_len(head)
            if data:
                self._append_tail(run_id, machine, data, counters, tail_cap)
            self._db.execute(
                "UPDATE results SET last_seq = ?, head_bytes = ?, tail_bytes = ?, "
                "dropped_bytes = ? WHERE run_id = ? AND machine = ?",
                (seq, counters.head, counters.tail, counters.dropped, run_id, machine),
            )

    def _append_tail(
        self, run_id: str, machine: str, data: str, counters: _OutputCounters, tail_cap: int
    ) -> None:
        size = _utf8_len(data)
        if size > tail_cap:
            kept = _drop_front_bytes(data, size - tail_cap)
            counters.dropped += size - _utf8_len(kept)
            data, size = kept, _utf8_len(kept)
        self._db.execute(
            "INSERT INTO output (run_id, machine, part, data) VALUES (?, ?, 'tail', ?)",
            (run_id, machine, data),
        )
        counters.tail += size
        # Drop the oldest tail chunks, then trim the oldest survivor, until the
        # tail fits its half of the cap again.
        while counters.tail > tail_cap:
            oldest = self._db.execute(
                "SELECT id, data FROM output WHERE run_id = ? AND machine = ? AND part = 'tail' "
                "ORDER BY id LIMIT 1",
                (run_id, machine),
            ).fetchone()
            excess = counters.tail - tail_cap
            oldest_size = _utf8_len(oldest["data"])
            if oldest_size <= excess:
                self._db.execute("DELETE FROM output WHERE id = ?", (oldest["id"],))
                counters.tail -= oldest_size
                counters.dropped += oldest_size
            else:
                kept = _drop_front_bytes(oldest["data"], excess)
                removed = oldest_size - _utf8_len(kept)
                self._db.execute("UPDATE output SET data = ? WHERE id = ?", (kept, oldest["id"]))
                counters.tail -= removed
                counters.dropped += removed

    def output(self, run_id: str, machine: str) -> str:
        """Return the stored output, with a marker where the cap dropped bytes."""
        rows = self._db.execute(
            "SELECT part, data FROM output WHERE run_id = ? AND machine = ? ORDER BY id",
            (run_id, machine),
        ).fetchall()
        dropped_row = self._db.execute(
            "SELECT dropped_bytes FROM results WHERE run_id = ? AND machine = ?",
            (run_id, machine),
        ).fetchone()
        dropped = dropped_row[0] if dropped_row else 0
        head = "".join(row["data"] for row in rows if row["part"] == "head")
        tail = "".join(row["data"] for row in rows if row["part"] == "tail")
        if dropped:
            return f"{head}\n[saltpeter: {dropped} bytes of output dropped]\n{tail}"
        return head + tail

    # -- reads --------------------------------------------------------------

    def run(self, run_id: str) -> dict[str, Any] | None:
        row = self._db.execute(
            "SELECT * FROM runs WHERE run_id = ? AND status != ?", (run_id, PREPARED)
        ).fetchone()
        return self._run_dict(row) if row else None

    def runs(self, job: str | None = None, limit: int = 20) -> list[dict[str, Any]]:
        if job is None:
            rows = self._db.execute(
                "SELECT * FROM runs WHERE status != ? ORDER BY started_at DESC, rowid DESC LIMIT ?",
                (PREPARED, limit),
            )
        else:
            rows = self._db.execute(
                "SELECT * FROM runs WHERE job = ? AND status != ? "
                "ORDER BY started_at DESC, rowid DESC LIMIT ?",
                (job, PREPARED, limit),
            )
        return [self._run_dict(row) for row in rows.fetchall()]

    def running_runs(self) -> list[dict[str, Any]]:
        rows = self._db.execute(
            "SELECT * FROM runs WHERE status = ? ORDER BY started_at", (RunStatus.RUNNING.value,)
        )
        return [self._run_dict(row) for row in rows.fetchall()]

    def latest_run(self, job: str, include_skipped: bool = False) -> dict[str, Any] | None:
        query = f"SELECT * FROM runs WHERE job = ? AND status != '{PREPARED}'"
        if not include_skipped:
            query += f" AND status NOT IN ('{RunStatus.SKIPPED.value}', '{RunStatus.MISSED.value}')"
        row = self._db.execute(
            query + " ORDER BY started_at DESC, rowid DESC LIMIT 1", (job,)
        ).fetchone()
        return self._run_dict(row) if row else None

    def results(self, run_id: str, with_output: bool = True) -> dict[str, dict[str, Any]]:
        rows = self._db.execute(
            "SELECT * FROM results WHERE run_id = ? ORDER BY machine", (run_id,)
        ).fetchall()
        results: dict[str, dict[str, Any]] = {}
        for row in rows:
            result = {
                "state": row["state"],
                "retcode": row["retcode"],
                "reason": row["reason"],
                "started_at": row["started_at"],
                "ended_at": row["ended_at"],
                "pid": row["pid"],
                "last_seq": row["last_seq"],
                "late_retcode": row["late_retcode"],
                "late_reason": row["late_reason"],
                "late_ended_at": row["late_ended_at"],
            }
            if with_output:
                result["output"] = self.output(run_id, row["machine"])
            results[row["machine"]] = result
        return results

    def machine_runs(self, run_id: str) -> list[MachineRun]:
        rows = self._db.execute("SELECT * FROM results WHERE run_id = ?", (run_id,)).fetchall()
        return [
            MachineRun(
                run_id=run_id,
                machine=row["machine"],
                state=MachineState(row["state"]),
                retcode=row["retcode"],
                reason=Reason(row["reason"]) if row["reason"] else None,
                started_at=_parse_instant(row["started_at"]),
                ended_at=_parse_instant(row["ended_at"]),
                pid=row["pid"],
                last_seq=row["last_seq"],
                late_retcode=row["late_retcode"],
                late_reason=Reason(row["late_reason"]) if row["late_reason"] else None,
            )
            for row in rows
        ]

    @staticmethod
    def _run_dict(row: sqlite3.Row) -> dict[str, Any]:
        return {
            "run_id": row["run_id"],
            "job": row["job"],
            "trigger": row["trigger"],
            "scheduled_at": row["scheduled_at"],
            "started_at": row["started_at"],
            "ended_at": row["ended_at"],
            "status": row["status"],
            "skip_reason": row["skip_reason"],
            "token_hash": row["token_hash"],
            "jid": row["jid"],
            "timeout": row["timeout"],
            "targets": json.loads(row["targets"]),
            "maintenance": json.loads(row["maintenance"]),
        }


def _parse_instant(text: str | None) -> datetime | None:
    return datetime.fromisoformat(text) if text else None
