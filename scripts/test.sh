#!/usr/bin/env bash
# Sets up .venv (if needed) and runs the test suite on CPU with 8 fake devices (see tests/conftest.py).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then python3 -m venv .venv; fi
.venv/bin/pip install -q --upgrade pip
.venv/bin/pip install -q -e '.[test,demo]'
exec .venv/bin/python -m pytest -n 2 -q "$@"
