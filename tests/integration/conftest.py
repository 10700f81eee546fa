"""Fixtures for tests against a real Salt master and real minions on 127.0.0.1.

Every test in this folder is marked ``integration``. The ``sandbox`` fixture
starts one master with the Saltpeter engine and three minions per test module.
A module fills its job directory by overriding ``jobs_dir``, and changes engine
settings by overriding ``sandbox_settings``.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from saltpeter.sandbox import Sandbox

INTEGRATION_DIR = Path(__file__).resolve().parent
SANDBOX_MINIONS = 3
# Generous bounds that only keep a broken sandbox from hanging the suite.
SANDBOX_UP_TIMEOUT = 180.0
EVENT_TIMEOUT = 30.0

T = TypeVar("T")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if INTEGRATION_DIR in item.path.resolve().parents:
            item.add_marker(pytest.mark.integration)


def wait_for(
    condition: Callable[[], T | None],
    timeout: float,
    message: str,
    interval: float = 0.2,
) -> T:
    """Call CONDITION until it returns a truthy value, and return that value.

    Raises AssertionError with MESSAGE and the last value when TIMEOUT seconds pass first.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(
                f"timed out after {timeout:g} s: {message} (last value: {value!r})"
            )
        time.sleep(interval)


@pytest.fixture(name="wait_for")
def wait_for_fixture() -> Callable[..., Any]:
    """The :func:`wait_for` helper, for tests that prefer a fixture to an import."""
    return wait_for


@pytest.fixture(scope="module")
def jobs_dir(short_tmp_dir: Callable[[str], Path]) -> Path:
    """The Saltpeter job directory of this module's sandbox, empty by default.

    Override this fixture in a test module to write job files before the engine starts.
    """
    return short_tmp_dir("jobs")


@pytest.fixture(scope="module")
def sandbox_settings() -> dict[str, object]:
    """Extra engine settings for this module's sandbox (they override the sandbox's own)."""
    return {}


@pytest.fixture(scope="module")
def sandbox(
    short_tmp_dir: Callable[[str], Path], jobs_dir: Path, sandbox_settings: dict[str, object]
) -> Iterator[Sandbox]:
    """A running sandbox with minion-1 .. minion-3, stopped after the module's tests."""
    running = Sandbox(short_tmp_dir("sb"))
    try:
        running.up(
            SANDBOX_MINIONS,
            jobs_dir=jobs_dir,
            timeout=SANDBOX_UP_TIMEOUT,
            settings=sandbox_settings,
        )
        yield running
    finally:
        running.down()


class EventCollector:
    """Events from a sandbox's master event bus, read by a background thread."""

    def __init__(self, sandbox: Sandbox, tag_prefix: str = "saltpeter/") -> None:
        self._sandbox = sandbox
        self._tag_prefix = tag_prefix
        self._events: list[tuple[str, dict[str, Any]]] = []
        # Positions in _events of the events that wait() has returned.
        self._returned: set[int] = set()
        self._changed = threading.Condition()
        self._stop = threading.Event()
        self._connected = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._read, name="event-collector", daemon=True)

    def start(self, timeout: float = EVENT_TIMEOUT) -> None:
        """Start reading, and return once the listener is connected to the bus."""
        self._thread.start()
        if not self._connected.wait(timeout):
            raise AssertionError(f"event listener did not connect within {timeout:g} s")
        if self._error is not None:
            raise AssertionError(f"event listener failed: {self._error!r}") from self._error

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _read(self) -> None:
        try:
            with self._sandbox.event_listener(self._tag_prefix) as listener:
                self._connected.set()
                while not self._stop.is_set():
                    event = listener.get(timeout=0.5)
                    if event is not None:
                        with self._changed:
                            self._events.append(event)
                            self._changed.notify_all()
        except BaseException as exc:  # reported by start() or wait()
            self._error = exc
            self._connected.set()

    def all(self, tag_regex: str) -> list[tuple[str, dict[str, Any]]]:
        """Return every collected event whose whole tag matches TAG_REGEX, oldest first."""
        pattern = re.compile(tag_regex)
        with self._changed:
            return [(tag, data) for tag, data in self._events if pattern.fullmatch(tag)]

    def wait(self, tag_regex: str, timeout: float = EVENT_TIMEOUT) -> dict[str, Any]:
        """Return the data of the oldest event whose whole tag matches TAG_REGEX and that no
        earlier wait() returned, waiting up to TIMEOUT seconds for it to arrive."""
        pattern = re.compile(tag_regex)
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                for index, (tag, data) in enumerate(self._events):
                    if index not in self._returned and pattern.fullmatch(tag):
                        self._returned.add(index)
                        return data
                if self._error is not None:
                    raise AssertionError(f"event listener failed: {self._error!r}")
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    seen = [tag for tag, _ in self._events]
                    raise AssertionError(
                        f"no event with a tag matching {tag_regex!r} within {timeout:g} s. "
                        f"Tags seen: {seen}"
                    )
                self._changed.wait(remaining)


@pytest.fixture
def events(sandbox: Sandbox) -> Iterator[EventCollector]:
    """Events under ``saltpeter/`` on the sandbox's master bus, collected during one test."""
    collector = EventCollector(sandbox)
    collector.start()
    try:
        yield collector
    finally:
        collector.stop()
