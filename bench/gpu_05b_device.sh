#!/bin/bash
# The gpu_05b pipeline (pipelines.yaml) on one lent GPU, stage by stage, in one device call: build the
# Qwen2.5-0.5B-shaped checkpoint with random weights where base.path points (bench/make_shape.py), then
# base (copies base.path) -> sft -> rl -> scores through `python -m alignflow.steps`. Carry .whl (pydantic wheels;
# the image lacks it) and data/gpu_05b/curated (curated here: alignflow.data.curate.curate on the gpu_05b config).
set -o pipefail
PYTHONPATH=/tmp/site python3 -c "import pydantic" 2>/dev/null || python3 -m pip install -q --no-index --no-deps \
  --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl 2>&1 | grep -v WARNING
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 ALIGNFLOW_TRACKING=file
OUT=${OUT:-/tmp/out}/gpu_05b
mkdir -p $OUT
python3 bench/make_shape.py --shape 0.5b --out models/shapes/qwen2.5-0.5b --device cuda --no-check | tail -4
for stage in ${STAGES:-base sft rl scores}; do
  echo "== $stage $(date +%T)"
  python3 -m alignflow.steps $stage --pipeline gpu_05b 2>&1 | grep -v "it/s\]\|Warning\|warnings.warn" | tee -a $OUT/log.txt | tail -6
  cp metrics/gpu_05b/{base,sft,rl}.json metrics/gpu_05b/*.csv reports/gpu_05b/device_scores.json $OUT/ 2>/dev/null
done
# one file back (a call returns at most 8)
tar czf $OUT.tgz -C $(dirname $OUT) gpu_05b && rm -r $OUT && ls -la $OUT.tgz
