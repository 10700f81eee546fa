#!/usr/bin/env bash
# Run the whole test suite: lint, unit tests, and integration tests against
# real salt-master and salt-minion processes on 127.0.0.1.
set -euo pipefail

top=$(cd "$(dirname "$0")/.." && pwd)
"$top/scripts/bootstrap.sh"
cd "$top"

.venv/bin/ruff check .

# tests/browser drives Debian's Chromium through Playwright. Playwright's own
# browser downloads are never used.
if [ ! -x /usr/bin/chromium ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "test.sh: installing Debian's chromium package for tests/browser" >&2
    if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; }; then
        echo "test.sh: installing chromium failed; tests/browser will be skipped" >&2
    fi
fi

exec .venv/bin/python -m pytest "$@"
