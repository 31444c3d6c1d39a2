#!/bin/bash
# The gpu_05b pipeline (pipelines.yaml) on one lent GPU, stage by stage, in one device call: build the
# Qwen2.5-0.5B-shaped checkpoint with random weights where base.path points (bench/make_shape.py), then
# base (copies base.path) -> sft -> rl -> scores through `python -m alignflow.steps`. Carry .whl (pydantic wheels;
# the image lacks it) and data/gpu_05b/curated (curated here: alignflow.data.curate.curate on the gpu_05b config).
set -o pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
  .whl/pydantic*.whl .whl/annotated_types*.whl .whl/typing_inspection*.whl 2>&1 | grep -v WARNING
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 ALIGNFLOW_TRACKING=file
OUT=${OUT:-metrics/gpu_05b}
python3 bench/make_shape.py --shape 0.5b --out models/shapes/qwen2.5-0.5b --device cuda --no-check | tail -4
for stage in ${STAGES:-base sft rl scores}; do
  echo "== $stage $(date +%T)"
  python3 -m alignflow.steps $stage --pipeline gpu_05b 2>&1 | grep -v "it/s\]\|Warning\|warnings.warn" | tail -6
  cp metrics/gpu_05b/{base,sft,rl,device_scores}.json metrics/gpu_05b/{sft,rl}_curve.csv $OUT/ 2>/dev/null
done
ls $OUT
