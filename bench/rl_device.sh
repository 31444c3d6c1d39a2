#!/bin/bash
# Issue 18, the RL step after the chunked log-probs and the bf16 static engine (rl.precision bf16), one lent GPU,
# one call: Qwen2.5-0.5B shape - rl (train_candidate vs TRL 1.16 GRPOTrainer), logprobs (chunked vs unchunked,
# forward + backward); Qwen2.5-1.5B shape - rl; then 0.5B rollout (static engine vs transformers' static-cache
# generate, batch 256 x 256 tokens), last so that a call cut short loses only it. Carry .whl (pydantic for alignflow.config; trl 1.16.0, datasets 4.7.0, dill 0.4.0,
# multiprocess 0.70.18 for the peer; see bench/shape_device.sh).
#   bash bench/rl_device.sh
set -o pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  2>&1 | grep -v WARNING
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
OUT=${OUT:-bench/results}
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm --format=csv,noheader
python3 -c "import torch, transformers, trl, datasets, pydantic; print(torch.__version__, transformers.__version__, 'trl', trl.__version__, 'datasets', datasets.__version__)" 2>&1 | tail -1
for s in 0.5b 1.5b; do
  d=models/shapes/qwen2.5-$s
  [ -f $d/config.json ] || python3 bench/make_shape.py --shape $s --out $d --device cuda --no-check > $OUT/make_shape_$s.log 2>&1
  echo "shape $s built ($(date +%T))"; tail -2 $OUT/make_shape_$s.log 2>/dev/null
done
python3 bench/shape_bench.py --model models/shapes/qwen2.5-0.5b --sections rl,logprobs --out $OUT/shape_0.5b.json \
  --budget-s ${BUDGET05:-200} 2>&1 | grep -v "it/s\]\|Warning\|warnings.warn" | tee $OUT/shape_bench_0.5b.log | tail -12
python3 bench/shape_bench.py --model models/shapes/qwen2.5-1.5b --sections rl --out $OUT/shape_1.5b.json \
  --budget-s ${BUDGET15:-200} 2>&1 | grep -v "it/s\]\|Warning\|warnings.warn" | tee $OUT/shape_bench_1.5b.log | tail -12
python3 bench/shape_bench.py --model models/shapes/qwen2.5-0.5b --sections rollout --out $OUT/shape_0.5b_rollout.json \
  2>&1 | grep -v "it/s\]\|Warning\|warnings.warn" | tee $OUT/shape_bench_0.5b_rollout.log | tail -6
