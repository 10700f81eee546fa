"""The engine's calls into Salt: target resolution, publishes and the event bus.

Salt's APIs used here were read from Salt 3008.4's source: LocalClient's
``run_job_async`` publishes without waiting for returns, returns arrive on
the master event bus as ``salt/job/<jid>/ret/<minion>``, and
``CkMinions.check_minions`` resolves a target against accepted keys and the
master's grain and pillar cache. Blocking calls run in a small thread pool so
the engine's loop never waits on the disk or the master's request server.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import logging
import os
import re
import threading
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import salt.client
import salt.utils.event
import salt.utils.jid
import salt.utils.minions
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

log = logging.getLogger(__name__)

RETURN_TAG = re.compile(r"^salt/job/(?P<jid>[^/]+)/ret/(?P<minion>[^/]+)$")

EventHandler = Callable[[str, dict[str, Any]], Awaitable[None] | None]


class SaltBridge:
    """The engine's connection to its Salt master."""

    def __init__(self, opts: dict[str, Any], executor: concurrent.futures.Executor) -> None:
        self.opts = opts
        self.executor = executor
        self._client: salt.client.LocalClient | None = None
        self._listener: salt.utils.event.MasterEvent | None = None
        self._publisher: salt.utils.event.MasterEvent | None = None
        self._outbox: asyncio.Queue[tuple[str, dict[str, Any]]] = asyncio.Queue()
        self.minion_keys = MinionKeys(opts)
        # Resolutions in progress, by (targets, target_type): jobs due at the same
        # instant with the same target share one trip to the thread pool.
        self._resolving: dict[tuple[str, str], asyncio.Future[list[str]]] = {}
        # One CkMinions per pool thread. Creating one per call loads Salt's cache
        # module again each time (about 1.5 ms with Salt 3008.4).
        self._checkers = threading.local()
        self._sender: asyncio.Task[None] | None = None

    async def start(self, on_event: EventHandler) -> None:
        """Connect to the bus, start listening, and start the event sender."""
        loop = asyncio.get_running_loop()
        self._client = await loop.run_in_executor(
            self.executor,
            lambda: salt.client.LocalClient(mopts=self.opts, io_loop=loop),
        )
        self._listener = salt.utils.event.get_master_event(
            self.opts, self.opts["sock_dir"], listen=True, io_loop=loop
        )
        self._publisher = salt.utils.event.get_master_event(
            self.opts, self.opts["sock_dir"], listen=False, io_loop=loop
        )
        listener = self._listener

        async def handle(raw: bytes) -> None:
            try:
                tag, data = listener.unpack(raw)
            except Exception:
                log.debug("could not unpack an event from the master bus", exc_info=True)
                return
            if not isinstance(data, dict):
                return
            try:
                result = on_event(tag, data)
                if asyncio.iscoroutine(result):
                    await result
            except Exception:
                log.exception("handling the event %s failed", tag)

        listener.set_event_handler(handle)
        self._sender = asyncio.create_task(self._send_events())

    async def close(self) -> None:
        if self._sender is not None:
            self._sender.cancel()
        for event in (self._listener, self._publisher):
            if event is not None:
                event.destroy()
        if self._client is not None:
            self._client.destroy()

    def verify_minion_signature(self, minion: str, message: bytes, signature: str | None) -> bool:
        return self.minion_keys.verify(minion, message, signature)

    # -- the event bus ------------------------------------------------------

    def fire(self, tag: str, data: dict[str, Any]) -> None:
        """Queue an event for the master bus; events go out in the order fired."""
        self._outbox.put_nowait((tag, data))

    async def _send_events(self) -> None:
        assert self._publisher is not None
        while True:
            tag, data = await self._outbox.get()
            try:
                await self._publisher.fire_event_async(dict(data), tag)
            except Exception:
                log.exception("could not fire event %s on the master bus", tag)

    async def flush_events(self, timeout: float = 5.0) -> None:
        """Wait until queued events have been handed to the bus (at most ``timeout`` s)."""
        deadline = asyncio.get_running_loop().time() + timeout
        while not self._outbox.empty() and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.01)

    # -- targets and publishing --------------------------------------------

    def new_jid(self) -> str:
        # unique_jid adds the process id and guarantees distinct jids within
        # one process even inside the same microsecond.
        return salt.utils.jid.gen_jid({"unique_jid": True})

    async def resolve_targets(self, targets: str, target_type: str) -> list[str]:
        """Return the accepted minions that ``targets`` matches, using the master's caches.

        Calls for the same target while one is in progress wait for that one's result.
        """
        key = (targets, target_type)
        pending = self._resolving.get(key)
        if pending is None:
            pending = asyncio.get_running_loop().run_in_executor(
                self.executor, self._check_minions, targets, target_type
            )
            self._resolving[key] = pending
            pending.add_done_callback(lambda _: self._resolving.pop(key, None))
        # A copy, so that no caller can change the list the others receive.
        return list(await asyncio.shield(pending))

    def _check_minions(self, targets: str, target_type: str) -> list[str]:
        checker = getattr(self._checkers, "checker", None)
        if checker is None:
            checker = self._checkers.checker = salt.utils.minions.CkMinions(self.opts)
        result = checker.check_minions(targets, tgt_type=target_type)
        return sorted(result.get("minions", []))

    async def accepted_minions(self) -> list[str]:
        def listing() -> list[str]:
            directory = os.path.join(self.opts["pki_dir"], "minions")
            try:
                return sorted(
                    name
                    for name in os.listdir(directory)
                    if not name.startswith(".") and os.path.isfile(os.path.join(directory, name))
                )
            except FileNotFoundError:
                return []

        return await asyncio.get_running_loop().run_in_executor(self.executor, listing)

    async def publish(
        self,
        minions: Iterable[str],
        fun: str,
        arg: list[Any],
        kwarg: dict[str, Any] | None = None,
        jid: str = "",
    ) -> dict[str, Any]:
        """Publish ``fun`` to a list of minions; return Salt's pub data (jid, minions)."""
        assert self._client is not None
        pub = await self._client.run_job_async(
            list(minions),
            fun,
            arg=arg,
            kwarg=kwarg,
            tgt_type="list",
            jid=jid,
            listen=False,
        )
        if not pub or not pub.get("jid") or str(pub.get("jid")) == "0":
            raise RuntimeError(f"the master did not accept the publish of {fun}")
        return pub


class MinionKeys:
    """Verifies signatures made with minions' Salt keys, against the master's accepted keys.

    Keys come from Salt's key cache (``keys.cache_driver``, by default the
    files in ``pki_dir/minions``) and are kept for ``ttl`` seconds, so a key
    that is deleted or rejected stops working within that time.
    """

    def __init__(self, opts: dict[str, Any], ttl: float = 60.0) -> None:
        self.opts = opts
        self.ttl = ttl
        self._cache: Any = None
        self._keys: dict[str, tuple[float, Any]] = {}

    def _key_cache(self) -> Any:
        if self._cache is None:
            import salt.cache

            self._cache = salt.cache.Cache(
                self.opts, driver=self.opts.get("keys.cache_driver", "localfs_key")
            )
        return self._cache

    def _public_key(self, minion: str) -> Any:
        now = time.monotonic()
        cached = self._keys.get(minion)
        if cached is not None and now - cached[0] < self.ttl:
            return cached[1]
        key = None
        try:
            entry = self._key_cache().fetch("keys", minion)
        except Exception as exc:
            log.warning("cannot read the Salt key of minion %s: %s", minion, exc)
            entry = None
        if isinstance(entry, dict) and entry.get("state") == "accepted" and entry.get("pub"):
            try:
                key = serialization.load_pem_public_key(str(entry["pub"]).encode())
            except ValueError as exc:
                log.warning("the accepted Salt key of minion %s is unreadable: %s", minion, exc)
        self._keys[minion] = (now, key)
        if len(self._keys) > 100000:
            self._keys.clear()
        return key

    def verify(self, minion: str, message: bytes, signature: str | None) -> bool:
        """Return whether ``signature`` is ``minion``'s signature of ``message``."""
        if not signature:
            return False
        key = self._public_key(minion)
        if not isinstance(key, rsa.RSAPublicKey):
            return False
        try:
            key.verify(
                base64.b64decode(signature, validate=True),
                message,
                padding.PKCS1v15(),
                hashes.SHA256(),
            )
        except (InvalidSignature, ValueError):
            return False
        return True


def parse_return_tag(tag: str) -> tuple[str, str] | None:
    """Return (jid, minion) for a ``salt/job/<jid>/ret/<minion>`` tag."""
    match = RETURN_TAG.match(tag)
    if match is None:
        return None
    return match.group("jid"), match.group("minion")
