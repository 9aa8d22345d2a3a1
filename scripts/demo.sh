#!/usr/bin/env bash
# Quick start 1: set everything up, then run the main job on embedded data.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/gradprobe demo "$@"
