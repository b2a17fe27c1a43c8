"""fastops.py: the CPU exp, SiLU, softmax and attention agree with MLX's own, values and
gradients, on shapes with several rows (a per-row mistake cannot hide in one row)."""

import math

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx_lm.models import activations, llama
from mlx_lm.models.base import scaled_dot_product_attention as mlx_attention

from smslora import fastops
import tiny
from smslora import scoring
from smslora.loss import projected_cross_entropy
from smslora.model import load_model


def test_exp_is_float32_accurate_over_the_whole_range():
    # float32 overflows above 88.7; the uses here (softmax, sigmoid) never need it
    x = mx.concatenate([mx.linspace(-100, 88, 100_001), mx.array([-math.inf, 0.0, 1.0])])
    got, want = np.array(fastops.exp(x), dtype=np.float64), np.exp(np.array(x, dtype=np.float64))
    normal = want > 1e-37  # below float32's normal range both are ~0
    assert np.max(np.abs(got[normal] - want[normal]) / want[normal]) < 1e-6
    assert np.all(got[~normal] < 1.1e-37) and np.all(np.isfinite(got))
    g = mx.grad(lambda v: fastops.exp(v).sum())(mx.array([0.5, -2.0, 3.0]))
    assert np.allclose(np.array(g), np.exp([0.5, -2.0, 3.0]), rtol=3e-6)


def test_swiglu_values_and_gradients():
    mx.random.seed(0)
    gate, x = mx.random.normal((3, 5, 64)) * 6, mx.random.normal((3, 5, 64))
    ours = fastops.swiglu(gate, x)
    assert mx.allclose(ours, activations.swiglu(gate, x), atol=2e-5, rtol=1e-5)
    w = mx.random.normal(ours.shape)
    g1 = mx.grad(lambda a, b: (fastops.swiglu(a, b) * w).sum(), argnums=(0, 1))(gate, x)
    g2 = mx.grad(lambda a, b: (nn.silu(a) * b * w).sum(), argnums=(0, 1))(gate, x)
    for a, b in zip(g1, g2):
        assert mx.allclose(a, b, atol=2e-5, rtol=1e-4)


def test_cross_entropy_values_and_gradients():
    mx.random.seed(1)
    logits, targets = mx.random.normal((2, 5, 1000)) * 10, mx.random.randint(0, 1000, (2, 5))
    w = mx.random.normal((2, 5))
    assert mx.allclose(fastops.cross_entropy(logits, targets),
                       nn.losses.cross_entropy(logits, targets), atol=1e-4)
    g1 = mx.grad(lambda v: (fastops.cross_entropy(v, targets) * w).sum())(logits)
    g2 = mx.grad(lambda v: (nn.losses.cross_entropy(v, targets) * w).sum())(logits)
    assert mx.allclose(g1, g2, atol=1e-5)
    assert mx.allclose(fastops.softmax(logits), mx.softmax(logits, axis=-1), atol=1e-6)


@pytest.mark.parametrize("mask", ["none", "causal", "bool", "additive"])
def test_attention_matches_mlx_with_grouped_queries(mask):
    mx.random.seed(2)
    q, k, v = (mx.random.normal((2, 6, 7, 16)), mx.random.normal((2, 2, 11, 16)),
               mx.random.normal((2, 2, 11, 16)))
    m = {"none": None, "causal": "causal",
         "bool": mx.random.uniform(shape=(7, 11)) > 0.3,
         "additive": mx.random.normal((7, 11))}[mask]
    if mask == "bool":
        m[:, 0] = True  # every query sees some key
    ours = fastops.scaled_dot_product_attention(q, k, v, None, 0.25, m)
    assert mx.allclose(ours, mlx_attention(q, k, v, None, 0.25, m), atol=1e-5)
    g1 = mx.grad(lambda a: fastops.scaled_dot_product_attention(a, k, v, None, 0.25, m).sum())(q)
    g2 = mx.grad(lambda a: mlx_attention(a, k, v, None, 0.25, m).sum())(q)
    assert mx.allclose(g1, g2, atol=1e-4)


def test_a_model_gives_the_same_logits_with_and_without(tmp_path, monkeypatch):
    path = tiny.make_tiny_model(tmp_path / "m")
    model, _ = load_model(path)  # on a CPU: installs fastops
    assert llama.swiglu is fastops.swiglu
    ids = mx.array([[5, 9, 33, 2, 17, 80], [3, 3, 60, 1, 0, 0]])
    fast = model(ids)
    monkeypatch.setattr(llama, "swiglu", activations.swiglu)
    monkeypatch.setattr(llama, "scaled_dot_product_attention", mlx_attention)
    assert mx.allclose(fast, model(ids), atol=1e-4)


@pytest.mark.parametrize("tied", [True, False])
def test_projected_cross_entropy_chunked_equals_the_plain_loss(tmp_path, tied):
    """The memory-lean loss of 03_train (spans of `rows` positions, each read against `cols`
    words of the output layer at a time, the gradient computed with the loss) gives the plain
    project-then-cross-entropy values and gradients; so does its forward-only form (grad=False,
    validation)."""
    model, _ = load_model(tiny.make_tiny_model(tmp_path / "m", tie_word_embeddings=tied))
    assert scoring.output_weight(model) is not None
    mx.random.seed(3)
    h, w = mx.random.normal((3, 50, model.args.hidden_size)), mx.random.uniform(shape=(3, 50))
    targets = mx.random.randint(0, model.args.vocab_size, (3, 50))

    def plain(x):
        return (nn.losses.cross_entropy(scoring.project(model, x), targets) * w).sum()

    def chunked(x):  # 150 positions: 10 spans of 16, the last one short; 512 words: 6 chunks
        return (projected_cross_entropy(model, x, targets, rows=16, cols=100, keep=0)
                * w).sum()

    assert abs(chunked(h).item() - plain(h).item()) < 1e-3 * abs(plain(h).item())
    measured = (projected_cross_entropy(model, h, targets, rows=16, cols=100, keep=0,
                                               grad=False) * w).sum()
    assert abs(measured.item() - plain(h).item()) < 1e-3 * abs(plain(h).item())
    g1, g2 = mx.grad(chunked)(h), mx.grad(plain)(h)
    assert mx.abs(g1).max().item() > 1e-3
    assert mx.allclose(g1, g2, atol=1e-5, rtol=1e-4)


def test_label_logits_are_those_columns_of_the_full_projection(tmp_path):
    model, _ = load_model(tiny.make_tiny_model(tmp_path / "m"))
    h = mx.random.normal((4, model.args.hidden_size))
    assert mx.allclose(scoring.label_logits(model, h, [7, 3]), scoring.project(model, h)[:, [7, 3]],
                       atol=1e-5)
