#!/bin/bash
# The multi-GPU bench as run on a lent 2-GPU host (bench/results/rl_multi_gpu.json), from the repo root with
# .carry/wheels holding py3.12 wheels (pandas, pydantic, pyyaml) and .carry/gpu/ the gpu pipeline's curated splits
# as JSON Lines (`alignflow stage curate --pipeline gpu; alignflow export-splits --pipeline gpu`). Shortened gpu
# pipeline (base 500 steps, RL $STEPS steps of $PROMPTS prompts x 8, rollout engine $ENGINE) so the whole thing
# fits one 10-minute device call.
set -eo pipefail
ENGINE=${ENGINE:-static} PROMPTS=${PROMPTS:-128} STEPS=${STEPS:-40}
python -m pip install -q --no-index --find-links .carry/wheels pandas pydantic pyyaml 2>&1 | grep -v WARNING || true
mkdir -p data/gpu/curated && cp .carry/gpu/*.jsonl* .carry/gpu/validation.json data/gpu/curated/ && gunzip -f data/gpu/curated/corpus.jsonl.gz
ENGINE=$ENGINE PROMPTS=$PROMPTS STEPS=$STEPS python - <<'PY'
import os
import yaml
raw = yaml.safe_load(open("pipelines.yaml"))
gpu = raw["pipelines"]["gpu"]
steps = int(os.environ["STEPS"])
gpu["base"]["steps"] = 500
gpu["rl"]["engine"] = os.environ["ENGINE"]
gpu["rl"]["prompts_per_step"] = int(os.environ["PROMPTS"])
gpu["rl"]["checkpoint_every"] = steps // 2
gpu["rl"]["candidates"] = [{"name": "grpo", "algorithm": "grpo", "seeds": [0], "steps": steps,
                            "checkpoints": [steps // 2, steps], "lr": 5e-6, "warmup_steps": 10}]
gpu["ope"]["top_k"] = 2
yaml.safe_dump(raw, open("pipelines.yaml", "w"), sort_keys=False)
PY
export ALIGNFLOW_TRACKING=file
python -m alignflow.steps base --pipeline gpu 2>&1 | grep -v "it/s" | tail -2
python -m alignflow.steps sft --pipeline gpu 2>&1 | grep -v "it/s" | tail -2
python bench/rl_multi_gpu.py --pipeline gpu --gpus 1 2 --out $OUT/rl_multi_gpu.json 2>&1 | grep -v "it/s" | tail -60
