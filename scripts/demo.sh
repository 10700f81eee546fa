#!/usr/bin/env bash
# Start a sandbox (a Salt master with the Saltpeter engine and three minions
# on 127.0.0.1) running the example jobs in docs/examples, and print each run
# as it completes. Ctrl-C stops the sandbox.
set -euo pipefail

top=$(cd "$(dirname "$0")/.." && pwd)
"$top/scripts/bootstrap.sh"

root=${SANDBOX_ROOT:-$top/.sandbox}
sandbox="$top/.venv/bin/saltpeter-sandbox"

trap '"$sandbox" down --root "$root"' EXIT
"$sandbox" up --root "$root" --minions "${SANDBOX_MINIONS:-3}" --jobs "$top/docs/examples"
"$sandbox" watch --root "$root"
