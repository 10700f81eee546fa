"""Engine side of the wrapper protocol: parsing and checking frames.

docs/protocol.md is the contract. Every frame from a wrapper goes through
:func:`parse_frame`, which returns a typed frame or raises
:class:`ProtocolError` with one of the protocol's error codes, so the
WebSocket handler never acts on a field it has not checked.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

PROTOCOL_VERSION = 1
MAX_FRAME_BYTES = 1024 * 1024

# Error codes sent in `error` frames; see docs/protocol.md.
AUTH_FAILED = "auth_failed"
UNKNOWN_RUN = "unknown_run"
BAD_MESSAGE = "bad_message"
PROTOCOL_MISMATCH = "protocol_version"
JOB_UNAVAILABLE = "job_unavailable"

COMPLETE_REASONS = frozenset({"exit", "signal", "timeout", "killed", "start_failed"})

# Maximum length of a run id, minion id, token or version string in a hello.
_MAX_ID_LENGTH = 256
# Base64 of an RSA signature: 684 characters for a 4096-bit key.
_MAX_SIGNATURE_LENGTH = 2048


class ProtocolError(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True)
class Hello:
    protocol: int
    run: str
    machine: str
    token: str
    wrapper_version: str
    need_job: bool
    # Base64 RSA signature of the run credential by the minion's Salt key.
    signature: str | None = None


@dataclass(frozen=True)
class Start:
    seq: int
    pid: int
    time: str


@dataclass(frozen=True)
class Output:
    seq: int
    data: str
    # Bytes of output the wrapper left out right before ``data``.
    skipped: int = 0


@dataclass(frozen=True)
class Complete:
    seq: int
    retcode: int
    reason: str
    time: str
    signal: str | None


@dataclass(frozen=True)
class Heartbeat:
    time: str


Frame = Hello | Start | Output | Complete | Heartbeat
SequencedFrame = Start | Output | Complete


def _bad(message: str) -> ProtocolError:
    return ProtocolError(BAD_MESSAGE, message)


def _field(obj: dict[str, Any], name: str, kind: type | tuple[type, ...]) -> Any:
    if name not in obj:
        raise _bad(f"{obj.get('type')} frame: missing field '{name}'")
    value = obj[name]
    # bool is a subclass of int; a boolean where a number belongs is malformed.
    if not isinstance(value, kind) or (isinstance(value, bool) and bool not in _kinds(kind)):
        raise _bad(f"{obj.get('type')} frame: field '{name}' has the wrong type")
    return value


def _kinds(kind: type | tuple[type, ...]) -> tuple[type, ...]:
    return kind if isinstance(kind, tuple) else (kind,)


def _identifier(obj: dict[str, Any], name: str) -> str:
    value = _field(obj, name, str)
    if not value or len(value) > _MAX_ID_LENGTH:
        raise _bad(f"{obj.get('type')} frame: field '{name}' is empty or too long")
    return value


def _signature(obj: dict[str, Any]) -> str | None:
    if obj.get("signature") is None:
        return None
    value = _field(obj, "signature", str)
    if not value or len(value) > _MAX_SIGNATURE_LENGTH:
        raise _bad("hello frame: field 'signature' is empty or too long")
    return value


def _seq(obj: dict[str, Any]) -> int:
    seq = _field(obj, "seq", int)
    if seq < 1:
        raise _bad(f"{obj.get('type')} frame: seq {seq} is below 1")
    return seq


def _skipped(obj: dict[str, Any]) -> int:
    if obj.get("skipped") is None:
        return 0
    skipped = _field(obj, "skipped", int)
    if skipped < 0:
        raise _bad(f"output frame: skipped {skipped} is below 0")
    return skipped


def parse_frame(text: str | bytes) -> Frame:
    """Parse one frame from a wrapper, or raise ProtocolError(BAD_MESSAGE)."""
    if isinstance(text, bytes):
        raise _bad("binary frames are not part of the protocol; send JSON text frames")
    try:
        obj = json.loads(text)
    except ValueError as exc:
        raise _bad(f"frame is not valid JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise _bad("frame is not a JSON object")
    kind = obj.get("type")
    if kind == "hello":
        protocol = _field(obj, "protocol", int)
        if protocol != PROTOCOL_VERSION:
            raise ProtocolError(
                PROTOCOL_MISMATCH,
                f"protocol {protocol} is not supported; this engine speaks {PROTOCOL_VERSION}",
            )
        return Hello(
            protocol=protocol,
            run=_identifier(obj, "run"),
            machine=_identifier(obj, "machine"),
            token=_identifier(obj, "token"),
            wrapper_version=str(obj.get("wrapper_version", "unknown"))[:_MAX_ID_LENGTH],
            need_job=bool(obj.get("need_job", False)),
            signature=_signature(obj),
        )
    if kind == "start":
        return Start(seq=_seq(obj), pid=_field(obj, "pid", int), time=_field(obj, "time", str))
    if kind == "output":
        return Output(seq=_seq(obj), data=_field(obj, "data", str), skipped=_skipped(obj))
    if kind == "complete":
        reason = _field(obj, "reason", str)
        if reason not in COMPLETE_REASONS:
            raise _bad(f"complete frame: unknown reason {reason!r}")
        signal = obj.get("signal")
        return Complete(
            seq=_seq(obj),
            retcode=_field(obj, "retcode", int),
            reason=reason,
            time=_field(obj, "time", str),
            signal=str(signal)[:32] if signal is not None else None,
        )
    if kind == "heartbeat":
        return Heartbeat(time=str(obj.get("time", "")))
    raise _bad(f"unknown frame type {str(kind)[:64]!r}")


def credential_message(run_id: str, machine_id: str, token: str) -> bytes:
    """Return the bytes a minion signs with its Salt key to prove it received a run.

    The wrapper builds the same bytes (``credential_message`` in wrapper.py).
    """
    return f"saltpeter-run-credential:{run_id}:{machine_id}:{token}".encode()


def encode(kind: str, **fields: Any) -> str:
    return json.dumps({"type": kind, **fields}, separators=(",", ":"))
