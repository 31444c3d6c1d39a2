#!/bin/bash
# Issue 19's claims on the `gpu` pipeline (76 M Qwen2-shape model) in ONE device call of about TOTAL seconds:
# base (shortened to BASE_STEPS) -> sft through `python -m alignflow.steps`, then bench/claims.py: the distillation
# teacher (the `teacher` stage's function, trained while the first runs go), the SFT and teacher figures, and
# METHODS x SEEDS RL runs of STEPS steps at PROMPTS prompts x 8, WORKERS processes sharing the GPU (through MPS when
# its daemon starts), highest priority first (SRPPO, GRPO, OPSD, OPD, ExOPD; then ExOPD 1.5, the reward-corrected
# ExOPD, SRPPO with the verifier, GRPO on its own changed set); a run that would end after the deadline is not
# started (claims.json then lists it as skipped). At most WORKERS + 1 busy CPU cores: a CPU job may share the host.
#   carry: data/gpu/curated (`alignflow stage curate --pipeline gpu`, or alignflow.data.curate.curate on its config)
#   and .whl (pydantic wheels, which the image lacks); both are ignored paths, so name them in the call's carry.
# Returned in $OUT: claims_gpu_runs.json (every run: accuracies, per-prompt correctness, changed shares per matrix,
# mechanisms, and the Jaccard overlaps), claims.json (verdicts), base.json, sft.json, claims.log.
# Afterwards, here: cp them to bench/results/ and `python bench/claims.py --report-only` (docs table and plots).
set -o pipefail
START=$SECONDS
TOTAL=${TOTAL:-490} BASE_STEPS=${BASE_STEPS:-400} STEPS=${STEPS:-40} PROMPTS=${PROMPTS:-128} WORKERS=${WORKERS:-3}
SEEDS=${SEEDS:-0 1 2} METHODS=${METHODS:-srppo grpo opsd opd exopd exopd_15 exopd_rc srppo_verifier grpo_masked}
OUT=${OUT:-/tmp/out}
mkdir -p $OUT
PYTHONPATH=/tmp/site python3 -c "import pydantic" 2>/dev/null || python3 -m pip install -q --no-index --no-deps \
  --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl 2>&1 | grep -v WARNING
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 ALIGNFLOW_TRACKING=file OMP_NUM_THREADS=1
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader; echo "cores $(nproc)"
# the shortened base (this copy of pipelines.yaml only)
python3 -c "import yaml,sys; r=yaml.safe_load(open('pipelines.yaml')); r['pipelines']['gpu']['base']['steps']=int(sys.argv[1]); yaml.safe_dump(r, open('pipelines.yaml','w'), sort_keys=False)" $BASE_STEPS
for stage in base sft; do
  echo "== $stage $(date +%T) (+$((SECONDS - START)) s)"
  python3 -m alignflow.steps $stage --pipeline gpu 2>&1 | grep -v "it/s\]\|Warning\|warnings.warn" | tail -2 | cut -c1-600
  cp metrics/gpu/$stage.json $OUT/ 2>/dev/null
done
export CUDA_MPS_PIPE_DIRECTORY=/tmp/mps-pipe CUDA_MPS_LOG_DIRECTORY=/tmp/mps-log
mkdir -p $CUDA_MPS_PIPE_DIRECTORY $CUDA_MPS_LOG_DIRECTORY
if command -v nvidia-cuda-mps-control >/dev/null && nvidia-cuda-mps-control -d \
   && timeout 30 python3 -c "import torch; assert torch.ones(2, device='cuda').sum().item() == 2"; then
  echo "MPS on"
else
  echo quit | nvidia-cuda-mps-control 2>/dev/null; unset CUDA_MPS_PIPE_DIRECTORY CUDA_MPS_LOG_DIRECTORY; echo "MPS off"
fi
LEFT=$((TOTAL - (SECONDS - START)))
echo "== claims $(date +%T) (+$((SECONDS - START)) s, $LEFT s left)"
timeout $((LEFT + 15)) python3 bench/claims.py --pipeline gpu --device cuda --workers $WORKERS --steps $STEPS \
  --prompts-per-step $PROMPTS --seeds $SEEDS --methods $METHODS --deadline-s $((LEFT - 30)) --prior-run-s 60 \
  --out $OUT/claims_gpu_runs.json --claims-out $OUT/claims.json --work /tmp/claims_masks --no-report 2>&1 \
  | tr '\r' '\n' | grep -v "it/s\|Warning\|warnings.warn" > $OUT/claims.log
grep -v "^\s*$" $OUT/claims.log | tail -12 | cut -c1-400
[ -n "$CUDA_MPS_PIPE_DIRECTORY" ] && echo quit | nvidia-cuda-mps-control
echo "done +$((SECONDS - START)) s"; ls -la $OUT
