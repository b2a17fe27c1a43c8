"""Shared test helpers. pytest itself is re-executed with the fast BLAS (smslora/fastblas.py)
before any test module imports mlx: the explicit entry point of the test run."""

import os
import signal
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "scripts"), str(ROOT / "tests")]

import pytest  # noqa: E402

from smslora import fastblas  # noqa: E402  (imports nothing heavy)

SHARED_DATA = ROOT.parent / "shared" / "data"

# Tests send Ctrl-C (SIGINT) to the scripts they start. A shell that starts a job in the
# background without job control (`cmd &`, nohup) makes it ignore SIGINT, and children inherit
# that: Python then never raises KeyboardInterrupt. Give the scripts the usual disposition.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: uses the real 135M model (runs in CI, on the CPU)")
    if fastblas.fast_blas_env(os.environ) is not None:
        # The re-exec inherits file descriptors: give pytest's real stdout/stderr back first.
        config.pluginmanager.getplugin("capturemanager").stop_global_capturing()
        fastblas.ensure()


def run_script(script: str, *args, input: str | None = None, env: dict | None = None):
    """Run a numbered script as a user would, in a subprocess."""
    return subprocess.run([sys.executable, str(ROOT / "scripts" / script), *map(str, args)],
                          capture_output=True, text=True, input=input, cwd=ROOT,
                          env={**os.environ, **(env or {})}, timeout=600)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    import tiny

    return tiny.make_tiny_model(tmp_path_factory.mktemp("tiny") / "model", quantize=True)


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    from smslora import splits

    out = tmp_path_factory.mktemp("data")
    splits.prepare("shipped", out)
    return out


def read_back_logits(gguf_path, folder, messages):
    """score_logits of a GGUF read back by step 1 (float32) into `folder`: what an export says."""
    from smslora import artifacts
    from smslora.convert.to_mlx import convert_gguf
    from smslora.model import load_model
    from smslora.scoring import score_logits

    folder.mkdir()
    convert_gguf(gguf_path, folder, dtype="float32")
    artifacts.write_checksums(folder, "scripts/01_download_model.py")
    return score_logits(*load_model(folder), messages)
