#!/usr/bin/env bash
# README line 2: set up once, then run the test suite.
#   ./test.sh                              the default set: unit, integration and the end-to-end smoke pipeline
#   ./test.sh -m "scaled or vllm or pipelines"   servers (Prefect/MLflow/PostgreSQL, UI, load), vLLM, whole extra
#                                          pipelines (BYO example, every method, chaos, side by side)
#   ./test.sh -m slow                      the full-size learning checks
# .ci/run runs the first two.
set -euo pipefail
cd "$(dirname "$0")"
source scripts/setup.sh
if [ $# -eq 0 ]; then set -- -m "not slow and not scaled and not vllm and not pipelines"; fi
exec .venv/bin/python -m pytest -q "$@"
