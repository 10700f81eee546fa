"""Run credentials signed with a minion's Salt key and checked against the master's keys.

The keys are real RSA keys in a real master's key directory layout, read
through Salt's own key cache (the ``localfs_key`` driver).
"""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import pytest
import salt.config
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from saltpeter import protocol, wrapper
from saltpeter.saltbridge import MinionKeys


def write_key_pair(directory: Path, name: str) -> tuple[Path, bytes]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    private_path = directory / f"{name}.pem"
    private_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return private_path, public


@pytest.fixture
def master_opts(tmp_path: Path) -> dict[str, Any]:
    config = tmp_path / "master"
    config.write_text(
        f"root_dir: {tmp_path}\npki_dir: {tmp_path / 'pki'}\ncachedir: {tmp_path / 'cache'}\n"
    )
    for bank in ("minions", "minions_pre", "minions_rejected"):
        (tmp_path / "pki" / bank).mkdir(parents=True)
    return salt.config.master_config(str(config))


def accept(opts: dict[str, Any], tmp_path: Path, minion: str, bank: str = "minions") -> Path:
    private, public = write_key_pair(tmp_path, minion)
    (Path(opts["pki_dir"]) / bank / minion).write_bytes(public)
    return private


def credential(private: Path, run: str, minion: str, token: str) -> tuple[bytes, str]:
    signature = wrapper.sign_credential(str(private), run, minion, token)
    return protocol.credential_message(run, minion, token), signature


class TestSignatures:
    def test_accepted_minion_signature_verifies(self, master_opts, tmp_path: Path) -> None:
        private = accept(master_opts, tmp_path, "m1")
        message, signature = credential(private, "job_1", "m1", "tok")
        assert MinionKeys(master_opts).verify("m1", message, signature) is True

    def test_wrapper_and_engine_sign_the_same_bytes(self) -> None:
        assert wrapper.credential_message("r", "m", "t") == protocol.credential_message(
            "r", "m", "t"
        )

    def test_other_minions_key_is_rejected(self, master_opts, tmp_path: Path) -> None:
        accept(master_opts, tmp_path, "m1")
        intruder = accept(master_opts, tmp_path, "m2")
        message, signature = credential(intruder, "job_1", "m1", "tok")
        assert MinionKeys(master_opts).verify("m1", message, signature) is False

    def test_signature_of_another_token_is_rejected(self, master_opts, tmp_path: Path) -> None:
        private = accept(master_opts, tmp_path, "m1")
        _, signature = credential(private, "job_1", "m1", "old-token")
        message = protocol.credential_message("job_1", "m1", "new-token")
        assert MinionKeys(master_opts).verify("m1", message, signature) is False

    def test_missing_signature_is_rejected(self, master_opts, tmp_path: Path) -> None:
        accept(master_opts, tmp_path, "m1")
        message = protocol.credential_message("job_1", "m1", "tok")
        assert MinionKeys(master_opts).verify("m1", message, None) is False

    def test_pending_key_is_rejected(self, master_opts, tmp_path: Path) -> None:
        private = accept(master_opts, tmp_path, "m1", bank="minions_pre")
        message, signature = credential(private, "job_1", "m1", "tok")
        assert MinionKeys(master_opts).verify("m1", message, signature) is False

    def test_unknown_minion_is_rejected(self, master_opts, tmp_path: Path) -> None:
        private, _ = write_key_pair(tmp_path, "ghost")
        message, signature = credential(private, "job_1", "ghost", "tok")
        assert MinionKeys(master_opts).verify("ghost", message, signature) is False

    def test_garbage_signature_is_rejected(self, master_opts, tmp_path: Path) -> None:
        accept(master_opts, tmp_path, "m1")
        message = protocol.credential_message("job_1", "m1", "tok")
        keys = MinionKeys(master_opts)
        assert keys.verify("m1", message, "not base64!") is False
        assert keys.verify("m1", message, base64.b64encode(b"x" * 256).decode()) is False

    def test_deleted_key_stops_working_after_ttl(self, master_opts, tmp_path: Path) -> None:
        private = accept(master_opts, tmp_path, "m1")
        message, signature = credential(private, "job_1", "m1", "tok")
        keys = MinionKeys(master_opts, ttl=0)
        assert keys.verify("m1", message, signature) is True
        (Path(master_opts["pki_dir"]) / "minions" / "m1").unlink()
        assert keys.verify("m1", message, signature) is False


class TestKeyLoading:
    """The minion's own key is loaded without the slow check of its primes."""

    @staticmethod
    def sign_recording_loads(
        master_opts, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, accepts_skip: bool
    ) -> tuple[list[dict[str, Any]], bool]:
        """Sign a credential; return the keyword arguments of each key load and the verdict.

        Without ACCEPTS_SKIP the loader behaves as in cryptography before 39,
        which has no unsafe_skip_rsa_key_validation.
        """
        private = accept(master_opts, tmp_path, "m1")
        calls: list[dict[str, Any]] = []
        real = serialization.load_pem_private_key

        def load(data: bytes, password: bytes | None, **kwargs: Any) -> Any:
            calls.append(kwargs)
            if kwargs and not accepts_skip:
                raise TypeError("unexpected keyword argument")
            return real(data, password, **kwargs)

        monkeypatch.setattr(serialization, "load_pem_private_key", load)
        message, signature = credential(private, "job_1", "m1", "tok")
        return calls, MinionKeys(master_opts).verify("m1", message, signature)

    def test_key_is_loaded_unchecked(
        self, master_opts, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        calls, verified = self.sign_recording_loads(master_opts, tmp_path, monkeypatch, True)
        assert calls == [{"unsafe_skip_rsa_key_validation": True}]
        assert verified is True

    def test_older_cryptography_loads_the_key_checked(
        self, master_opts, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        calls, verified = self.sign_recording_loads(master_opts, tmp_path, monkeypatch, False)
        assert calls == [{"unsafe_skip_rsa_key_validation": True}, {}]
        assert verified is True


class TestLaunchSigning:
    def test_unreadable_key_fails_the_launch(self, tmp_path: Path) -> None:
        result = wrapper.launch(
            "job_1",
            "job",
            "ws://127.0.0.1:9/wrapper",
            "tok",
            "m1",
            wrapper.__file__,
            "off",
            str(tmp_path / "logs"),
            str(tmp_path / "state"),
            key_path=str(tmp_path / "missing.pem"),
        )
        assert result["started"] is False
        assert "cannot sign the run credential" in str(result["error"])
