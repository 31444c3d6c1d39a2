#!/bin/bash
# bench/compare_methods.py as run on a lent GPU host's CPUs (bench/results/methods_tiny.json): the tiny pipeline's
# 450 RL steps per run, WORKERS processes of one torch thread each on the host's CPU cores (DEVICE=cpu: the 1M model
# is launch-bound on a GPU, no faster there), so the GPU stays free for a GPU job started beside it in the same call.
# METHODS and SEEDS pick a share of the 13 x 3 runs; the JSON is written to $OUT/$NAME as runs finish. A later call
# carries the earlier calls' JSON in .carry/$NAME: compare_methods appends to it and skips the runs already there.
# The docs table and plot come afterwards: `python bench/compare_methods.py --report-only`.
# Carried: data/tiny/curated, models/tiny/base, models/tiny/sft and checkpoints/tiny/compare/teacher (a finished
# tiny run up to SFT and the distillation teacher), .carry (earlier calls' JSON), .whl (pydantic, which the image lacks).
set -o pipefail
WORKERS=${WORKERS:-13} STEPS=${STEPS:-450} LIMIT=${LIMIT:-560} DEVICE=${DEVICE:-cpu} NAME=${NAME:-methods_tiny.json}
PYTHONPATH=/tmp/site python3 -c "import pydantic" 2>/dev/null || python3 -m pip install -q --no-index --no-deps \
  --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl 2>&1 | grep -v WARNING
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 ALIGNFLOW_TRACKING=file
[ -f .carry/$NAME ] && cp .carry/$NAME $OUT/$NAME
echo "cores $(nproc); $(grep -m1 'model name' /proc/cpuinfo)"
timeout $LIMIT python3 bench/compare_methods.py --pipeline tiny --steps $STEPS --seeds ${SEEDS:-0 1 2} \
  ${METHODS:+--methods $METHODS} --device $DEVICE --workers $WORKERS --no-report --out $OUT/$NAME 2>&1 \
  | tr '\r' '\n' | grep -v "it/s" > $OUT/${NAME%.json}.log
tail -3 $OUT/${NAME%.json}.log
