"""A stand-in for an Elasticsearch or OpenSearch server, for the shipping tests.

Neither server can be installed on the machines that run this test suite, so the
tests drive the real ``elasticsearch`` and ``opensearch-py`` async clients against
this small Tornado application instead. It is a stand-in, not an emulator: it
implements only the endpoints that saltpeter.shipping uses, in the shape of the
servers' documented responses, and it keeps documents in memory.

- ``POST`` or ``PUT /_bulk``: NDJSON ``index`` and ``create`` operations. The
  response has a ``status`` per item and the top-level ``errors`` flag.
- ``HEAD`` and ``PUT /_index_template/<name>``, and ``GET`` for a stored template.
- ``GET`` or ``POST /<index pattern>/_search``: every stored document of the
  matching indices in arrival order, limited by ``size`` (default 10). Queries are
  not evaluated.
- ``GET /``: the server's name and version.

The Elasticsearch flavour sends ``X-Elastic-Product: Elasticsearch`` on every
response, because elasticsearch-py rejects a 2xx response without it (see
``elasticsearch/_async/client/_base.py`` in the 9.x client).

Given an SSL context, the server speaks HTTPS. Faults on demand: stop listening (so
connections are refused), respond to bulk requests with an error status, reject the
next bulk items with a status, and delay every response. The server runs on its own
asyncio loop in a daemon thread and binds to 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import base64
import fnmatch
import json
import socket
import ssl
import threading
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

import tornado.httpserver
import tornado.netutil
import tornado.web

T = TypeVar("T")

Product = Literal["elasticsearch", "opensearch"]

_ERROR_TYPES = {
    400: "illegal_argument_exception",
    401: "security_exception",
    429: "es_rejected_execution_exception",
    500: "internal_server_error",
    503: "unavailable_shards_exception",
}


@dataclass
class StoredDocument:
    index: str
    id: str
    source: dict[str, Any]
    version: int = 1


@dataclass
class RequestRecord:
    method: str
    path: str
    authorization: str | None


@dataclass
class _Faults:
    bulk_status: int | None = None  # respond to whole bulk requests with this status
    bulk_status_count: int | None = None  # how many more times; None means until cleared
    item_status: int | None = None  # reject bulk items with this status
    item_status_count: int = 0  # how many more items
    delay_seconds: float = 0.0  # wait before responding to any request


@dataclass
class _State:
    documents: dict[tuple[str, str], StoredDocument] = field(default_factory=dict)
    templates: dict[str, dict[str, Any]] = field(default_factory=dict)
    requests: list[RequestRecord] = field(default_factory=list)
    faults: _Faults = field(default_factory=_Faults)


class _Handler(tornado.web.RequestHandler):
    """Routes every request of the stand-in by method and path."""

    @property
    def standin(self) -> SearchStandin:
        # set_default_headers() runs before initialize(), so the server comes from the
        # application's settings.
        return self.application.settings["standin"]

    def set_default_headers(self) -> None:
        self.set_header("Content-Type", "application/json; charset=UTF-8")
        if self.standin.product == "elasticsearch":
            self.set_header("X-Elastic-Product", "Elasticsearch")

    def compute_etag(self) -> None:
        return None

    async def prepare(self) -> None:
        self.standin._record(self.request)
        delay = self.standin._faults().delay_seconds
        if delay:
            await asyncio.sleep(delay)
        if not self.standin._authorized(self.request.headers.get("Authorization")):
            self.set_header("WWW-Authenticate", 'Basic realm="security" charset="UTF-8"')
            self._send_error(401, "missing authentication credentials for REST request")

    def _send_json(self, status: int, body: dict[str, Any]) -> None:
        self.set_status(status)
        self.finish(json.dumps(body))

    def _send_error(self, status: int, reason: str) -> None:
        error_type = _ERROR_TYPES.get(status, "exception")
        error = {"type": error_type, "reason": reason}
        self._send_json(status, {"error": {"root_cause": [error], **error}, "status": status})

    def _segments(self) -> list[str]:
        return [part for part in self.request.path.split("/") if part]

    async def head(self, _path: str) -> None:
        segments = self._segments()
        if len(segments) == 2 and segments[0] == "_index_template":
            self.set_status(200 if self.standin._has_template(segments[1]) else 404)
            self.finish()
            return
        self.set_status(404)
        self.finish()

    async def get(self, _path: str) -> None:
        segments = self._segments()
        if not segments:
            self._send_json(200, self.standin._banner())
        elif len(segments) == 2 and segments[0] == "_index_template":
            template = self.standin._template(segments[1])
            if template is None:
                self._send_error(404, f"index template matching [{segments[1]}] not found")
            else:
                entry = {"name": segments[1], "index_template": template}
                self._send_json(200, {"index_templates": [entry]})
        elif len(segments) == 2 and segments[1] == "_search":
            self._search(segments[0])
        else:
            self._send_error(400, f"no handler found for uri [{self.request.path}]")

    async def put(self, _path: str) -> None:
        segments = self._segments()
        if segments == ["_bulk"]:
            self._bulk()  # Elasticsearch takes both PUT and POST, and elasticsearch-py 9 sends PUT
            return
        if len(segments) == 2 and segments[0] == "_index_template":
            self.standin._put_template(segments[1], json.loads(self.request.body))
            self._send_json(200, {"acknowledged": True})
            return
        self._send_error(400, f"no handler found for uri [{self.request.path}]")

    async def post(self, _path: str) -> None:
        segments = self._segments()
        if segments == ["_bulk"]:
            self._bulk()
        elif len(segments) == 2 and segments[1] == "_search":
            self._search(segments[0])
        else:
            self._send_error(400, f"no handler found for uri [{self.request.path}]")

    def _bulk(self) -> None:
        status = self.standin._take_bulk_status()
        if status is not None:
            self._send_error(status, f"bulk request failed with {status} on demand")
            return
        self._send_json(200, self.standin._bulk(self.request.body))

    def _search(self, pattern: str) -> None:
        size = 10
        if self.request.body:
            size = int(json.loads(self.request.body).get("size", size))
        if "size" in self.request.arguments:
            size = int(self.get_argument("size"))
        matches = self.standin.documents(pattern)
        hits = [
            {"_index": doc.index, "_id": doc.id, "_score": 1.0, "_source": doc.source}
            for doc in matches[:size]
        ]
        total = {"value": len(matches), "relation": "eq"}
        self._send_json(
            200, {"took": 1, "timed_out": False, "hits": {"total": total, "hits": hits}}
        )


class SearchStandin:
    """One stand-in server. Methods other than the handlers are safe to call from tests."""

    def __init__(
        self,
        product: Product = "elasticsearch",
        credentials: tuple[str, str] | None = None,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self.product = product
        self.credentials = credentials
        self.tls = tls
        self.api_key: str | None = None
        self._lock = threading.Lock()
        self._state = _State()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: tornado.httpserver.HTTPServer | None = None
        self._app = tornado.web.Application([(r"/(.*)", _Handler)], standin=self)
        probe = tornado.netutil.bind_sockets(0, "127.0.0.1", family=socket.AF_INET)[0]
        self.port: int = probe.getsockname()[1]
        probe.close()

    @property
    def url(self) -> str:
        scheme = "https" if self.tls is not None else "http"
        return f"{scheme}://127.0.0.1:{self.port}"

    # -- lifecycle ------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()
        self.accept_connections()

    def stop(self) -> None:
        self.refuse_connections()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)

    def accept_connections(self) -> None:
        """Listen on the server's port, again after refuse_connections()."""

        async def listen() -> None:
            sockets = tornado.netutil.bind_sockets(self.port, "127.0.0.1", family=socket.AF_INET)
            server = tornado.httpserver.HTTPServer(self._app, ssl_options=self.tls)
            server.add_sockets(sockets)
            self._server = server

        self._call(listen)

    def refuse_connections(self) -> None:
        """Stop listening and close open connections, so that clients get refused."""

        async def close() -> None:
            server, self._server = self._server, None
            if server is not None:
                server.stop()
                await server.close_all_connections()

        self._call(close)

    def _call(self, make: Callable[[], Coroutine[Any, Any, T]]) -> T:
        return asyncio.run_coroutine_threadsafe(make(), self._loop).result(timeout=30)

    # -- faults -----------------------------------------------------------------

    def fail_bulk(self, status: int, times: int | None = None) -> None:
        """Respond to the next ``times`` bulk requests (all when None) with ``status``."""
        with self._lock:
            self._state.faults.bulk_status = status
            self._state.faults.bulk_status_count = times

    def fail_items(self, status: int, count: int) -> None:
        """Reject the next ``count`` bulk items with ``status`` and store the others."""
        with self._lock:
            self._state.faults.item_status = status
            self._state.faults.item_status_count = count

    def delay(self, seconds: float) -> None:
        """Wait ``seconds`` before responding to each request (0 to respond at once)."""
        with self._lock:
            self._state.faults.delay_seconds = seconds

    def clear_faults(self) -> None:
        with self._lock:
            self._state.faults = _Faults()

    # -- inspection -------------------------------------------------------------

    def documents(self, pattern: str = "*") -> list[StoredDocument]:
        """Return the stored documents of the indices matching ``pattern``, in arrival order."""
        patterns = pattern.split(",")
        with self._lock:
            return [
                doc
                for doc in self._state.documents.values()
                if any(fnmatch.fnmatchcase(doc.index, each) for each in patterns)
            ]

    def requests(self, method: str | None = None, path: str | None = None) -> list[RequestRecord]:
        with self._lock:
            return [
                record
                for record in self._state.requests
                if (method is None or record.method == method)
                and (path is None or record.path == path)
            ]

    def templates(self) -> dict[str, dict[str, Any]]:
        with self._lock:
            return dict(self._state.templates)

    # -- handler side -----------------------------------------------------------

    def _faults(self) -> _Faults:
        with self._lock:
            return self._state.faults

    def _record(self, request: Any) -> None:
        record = RequestRecord(request.method, request.path, request.headers.get("Authorization"))
        with self._lock:
            self._state.requests.append(record)

    def _authorized(self, header: str | None) -> bool:
        if self.credentials is None and self.api_key is None:
            return True
        if header is None:
            return False
        scheme, _, value = header.partition(" ")
        if scheme == "Basic" and self.credentials is not None:
            expected = base64.b64encode(":".join(self.credentials).encode()).decode()
            return value == expected
        if scheme == "ApiKey" and self.api_key is not None:
            return value == self.api_key
        return False

    def _banner(self) -> dict[str, Any]:
        if self.product == "opensearch":
            version = {"distribution": "opensearch", "number": "2.19.0"}
        else:
            version = {"number": "9.1.0", "build_flavor": "default"}
        return {
            "name": "standin",
            "cluster_name": "standin",
            "version": version,
            "tagline": "The OpenSearch Project: https://opensearch.org/"
            if self.product == "opensearch"
            else "You Know, for Search",
        }

    def _has_template(self, name: str) -> bool:
        with self._lock:
            return name in self._state.templates

    def _template(self, name: str) -> dict[str, Any] | None:
        with self._lock:
            return self._state.templates.get(name)

    def _put_template(self, name: str, body: dict[str, Any]) -> None:
        with self._lock:
            self._state.templates[name] = body

    def _take_bulk_status(self) -> int | None:
        with self._lock:
            faults = self._state.faults
            if faults.bulk_status is None:
                return None
            status = faults.bulk_status
            if faults.bulk_status_count is not None:
                faults.bulk_status_count -= 1
                if faults.bulk_status_count <= 0:
                    faults.bulk_status = None
                    faults.bulk_status_count = None
            return status

    def _bulk(self, body: bytes) -> dict[str, Any]:
        lines = [line for line in body.split(b"\n") if line.strip()]
        items: list[dict[str, Any]] = []
        position = 0
        with self._lock:
            while position < len(lines):
                action = json.loads(lines[position])
                (op, meta), *_ = action.items()
                source = json.loads(lines[position + 1])
                position += 2
                items.append({op: self._apply(op, meta["_index"], meta["_id"], source)})
        errors = any(not 200 <= next(iter(item.values()))["status"] < 300 for item in items)
        return {"took": 1, "errors": errors, "items": items}

    def _apply(self, op: str, index: str, doc_id: str, source: dict[str, Any]) -> dict[str, Any]:
        """Apply one bulk operation to the store; the caller holds the lock."""
        faults = self._state.faults
        result: dict[str, Any] = {"_index": index, "_id": doc_id}
        if faults.item_status is not None and faults.item_status_count > 0:
            faults.item_status_count -= 1
            error_type = _ERROR_TYPES.get(faults.item_status, "exception")
            reason = f"item failed with {faults.item_status} on demand"
            return {
                **result,
                "status": faults.item_status,
                "error": {"type": error_type, "reason": reason},
            }
        key = (index, doc_id)
        existing = self._state.documents.get(key)
        if existing is not None and op == "create":
            reason = f"[{doc_id}]: version conflict, document already exists"
            error = {"type": "version_conflict_engine_exception", "reason": reason}
            return {**result, "status": 409, "error": error}
        if existing is not None:
            existing.source = source
            existing.version += 1
            return {**result, "_version": existing.version, "result": "updated", "status": 200}
        self._state.documents[key] = StoredDocument(index, doc_id, source)
        return {**result, "_version": 1, "result": "created", "status": 201}
