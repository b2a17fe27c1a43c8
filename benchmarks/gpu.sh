#!/usr/bin/env bash
# The GPU check: MLX's CUDA build on an NVIDIA machine that has no package registry.
#
#   WHEELS=dir/with/wheels OUT=results/ benchmarks/gpu.sh
#
# WHEELS holds mlx, mlx-cuda-13 and mlx-lm for that machine's Python (pip download ... --python-
# version X.Y, see README "Performance"); models/baseline/ must already be there (step 1's output,
# copied). It installs the wheels beside the machine's own packages, points runme.sh at that Python
# (no registry: setup is marked done), then runs the end-to-end pipeline and the two benchmarks,
# keeping going past a failing part, and writes everything to $OUT.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-reports/gpu}"
mkdir -p "$OUT"
# Into the machine's own environment, beside the nvidia-* libraries mlx-cuda-13 links to.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
  "${WHEELS:?set WHEELS}"/*.whl || exit 1
NV="$(python3 -c 'import nvidia, os; print(os.path.dirname(nvidia.__path__[0]))' 2>/dev/null)/nvidia"
export LD_LIBRARY_PATH="$(ls -d "$NV"/*/lib 2>/dev/null | tr '\n' ':')${LD_LIBRARY_PATH:-}"
export PYTHONUNBUFFERED=1

nvidia-smi -L | tee "$OUT/gpu.txt"
python3 - <<'EOF' 2>&1 | tee -a "$OUT/gpu.txt"
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

# runme.sh's setup would pip install from a registry: give it this Python, marked as set up.
mkdir -p /tmp/venv/bin
printf '#!/bin/sh\nexec %s "$@"\n' "$(command -v python3)" > /tmp/venv/bin/python
chmod +x /tmp/venv/bin/python
cat requirements.txt runme.sh | sha256sum | cut -d' ' -f1 > /tmp/venv/.requirements.sha256
export VENV=/tmp/venv

python3 benchmarks/e2e.py --out "$OUT/bench_e2e.json" 2>&1 | tee "$OUT/e2e.log"
cp reports/report.md "$OUT/" 2>/dev/null
python3 benchmarks/score.py --out "$OUT/bench_score.json" 2>&1 | tee "$OUT/score.log"
python3 benchmarks/train.py --iters 100 --mlx-lm-iters 100 --out "$OUT/bench_train.json" 2>&1 \
  | tee "$OUT/train.log"
