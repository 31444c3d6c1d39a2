#!/usr/bin/env bash
# README line 2: set up once, then run the test suite (slow, full-size runs excluded unless asked for).
#   ./test.sh                  unit, integration and the end-to-end smoke pipeline
#   ./test.sh -m slow          the full-size learning checks
set -euo pipefail
cd "$(dirname "$0")"
source scripts/setup.sh
if [ $# -eq 0 ]; then set -- -m "not slow"; fi
exec .venv/bin/python -m pytest -q "$@"
