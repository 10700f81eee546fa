#!/usr/bin/env bash
# Run the whole test suite: lint, unit tests, and integration tests against
# real salt-master and salt-minion processes on 127.0.0.1.
set -euo pipefail

top=$(cd "$(dirname "$0")/.." && pwd)
"$top/scripts/bootstrap.sh"
cd "$top"

.venv/bin/ruff check .
exec .venv/bin/python -m pytest "$@"
