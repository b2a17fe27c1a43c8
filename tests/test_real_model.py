"""The real 135M model on this CPU: a few training steps, then scoring through the adapter."""

import json

import numpy as np
import pytest

from conftest import run_script
from smslora.convert.step import make_baseline
from smslora.model import load_model
from smslora.scoring import p_spam

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def baseline(tmp_path_factory):
    out = tmp_path_factory.mktemp("real") / "baseline"
    assert make_baseline(out, base="smollm2-135m") == 0
    return out


def test_the_4_bit_base_counts_the_tutorials_parameters_as_the_de_quantized_one(baseline):
    """03_train's count (mlx-lm's get_total_parameters): on a GPU the base stays 4-bit, and
    summing its packed arrays would give 28.8M instead of 134,515,008."""
    from mlx_lm.utils import get_total_parameters

    for dequantize in (False, True):
        model, _ = load_model(baseline, dequantize=dequantize)
        assert get_total_parameters(model) == 134_515_008, dequantize


def test_a_few_real_training_steps(tmp_path, baseline, data_dir):
    ad = tmp_path / "adapters"
    r = run_script("03_train.py", "--config", "seed", "--model", baseline, "--data", data_dir,
                   "--adapter-path", ad, "--reports", tmp_path / "reports", "--iters", "4",
                   "--steps-per-eval", "2", "--steps-per-report", "2", "--val-batches", "2")
    assert r.returncode == 0, r.stderr
    assert "Trainable parameters: 0.968% (1.303M/134.515M)" in r.stdout
    history = json.loads((ad / "history.json").read_text())
    losses = [e["train_loss"] for e in history["train"]] + [e["val_loss"] for e in history["val"]]
    assert len(losses) == 5 and all(np.isfinite(losses))
    # base + the 4-step adapter loads and scores through the prefix-cached path
    model, tok = load_model(baseline, ad)
    p = p_spam(model, tok, ["Ok lar, see you at 6", "WINNER! Claim your £900 prize, call 09061701461"])
    assert p.shape == (2,) and np.all((p >= 0) & (p <= 1))
