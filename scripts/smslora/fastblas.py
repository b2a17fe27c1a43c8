"""Intel MKL in place of the reference BLAS that MLX's Linux CPU wheel bundles.

MLX's CPU backend calls cblas_sgemm from a bundled reference BLAS (~5-8 GFLOP/s here). Preloading
PyPI's MKL (`libmkl_rt.so.3`) makes the same calls run at ~100-200 GFLOP/s. LD_PRELOAD only
takes effect when a process starts, so `ensure()` re-executes the current command once with it
set. It must run before mlx is imported, which is why the entry points (a script's
`cli.run`, pytest's conftest) call it before anything else, and why this module imports nothing
heavy.

The same re-execution keeps glibc's malloc from handing large blocks back to the kernel. MLX's
CPU backend allocates every array with malloc; glibc serves blocks over its (dynamic) mmap
threshold with fresh pages and unmaps them on free, so each logits-sized temporary (tens of MB)
is page-faulted in again at every step: measured here, an exp over 4M floats took 45 ms, 33 of
them in the kernel, against 9 ms with the thresholds below. The price: memory freed by the
process stays mapped until model.release_memory() trims it, so peak RSS can be higher.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

FAST_BLAS_ENV = "SMS_LORA_FAST_BLAS"  # "0" disables the re-exec (for benchmarks of the slow path)


def find_mkl() -> Path | None:
    """The MKL runtime installed by PyPI's `mkl` wheel into this environment, if any."""
    for lib in (Path(sys.prefix) / "lib", Path(sys.base_prefix) / "lib"):
        candidate = lib / "libmkl_rt.so.3"
        if candidate.exists():
            return candidate
    return None


def fast_blas_env(environ: dict) -> dict | None:
    """The environment that loads MKL in place of MLX's bundled BLAS, or None if not needed."""
    if not sys.platform.startswith("linux") or environ.get(FAST_BLAS_ENV) == "0":
        return None
    mkl = find_mkl()
    if mkl is None or str(mkl) in environ.get("LD_PRELOAD", ""):
        return None
    env = dict(environ)
    env["LD_PRELOAD"] = ":".join(p for p in (str(mkl), environ.get("LD_PRELOAD", "")) if p)
    # MKL's own OpenMP threads (libiomp5 from the `intel-openmp` wheel): one per core.
    env.setdefault("MKL_THREADING_LAYER", "INTEL")
    env.setdefault("MALLOC_MMAP_THRESHOLD_", str(1 << 30))  # blocks up to 1 GB from the heap
    env.setdefault("MALLOC_TRIM_THRESHOLD_", str(1 << 32))  # and freed ones kept for reuse
    env[FAST_BLAS_ENV] = "1"
    return env


def ensure() -> None:
    """Re-execute this very command with MKL preloaded, once, before mlx is imported."""
    if "mlx.core" in sys.modules:
        return  # too late to swap the BLAS; the caller imported mlx first
    env = fast_blas_env(os.environ)
    if env is not None:
        sys.stdout.flush()
        sys.stderr.flush()
        os.execve(sys.executable, list(sys.orig_argv), env)


def blas_in_use() -> str:
    """Which BLAS library the running process has mapped ('mkl', 'reference' or 'other')."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return "other"
    if "libmkl_rt" in maps:
        return "mkl"
    if "mlx_cpu.libs/libblas" in maps:
        return "reference"
    return "other"


