#!/bin/bash
# The multi-GPU bench as run on a lent 2-GPU host (bench/results/rl_multi_gpu.json), from the repo root with
# .carry/wheels holding py3.12 wheels (pandas, pydantic, pyyaml) and .carry/gpu/ the gpu pipeline's curated splits
# as JSON Lines (`alignflow stage curate --pipeline gpu; alignflow export-splits --pipeline gpu`). Shortened gpu
# pipeline (base 500 steps, RL $STEPS steps of $PROMPTS prompts x 8) so the whole thing fits one 10-minute device
# call; the bench runs once per rollout engine in $ENGINES (the first one's JSON is rl_multi_gpu.json).
set -eo pipefail
ENGINES=${ENGINES:-static transformers} PROMPTS=${PROMPTS:-128} STEPS=${STEPS:-40} BASE_STEPS=${BASE_STEPS:-500}
MICRO=${MICRO:-0}  # rl.micro_batch_size (responses per forward/backward of the update per rank; 0 = whole batch)
python -m pip install -q --no-index --find-links .carry/wheels pandas pydantic pyyaml 2>&1 | grep -v WARNING || true
mkdir -p data/gpu/curated && cp .carry/gpu/*.jsonl* .carry/gpu/validation.json data/gpu/curated/ && gunzip -f data/gpu/curated/corpus.jsonl.gz
PROMPTS=$PROMPTS STEPS=$STEPS BASE_STEPS=$BASE_STEPS MICRO=$MICRO python - <<'PY'
import os
import yaml
raw = yaml.safe_load(open("pipelines.yaml"))
gpu = raw["pipelines"]["gpu"]
steps = int(os.environ["STEPS"])
gpu["base"]["steps"] = int(os.environ["BASE_STEPS"])
gpu["rl"]["micro_batch_size"] = int(os.environ["MICRO"]) or None
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
first=${ENGINES%% *}
for engine in $ENGINES; do
  name=rl_multi_gpu; [ "$engine" = "$first" ] || name=rl_multi_gpu_$engine
  python -c "import yaml,sys; r=yaml.safe_load(open('pipelines.yaml')); r['pipelines']['gpu']['rl']['engine']=sys.argv[1]; yaml.safe_dump(r, open('pipelines.yaml','w'), sort_keys=False)" $engine
  python bench/rl_multi_gpu.py --pipeline gpu --gpus 1 2 --out $OUT/$name.json 2>&1 | grep -v "it/s" | tail -40
done
