"""Engine-side parsing of wrapper frames."""

from __future__ import annotations

import json

import pytest

from saltpeter import protocol
from saltpeter.protocol import (
    BAD_MESSAGE,
    PROTOCOL_MISMATCH,
    Complete,
    Heartbeat,
    Hello,
    Output,
    ProtocolError,
    Start,
    parse_frame,
)


def frame(**fields: object) -> str:
    return json.dumps(fields)


HELLO = {
    "type": "hello",
    "protocol": 1,
    "run": "backup_1",
    "machine": "m1",
    "token": "secret",
    "wrapper_version": "1.0",
    "need_job": True,
}


class TestValidFrames:
    def test_hello(self) -> None:
        parsed = parse_frame(frame(**HELLO))
        assert parsed == Hello(1, "backup_1", "m1", "secret", "1.0", True)

    def test_start(self) -> None:
        assert parse_frame(frame(type="start", seq=1, pid=42, time="t")) == Start(1, 42, "t")

    def test_output(self) -> None:
        assert parse_frame(frame(type="output", seq=2, data="x\n")) == Output(2, "x\n")

    def test_output_with_skipped_bytes(self) -> None:
        parsed = parse_frame(frame(type="output", seq=3, data="end", skipped=4096))
        assert parsed == Output(3, "end", skipped=4096)
        assert parse_frame(frame(type="output", seq=3, data="", skipped=None)) == Output(3, "")

    def test_complete_with_signal(self) -> None:
        parsed = parse_frame(
            frame(type="complete", seq=3, retcode=137, reason="signal", time="t", signal="SIGKILL")
        )
        assert parsed == Complete(3, 137, "signal", "t", "SIGKILL")

    def test_heartbeat(self) -> None:
        assert parse_frame(frame(type="heartbeat", time="t")) == Heartbeat("t")


class TestRejectedFrames:
    @pytest.mark.parametrize(
        ("text", "expected"),
        [
            ("not json", "not valid JSON"),
            ("[1, 2]", "not a JSON object"),
            (frame(type="launch"), "unknown frame type 'launch'"),
            (frame(type="output", seq=1), "missing field 'data'"),
            (frame(type="output", seq="1", data=""), "field 'seq' has the wrong type"),
            (frame(type="output", seq=True, data=""), "field 'seq' has the wrong type"),
            (frame(type="output", seq=0, data=""), "seq 0 is below 1"),
            (frame(type="output", seq=1, data="", skipped=-1), "skipped -1 is below 0"),
            (frame(type="output", seq=1, data="", skipped="9"), "'skipped' has the wrong type"),
            (frame(type="output", seq=1, data="", skipped=True), "'skipped' has the wrong type"),
            (frame(type="start", seq=1, pid=1.5, time="t"), "field 'pid' has the wrong type"),
            (
                frame(type="complete", seq=1, retcode=0, reason="bored", time="t"),
                "unknown reason 'bored'",
            ),
            (frame(**{**HELLO, "run": ""}), "field 'run' is empty or too long"),
            (frame(**{**HELLO, "token": "x" * 300}), "field 'token' is empty or too long"),
        ],
    )
    def test_bad_message(self, text: str, expected: str) -> None:
        with pytest.raises(ProtocolError) as caught:
            parse_frame(text)
        assert caught.value.code == BAD_MESSAGE
        assert expected in caught.value.message

    def test_binary_frame(self) -> None:
        with pytest.raises(ProtocolError, match="binary frames"):
            parse_frame(b"{}")

    def test_other_protocol_version(self) -> None:
        with pytest.raises(ProtocolError) as caught:
            parse_frame(frame(**{**HELLO, "protocol": 2}))
        assert caught.value.code == PROTOCOL_MISMATCH


def test_encode_is_compact_json() -> None:
    assert protocol.encode("ack", seq=3) == '{"type":"ack","seq":3}'
