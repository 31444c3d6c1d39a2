# Sourced by run.sh and test.sh: a venv in .venv with the pinned, verified set (constraints.txt).
# torch==2.13.0 resolves to the CPU wheel here; on a GPU machine install the CUDA build first.
PY=${PYTHON:-python3}
if ! "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
  echo "alignflow needs Python >= 3.11 (found $("$PY" --version)); set PYTHON=python3.11" >&2; exit 1
fi
stamp=.venv/.alignflow-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ constraints.txt -nt "$stamp" ]; then
  [ -x .venv/bin/python ] || "$PY" -m venv .venv
  echo "installing alignflow and its pinned dependencies into .venv (first time: ~2 minutes)..."
  if ! { .venv/bin/python -m pip install --upgrade "pip>=24" &&
         .venv/bin/python -m pip install -c constraints.txt -e ".[dev]"; } > .venv/install.log 2>&1; then
    tail -30 .venv/install.log >&2; echo "install failed: full log in .venv/install.log" >&2; exit 1
  fi
  touch "$stamp"
fi
export PATH="$PWD/.venv/bin:$PATH"
