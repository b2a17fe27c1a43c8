"""Every way of running the code gets MKL in place of MLX's bundled reference BLAS on Linux."""

import os
import platform
import subprocess
import sys

import pytest

from smslora import fastblas
from conftest import ROOT

linux_x86 = sys.platform.startswith("linux") and platform.machine() == "x86_64"
pytestmark = pytest.mark.skipif(not linux_x86, reason="MKL is preloaded on Linux x86-64 only")

PROBE = ("import sys; sys.path.insert(0, 'scripts'); from smslora import fastblas; fastblas.ensure(); "
         "import mlx.core as mx, numpy as np; a = np.random.rand(64, 48).astype(np.float32); "
         "b = np.random.rand(48, 32).astype(np.float32); "
         "err = float(np.abs(np.array(mx.array(a) @ mx.array(b)) - a @ b).max()); "
         "print(fastblas.blas_in_use(), err < 1e-4)")


def clean_env(**extra):
    env = {k: v for k, v in os.environ.items()
           if k not in ("LD_PRELOAD", fastblas.FAST_BLAS_ENV, "MKL_THREADING_LAYER")}
    return {**env, **extra}


def test_the_test_process_runs_on_mkl():
    assert fastblas.find_mkl() is not None, "the mkl wheel is missing: pip install -r requirements.txt"
    assert fastblas.blas_in_use() == "mkl"


def test_a_script_run_alone_gets_mkl_without_a_manual_step():
    r = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, cwd=ROOT,
                       env=clean_env())
    assert r.stdout.split() == ["mkl", "True"], r.stderr


def test_the_switch_off_really_gives_the_reference_blas():
    r = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, cwd=ROOT,
                       env=clean_env(**{fastblas.FAST_BLAS_ENV: "0"}))
    assert r.stdout.split() == ["reference", "True"], r.stderr


def test_numbered_script_help_runs_on_mkl():
    # --help exits before any model work, but after the import that swaps the BLAS in.
    probe = ("import runpy, sys; sys.argv = ['scripts/02_prepare_data.py', '--help'];"
             "import atexit; sys.path.insert(0, 'scripts'); from smslora import fastblas;"
             "atexit.register(lambda: print('BLAS', fastblas.blas_in_use()));"
             "runpy.run_path('scripts/02_prepare_data.py', run_name='__main__')")
    r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT,
                       env=clean_env(PYTHONPATH=str(ROOT / "scripts")))
    assert "BLAS mkl" in r.stdout, r.stderr


FAULTS = ("import sys, resource; sys.path.insert(0, 'scripts'); from smslora import fastblas; fastblas.ensure(); from smslora import fastops;"
          "import mlx.core as mx; x = mx.random.normal((4_000_000,)); mx.eval(fastops._exp(x));"
          "before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt;"
          "[mx.eval(fastops._exp(x)) for _ in range(5)];"
          "print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) // 5)")


@pytest.mark.parametrize("fast", [True, False])
def test_large_temporaries_are_not_page_faulted_in_again_at_every_use(fast):
    """The re-execution also keeps glibc from unmapping freed 16 MB blocks (fastblas); without
    it every call faults its temporaries' ~20,000 pages in again."""
    env = clean_env() if fast else clean_env(**{fastblas.FAST_BLAS_ENV: "0"})
    env = {k: v for k, v in env.items() if not k.startswith("MALLOC_")}
    r = subprocess.run([sys.executable, "-c", FAULTS], capture_output=True, text=True, cwd=ROOT,
                       env=env)
    faults = int(r.stdout.strip() or -1)
    assert (faults < 500) if fast else (faults > 5000), (faults, r.stderr)
