#!/bin/bash
# bench/rl_step.py on the lent GPU machine (bench/results/rl_step_gpu.json): TRL and datasets travel as py3.12
# wheels in .carry/trl (trl 1.16.0, datasets 4.7.0, pyarrow 21, pandas, pydantic, pyyaml and their small deps;
# torch, transformers and accelerate come from the image). Installed without dependency resolution because the
# machine has no registry; what the image lacks is in the folder.
set -eo pipefail
python -m pip install -q --no-index --no-deps .carry/trl/*.whl 2>&1 | grep -v WARNING || true
CUDA_VISIBLE_DEVICES=0 python bench/rl_step.py --device cuda --engine static --shape 0.5b --model none --new-tokens 256 --steps 5 \
  --out "$OUT/rl_step_gpu.json" 2>&1 | grep -v "it/s" | tail -50
