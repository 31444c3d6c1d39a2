#!/bin/bash
# Issue 18 on the lent GPU machine: build a Qwen2.5 shape with random weights (bench/make_shape.py), load it
# through models.load like base.path, and time the stages' own functions against their peers
# (bench/shape_bench.py). Python packages the image lacks (pydantic for alignflow.config; trl 1.16.0 and
# datasets 4.7.0 for the TRL peer, with dill and multiprocess) travel as py3.12 wheels in .whl (carry it).
#   bash bench/shape_device.sh 0.5b "sft,rollout,rl,lora_sft" 420
#   bash bench/shape_device.sh 1.5b "rl,lora_rl" 420
set -o pipefail
SHAPE=${1:-0.5b}; SECTIONS=${2:-sft,rollout,rl}; BUDGET=${3:-420}; EXTRA=${4:-}
OUT=${OUT:-bench/results}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  2>&1 | grep -v WARNING
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm --format=csv,noheader
python3 -c "import sys, torch, transformers, pydantic, yaml, tqdm, peft; print(sys.version.split()[0], torch.__version__, transformers.__version__, pydantic.__version__, peft.__version__)"
python3 -c "import trl, datasets; print('trl', trl.__version__, 'datasets', datasets.__version__)" 2>&1 | tail -1
DIR=models/shapes/qwen2.5-$SHAPE
[ -f $DIR/config.json ] || python3 bench/make_shape.py --shape $SHAPE --out $DIR --device cuda 2>&1 | tee $OUT/make_shape_$SHAPE.log | tail -25
python3 bench/shape_bench.py --model $DIR --sections $SECTIONS --out $OUT/shape_$SHAPE.json --budget-s $BUDGET $EXTRA \
  2>&1 | grep -v "it/s\]\|Warning\|warnings.warn" | tee $OUT/shape_bench_$SHAPE.log | tail -60
