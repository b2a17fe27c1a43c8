"""Cross-entropy over the vocabulary with bounded memory: the training loss."""

from __future__ import annotations

import functools

import mlx.core as mx

from .model import fast_ops_enabled, on_cpu
from .scoring import output_weight, project


def cross_entropy(logits, targets):
    """Per-position cross-entropy (fastops' on a CPU, MLX's elsewhere)."""
    if on_cpu() and fast_ops_enabled():
        from . import fastops

        return fastops.cross_entropy(logits, targets)
    import mlx.nn as nn

    return nn.losses.cross_entropy(logits, targets)


CE_ROWS = 256  # positions per pass over the output layer


CE_COLS = 4096  # vocabulary columns at a time


CE_KEEP = 64  # up to this many positions (a completion-only batch) plain autodiff keeps the logits


@functools.cache
def _ce_kernels(fast_exp: bool):
    """The elementwise part of one vocabulary chunk of the online log-sum-exp, fused."""
    if fast_exp:
        from . import fastops

        exp = fastops._exp
    else:
        exp = mx.exp

    @mx.compile
    def first_chunk(z):  # running max m, e = exp(z - m), running sum s
        m = z.max(axis=-1, keepdims=True)
        e = exp(z - m)
        return m, e, e.sum(axis=-1, keepdims=True)

    @mx.compile
    def next_chunk(z, m, s):  # the new max, how much the old terms shrink, e, the new sum
        new = mx.maximum(m, z.max(axis=-1, keepdims=True))
        shrink = exp(m - new)
        e = exp(z - new)
        return new, shrink, e, s * shrink + e.sum(axis=-1, keepdims=True)

    return first_chunk, next_chunk


def projected_cross_entropy(model, h: mx.array, targets: mx.array, rows: int = CE_ROWS,
                            cols: int = CE_COLS, keep: int = CE_KEEP, grad: bool = True):
    """cross_entropy(project(model, h), targets), per position, with bounded memory.

    `rows` positions at a time read the output layer (49,152 x 576) `cols` words at a time:
    each chunk's logits update a running log-sum-exp (the running max and sum of exponentials,
    rescaled when the max grows, as flash attention does) and, in the same pass, the running
    gradient with respect to h (softmax times the output layer). So the backward pass only
    scales that gradient by its cotangent: two matrix products with the output layer in all,
    its 113 MB read once per `rows` positions (32 at a time made the loss memory-bound), and
    at most about one span's logits alive (~80 MB for 256 positions, measured). Gradient: h's
    only (the output layer is frozen here). grad=False: the loss alone (validation; not for
    use under a gradient transform). A 4-bit output layer, or at most `keep` positions (whose
    logits are small enough to keep), take the plain path."""
    weight = output_weight(model)
    if weight is None or h.size // h.shape[-1] <= keep:  # 4-bit, or small: plain autodiff
        return cross_entropy(project(model, h).astype(mx.float32), targets)
    x = h.reshape(-1, h.shape[-1])
    t = targets.reshape(-1)
    spans = [(a, min(a + rows, x.shape[0])) for a in range(0, x.shape[0], rows)]
    first_chunk, next_chunk = _ce_kernels(on_cpu() and fast_ops_enabled())

    def loss_and_grad(x, t, with_grad, after=None):
        m = s = dh = None
        for c in range(0, weight.shape[0], cols):  # each chunk waits for the one before
            w = weight[c: c + cols]  # (mx.depends): MLX's CPU scheduler would otherwise
            inputs = x if after is None else mx.depends(x, after)  # compute all the logits
            z = (inputs @ w.T).astype(mx.float32)  # first (measured: 216 MB instead of 82)
            if m is None:
                m, e, s = first_chunk(z)
                dh = e @ w if with_grad else None
            else:
                m, shrink, e, s = next_chunk(z, m, s)
                dh = dh * shrink + e @ w if with_grad else None
            after = dh if with_grad else s
        target = weight[t]
        loss = (m + mx.log(s)).squeeze(-1) - (x * target).sum(axis=-1).astype(mx.float32)
        if not with_grad:
            return loss, None
        return loss, (dh / s - target).astype(x.dtype)  # softmax - onehot, times the layer

    if not grad:
        pieces = [loss_and_grad(x[a:b], t[a:b], False)[0] for a, b in spans]
        for piece in pieces:
            mx.eval(piece)  # one span's temporaries at a time
        return mx.concatenate(pieces).reshape(targets.shape)

    @mx.custom_function
    def ce(x):
        losses, grads = [], []
        for a, b in spans:
            loss, g = loss_and_grad(x[a:b], t[a:b], True, grads[-1] if grads else None)
            losses.append(loss)
            grads.append(g)
        return mx.concatenate(losses), mx.concatenate(grads)

    @ce.vjp
    def ce_vjp(x, cotangents, outputs):  # one input: x is the primal itself
        return (cotangents[0][:, None] * outputs[1],)

    return ce(x)[0].reshape(targets.shape)
