#!/bin/bash
# Issue 20 on a lent host with >= 4 GPUs (NOT RUN YET: no multi-GPU kind was lent when this was written).
# One call: the Qwen2.5-0.5B shape's RL step under FSDP2 on 1, 2, 4 (and 8 when present) GPUs with the speed-up,
# then the same under DDP for comparison, then the 7B shape (random weights, built here) under FSDP2 on every GPU,
# where one GPU cannot hold its fp32 weights, gradients and AdamW state (~122 GB). Carry .whl with pydantic (as
# bench/rl_device.sh). JSON into $OUT (bench/results by default): rl_fsdp_0.5b.json, rl_ddp_0.5b.json, rl_fsdp_7b.json
# with n_gpus, speedup_vs_1gpu, strategy, parameters, peak_memory_gib, device and every run.
#   bash bench/rl_fsdp_device.sh
set -o pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  2>&1 | grep -v WARNING
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 ALIGNFLOW_TRACKING=file
OUT=${OUT:-bench/results}; mkdir -p $OUT
N=$(nvidia-smi -L | wc -l)
GPUS="1 2 4"; [ "$N" -ge 8 ] && GPUS="1 2 4 8"
PROMPTS=${PROMPTS:-256}   # x 8 completions: 2,048 a step, a batch that fills 4 GPUs (1.91x on 2 H200s at 4,096, DDP)
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
for s in 0.5b 7b; do
  d=models/shapes/qwen2.5-$s
  [ -f $d/config.json ] || python3 bench/make_shape.py --shape $s --out $d --device cuda --no-check > $OUT/make_shape_$s.log 2>&1
  echo "shape $s built ($(date +%T))"
done
run() { python3 bench/rl_fsdp.py "$@" 2>&1 | grep -v "it/s\]\|Warning\|warnings.warn" | tail -8; }
run --model models/shapes/qwen2.5-0.5b --strategy fsdp --gpus $GPUS --prompts $PROMPTS --micro 256 --out $OUT/rl_fsdp_0.5b.json
run --model models/shapes/qwen2.5-0.5b --strategy ddp --gpus $GPUS --prompts $PROMPTS --micro 256 --out $OUT/rl_ddp_0.5b.json
# 7B: every GPU, activation checkpointing, a smaller batch (the engine's bf16 copy is 15 GB on each rank)
run --model models/shapes/qwen2.5-7b --strategy fsdp --gpus $N --prompts ${PROMPTS7B:-64} --micro 32 --ac --steps 6 \
  --warmup 2 --out $OUT/rl_fsdp_7b.json
