"""The HTTP API, the live WebSocket and the web dashboard, served inside the engine.

:func:`listen` serves them with Tornado on the engine's own asyncio loop. Every
handler runs on that loop, reads the run store on the engine's SQLite connection
(short indexed queries) and calls the engine directly, so the API never changes
run state by any path other than the one the runners use. The endpoints, status
codes and message shapes are documented in ``docs/api.md``.

Access rules:

- Without ``api_token`` the API must listen on a loopback address, and it answers
  only requests whose ``Host`` header names a loopback address, so that a web page
  from another site cannot reach it through DNS rebinding.
- With ``api_token`` every API request must carry ``Authorization: Bearer TOKEN``
  or the session cookie that ``POST /login`` sets. The dashboard's static files are
  served without it, because they contain no data and carry the login form.
- A browser request that changes state (POST) or opens the WebSocket is accepted
  only from the API's own origin.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import ipaddress
import json
import logging
import time
import urllib.parse
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import tornado.httpserver
import tornado.web
import tornado.websocket

from saltpeter.control import ControlError, build_status
from saltpeter.engine import NothingRunningError, RequestError, UnknownJobError
from saltpeter.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE

if TYPE_CHECKING:
    from saltpeter.engine import Engine
    from saltpeter.store import RunStore

log = logging.getLogger(__name__)

DASHBOARD_DIR = Path(__file__).resolve().parent / "dashboard"
SESSION_COOKIE = "saltpeter_session"
JSON_CONTENT_TYPE = "application/json; charset=UTF-8"

DEFAULT_RUNS_LIMIT = 20
MAX_RUNS_LIMIT = 1000

# Largest message a client may send on /ws. Client messages are small commands.
MAX_CLIENT_MESSAGE_BYTES = 64 * 1024
# Seconds between WebSocket pings; a client that misses them is disconnected.
WS_PING_SECONDS = 20.0

# Per-connection memory bounds for /ws, in bytes of JSON text queued in Tornado
# but not yet handed to the socket. Past PAUSE, output chunks for the connection
# are counted and dropped. Once the queue drains below RESUME, the client gets one
# ``output_dropped`` message per minion that lost output. Events and results still
# queue while output is dropped, and past CLOSE the connection is closed.
WS_OUTPUT_PAUSE_BYTES = 1024 * 1024
WS_OUTPUT_RESUME_BYTES = 256 * 1024
WS_CLOSE_BYTES = 16 * 1024 * 1024

# Output per minion included in a ``snapshot`` message: the most recent part only.
SNAPSHOT_OUTPUT_CHARS = 4096

# Auth failures are logged at most once per peer in this many seconds.
AUTH_LOG_INTERVAL = 60.0

_SESSION_KEY_LABEL = b"saltpeter dashboard session v1"
_LOOPBACK_NAMES = frozenset(("localhost",))
_SKIP_MESSAGES = {
    "overlap": "a run is still in flight and allow_overlap is false",
    "no_targets": "the target matched no minion",
    "slot_taken": "the slot already has a run",
}


class ApiConfigError(Exception):
    """The API settings would expose the API; raised by :func:`listen`."""


class ApiError(tornado.web.HTTPError):
    """A request that the API rejects, with its HTTP status and JSON details.

    Because it is an HTTPError without a log message, Tornado sends the error
    response without logging a traceback.
    """

    def __init__(self, status: int, message: str, **details: Any) -> None:
        super().__init__(status)
        self.status = status
        self.message = message
        self.details = details

    def body(self) -> dict[str, Any]:
        return {"status": "error", "message": self.message, **self.details}


# --------------------------------------------------------------------------- access


def _json_kind(value: object) -> str:
    """Name a decoded JSON value's kind in JSON's own words, for error messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"


def is_loopback(address: str) -> bool:
    """Tell whether a bind address or host name is a loopback address.

    An empty address binds every interface, so it is not loopback. Host names other
    than ``localhost`` are not resolved and count as not loopback.
    """
    text = address.strip().lower()
    if text in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(text.strip("[]")).is_loopback
    except ValueError:
        return False


def check_bind(address: str, token: str) -> None:
    """Raise ApiConfigError when ``address`` is not loopback and ``token`` is empty."""
    if token or is_loopback(address):
        return
    bind_text = address or "every interface"
    raise ApiConfigError(
        f"the HTTP API does not start: api_ws_bind_addr is {bind_text!r}, which is not a "
        "loopback address, and api_token is empty, so anyone who can reach that address "
        "could read every job and kill runs. Set api_token in saltpeter_config, or set "
        "api_ws_bind_addr to 127.0.0.1"
    )


def host_name(host_header: str) -> str:
    """Return the lower-case host name of a Host header value, without the port."""
    return urllib.parse.urlsplit("//" + host_header).hostname or ""


def same_origin(origin: str, host_header: str) -> bool:
    """Tell whether an Origin header names the same scheme-less host and port as Host."""
    parts = urllib.parse.urlsplit(origin)
    if parts.scheme not in ("http", "https"):
        return False
    return parts.netloc.lower() == host_header.lower()


def session_value(token: str) -> str:
    """Derive the session cookie's value from the token, so the cookie is not the token.

    A changed token gives another value, which signs every dashboard out.
    """
    return hmac.new(token.encode("utf-8"), _SESSION_KEY_LABEL, hashlib.sha256).hexdigest()


def _equal(presented: str, expected: str) -> bool:
    return hmac.compare_digest(presented.encode("utf-8"), expected.encode("utf-8"))


# --------------------------------------------------------------- schedule in words

_MONTH_WORDS = (
    "",
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
)
_WEEKDAY_WORDS = ("Sunday", "Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday")
_MONTH_NUMBERS = {word[:3].lower(): number for number, word in enumerate(_MONTH_WORDS) if word}
_WEEKDAY_NUMBERS = {word[:3].lower(): number for number, word in enumerate(_WEEKDAY_WORDS)}


def _join(words: list[str]) -> str:
    if len(words) <= 1:
        return "".join(words)
    return f"{', '.join(words[:-1])} and {words[-1]}"


def _ordinal(number: int) -> str:
    if 10 <= number % 100 <= 20:
        suffix = "th"
    else:
        suffix = {1: "st", 2: "nd", 3: "rd"}.get(number % 10, "th")
    return f"{number}{suffix}"


def _value_word(kind: str, token: str) -> str:
    """Return one field value in words: month and weekday names, or the number."""
    if kind == "month":
        number = _MONTH_NUMBERS.get(token)
        if number is None and token.isdigit():
            number = int(token)
        return _MONTH_WORDS[number] if number and 1 <= number <= 12 else token
    if kind == "weekday":
        number = _WEEKDAY_NUMBERS.get(token)
        if number is None and token.isdigit():
            number = int(token)
        return _WEEKDAY_WORDS[number % 7] if number is not None and number <= 7 else token
    return token


def _item_words(kind: str, item: str) -> str | None:
    """Return a number, a name or an ``N-M`` range in words; None for other forms."""
    if "/" in item or item == "*":
        return None
    if "-" in item:
        low, high = item.split("-", 1)
        return f"{_value_word(kind, low)} through {_value_word(kind, high)}"
    return _value_word(kind, item)


def _values_words(kind: str, text: str) -> tuple[str, bool] | None:
    """Return a comma-separated field in words and whether it names several values."""
    items = text.split(",")
    words = [_item_words(kind, item) for item in items]
    if any(word is None for word in words):
        return None
    several = len(items) > 1 or "-" in text
    return _join([word for word in words if word is not None]), several


def _step_words(unit: str, text: str) -> str | None:
    """Return ``*/S``, ``N-M/S`` or ``N/S`` in words, or None for other forms."""
    if text.count("/") != 1 or "," in text:
        return None
    start, step = text.split("/")
    if not step.isdigit():
        return None
    every = f"every {unit}" if step == "1" else f"every {step} {unit}s"
    if start == "*":
        return every
    if "-" in start:
        low, high = start.split("-", 1)
        return f"{every} from {unit} {low} through {high}"
    return f"{every} from {unit} {start}"


def _time_words(sec: str, minute: str, hour: str) -> str:
    if all(text.isdigit() for text in (sec, minute, hour)):
        clock = f"{int(hour):02d}:{int(minute):02d}"
        return f"at {clock}:{int(sec):02d}" if int(sec) else f"at {clock}"
    units = [("second", sec), ("minute", minute), ("hour", hour)]
    if sec == "0":
        # Second 0 is the default and goes without saying once a larger unit speaks.
        units = units[1:]
    phrases: list[str] = []
    covered = False  # the previous phrase ("every 15 seconds") already covers this unit
    for index, (unit, text) in enumerate(units):
        first = index == 0
        if text == "*":
            if first:
                phrases.append(f"every {unit}")
                covered = True
            elif not covered:
                phrases.append(f"of every {unit}")
                covered = True
            continue
        step = _step_words(unit, text)
        if step is not None:
            phrases.append(step if first else f"of {step}")
            covered = True
            continue
        values = _values_words("number", text)
        if values is None:
            phrases.append(f"at {unit} field {text}" if first else f"of {unit} field {text}")
        else:
            words, several = values
            noun = f"{unit}s" if several else unit
            phrases.append(f"at {noun} {words}" if first else f"of {noun} {words}")
        covered = False
    return " ".join(phrases)


def _day_of_month_words(text: str) -> str:
    step = _step_words("day", text)
    if step is not None:
        return f"{step} of the month"
    values = _values_words("number", text)
    if values is None:
        return f"on day-of-month field {text}"
    words, several = values
    return f"on {'days' if several else 'day'} {words} of the month"


def _weekday_words(text: str) -> str:
    step = _step_words("weekday", text)
    if step is not None:
        return step
    values = _values_words("weekday", text)
    return f"on {values[0]}" if values is not None else f"on weekday field {text}"


def _month_words(text: str) -> str:
    step = _step_words("month", text)
    if step is not None:
        return step
    values = _values_words("month", text)
    return f"in {values[0]}" if values is not None else f"in month field {text}"


def _year_words(text: str) -> str:
    step = _step_words("year", text)
    if step is not None:
        return step
    values = _values_words("number", text)
    return f"in {values[0]}" if values is not None else f"in year field {text}"


def describe_schedule(fields: Mapping[str, str], zone: str) -> str:
    """Describe a normalized seven-field schedule in English, for example
    ``every 5 minutes``, ``at 02:30 on Monday through Friday (Europe/Berlin)``.

    The day fields follow Vixie cron: when neither ``dom`` nor ``dow`` starts with
    ``*``, a day matching either one fires, and the text joins the two with "or".
    The zone is named when the schedule depends on the wall clock.
    """
    sec, minute, hour = fields["sec"], fields["min"], fields["hour"]
    dom, month, dow, year = fields["dom"], fields["mon"], fields["dow"], fields["year"]
    phrases = [_time_words(sec, minute, hour)]
    day_phrases = []
    if dom != "*":
        day_phrases.append(_day_of_month_words(dom))
    if dow != "*":
        day_phrases.append(_weekday_words(dow))
    if len(day_phrases) == 2:
        either = not dom.startswith("*") and not dow.startswith("*")
        phrases.append(f" {'or' if either else 'and'} ".join(day_phrases))
    else:
        phrases.extend(day_phrases)
    if month != "*":
        phrases.append(_month_words(month))
    if year != "*":
        phrases.append(_year_words(year))
    text = " ".join(phrases)
    wall_clock = hour != "*" or any(value != "*" for value in (dom, month, dow, year))
    return f"{text} ({zone})" if wall_clock else text


# ----------------------------------------------------------------- shared operations


@dataclass
class ApiContext:
    """State shared by every handler: the engine, the bind address and the limits."""

    engine: Engine
    address: str
    output_pause_bytes: int = WS_OUTPUT_PAUSE_BYTES
    output_resume_bytes: int = WS_OUTPUT_RESUME_BYTES
    close_bytes: int = WS_CLOSE_BYTES
    ping_seconds: float = WS_PING_SECONDS
    _auth_logged: dict[str, tuple[float, int]] = field(default_factory=dict)

    @property
    def store(self) -> RunStore:
        if self.engine.store is None:
            raise ApiError(503, "the engine has not opened its run store yet; retry shortly")
        return self.engine.store

    def token(self) -> str:
        # Read on every request, so a changed api_token applies without a restart.
        return str(getattr(self.engine.settings, "api_token", "") or "")

    def log_auth_failure(self, peer: str, reason: str) -> None:
        """Log a rejected request, at most once per peer per AUTH_LOG_INTERVAL seconds."""
        now = time.monotonic()
        last, suppressed = self._auth_logged.get(peer, (0.0, 0))
        if last and now - last < AUTH_LOG_INTERVAL:
            self._auth_logged[peer] = (last, suppressed + 1)
            return
        more = f" ({suppressed} more since the last report)" if suppressed else ""
        log.warning("HTTP API: rejected a request from %s: %s%s", peer, reason, more)
        self._auth_logged[peer] = (now, 0)

    def kill(self, name: object) -> tuple[int, dict[str, Any]]:
        """Kill every run of a job in flight; return the HTTP status and body."""
        try:
            result = self.engine.kill_job(name)
        except UnknownJobError as exc:
            return 404, {"status": "error", "message": str(exc)}
        except NothingRunningError as exc:
            return 409, {"status": "error", "message": str(exc), "reason": "not_running"}
        except RequestError as exc:
            return 400, {"status": "error", "message": str(exc)}
        job = result["job"]
        return 200, {
            "status": "ok",
            # The original Saltpeter's message, which existing tools may match.
            "message": f"Kill signal sent to job: {job}",
            "job": job,
            "signalled": result["signalled"],
        }

    async def run(self, name: object) -> tuple[int, dict[str, Any]]:
        """Start a run of a job now; return the HTTP status and body."""
        try:
            result = await self.engine.run_job(name)
        except UnknownJobError as exc:
            return 404, {"status": "error", "message": str(exc)}
        except RequestError as exc:
            return 400, {"status": "error", "message": str(exc)}
        return self._run_outcome(str(name), result)

    def _run_outcome(self, job: str, result: Mapping[str, Any]) -> tuple[int, dict[str, Any]]:
        if result.get("started"):
            targets = list(result.get("targets", []))
            return 200, {
                "status": "ok",
                "message": f"job '{job}' started as run {result['run_id']} on "
                f"{len(targets)} minion(s)",
                "job": job,
                "run_id": result["run_id"],
                "targets": targets,
                "maintenance": list(result.get("maintenance", [])),
            }
        reason = str(result.get("reason"))
        if reason == "unknown_job":
            return 404, {"status": "error", "message": f"unknown job {job!r}"}
        if reason == "maintenance":
            if self.engine.maintenance.global_:
                cause = "global maintenance is on (saltpeter_maintenance: global: true)"
            else:
                cause = "every minion that the target matched is under maintenance"
        else:
            cause = _SKIP_MESSAGES.get(reason, reason)
        running = list(result.get("running", []))
        if running:
            cause += f" (in flight: {', '.join(running)})"
        body: dict[str, Any] = {
            "status": "error",
            "message": f"job '{job}' did not start: {cause}",
            "job": job,
            "reason": reason,
        }
        if running:
            body["running"] = running
        return 409, body


# ------------------------------------------------------------------- documents


def _public_run(run: Mapping[str, Any]) -> dict[str, Any]:
    """Return a stored run without its token hash."""
    return {key: value for key, value in run.items() if key != "token_hash"}


def _result_summary(result: Mapping[str, Any]) -> dict[str, Any]:
    return {
        key: result[key] for key in ("state", "retcode", "reason", "started_at", "ended_at", "pid")
    }


def job_document(engine: Engine, store: RunStore, name: str, row: Any) -> dict[str, Any]:
    """Build the ``GET /jobs`` entry of one job."""
    job = engine.jobs[name]
    definition = job.describe()
    latest = store.latest_run(name)
    results: dict[str, Any] = {}
    if latest is not None:
        results = {
            machine: _result_summary(result)
            for machine, result in store.results(latest["run_id"], with_output=False).items()
        }
    running = [run.run_id for run in engine.manager.running(name)] if engine.manager else []
    return {
        "name": name,
        "schedule_text": describe_schedule(job.schedule_fields, job.timezone),
        "definition": definition,
        "next_run": row.next_run if row is not None else None,
        "last_run": row.last_run if row is not None else None,
        "last_run_id": latest["run_id"] if latest else None,
        "last_status": latest["status"] if latest else None,
        "last_results": results,
        "running": running,
    }


def config_document(engine: Engine, token_required: bool) -> dict[str, Any]:
    """Build the ``GET /config`` document: runtime settings that the dashboard shows."""
    maintenance = engine.maintenance
    return {
        "debug": engine.settings.debug,
        "maintenance": {"global": maintenance.global_, "machines": sorted(maintenance.machines)},
        "timezone": engine.settings.timezone,
        "token_required": token_required,
        "jobs": len(engine.jobs),
        "runs_in_flight": len(engine.manager.runs) if engine.manager else 0,
        "server_time": datetime.now(timezone.utc).isoformat(),
    }


def _parse_limit(text: str | None) -> int:
    if text is None:
        return DEFAULT_RUNS_LIMIT
    try:
        limit = int(text)
    except ValueError:
        raise ApiError(
            400, f"limit {text!r} is invalid: expected a whole number 1-{MAX_RUNS_LIMIT}"
        ) from None
    if not 1 <= limit <= MAX_RUNS_LIMIT:
        raise ApiError(400, f"limit {limit} is out of range 1-{MAX_RUNS_LIMIT}")
    return limit


def job_from_body(body: bytes) -> str:
    """Return the job name of a ``{"job": NAME}`` request body; raise ApiError 400."""
    example = 'send a JSON object such as {"job": "backup"}'
    if not body.strip():
        raise ApiError(400, f"the request body is empty; {example}")
    try:
        payload = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"the request body is not valid JSON ({exc}); {example}") from None
    if not isinstance(payload, dict):
        raise ApiError(
            400, f"the request body is {_json_kind(payload)}, not a JSON object; {example}"
        )
    if "job" not in payload:
        raise ApiError(400, f"the request body has no 'job' key; {example}")
    job = payload["job"]
    if not isinstance(job, str):
        raise ApiError(400, f"'job' is {json.dumps(job)}, not a string; {example}")
    return job


# ------------------------------------------------------------------------ handlers


class _AccessMixin:
    """Host, origin and token checks shared by the API, WebSocket and file handlers."""

    api: ApiContext
    request: Any
    requires_token = True

    def check_access(self) -> None:
        token = self.api.token()
        peer = str(self.request.remote_ip)
        if not token:
            if not is_loopback(self.api.address):
                # api_token was removed from the config after the start.
                self.api.log_auth_failure(peer, "api_token is empty on a non-loopback address")
                raise ApiError(
                    403,
                    "api_token is empty and the API listens on a non-loopback address; "
                    "set api_token in saltpeter_config",
                )
            name = host_name(self.request.host)
            if not is_loopback(name):
                self.api.log_auth_failure(peer, f"Host header {self.request.host!r}")
                raise ApiError(
                    403,
                    f"the Host header names {self.request.host!r}; without api_token the API "
                    "answers only requests to 127.0.0.1, localhost or [::1]",
                )
        if self.request.method not in ("GET", "HEAD", "OPTIONS"):
            self.check_same_origin()
        if token and self.requires_token:
            self.check_token(token, peer)

    def check_same_origin(self) -> None:
        headers = self.request.headers
        fetch_site = headers.get("Sec-Fetch-Site")
        origin = headers.get("Origin")
        if fetch_site in ("cross-site", "same-site") or (
            origin is not None and not same_origin(origin, self.request.host)
        ):
            raise ApiError(403, f"requests from origin {origin!r} are not accepted")

    def check_token(self, token: str, peer: str) -> None:
        header = self.request.headers.get("Authorization")
        if header is not None:
            scheme, _, presented = header.partition(" ")
            if scheme.lower() != "bearer" or not _equal(presented.strip(), token):
                self.api.log_auth_failure(peer, "invalid Authorization header")
                raise ApiError(401, "the Authorization header does not carry the API token")
            return
        cookie = self.request.cookies.get(SESSION_COOKIE)
        if cookie is not None and _equal(cookie.value, session_value(token)):
            return
        reason = "invalid session cookie" if cookie is not None else "no token"
        self.api.log_auth_failure(peer, reason)
        raise ApiError(
            401,
            "this API needs a token: send Authorization: Bearer TOKEN, or sign in on the dashboard",
        )


def _security_headers(handler: tornado.web.RequestHandler) -> None:
    handler.set_header("X-Content-Type-Options", "nosniff")
    handler.set_header("Referrer-Policy", "no-referrer")
    handler.set_header(
        "Content-Security-Policy",
        "default-src 'self'; connect-src 'self'; img-src 'self' data:; "
        "frame-ancestors 'none'; base-uri 'none'; form-action 'self'",
    )


class ApiHandler(_AccessMixin, tornado.web.RequestHandler):
    """Base of the JSON endpoints."""

    def initialize(self, api: ApiContext) -> None:
        self.api = api

    def set_default_headers(self) -> None:
        _security_headers(self)
        self.set_header("Cache-Control", "no-store")

    def prepare(self) -> None:
        self.check_access()

    def send_json(self, body: Any, status: int = 200) -> None:
        self.set_status(status)
        self.set_header("Content-Type", JSON_CONTENT_TYPE)
        self.finish(json.dumps(body))

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        exc = kwargs.get("exc_info", (None, None, None))[1]
        if isinstance(exc, ApiError):
            body = exc.body()
            if exc.status == 401:
                self.set_header("WWW-Authenticate", 'Bearer realm="saltpeter"')
        elif isinstance(exc, tornado.web.HTTPError) and exc.log_message:
            body = {"status": "error", "message": exc.log_message % exc.args}
        else:
            body = {"status": "error", "message": self._reason}
        self.set_header("Content-Type", JSON_CONTENT_TYPE)
        self.finish(json.dumps(body))


class StatusHandler(ApiHandler):
    def get(self) -> None:
        job = self.get_query_argument("job", None)
        try:
            document = build_status(self.api.store, job)
        except ControlError as exc:
            raise ApiError(404, str(exc)) from None
        self.send_json(document)


class KillHandler(ApiHandler):
    def post(self) -> None:
        status, body = self.api.kill(job_from_body(self.request.body))
        self.send_json(body, status)


class RunHandler(ApiHandler):
    async def post(self) -> None:
        status, body = await self.api.run(job_from_body(self.request.body))
        self.send_json(body, status)


class JobsHandler(ApiHandler):
    def get(self) -> None:
        engine = self.api.engine
        store = self.api.store
        only = self.get_query_argument("job", None)
        if only is not None and only not in engine.jobs:
            raise ApiError(404, f"unknown job {only!r}")
        rows = store.jobs()
        names = [only] if only is not None else sorted(engine.jobs)
        jobs = [job_document(engine, store, name, rows.get(name)) for name in names]
        self.send_json({"jobs": jobs})


class RunsHandler(ApiHandler):
    def get(self) -> None:
        store = self.api.store
        job = self.get_query_argument("job", None)
        limit = _parse_limit(self.get_query_argument("limit", None))
        runs = store.runs(job, limit)
        if job is not None and not runs and job not in self.api.engine.jobs:
            raise ApiError(404, f"unknown job {job!r}: no job file defines it and no run is stored")
        documents = []
        for run in runs:
            document = _public_run(run)
            document["results"] = {
                machine: _result_summary(result)
                for machine, result in store.results(run["run_id"], with_output=False).items()
            }
            documents.append(document)
        self.send_json({"runs": documents})


class RunDetailHandler(ApiHandler):
    def get(self, run_id: str) -> None:
        store = self.api.store
        run = store.run(run_id)
        if run is None:
            raise ApiError(404, f"run {run_id!r} is not in the store")
        document = _public_run(run)
        document["results"] = store.results(run_id)
        self.send_json(document)


class MetricsHandler(ApiHandler):
    def get(self) -> None:
        self.set_header("Content-Type", METRICS_CONTENT_TYPE)
        self.finish(self.api.engine.metrics.render())


class ConfigHandler(ApiHandler):
    def get(self) -> None:
        self.send_json(config_document(self.api.engine, bool(self.api.token())))


class LoginHandler(ApiHandler):
    """Check a token and set the session cookie that the dashboard uses."""

    requires_token = False

    def post(self) -> None:
        token = self.api.token()
        presented = self.get_body_argument("token", None)
        if presented is None:
            try:
                payload = json.loads(self.request.body or b"{}")
            except (ValueError, UnicodeDecodeError):
                payload = None
            if isinstance(payload, dict) and isinstance(payload.get("token"), str):
                presented = payload["token"]
        if not token:
            self.send_json({"status": "ok", "message": "this API needs no token"})
            return
        if presented is None or not _equal(presented, token):
            self.api.log_auth_failure(str(self.request.remote_ip), "wrong token at login")
            raise ApiError(401, "the token is wrong")
        self.set_cookie(
            SESSION_COOKIE,
            session_value(token),
            path="/",
            httponly=True,
            samesite="Strict",
            secure=self.request.protocol == "https",
        )
        self.send_json({"status": "ok", "message": "signed in"})


class LogoutHandler(ApiHandler):
    requires_token = False

    def post(self) -> None:
        self.clear_cookie(SESSION_COOKIE, path="/")
        self.send_json({"status": "ok", "message": "signed out"})


class NotFoundHandler(ApiHandler):
    requires_token = False

    def prepare(self) -> None:
        raise ApiError(404, f"no such endpoint: {self.request.method} {self.request.path}")


class DashboardFileHandler(_AccessMixin, tornado.web.StaticFileHandler):
    """The dashboard's static files. They carry no data, so they need no token."""

    requires_token = False

    def initialize(self, path: str, api: ApiContext, default_filename: str | None = None) -> None:
        super().initialize(path, default_filename)
        self.api = api

    def set_default_headers(self) -> None:
        _security_headers(self)
        self.set_header("Cache-Control", "no-cache")

    def prepare(self) -> None:
        self.check_access()


# ----------------------------------------------------------------- the WebSocket


_WS_ACTIONS = ("subscribe", "unsubscribe", "killCron", "kill", "run")


def _names(value: object) -> list[str] | None:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(item, str) for item in value):
        return list(value)
    return None


class LiveHandler(_AccessMixin, tornado.websocket.WebSocketHandler):
    """One client of ``/ws``: job events and output, and kill and run commands.

    The handler is a RunObserver on the engine's manager while it is open. The
    manager calls it on the loop thread right after storing each change. A
    snapshot is read in the same loop turn as its subscription, so no chunk is in
    both a snapshot and a later ``output`` message, and no chunk falls between.
    """

    def initialize(self, api: ApiContext) -> None:
        self.api = api
        self.jobs: set[str] = set()
        self.all_jobs = False
        self.pending_bytes = 0
        self.dropping = False
        self.pauses = 0
        self.dropped: dict[tuple[str, str, str], int] = {}
        self.closing = False
        self.tasks: set[asyncio.Task[None]] = set()

    def set_default_headers(self) -> None:
        _security_headers(self)

    def prepare(self) -> None:
        try:
            self.check_access()
        except ApiError as exc:
            self.set_status(exc.status)
            if exc.status == 401:
                self.set_header("WWW-Authenticate", 'Bearer realm="saltpeter"')
            self.set_header("Content-Type", JSON_CONTENT_TYPE)
            self.finish(json.dumps(exc.body()))

    def check_origin(self, origin: str) -> bool:
        allowed = same_origin(origin, self.request.host)
        if not allowed:
            self.api.log_auth_failure(str(self.request.remote_ip), f"WebSocket origin {origin!r}")
        return allowed

    @property
    def peer(self) -> str:
        return str(self.request.remote_ip)

    def open(self, *args: str, **kwargs: str) -> None:
        manager = self.api.engine.manager
        if manager is not None:
            manager.observers.append(self)
        log.debug("HTTP API: WebSocket client %s connected", self.peer)

    def on_close(self) -> None:
        # Run requests in progress finish, because cancelling one could interrupt
        # the engine between storing a run and publishing it. Their results are
        # dropped by send().
        self.closing = True
        manager = self.api.engine.manager
        if manager is not None:
            # The manager may be iterating over its observers right now (a failed
            # write can close the connection), so the list changes on a later turn.
            asyncio.get_running_loop().call_soon(self._unregister, manager.observers)
        log.debug(
            "HTTP API: WebSocket client %s disconnected (code %s)", self.peer, self.close_code
        )

    def _unregister(self, observers: list[Any]) -> None:
        observers[:] = [observer for observer in observers if observer is not self]

    # -- sending, with the memory bound --------------------------------------

    def send(self, message: Mapping[str, Any]) -> None:
        if self.closing:
            return
        text = json.dumps(message)  # ASCII-only, so len() is the size in bytes
        size = len(text)
        if self.pending_bytes + size > self.api.close_bytes:
            log.warning(
                "HTTP API: WebSocket client %s has %d bytes of messages it does not read; "
                "closing the connection",
                self.peer,
                self.pending_bytes,
            )
            self.closing = True
            self.close(1008, "the client does not read its messages")
            return
        try:
            written = self.write_message(text)
        except tornado.websocket.WebSocketClosedError:
            self.closing = True
            return
        self.pending_bytes += size
        written.add_done_callback(lambda future: self._written(future, size))

    def _written(self, future: Awaitable[None], size: int) -> None:
        assert isinstance(future, asyncio.Future)
        if not future.cancelled():
            future.exception()  # retrieved, so a closed stream is not logged as unhandled
        self.pending_bytes -= size
        if self.dropping and self.pending_bytes <= self.api.output_resume_bytes:
            self.dropping = False
            dropped, self.dropped = self.dropped, {}
            for (job, run_id, machine), chars in dropped.items():
                self.send(
                    {
                        "type": "output_dropped",
                        "job": job,
                        "run_id": run_id,
                        "machine": machine,
                        "chars": chars,
                    }
                )

    def send_error_message(self, message: str, **details: Any) -> None:
        self.send({"type": "error", "message": message, **details})

    # -- RunObserver ---------------------------------------------------------

    def subscribed(self, job: str) -> bool:
        return self.all_jobs or job in self.jobs

    def on_event(self, tag: str, data: dict[str, Any]) -> None:
        parts = tag.split("/")
        if len(parts) < 4 or parts[:2] != ["saltpeter", "job"] or not self.subscribed(parts[2]):
            return
        self.send({"type": "event", "tag": tag, "job": parts[2], "data": data})

    def on_output(self, job: str, run_id: str, minion: str, data: str) -> None:
        if not self.subscribed(job) or self.closing:
            return
        if self.dropping or self.pending_bytes >= self.api.output_pause_bytes:
            if not self.dropping:
                self.pauses += 1
                level = logging.INFO if self.pauses == 1 else logging.DEBUG
                log.log(
                    level,
                    "HTTP API: WebSocket client %s reads too slowly; dropping output for it "
                    "(pause %d on this connection)",
                    self.peer,
                    self.pauses,
                )
            self.dropping = True
            key = (job, run_id, minion)
            self.dropped[key] = self.dropped.get(key, 0) + len(data)
            return
        self.send({"type": "output", "job": job, "run_id": run_id, "machine": minion, "data": data})

    # -- client messages -----------------------------------------------------

    def on_message(self, message: str | bytes) -> None:
        try:
            request = json.loads(message)
        except (ValueError, UnicodeDecodeError) as exc:
            self.send_error_message(f"the message is not valid JSON: {exc}")
            return
        if not isinstance(request, dict):
            self.send_error_message(
                f"the message is {_json_kind(request)}; expected a JSON object such as "
                '{"subscribe": "backup"}'
            )
            return
        request_id = request.get("id")
        actions = [key for key in _WS_ACTIONS if key in request]
        unknown = sorted(set(request) - set(_WS_ACTIONS) - {"id"})
        if unknown or len(actions) != 1:
            self.send_error_message(
                "expected exactly one of subscribe, unsubscribe, killCron, kill or run"
                + (f"; unknown keys: {', '.join(unknown)}" if unknown else ""),
                id=request_id,
            )
            return
        action = actions[0]
        value = request[action]
        if action == "subscribe":
            self._subscribe(value, request_id)
        elif action == "unsubscribe":
            self._unsubscribe(value, request_id)
        elif not isinstance(value, str):
            self.send_error_message(f"{action} takes a job name as a string", id=request_id)
        elif action in ("killCron", "kill"):
            status, body = self.api.kill(value)
            self.send(
                {"type": "result", "action": "kill", "code": status, "id": request_id, **body}
            )
        else:
            task = asyncio.ensure_future(self._run(value, request_id))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    async def _run(self, job: str, request_id: object) -> None:
        status, body = await self.api.run(job)
        self.send({"type": "result", "action": "run", "code": status, "id": request_id, **body})

    def _subscribe(self, value: object, request_id: object) -> None:
        engine = self.api.engine
        if value == "*":
            was_all, before = self.all_jobs, set(self.jobs)
            self.all_jobs = True
            self._send_subscribed(request_id)
            if not was_all:
                self._send_snapshots(lambda job: job not in before)
            return
        names = _names(value)
        if names is None:
            self.send_error_message(
                'subscribe takes a job name, a list of job names or "*"', id=request_id
            )
            return
        unknown = sorted(name for name in names if name not in engine.jobs)
        if unknown:
            self.send_error_message(
                f"unknown job(s): {', '.join(unknown)}", id=request_id, jobs=unknown
            )
            return
        new = set(names) - self.jobs
        already_all = self.all_jobs
        self.jobs.update(names)
        self._send_subscribed(request_id)
        if not already_all:
            self._send_snapshots(lambda job: job in new)

    def _unsubscribe(self, value: object, request_id: object) -> None:
        if value == "*":
            self.all_jobs = False
            self.jobs.clear()
        else:
            names = _names(value)
            if names is None:
                self.send_error_message(
                    'unsubscribe takes a job name, a list of job names or "*"', id=request_id
                )
                return
            self.jobs.difference_update(names)
        self.send(
            {
                "type": "unsubscribed",
                "id": request_id,
                "jobs": "*" if self.all_jobs else sorted(self.jobs),
            }
        )

    def _send_subscribed(self, request_id: object) -> None:
        self.send(
            {
                "type": "subscribed",
                "id": request_id,
                "jobs": "*" if self.all_jobs else sorted(self.jobs),
            }
        )

    def _send_snapshots(self, include: Callable[[str], bool]) -> None:
        """Send the state and recent output of the included jobs' runs in flight."""
        manager = self.api.engine.manager
        store = self.api.engine.store
        if manager is None or store is None:
            return
        for run in sorted(manager.runs.values(), key=lambda item: item.started_at):
            if include(run.job_name):
                self.send(snapshot_message(store, run.job_name, run.run_id))


def snapshot_message(store: RunStore, job: str, run_id: str) -> dict[str, Any]:
    """Build the ``snapshot`` message of one run in flight."""
    run = store.run(run_id) or {}
    machines: dict[str, Any] = {}
    for machine, result in store.results(run_id).items():
        output = result.pop("output")
        skipped = max(0, len(output) - SNAPSHOT_OUTPUT_CHARS)
        machines[machine] = {
            **_result_summary(result),
            "output": output[skipped:],
            "output_skipped": skipped,
        }
    return {
        "type": "snapshot",
        "job": job,
        "run_id": run_id,
        "trigger": run.get("trigger"),
        "scheduled_at": run.get("scheduled_at"),
        "started_at": run.get("started_at"),
        "machines": machines,
    }


# ------------------------------------------------------------------- the server


def make_app(api: ApiContext) -> tornado.web.Application:
    """Build the Tornado application of the API, the WebSocket and the dashboard."""
    context = {"api": api}
    routes: Iterable[tuple[str, type[tornado.web.RequestHandler], dict[str, Any]]] = (
        (r"/status", StatusHandler, context),
        (r"/kill", KillHandler, context),
        (r"/run", RunHandler, context),
        (r"/jobs", JobsHandler, context),
        (r"/runs", RunsHandler, context),
        (r"/runs/([^/]+)", RunDetailHandler, context),
        (r"/metrics", MetricsHandler, context),
        (r"/config", ConfigHandler, context),
        (r"/login", LoginHandler, context),
        (r"/logout", LogoutHandler, context),
        (r"/ws", LiveHandler, context),
        (
            r"/()",
            DashboardFileHandler,
            {"path": str(DASHBOARD_DIR), "api": api, "default_filename": "index.html"},
        ),
        (r"/dashboard/(.+)", DashboardFileHandler, {"path": str(DASHBOARD_DIR), "api": api}),
    )
    return tornado.web.Application(
        list(routes),
        default_handler_class=NotFoundHandler,
        default_handler_args=context,
        websocket_max_message_size=MAX_CLIENT_MESSAGE_BYTES,
        websocket_ping_interval=api.ping_seconds,
        compress_response=True,
    )


def listen(engine: Engine, port: int, address: str) -> tornado.httpserver.HTTPServer:
    """Serve the API, the WebSocket and the dashboard on ``address``:``port``.

    Runs on the loop that is current when called. Raises ApiConfigError, before
    binding, when ``address`` is not loopback and ``api_token`` is empty.
    """
    token = str(getattr(engine.settings, "api_token", "") or "")
    check_bind(address, token)
    api = ApiContext(engine=engine, address=address)
    server = tornado.httpserver.HTTPServer(make_app(api), xheaders=False)
    server.listen(port, address)
    log.info(
        "HTTP API and dashboard listening on http://%s:%d/ (%s)",
        f"[{address}]" if ":" in address else address,
        port,
        "token required" if token else "no token: loopback only",
    )
    return server
