#!/usr/bin/env bash
# README line 1: set up once (a venv in .venv with the pinned set), then run the default pipeline.
#   ./run.sh                      the embedded default (pipeline `tiny`)
#   ./run.sh --pipeline smoke     any named pipeline; -S key.path=value overrides
set -euo pipefail
cd "$(dirname "$0")"
source scripts/setup.sh
exec .venv/bin/alignflow run "$@"
