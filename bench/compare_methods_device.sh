#!/bin/bash
# bench/compare_methods.py as run on a lent 1-GPU host (bench/results/methods_tiny.json): 13 methods x 3 seeds x the
# tiny pipeline's 450 RL steps, WORKERS processes of one torch thread each sharing the GPU (through MPS when the
# host lets its daemon start, else plain time-sharing), the JSON written to $OUT as runs finish; the docs table and
# plot are made afterwards where scipy and matplotlib are (`python bench/compare_methods.py --report-only`).
# Carried: data/tiny/curated, models/tiny/base, models/tiny/sft (a finished tiny run) and .carry/ holding
# py3.12 wheels (.carry/wheels: pandas, pydantic, pyyaml, installed only where missing) and the curated splits as
# JSON Lines (.carry/curated, `alignflow export-splits`: read where pyarrow is missing).
set -o pipefail
WORKERS=${WORKERS:-20} STEPS=${STEPS:-450} LIMIT=${LIMIT:-450}
for pair in pandas:pandas pydantic:pydantic yaml:pyyaml; do
  python3 -c "import ${pair%%:*}" 2>/dev/null || python3 -m pip install -q --no-index --find-links .carry/wheels "${pair##*:}" 2>&1 | grep -v WARNING
done
cp .carry/curated/*.jsonl data/tiny/curated/
nproc; nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader
export CUDA_MPS_PIPE_DIRECTORY=/tmp/mps-pipe CUDA_MPS_LOG_DIRECTORY=/tmp/mps-log
mkdir -p $CUDA_MPS_PIPE_DIRECTORY $CUDA_MPS_LOG_DIRECTORY
if command -v nvidia-cuda-mps-control >/dev/null && nvidia-cuda-mps-control -d \
   && timeout 60 python3 -c "import torch; assert torch.ones(2, device='cuda').sum().item() == 2"; then
  echo "MPS on"
else
  echo quit | nvidia-cuda-mps-control 2>/dev/null; unset CUDA_MPS_PIPE_DIRECTORY CUDA_MPS_LOG_DIRECTORY; echo "MPS off"
fi
PYTHONUNBUFFERED=1 timeout $LIMIT python3 bench/compare_methods.py --pipeline tiny --steps $STEPS --seeds 0 1 2 \
  --device cuda --workers $WORKERS --no-report --out $OUT/methods_tiny.json 2>&1 | tr '\r' '\n' | grep -v "it/s" \
  | tee $OUT/log.txt
[ -n "$CUDA_MPS_PIPE_DIRECTORY" ] && echo quit | nvidia-cuda-mps-control
ls -la $OUT
