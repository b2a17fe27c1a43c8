"""Faster transcendental maths for MLX's CPU backend (the model's SiLU and attention softmax).

Measured on this project's 2-core x86 machine (benchmarks/README): MLX's CPU `exp`, `sigmoid`
and `tanh` cost ~9-15 ns an element (scalar libm calls), while `+` and `*` run at ~0.3 ns. A
SmolLM2 block spends more time in its SiLU than in its attention. Here exp(x) is computed with
only vectorisable operations (2^k from the exponent bits, e^r from a degree-7 polynomial on
|r| <= ln(2)/2; relative error ~1e-7, like MLX's own) inside mx.compile, with exact gradients.

`install()` points mlx-lm's llama blocks at these functions; it is called by model.load_model
on a CPU only (Metal and CUDA have fast kernels of their own).
"""

from __future__ import annotations

import math

import mlx.core as mx

LOG2E = 1.0 / math.log(2.0)
LN2_HI, LN2_LO = 0.693145751953125, 1.428606820309417e-06  # ln 2 = HI + LO, HI exact in float32


@mx.compile
def _exp(x):
    x = mx.clip(x, -87.0, 88.0)  # float32's normal range: exp(-87) ~ 1.6e-38 stands for 0
    k = mx.round(x * LOG2E)
    r = (x - k * LN2_HI) - k * LN2_LO  # exp(x) = 2^k * e^r, |r| <= ln(2)/2 (Cody-Waite)
    p = 1 + r * (1 + r * (1 / 2 + r * (1 / 6 + r * (1 / 24 + r * (1 / 120 + r * (
        1 / 720 + r * (1 / 5040)))))))
    return p * mx.view((k.astype(mx.int32) + 127) << 23, mx.float32)


@mx.custom_function
def exp(x):
    return _exp(x)


@exp.vjp
def _exp_vjp(primals, cotangent, output):
    return (cotangent * output,)


@mx.compile
def _swiglu(gate, x):
    return gate * x / (1 + _exp(-gate))


@mx.compile
def _swiglu_grads(gate, x, cotangent):
    s = 1 / (1 + _exp(-gate))
    return cotangent * x * s * (1 + gate * (1 - s)), cotangent * gate * s


@mx.custom_function
def swiglu(gate, x):
    """silu(gate) * x, as mlx-lm's llama MLP computes it."""
    return _swiglu(gate, x)


@swiglu.vjp
def _swiglu_vjp(primals, cotangent, output):
    return _swiglu_grads(*primals, cotangent)


def softmax(x, axis=-1):
    e = exp(x - mx.stop_gradient(x.max(axis=axis, keepdims=True)))
    return e / e.sum(axis=axis, keepdims=True)


@mx.compile
def _logsumexp(x):
    m = x.max(axis=-1, keepdims=True)
    return (m + mx.log(_exp(x - m).sum(axis=-1, keepdims=True))).squeeze(-1)


@mx.compile
def _logsumexp_grad(x, out, cotangent):
    return _exp(x - out[..., None]) * cotangent[..., None]  # softmax(x) * cotangent


@mx.custom_function
def logsumexp(x):
    """log(sum(exp(x))) over the last axis, in two passes over x and no x-sized temporaries."""
    return _logsumexp(x)


@logsumexp.vjp
def _logsumexp_vjp(primals, cotangent, output):
    return (_logsumexp_grad(primals, output, cotangent),)  # one input: primals is x itself


def cross_entropy(logits, targets):
    """Per-position cross-entropy, as nn.losses.cross_entropy(logits, targets)."""
    picked = mx.take_along_axis(logits, targets[..., None], axis=-1).squeeze(-1)
    return logsumexp(logits) - picked


def scaled_dot_product_attention(queries, keys, values, cache, scale, mask, sinks=None,
                                 softmax=softmax):
    """mlx-lm's attention call (grouped-query), with the softmax above (or another: the GPU
    probe's). queries (B, H, L, D); keys and values (B, KV, S, D); mask None, "causal", boolean
    or additive (L, S)."""
    if sinks is not None or hasattr(cache, "bits"):
        from mlx_lm.models.base import scaled_dot_product_attention as original
        return original(queries, keys, values, cache, scale, mask, sinks)
    B, H, L, D = queries.shape
    KV, S = keys.shape[1], keys.shape[2]
    q = (queries * scale).reshape(B, KV, H // KV, L, D)
    scores = q @ keys[:, :, None].swapaxes(-1, -2)  # (B, KV, H/KV, L, S)
    if isinstance(mask, str):  # "causal": query i sees keys up to S - L + i
        mask = mx.arange(S)[None] <= mx.arange(S - L, S)[:, None]
    if mask is not None:
        scores = (mx.where(mask, scores, -math.inf) if mask.dtype == mx.bool_
                  else scores + mask)
    out = softmax(scores) @ values[:, :, None]
    return out.reshape(B, H, L, D)


def install() -> None:
    """Use these in mlx-lm's llama family (SmolLM2 is a llama). Idempotent."""
    from mlx_lm.models import llama

    llama.swiglu = swiglu
    llama.scaled_dot_product_attention = scaled_dot_product_attention
