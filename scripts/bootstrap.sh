#!/usr/bin/env bash
# Create or refresh the project's virtual environment in .venv.
#
# Salt is published as a source distribution only, so a fresh environment
# builds it (about a minute on two cores). An existing environment is kept
# and only brought up to date when pyproject.toml changes.
set -euo pipefail

top=$(cd "$(dirname "$0")/.." && pwd)
venv="$top/.venv"
stamp="$venv/.saltpeter-stamp"
python=${PYTHON:-python3}

if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null; then
    echo "bootstrap: $python is missing or older than 3.10; set PYTHON to a Python 3.10+ interpreter" >&2
    exit 1
fi

want=$(sha256sum "$top/pyproject.toml" | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && [ -x "$venv/bin/python" ]; then
    exit 0
fi

if [ ! -x "$venv/bin/python" ]; then
    if ! "$python" -m venv --help >/dev/null 2>&1 || ! "$python" -c 'import ensurepip' 2>/dev/null; then
        if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
            echo "bootstrap: installing python3-venv with apt-get" >&2
            apt-get update -qq && apt-get install -y -qq python3-venv >/dev/null
        else
            echo "bootstrap: $python cannot create virtual environments; install Debian's python3-venv package" >&2
            exit 1
        fi
    fi
    echo "bootstrap: building $venv (Salt compiles from source; this takes a minute or two)" >&2
    "$python" -m venv "$venv"
    "$venv/bin/python" -m pip install --quiet --upgrade pip
else
    echo "bootstrap: updating $venv for the changed pyproject.toml" >&2
fi
# This machine's pip configuration names package index folders that may not
# exist; pip warns about each one on every install, so those lines are dropped.
"$venv/bin/python" -m pip install --quiet -e "$top[test]" 2>&1 \
    | { grep -v "^WARNING: Location '.*' is ignored" || true; }
echo "$want" > "$stamp"
