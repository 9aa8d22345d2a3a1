#!/usr/bin/env bash
# Set up a development environment in .venv: gradprobe (editable) with its test and
# integration extras, torch pinned by requirements/constraints.txt. Idempotent and
# quick once done (a stamp file records the install).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
stamp=.venv/.gradprobe-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ requirements/constraints.txt -nt "$stamp" ]; then
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -c requirements/constraints.txt -e ".[dev,all]"
  touch "$stamp"
fi
