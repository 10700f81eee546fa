"""Ship run records to Elasticsearch and OpenSearch.

When ``elasticsearch`` or ``opensearch`` is set in ``saltpeter_config``, every run
event becomes a document in the daily index ``<index>-YYYY.MM.DD`` (the UTC date of
the event), with the fields of the original Saltpeter's documents, so dashboards
built for it keep working. docs/elasticsearch.md describes the settings, the
documents and the index template.

A :class:`Shipper` is a run observer. The engine calls its hooks on its one event
loop, so they only append to a bounded in-memory queue. A background task turns the
queue into documents and sends them in ``_bulk`` requests through the official async
client (``elasticsearch`` or ``opensearch-py``). While the cluster is unreachable or
returns 429 or 5xx, documents go to an on-disk spool, bounded in bytes, and are sent
in order once the cluster accepts requests again. Every document has a deterministic
``_id``, so a resend replaces the earlier copy and never duplicates it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import hashlib
import json
import logging
import os
import re
import threading
import time
import urllib.parse
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

if TYPE_CHECKING:
    from saltpeter.config import Settings

log = logging.getLogger(__name__)

T = TypeVar("T")

# msg_type values. The original Saltpeter wrote "start", "end" and "overlap" where
# these write "job_start", "job_end" and "skipped".
JOB_START = "job_start"
MACHINE_START = "machine_start"
MACHINE_RESULT = "machine_result"
JOB_END = "job_end"
SKIPPED = "skipped"
MISSED = "missed"

DEFAULT_SPOOL_MAX_BYTES = 100 * 1024 * 1024
DEFAULT_REQUEST_TIMEOUT = 10.0  # s for one HTTP request to the cluster
DEFAULT_RETRY_BASE = 1.0  # s before the first retry
DEFAULT_RETRY_CAP = 60.0  # s, the longest wait between retries
DEFAULT_BATCH_MAX_DOCUMENTS = 500
DEFAULT_BATCH_MAX_BYTES = 5 * 1024 * 1024  # of NDJSON in one _bulk request
# Run events that wait in memory for the sender task, beyond which the oldest is
# dropped. The queue grows only while a request is in flight, for at most the request
# timeout, because otherwise the sender moves it to the cluster or to the spool.
DEFAULT_PENDING_MAX = 10_000
OUTPUT_READS_PER_TURN = 20  # documents built between yields to the event loop
CLOSE_GRACE_SECONDS = 5.0  # for the last spool writes after close() aborts a request
DROP_LOG_INTERVAL = 60.0  # s between warnings about dropped documents

# Elasticsearch and OpenSearch reject a document _id longer than 512 bytes, so
# longer ids are hashed.
MAX_ID_BYTES = 512
# The daily suffix "-YYYY.MM.DD" takes 11 of the 255 bytes an index name may have.
MAX_INDEX_PREFIX_BYTES = 255 - 11
# Characters that Elasticsearch or OpenSearch reject in index names: OpenSearch
# rejects "+" anywhere, Elasticsearch only at the start.
_INDEX_FORBIDDEN = re.compile(r'[\\/*?"<>| ,#:+A-Z]')

_TAG_PREFIX = ("saltpeter", "job")
_JOB_TAG_SUFFIXES = {"start": JOB_START, "complete": JOB_END, "skipped": SKIPPED, "missed": MISSED}
_MACHINE_TAG_SUFFIXES = {"start": MACHINE_START, "complete": MACHINE_RESULT}


def _keyword_text() -> dict[str, Any]:
    # The original Saltpeter's template mapped these fields as text with a keyword
    # subfield, so dashboards aggregate on "job_name.keyword" and the like.
    return {"type": "text", "fields": {"keyword": {"type": "keyword", "ignore_above": 256}}}


MAPPING_PROPERTIES: dict[str, Any] = {
    "@timestamp": {"type": "date"},
    "job_name": _keyword_text(),
    "group": _keyword_text(),
    "job_instance": _keyword_text(),
    "machine": _keyword_text(),
    "msg_type": _keyword_text(),
    "return_code": {"type": "integer"},
    "output": {"type": "text"},
    "success": {"type": "boolean"},
    "reason": {"type": "keyword"},
    "trigger": {"type": "keyword"},
    "scheduled": {"type": "date"},
    "started": {"type": "date"},
    "targets": {"type": "keyword"},
    "maintenance": {"type": "keyword"},
    "running": {"type": "keyword"},
    "pid": {"type": "long"},
}


def index_template(index_prefix: str) -> dict[str, Any]:
    """Return the composable index template for ``<index_prefix>-*``."""
    return {
        "index_patterns": [f"{index_prefix}-*"],
        "template": {"mappings": {"properties": MAPPING_PROPERTIES}},
        "_meta": {"description": "Saltpeter run records", "managed_by": "saltpeter"},
    }


# ----------------------------------------------------------------------- URLs


def mask_url(url: str) -> str:
    """Return ``url`` with everything before the last "@" after the scheme replaced by ``***``.

    That covers userinfo even in a malformed URL, such as one without a scheme or
    with an unencoded "/" in the password, at the cost of masking a path with "@".
    """
    scheme, separator, rest = url.partition("://")
    if not separator:
        scheme, rest = "", url
    if "@" not in rest:
        return url
    return f"{scheme}{separator}***@{rest.rpartition('@')[2]}"


@dataclass(frozen=True)
class ClusterUrl:
    """A cluster's base URL, split from the credentials that its userinfo carried."""

    url: str  # scheme, host, port and path prefix, never userinfo
    username: str | None = field(default=None, repr=False)
    password: str | None = field(default=None, repr=False)


def parse_cluster_url(text: str) -> ClusterUrl:
    """Split a configured cluster URL. Raises ValueError with the URL masked.

    A URL without a port gets 9200 for http and 443 for https, the defaults of
    opensearch-py (``opensearchpy.client.utils._normalize_hosts``).
    """
    masked = mask_url(text)
    parts = urllib.parse.urlsplit(text.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{masked!r} is invalid: expected an http:// or https:// URL with a host")
    if parts.query or parts.fragment:
        raise ValueError(f"{masked!r} is invalid: a query string or fragment is not supported")
    try:
        port = parts.port
    except ValueError:
        raise ValueError(
            f"{masked!r} is invalid: the port is not a number from 0 to 65535"
        ) from None
    if port is None:
        port = 443 if parts.scheme == "https" else 9200
    host = parts.hostname
    if ":" in host:
        host = f"[{host}]"  # an IPv6 address needs brackets in a URL
    path = parts.path.rstrip("/")
    username = urllib.parse.unquote(parts.username) if parts.username is not None else None
    password = urllib.parse.unquote(parts.password) if parts.password is not None else None
    return ClusterUrl(f"{parts.scheme}://{host}:{port}{path}", username, password)


def check_index_prefix(prefix: str) -> str | None:
    """Return why ``prefix`` cannot start an index name, or None when it can."""
    if not prefix:
        return "must not be empty"
    if _INDEX_FORBIDDEN.search(prefix):
        return 'must be lowercase and free of spaces and \\ / * ? " < > | , # : +'
    if prefix[0] in "-_" or prefix in (".", ".."):
        return "must not start with - or _ and must not be . or .."
    if len(prefix.encode("utf-8")) > MAX_INDEX_PREFIX_BYTES:
        return f"is longer than {MAX_INDEX_PREFIX_BYTES} bytes"
    return None


# ------------------------------------------------------------------ documents


@dataclass(frozen=True)
class Document:
    """One document as two lines of a ``_bulk`` request: the index action and the source."""

    index: str
    id: str
    payload: bytes  # the action line and the source line, each ending in "\n"

    @classmethod
    def create(cls, index: str, doc_id: str, source: dict[str, Any]) -> Document:
        action = json.dumps({"index": {"_index": index, "_id": doc_id}}, ensure_ascii=False)
        body = json.dumps(source, ensure_ascii=False, separators=(",", ":"))
        # "replace" turns a lone surrogate, which UTF-8 cannot encode, into "?".
        payload = f"{action}\n{body}\n".encode("utf-8", "replace")
        return cls(index, doc_id, payload)

    @classmethod
    def from_lines(cls, action_line: bytes, source_line: bytes) -> Document:
        """Rebuild a document from spooled lines. Raises ValueError if they are damaged."""
        try:
            meta = json.loads(action_line)["index"]
            index, doc_id = meta["_index"], meta["_id"]
            json.loads(source_line)
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"damaged spool record: {exc}") from None
        return cls(index, doc_id, action_line + b"\n" + source_line + b"\n")

    @property
    def source(self) -> dict[str, Any]:
        return json.loads(self.payload.split(b"\n", 2)[1])


def document_id(run_id: str, minion: str, msg_type: str) -> str:
    """Return the ``_id`` of a run's document: the same inputs always give the same id."""
    text = "/".join(part for part in (run_id, minion, msg_type) if part)
    if len(text.encode("utf-8")) > MAX_ID_BYTES:
        return hashlib.sha256(text.encode("utf-8")).hexdigest()
    return text


def index_name(prefix: str, instant: datetime) -> str:
    """Return the daily index for an aware instant, dated in UTC."""
    return f"{prefix}-{instant.astimezone(timezone.utc):%Y.%m.%d}"


def format_timestamp(instant: datetime) -> str:
    """Format an aware instant as ISO 8601 in UTC with milliseconds, as ``@timestamp``."""
    utc = instant.astimezone(timezone.utc)
    return f"{utc:%Y-%m-%dT%H:%M:%S}.{utc.microsecond // 1000:03d}Z"


def _parse_instant(value: object) -> datetime | None:
    if not isinstance(value, str) or not value:
        return None
    try:
        instant = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return instant if instant.tzinfo is not None else instant.replace(tzinfo=timezone.utc)


def message_type(tag: str) -> str | None:
    """Return the msg_type for an event tag, or None for events that are not shipped.

    Job names and minion ids contain no "/", so a job event has four tag parts
    (``saltpeter/job/<job>/start``) and a minion event five.
    """
    parts = tag.split("/")
    if tuple(parts[:2]) != _TAG_PREFIX:
        return None
    if len(parts) == 4:
        return _JOB_TAG_SUFFIXES.get(parts[3])
    if len(parts) == 5:
        return _MACHINE_TAG_SUFFIXES.get(parts[4])
    return None


@dataclass(frozen=True)
class RunEvent:
    """A run event waiting in memory to become a document."""

    msg_type: str
    data: dict[str, Any]
    received: datetime  # when the engine announced it, aware UTC
    group: str


def _slot_run_id(job: str, instant: datetime, suffix: str) -> str:
    # The run manager names a skipped slot "<job>_<epoch seconds>_skipped".
    return f"{job}_{int(instant.timestamp())}_{suffix}"


def _job_end_summary(retcodes: dict[str, int]) -> str:
    succeeded = sum(1 for code in retcodes.values() if code == 0)
    summary = f"{succeeded} of {len(retcodes)} minion(s) returned 0"
    failed = [f"{minion} ({code})" for minion, code in sorted(retcodes.items()) if code != 0]
    if failed:
        summary += "; failed: " + ", ".join(failed)
    return summary


def build_source(event: RunEvent, output: str) -> tuple[str, dict[str, Any], datetime]:
    """Build a document's run id, source fields and instant from a run event.

    ``output`` is the stored output of a minion's result, and empty for other events.
    Raises KeyError or TypeError when the event lacks a field that its tag promises.
    """
    data = event.data
    job = str(data["job"])
    minion = ""
    return_code: int | None = 0
    text = ""
    extra: dict[str, Any] = {}
    instant = event.received

    if event.msg_type == JOB_START:
        run_id = str(data["run_id"])
        extra = {
            "trigger": data.get("trigger"),
            "scheduled": data.get("scheduled"),
            "targets": list(data.get("targets") or ()),
            "maintenance": list(data.get("maintenance") or ()),
        }
    elif event.msg_type == MACHINE_START:
        run_id, minion = str(data["run_id"]), str(data["minion"])
        instant = _parse_instant(data.get("time")) or instant
        extra = {"pid": data.get("pid")}
    elif event.msg_type == MACHINE_RESULT:
        run_id, minion = str(data["run_id"]), str(data["minion"])
        return_code = int(data["retcode"])
        text = output
        extra = {"reason": data.get("reason"), "success": return_code == 0}
    elif event.msg_type == JOB_END:
        run_id = str(data["run_id"])
        instant = _parse_instant(data.get("ended")) or instant
        success = bool(data.get("success"))
        # As in the original Saltpeter: 0 when every minion returned 0, otherwise 1.
        return_code = 0 if success else 1
        text = _job_end_summary(dict(data.get("retcodes") or {}))
        extra = {"success": success, "started": data.get("started")}
    elif event.msg_type == SKIPPED:
        scheduled = _parse_instant(data.get("scheduled"))
        run_id = str(data.get("run_id") or _slot_run_id(job, scheduled or instant, "skipped"))
        return_code = None
        text = f"skipped: {data.get('reason')}"
        extra = {
            "reason": data.get("reason"),
            "scheduled": data.get("scheduled"),
            "running": list(data.get("running") or ()),
        }
    elif event.msg_type == MISSED:
        scheduled = _parse_instant(data["scheduled"])
        if scheduled is None:
            raise TypeError(f"missed event of job {job} has no valid scheduled time")
        instant = scheduled
        run_id = str(data.get("run_id") or _slot_run_id(job, scheduled, "missed"))
        return_code = None
        text = "missed: the engine was not running at the scheduled time"
        extra = {"scheduled": data.get("scheduled")}
    else:
        raise KeyError(event.msg_type)

    source: dict[str, Any] = {
        "job_name": job,
        "group": event.group,
        "job_instance": run_id,
        "@timestamp": format_timestamp(instant),
        "machine": minion,
        "return_code": return_code,
        "output": text,
        "msg_type": event.msg_type,
        **extra,
    }
    return run_id, source, instant


# ---------------------------------------------------------------------- retry


def retry_delay(failures: int, base: float, cap: float) -> float:
    """Return the seconds to wait after ``failures`` consecutive failures (1 or more).

    The wait doubles with each failure, from ``base`` up to ``cap``.
    """
    exponent = min(max(failures, 1) - 1, 62)
    return min(cap, base * 2.0**exponent)


def request_is_retryable(status: int | None) -> bool:
    """Tell whether a failed request is worth sending again later.

    No status means that the request got no response. Authentication failures (401,
    403) are retried because the operator can fix the credentials without losing the
    spooled documents. Other 4xx statuses mean the request itself is wrong.
    """
    if status is None or status in (401, 403, 408, 429):
        return True
    return not 400 <= status < 500


def item_is_retryable(status: int) -> bool:
    """Tell whether a bulk item that failed with ``status`` may succeed when resent."""
    return status == 429 or status >= 500


# ---------------------------------------------------------------------- spool


@dataclass
class _Segment:
    number: int
    path: Path
    size: int  # bytes
    count: int  # documents
    sealed: bool = False  # read for sending, so nothing more is appended


class Spool:
    """An on-disk FIFO of documents, bounded in bytes, that survives a restart.

    The spool is a directory of numbered segment files in the ``_bulk`` NDJSON
    format. New documents are appended to the newest segment until it reaches
    ``segment_max_bytes``, and the oldest segment is sent first. When the total
    size exceeds ``max_bytes``, whole segments are dropped, oldest first. The
    methods block on disk I/O, so the shipper calls them from a worker thread. They
    take a lock, so calls from two threads run one after the other.
    """

    SUFFIX = ".ndjson"

    def __init__(self, directory: Path, max_bytes: int, segment_max_bytes: int) -> None:
        self.directory = Path(directory)
        self.max_bytes = max_bytes
        self.segment_max_bytes = max(1, min(segment_max_bytes, max_bytes // 10))
        self._segments: deque[_Segment] = deque()
        self._bytes = 0
        self._count = 0
        self._lock = threading.Lock()

    @property
    def documents(self) -> int:
        return self._count

    @property
    def size(self) -> int:
        return self._bytes

    def load(self) -> int:
        """Create the directory or find the segments an earlier run left; return their documents."""
        with self._lock:
            self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
            self._segments.clear()
            self._bytes = self._count = 0
            numbered = []
            for path in self.directory.iterdir():
                if path.suffix == self.SUFFIX and path.stem.isdigit():
                    numbered.append((int(path.stem), path))
                elif path.suffix == ".tmp":
                    path.unlink(missing_ok=True)  # an interrupted replace()
            for number, path in sorted(numbered):
                data = path.read_bytes()
                # Sealed, because a crash may have left half a record at the end.
                segment = _Segment(number, path, len(data), data.count(b"\n") // 2, sealed=True)
                self._add(segment)
            return self._count

    def append(self, documents: list[Document]) -> int:
        """Append documents after every spooled one; return how many the bound dropped."""
        if not documents:
            return 0
        with self._lock:
            payload = b"".join(document.payload for document in documents)
            tail = self._segments[-1] if self._segments else None
            if tail is None or tail.sealed or tail.size >= self.segment_max_bytes:
                number = tail.number + 1 if tail is not None else 1
                self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
                tail = _Segment(number, self.directory / f"{number:020d}{self.SUFFIX}", 0, 0)
                self._write(tail.path, payload, append=False)
                self._add(tail)
            else:
                self._write(tail.path, payload, append=True)
            tail.size += len(payload)
            tail.count += len(documents)
            self._bytes += len(payload)
            self._count += len(documents)
            return self._enforce_bound()

    def read_head(self) -> tuple[_Segment | None, list[Document], int]:
        """Read the oldest segment and seal it; return it, its documents and the damaged ones."""
        with self._lock:
            if not self._segments:
                return None, [], 0
            segment = self._segments[0]
            segment.sealed = True
            try:
                data = segment.path.read_bytes()
            except FileNotFoundError:
                data = b""
            lines = data.split(b"\n")
            if lines and lines[-1] == b"":
                lines.pop()
            documents: list[Document] = []
            damaged = 0
            for position in range(0, len(lines) - 1, 2):
                try:
                    documents.append(Document.from_lines(lines[position], lines[position + 1]))
                except ValueError:
                    damaged += 1
            damaged += len(lines) % 2  # a half-written record at the end
            return segment, documents, damaged

    def remove(self, segment: _Segment) -> None:
        """Delete a sent segment."""
        with self._lock:
            if segment in self._segments:
                self._segments.remove(segment)
                self._bytes -= segment.size
                self._count -= segment.count
            segment.path.unlink(missing_ok=True)

    def replace(self, segment: _Segment, documents: list[Document]) -> None:
        """Keep only ``documents`` in a segment, in its place in the order."""
        if not documents:
            self.remove(segment)
            return
        with self._lock:
            payload = b"".join(document.payload for document in documents)
            scratch = segment.path.with_suffix(".tmp")
            self._write(scratch, payload, append=False)
            os.replace(scratch, segment.path)
            if segment in self._segments:
                self._bytes += len(payload) - segment.size
                self._count += len(documents) - segment.count
            segment.size, segment.count = len(payload), len(documents)

    def _add(self, segment: _Segment) -> None:
        self._segments.append(segment)
        self._bytes += segment.size
        self._count += segment.count

    def _enforce_bound(self) -> int:
        dropped = 0
        while self._bytes > self.max_bytes and self._segments:
            oldest = self._segments.popleft()
            self._bytes -= oldest.size
            self._count -= oldest.count
            dropped += oldest.count
            oldest.path.unlink(missing_ok=True)
        return dropped

    @staticmethod
    def _write(path: Path, payload: bytes, *, append: bool) -> None:
        # The spool contains job output, so only the engine's user may read it.
        flags = os.O_WRONLY | os.O_CREAT | (os.O_APPEND if append else os.O_TRUNC)
        descriptor = os.open(path, flags, 0o600)
        with os.fdopen(descriptor, "wb") as stream:
            stream.write(payload)


# ------------------------------------------------------------------- backends


class ClusterError(Exception):
    """A request to the cluster that failed, with the HTTP status when there was one."""

    def __init__(self, status: int | None, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail

    @property
    def retryable(self) -> bool:
        return request_is_retryable(self.status)


class SearchBackend(Protocol):
    """The requests a shipper makes, through one official client."""

    product: str  # "Elasticsearch" or "OpenSearch", for messages
    masked_url: str  # the URL with credentials masked, for messages

    async def template_exists(self, name: str) -> bool: ...

    async def put_template(self, name: str, body: dict[str, Any]) -> None: ...

    async def bulk(self, body: bytes) -> dict[str, Any]: ...

    async def close(self) -> None: ...


class ElasticsearchBackend:
    """Requests through elasticsearch-py's AsyncElasticsearch.

    NOTE: elasticsearch-py sends ``compatible-with=<its major version>`` in its
    content types, which an older cluster rejects, so the installed client's major
    version must match the cluster's (the compatibility matrix in the elasticsearch-py
    README). Raises ImportError when the client library is missing.
    """

    product = "Elasticsearch"

    def __init__(
        self,
        url: ClusterUrl,
        masked_url: str,
        *,
        api_key: str | None = None,
        ca_certs: str | None = None,
        request_timeout: float = DEFAULT_REQUEST_TIMEOUT,
    ) -> None:
        import elasticsearch

        self._module = elasticsearch
        self.url = url
        self.masked_url = masked_url
        self._api_key = api_key
        self._ca_certs = ca_certs
        self._request_timeout = request_timeout
        self._client: Any = None

    def _get_client(self) -> Any:
        # The aiohttp session needs a running loop, so the client is made on first use.
        if self._client is None:
            options: dict[str, Any] = {
                "request_timeout": self._request_timeout,
                "max_retries": 0,  # the shipper retries, with backoff and the spool
                "retry_on_timeout": False,
            }
            if self._api_key:
                options["api_key"] = self._api_key
            elif self.url.username is not None:
                options["basic_auth"] = (self.url.username, self.url.password or "")
            if self._ca_certs:
                options["ca_certs"] = self._ca_certs
            self._client = self._module.AsyncElasticsearch([self.url.url], **options)
        return self._client

    async def _request(self, call: Callable[[Any], Awaitable[T]]) -> T:
        try:
            return await call(self._get_client())
        except self._module.ApiError as exc:
            raise ClusterError(exc.meta.status, str(exc)) from None
        except self._module.TransportError as exc:
            raise ClusterError(None, str(exc)) from None

    async def template_exists(self, name: str) -> bool:
        response = await self._request(
            lambda client: client.indices.exists_index_template(name=name)
        )
        return bool(response)

    async def put_template(self, name: str, body: dict[str, Any]) -> None:
        await self._request(
            lambda client: client.indices.put_index_template(
                name=name,
                index_patterns=body["index_patterns"],
                template=body["template"],
                meta=body["_meta"],
            )
        )

    async def bulk(self, body: bytes) -> dict[str, Any]:
        response = await self._request(lambda client: client.bulk(operations=body))
        return dict(response.body)

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()
            self._client = None


class OpenSearchBackend:
    """Requests through opensearch-py's AsyncOpenSearch. Raises ImportError when missing."""

    product = "OpenSearch"

    def __init__(
        self,
        url: ClusterUrl,
        masked_url: str,
        *,
        ca_certs: str | None = None,
        request_timeout: float = DEFAULT_REQUEST_TIMEOUT,
    ) -> None:
        import opensearchpy
        import opensearchpy.exceptions

        self._module = opensearchpy
        self.url = url
        self.masked_url = masked_url
        self._ca_certs = ca_certs
        self._request_timeout = request_timeout
        self._client: Any = None

    def _get_client(self) -> Any:
        if self._client is None:
            options: dict[str, Any] = {
                "timeout": self._request_timeout,
                "max_retries": 0,
                "retry_on_timeout": False,
            }
            if self.url.username is not None:
                options["http_auth"] = (self.url.username, self.url.password or "")
            if self._ca_certs:
                options["ca_certs"] = self._ca_certs
            self._client = self._module.AsyncOpenSearch(hosts=[self.url.url], **options)
        return self._client

    async def _request(self, call: Callable[[Any], Awaitable[T]]) -> T:
        try:
            return await call(self._get_client())
        except self._module.exceptions.TransportError as exc:
            status = exc.status_code if isinstance(exc.status_code, int) else None
            raise ClusterError(status, str(exc)) from None
        except self._module.exceptions.OpenSearchException as exc:
            # For example a response that is not JSON, which a proxy may send.
            raise ClusterError(None, str(exc)) from None

    async def template_exists(self, name: str) -> bool:
        return bool(
            await self._request(lambda client: client.indices.exists_index_template(name=name))
        )

    async def put_template(self, name: str, body: dict[str, Any]) -> None:
        await self._request(lambda client: client.indices.put_index_template(name=name, body=body))

    async def bulk(self, body: bytes) -> dict[str, Any]:
        return dict(await self._request(lambda client: client.bulk(body=body)))

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()
            self._client = None


# -------------------------------------------------------------------- shipper


@dataclass
class _BulkOutcome:
    delivered: bool  # False when the request or some items should be retried
    retry: list[Document] = field(default_factory=list)


class _Aborted(Exception):
    """close() stopped waiting for a request."""


class Shipper:
    """Send run events to one cluster as documents, spooling them while it is away.

    ``output_of(run_id, minion)`` returns a minion's stored output and
    ``group_of(job)`` the name of the job's file without the extension (None when the
    job is gone). The sender task calls ``output_of`` on the event loop, so the store
    must stay open until close() returns.
    """

    def __init__(
        self,
        backend: SearchBackend,
        index_prefix: str,
        spool_dir: Path,
        output_of: Callable[[str, str], str],
        group_of: Callable[[str], str | None],
        *,
        spool_max_bytes: int = DEFAULT_SPOOL_MAX_BYTES,
        pending_max: int = DEFAULT_PENDING_MAX,
        batch_max_documents: int = DEFAULT_BATCH_MAX_DOCUMENTS,
        batch_max_bytes: int = DEFAULT_BATCH_MAX_BYTES,
        retry_base: float = DEFAULT_RETRY_BASE,
        retry_cap: float = DEFAULT_RETRY_CAP,
        clock: Callable[[], datetime] = lambda: datetime.now(timezone.utc),
    ) -> None:
        self.backend = backend
        self.index_prefix = index_prefix
        self.output_of = output_of
        self.group_of = group_of
        self.pending_max = pending_max
        self.batch_max_documents = batch_max_documents
        self.batch_max_bytes = batch_max_bytes
        self.retry_base = retry_base
        self.retry_cap = retry_cap
        self.clock = clock
        self.spool = Spool(spool_dir, spool_max_bytes, batch_max_bytes)

        self.sent = 0  # documents the cluster stored
        self.spooled = 0  # documents written to the spool
        self.dropped = 0  # documents lost to the memory or spool bound, or to a disk error
        self.rejected = 0  # documents the cluster rejected permanently (4xx other than 429)

        self._pending: deque[RunEvent] = deque()
        self._wakeup = asyncio.Event()
        self._abort = asyncio.Event()
        self._closing = False
        self._closed = False
        self._task: asyncio.Task[None] | None = None
        self._template_ready = False
        self._failures = 0  # consecutive failed requests
        self._dropped_logged = 0
        self._dropped_logged_at = 0.0
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="saltpeter-spool"
        )

    def __repr__(self) -> str:
        return f"<Shipper {self.backend.product} {self.backend.masked_url}>"

    @property
    def _label(self) -> str:
        return f"{self.backend.product} at {self.backend.masked_url}"

    # -- the engine's hooks: they only enqueue ------------------------------

    def on_event(self, tag: str, data: dict[str, Any]) -> None:
        """Queue a run event for shipping. Runs on the engine's loop: no I/O."""
        kind = message_type(tag)
        if kind is None:
            return
        if self._closed:
            self.dropped += 1
            return
        if len(self._pending) >= self.pending_max:
            self._pending.popleft()
            self.dropped += 1
        group = self.group_of(str(data.get("job", ""))) or ""
        self._pending.append(RunEvent(kind, data, self.clock(), group))
        self._wakeup.set()

    def on_output(self, job: str, run_id: str, minion: str, data: str) -> None:
        """Ignore streamed output: a minion's result document carries its stored output."""

    # -- lifecycle --------------------------------------------------------------

    async def start(self) -> None:
        """Install the index template if it is missing, then start the sender task.

        Waits at most one request timeout for the cluster. When the template cannot be
        installed yet, the sender task tries again before it sends any document.
        """
        if self._task is not None:
            return
        log.info(
            "Shipping run records to %s, into %s-YYYY.MM.DD (spool %s, at most %d bytes)",
            self._label,
            self.index_prefix,
            self.spool.directory,
            self.spool.max_bytes,
        )
        try:
            await self._install_template()
        except Exception:
            log.exception("%s: unexpected error while installing the index template", self._label)
        self._task = asyncio.create_task(self._run(), name=f"saltpeter-shipper-{self._label}")

    async def close(self, timeout: float = 5.0) -> None:
        """Send what the cluster takes within ``timeout`` seconds and spool the rest."""
        if self._closed:
            return
        self._closing = True
        self._wakeup.set()
        task = self._task
        if task is not None:
            done, _ = await asyncio.wait({task}, timeout=timeout)
            if not done:
                self._abort.set()
                done, _ = await asyncio.wait({task}, timeout=CLOSE_GRACE_SECONDS)
            if not done:
                task.cancel()
                log.error(
                    "%s: the sender did not stop within %g s after close; %d queued run "
                    "event(s) are lost",
                    self._label,
                    timeout + CLOSE_GRACE_SECONDS,
                    len(self._pending),
                )
                self.dropped += len(self._pending)
                self._pending.clear()
        elif self._pending:
            # Never started: keep the queued events for the next engine start.
            try:
                await self._in_thread(self.spool.load)
            except OSError as exc:
                log.error(
                    "%s: spool %s is unusable, so documents that do not reach the cluster "
                    "are dropped; check its permissions and free space: %s",
                    self._label,
                    self.spool.directory,
                    exc,
                )
            await self._spool_pending()
        self._closed = True
        await self.backend.close()
        self._executor.shutdown(wait=False)
        log.info(
            "Stopped shipping to %s: %d sent, %d spooled, %d dropped, %d rejected, "
            "%d waiting in the spool",
            self._label,
            self.sent,
            self.spooled,
            self.dropped,
            self.rejected,
            self.spool.documents,
        )

    # -- the sender task -------------------------------------------------------

    async def _run(self) -> None:
        try:
            found = await self._in_thread(self.spool.load)
        except OSError as exc:
            log.error(
                "%s: spool %s is unusable, so documents that do not reach the cluster "
                "are dropped; check its permissions and free space: %s",
                self._label,
                self.spool.directory,
                exc,
            )
            found = 0
        if found:
            log.info(
                "%s: %d document(s) from an earlier run wait in spool %s",
                self._label,
                found,
                self.spool.directory,
            )
        while not (self._closing and not self._pending and not self.spool.documents):
            try:
                progressed = await self._step()
            except Exception:
                # The task must outlive a bug or an unexpected library error, so the
                # step counts as a failed request and is retried with backoff.
                log.exception("%s: unexpected error while shipping", self._label)
                self._failures += 1
                progressed = False
            if not progressed:
                if self._closing:
                    break
                await self._wait_for_retry()
            self._report_drops()
        await self._spool_pending()
        self._report_drops()

    async def _step(self) -> bool:
        """Make one attempt at progress; return False when the cluster failed."""
        if not self._template_ready and not await self._install_template():
            return False
        if self.spool.documents:
            # Documents in the spool are older than queued ones, so the queue goes to
            # the spool behind them and the oldest segment is sent first.
            await self._spool_pending()
            return await self._send_spool_head()
        if self._pending:
            return await self._send_pending()
        if not self._closing:
            self._wakeup.clear()
            await self._wakeup.wait()
        return True

    async def _wait_for_retry(self) -> None:
        """Wait out the backoff, moving queued events to the spool meanwhile."""
        delay = retry_delay(self._failures, self.retry_base, self.retry_cap)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + delay
        while not self._closing:
            if self._pending:
                await self._spool_pending()
                continue
            remaining = deadline - loop.time()
            if remaining <= 0:
                return
            self._wakeup.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wakeup.wait(), remaining)

    async def _install_template(self) -> bool:
        """Install the index template unless it exists; return False to retry later."""
        name = self.index_prefix
        try:
            if await self._call(self.backend.template_exists(name)):
                log.debug("%s: index template %s exists", self._label, name)
            else:
                await self._call(self.backend.put_template(name, index_template(name)))
                log.info("%s: installed index template %s for %s-*", self._label, name, name)
        except ClusterError as error:
            if error.retryable:
                self._note_failure(f"installing index template {name}", error)
                return False
            log.error(
                "%s: cannot install index template %s: %s. Documents are sent anyway and "
                "get the mappings the cluster derives; install the template by hand as "
                "docs/elasticsearch.md shows",
                self._label,
                name,
                error.detail,
            )
        except _Aborted:
            return False
        self._template_ready = True
        return True

    async def _send_pending(self) -> bool:
        documents = await self._take_documents()
        if not documents:
            return True
        try:
            outcome = await self._deliver(documents)
        except _Aborted:
            outcome = _BulkOutcome(False, documents)
        if outcome.retry:
            # The spool is empty here, so these go first, ahead of the queue.
            await self._spool_documents(outcome.retry)
        return outcome.delivered

    async def _send_spool_head(self) -> bool:
        try:
            segment, documents, damaged = await self._in_thread(self.spool.read_head)
        except OSError as exc:
            log.error("%s: cannot read spool %s: %s", self._label, self.spool.directory, exc)
            return False
        if damaged:
            log.warning(
                "%s: skipped %d damaged record(s) in spool %s",
                self._label,
                damaged,
                segment.path if segment else self.spool.directory,
            )
            self.dropped += damaged
        if segment is None:
            return True
        try:
            outcome = await self._deliver(documents) if documents else _BulkOutcome(True)
        except _Aborted:
            return False
        try:
            if outcome.delivered:
                await self._in_thread(self.spool.remove, segment)
            elif len(outcome.retry) < len(documents):
                await self._in_thread(self.spool.replace, segment, outcome.retry)
        except OSError as exc:
            log.error("%s: cannot update spool %s: %s", self._label, segment.path, exc)
        return outcome.delivered

    async def _deliver(self, documents: list[Document]) -> _BulkOutcome:
        """Send documents in one bulk request and sort out what to retry."""
        body = b"".join(document.payload for document in documents)
        try:
            response = await self._call(self.backend.bulk(body))
        except ClusterError as error:
            if error.retryable:
                self._note_failure(f"a bulk request of {len(documents)} document(s)", error)
                return _BulkOutcome(False, documents)
            self.rejected += len(documents)
            log.error(
                "%s: rejected a bulk request of %d document(s), which are dropped: %s",
                self._label,
                len(documents),
                error.detail,
            )
            self._note_success()
            return _BulkOutcome(True)

        items = response.get("items") or []
        retry: list[Document] = []
        rejections: list[str] = []
        for position, document in enumerate(documents):
            result = _item_result(items[position]) if position < len(items) else {}
            status = int(result.get("status", 503))
            if 200 <= status < 300:
                self.sent += 1
            elif item_is_retryable(status):
                retry.append(document)
            else:
                self.rejected += 1
                rejections.append(f"{document.index}/{document.id}: {status} {result.get('error')}")
        if rejections:
            log.error(
                "%s: rejected %d document(s), which are dropped; the first: %s",
                self._label,
                len(rejections),
                rejections[0],
            )
        if retry:
            self._note_failure(
                f"{len(retry)} of {len(documents)} document(s) in a bulk request",
                ClusterError(429, "the cluster asked to resend them later (429 or 5xx items)"),
            )
            return _BulkOutcome(False, retry)
        self._note_success()
        return _BulkOutcome(True)

    async def _call(self, request: Awaitable[T]) -> T:
        """Await a request unless close() gives up on it first, which raises _Aborted."""
        request_task = asyncio.ensure_future(request)
        abort_task = asyncio.ensure_future(self._abort.wait())
        try:
            done, _ = await asyncio.wait(
                {request_task, abort_task}, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            abort_task.cancel()
        if request_task not in done:
            request_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await request_task
            raise _Aborted
        return request_task.result()

    # -- the queue and the spool ------------------------------------------------

    async def _take_documents(self) -> list[Document]:
        """Turn queued events into documents, up to one bulk request's worth."""
        documents: list[Document] = []
        size = 0
        while self._pending and len(documents) < self.batch_max_documents:
            if documents and size >= self.batch_max_bytes:
                break
            if len(documents) % OUTPUT_READS_PER_TURN == OUTPUT_READS_PER_TURN - 1:
                # Each minion result reads its output from the run store on this loop,
                # so other callbacks get a turn between groups of reads.
                await asyncio.sleep(0)
            document = self._document_for(self._pending.popleft())
            if document is not None:
                documents.append(document)
                size += len(document.payload)
        return documents

    def _document_for(self, event: RunEvent) -> Document | None:
        output = ""
        if event.msg_type == MACHINE_RESULT:
            run_id, minion = event.data.get("run_id"), event.data.get("minion")
            try:
                output = self.output_of(str(run_id), str(minion))
            except Exception as exc:
                # The document still records the result, without the output.
                log.warning(
                    "%s: job %s run %s minion %s: cannot read the output from the run "
                    "store, so the document has none: %s",
                    self._label,
                    event.data.get("job"),
                    run_id,
                    minion,
                    exc,
                )
        try:
            run_id, source, instant = build_source(event, output)
        except (KeyError, TypeError, ValueError) as exc:
            log.error(
                "%s: dropped a %s event of job %s with a missing or invalid field: %r",
                self._label,
                event.msg_type,
                event.data.get("job"),
                exc,
            )
            self.dropped += 1
            return None
        doc_id = document_id(run_id, source["machine"], event.msg_type)
        return Document.create(index_name(self.index_prefix, instant), doc_id, source)

    async def _spool_pending(self) -> None:
        while self._pending:
            await self._spool_documents(await self._take_documents())

    async def _spool_documents(self, documents: list[Document]) -> None:
        if not documents:
            return
        try:
            dropped = await self._in_thread(self.spool.append, documents)
        except OSError as exc:
            log.error(
                "%s: cannot write %d document(s) to spool %s, so they are dropped: %s",
                self._label,
                len(documents),
                self.spool.directory,
                exc,
            )
            self.dropped += len(documents)
            return
        self.spooled += len(documents)
        self.dropped += dropped

    async def _in_thread(self, function: Callable[..., T], *args: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, function, *args)

    # -- logging ------------------------------------------------------------------

    def _note_failure(self, action: str, error: ClusterError) -> None:
        self._failures += 1
        delay = retry_delay(self._failures, self.retry_base, self.retry_cap)
        if self._failures == 1:
            level = logging.ERROR if error.status in (401, 403) else logging.WARNING
            log.log(
                level,
                "%s: %s failed: %s. Documents wait in spool %s; retrying in %g s, with "
                "the wait doubling up to %g s",
                self._label,
                action,
                error.detail,
                self.spool.directory,
                delay,
                self.retry_cap,
            )
        else:
            log.debug(
                "%s: %s failed again (%d in a row): %s; retrying in %g s",
                self._label,
                action,
                self._failures,
                error.detail,
                delay,
            )

    def _note_success(self) -> None:
        if self._failures:
            log.info(
                "%s: reachable again after %d failed request(s); %d document(s) wait in the spool",
                self._label,
                self._failures,
                self.spool.documents,
            )
        self._failures = 0

    def _report_drops(self) -> None:
        if self.dropped == self._dropped_logged:
            return
        now = time.monotonic()
        if self._dropped_logged and now - self._dropped_logged_at < DROP_LOG_INTERVAL:
            return
        log.warning(
            "%s: %d document(s) dropped so far. Drops happen, oldest first, when the spool "
            "(%d bytes at most) or the queue (%d events at most) is full, and when the "
            "spool cannot be written or read (logged above)",
            self._label,
            self.dropped,
            self.spool.max_bytes,
            self.pending_max,
        )
        self._dropped_logged = self.dropped
        self._dropped_logged_at = now


def _item_result(item: Any) -> dict[str, Any]:
    """Return the result of one bulk item, which is keyed by its operation."""
    if isinstance(item, dict) and item:
        result = next(iter(item.values()))
        if isinstance(result, dict):
            return result
    return {}


# ------------------------------------------------------------------ settings


@dataclass(frozen=True)
class _Product:
    setting: str  # the saltpeter_config key that contains the URL
    extra: str  # the package extra that installs the client


_PRODUCTS = (
    _Product("elasticsearch", "saltpeter[elasticsearch]"),
    _Product("opensearch", "saltpeter[opensearch]"),
)


def _optional_setting(settings: Settings, name: str, default: T) -> T:
    # Settings that the config loader does not know yet read as their default.
    value = getattr(settings, name, default)
    return default if value is None or value == "" else value


def shippers_from_settings(
    settings: Settings,
    spool_root: Path,
    output_of: Callable[[str, str], str],
    group_of: Callable[[str], str | None],
) -> list[Shipper]:
    """Create a shipper for each cluster configured in ``settings``.

    Each gets the spool directory ``spool_root/<setting>``. A cluster whose URL or
    index prefix is invalid, or whose client library is missing, gets one error log
    and no shipper, and the others still ship.
    """
    spool_max_bytes = int(
        _optional_setting(settings, "shipping_spool_max_bytes", DEFAULT_SPOOL_MAX_BYTES)
    )
    shippers: list[Shipper] = []
    for product in _PRODUCTS:
        url_text = str(getattr(settings, product.setting, "") or "")
        if not url_text:
            continue
        backend = _backend_for(product, url_text, settings)
        if backend is None:
            continue
        prefix = str(getattr(settings, f"{product.setting}_index", "saltpeter"))
        problem = check_index_prefix(prefix)
        if problem is not None:
            log.error(
                "saltpeter_config: field %r: %r is invalid: an index name %s; not shipping to %s",
                f"{product.setting}_index",
                prefix,
                problem,
                backend.masked_url,
            )
            continue
        shippers.append(
            Shipper(
                backend,
                prefix,
                Path(spool_root) / product.setting,
                output_of,
                group_of,
                spool_max_bytes=spool_max_bytes,
            )
        )
    return shippers


def _backend_for(product: _Product, url_text: str, settings: Settings) -> SearchBackend | None:
    name = product.setting
    try:
        url = parse_cluster_url(url_text)
    except ValueError as exc:
        log.error("saltpeter_config: field %r: %s; not shipping to it", name, exc)
        return None

    username = _optional_setting(settings, f"{name}_username", "")
    password = _optional_setting(settings, f"{name}_password", "")
    if username:
        # The separate settings take precedence over the URL's userinfo.
        url = ClusterUrl(url.url, username, password)
    api_key = _optional_setting(settings, f"{name}_api_key", "") if name == "elasticsearch" else ""
    if api_key and url.username is not None:
        log.warning(
            "saltpeter_config: %s_api_key is set, so %s authenticates with it and not with "
            "the user name and password",
            name,
            name,
        )
    ca_certs = _optional_setting(settings, f"{name}_ca_certs", "") or None
    masked = mask_url(url_text)

    try:
        if name == "elasticsearch":
            return ElasticsearchBackend(url, masked, api_key=api_key or None, ca_certs=ca_certs)
        return OpenSearchBackend(url, masked, ca_certs=ca_certs)
    except ImportError as exc:
        log.error(
            "saltpeter_config: %s is set, but its client library cannot be imported (%s); "
            "install it with: pip install '%s'. Run records are not shipped to %s",
            name,
            exc,
            product.extra,
            masked,
        )
        return None
