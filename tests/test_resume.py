"""Step 3 survives being stopped: SIGKILL at a random step, Ctrl-C or SIGTERM, then --resume
ends with the same adapter as a run that was never interrupted."""

import json
import signal
import subprocess
import sys
import time

import mlx.core as mx
import numpy as np
import pytest

from conftest import ROOT, run_script
from smslora import artifacts

ITERS = 60
SETTINGS = ["--config", "seed", "--iters", str(ITERS), "--num-layers", "2", "--steps-per-eval",
            "10", "--steps-per-save", "3", "--ship", "best", "--learning-rate", "1e-3",
            "--lr-schedule", "cosine", "--warmup", "5"]


def args(tiny_model, data_dir, ad, rep):
    return [*SETTINGS, "--model", tiny_model, "--data", data_dir, "--adapter-path", ad,
            "--reports", rep]


@pytest.fixture(scope="module")
def uninterrupted(tiny_model, data_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("whole")
    r = run_script("03_train.py", *args(tiny_model, data_dir, tmp / "ad", tmp / "rep"))
    assert r.returncode == 0, r.stderr
    return tmp / "ad"


def start(tiny_model, data_dir, ad, rep):
    cmd = [sys.executable, str(ROOT / "scripts" / "03_train.py"),
           *map(str, args(tiny_model, data_dir, ad, rep))]
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def wait_for_checkpoint(proc, run_dir, at_least: int):
    state = run_dir / "checkpoint" / "state.json"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if json.loads(state.read_text())["step"] >= at_least:
                return
        except (OSError, ValueError):
            pass
        time.sleep(0.005)
    raise AssertionError(f"no checkpoint at step >= {at_least}: {proc.communicate()}")


def same_adapters(a, b):
    for name in ("adapters.safetensors", "final_adapters.safetensors",
                 "best_adapters.safetensors"):
        wa, wb = mx.load(str(a / name)), mx.load(str(b / name))
        assert wa.keys() == wb.keys()
        for k in wa:
            np.testing.assert_allclose(np.array(wa[k]), np.array(wb[k]), rtol=1e-5, atol=1e-6,
                                       err_msg=f"{name}: {k}")
    ha, hb = (json.loads((d / "history.json").read_text()) for d in (a, b))
    assert ha["best"] == hb["best"] and ha["iterations_run"] == hb["iterations_run"] == ITERS
    assert [v["iteration"] for v in ha["val"]] == [v["iteration"] for v in hb["val"]]
    np.testing.assert_allclose([v["val_loss"] for v in ha["val"]],
                               [v["val_loss"] for v in hb["val"]], rtol=1e-5)


@pytest.mark.parametrize("seed", [0, 1])
def test_sigkill_at_a_random_step_then_resume_gives_the_same_adapter(
        tmp_path, tiny_model, data_dir, uninterrupted, seed):
    ad, rep = tmp_path / "ad", tmp_path / "rep"
    rng = np.random.default_rng(seed)
    proc = start(tiny_model, data_dir, ad, rep)
    wait_for_checkpoint(proc, tmp_path / ".ad.partial", int(rng.integers(3, ITERS // 2)))
    time.sleep(float(rng.uniform(0, 0.3)))  # then anywhere: mid-step, mid-eval, mid-save
    proc.kill()
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    assert not ad.exists()
    r = run_script("03_train.py", "--resume", "--adapter-path", ad)  # the checkpoint's settings
    assert r.returncode == 0, r.stderr
    assert "Resumed from the checkpoint after iteration" in r.stdout
    same_adapters(ad, uninterrupted)
    artifacts.verify_checksums(ad)
    assert not (ad / "checkpoint").exists() and not (tmp_path / ".ad.partial").exists()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_ctrl_c_and_sigterm_save_a_checkpoint_first(tmp_path, tiny_model, data_dir,
                                                   uninterrupted, sig):
    ad, rep = tmp_path / "ad", tmp_path / "rep"
    proc = start(tiny_model, data_dir, ad, rep)
    wait_for_checkpoint(proc, tmp_path / ".ad.partial", 7)
    proc.send_signal(sig)
    out, err = proc.communicate()
    assert proc.returncode == 130, err
    assert "Traceback" not in err and err.strip() == "interrupted"
    assert "--resume" in out
    state = json.loads((tmp_path / ".ad.partial" / "checkpoint" / "state.json").read_text())
    assert f"checkpoint after iteration {state['step']} saved" in out  # the last finished step
    r = run_script("03_train.py", "--resume", *args(tiny_model, data_dir, ad, rep))  # the same
    # settings spelled out again are accepted
    assert r.returncode == 0, r.stderr
    same_adapters(ad, uninterrupted)


def test_resume_refuses_other_settings_and_nothing_to_resume(tmp_path, tiny_model, data_dir):
    ad = tmp_path / "ad"
    r = run_script("03_train.py", "--resume", "--adapter-path", ad)
    assert r.returncode == 2 and "nothing to resume" in r.stderr
    proc = start(tiny_model, data_dir, ad, tmp_path / "rep")
    wait_for_checkpoint(proc, tmp_path / ".ad.partial", 3)
    proc.kill()
    proc.communicate()
    r = run_script("03_train.py", "--resume", "--adapter-path", ad, "--iters", "99")
    assert r.returncode == 2 and "iters=60 (asked: 99)" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    # a damaged checkpoint is named, not loaded
    ckpt = tmp_path / ".ad.partial" / "checkpoint" / "optimizer.safetensors"
    ckpt.write_bytes(ckpt.read_bytes()[:-8] + b"\0" * 8)
    r = run_script("03_train.py", "--resume", "--adapter-path", ad)
    assert r.returncode == 2 and "damaged" in r.stderr and "optimizer.safetensors" in r.stderr


def test_a_run_without_resume_starts_over_and_says_so(tmp_path, tiny_model, data_dir):
    ad = tmp_path / "ad"
    proc = start(tiny_model, data_dir, ad, tmp_path / "rep")
    wait_for_checkpoint(proc, tmp_path / ".ad.partial", 3)
    proc.kill()
    proc.communicate()
    r = run_script("03_train.py", *args(tiny_model, data_dir, ad, tmp_path / "rep"),
                   "--iters", "4")
    assert r.returncode == 0, r.stderr
    assert "Starting over" in r.stdout and "Resumed" not in r.stdout
    assert json.loads((ad / "history.json").read_text())["iterations_run"] == 4
