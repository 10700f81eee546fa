"""Fixtures shared by the whole test suite.

Nothing here starts a server. Servers that tests start bind to 127.0.0.1 only.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def short_tmp_dir(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """Return a function that creates a fresh, empty directory with a short path.

    Salt creates Unix sockets below a sandbox root, and Linux limits a socket path
    to 107 bytes, so roots sit directly in the session's temporary directory
    (``/tmp/pytest-of-USER/pytest-N/PREFIXn``) rather than in a folder named after
    the test. pytest keeps the directories of the last three sessions.
    """

    def make(prefix: str) -> Path:
        return tmp_path_factory.mktemp(prefix, numbered=True)

    return make
