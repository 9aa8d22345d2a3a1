#!/usr/bin/env bash
# Quick start 2: set everything up (Python env, headless Chromium), then run every test.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/install-chromium.sh
.venv/bin/ruff check src tests examples bench
exec .venv/bin/python -m pytest -n 2 -q "$@"
