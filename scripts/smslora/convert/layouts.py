"""llama.cpp quantized blocks written in MLX's affine layout, number for number, where MLX has
one that holds them: every group of 32 weights is scale * q + bias with q an unsigned integer of
`bits` bits, packed in order into uint32 words (a little-endian bit stream).

  * Q4_0, Q4_1 (4-bit) and Q8_0 (8-bit): float16 scale and bias, as MLX's own GGUF reader does;
  * Q5_0, Q5_1 (5-bit): float16 scale and bias too;
  * Q4_K (4-bit) and Q5_K (5-bit): a sub-block of 32 has scale d * sc and minimum dmin * m
    (float16 d, dmin times 6-bit integers): exact in float32, so those scales are float32.
Q6_K, Q2_K, Q3_K and the IQ types group 16 weights or use non-uniform codes: no MLX layout holds
them exactly.
"""

from __future__ import annotations

import numpy as np

BITS = {"Q4_0": 4, "Q4_1": 4, "Q8_0": 8, "Q5_0": 5, "Q5_1": 5, "Q4_K": 4, "Q5_K": 5}
GROUP = 32


def pack(q: np.ndarray, bits: int) -> np.ndarray:
    """Unsigned integers (..., n) of `bits` bits as MLX's uint32 words (..., n * bits / 32)."""
    if bits in (4, 8):  # whole bytes: element i in the low bits first
        q = q.astype(np.uint8)
        b = q if bits == 8 else q[..., 0::2] | (q[..., 1::2] << 4)
    else:
        stream = (q[..., None].astype(np.uint8) >> np.arange(bits, dtype=np.uint8)) & 1
        b = np.packbits(stream.reshape(*q.shape[:-1], -1), axis=-1, bitorder="little")
    return np.ascontiguousarray(b).view(np.uint32)


def half(blocks: np.ndarray, start: int) -> np.ndarray:
    """The float16 at byte `start` of each block, as float32 (exact)."""
    return blocks[:, start:start + 2].copy().view(np.float16)[:, 0].astype(np.float32)


def scales_and_biases(kind: str, blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per group of 32: (scale, bias), float32, from each block's header."""
    if kind in ("Q4_0", "Q5_0", "Q8_0"):  # symmetric: q - 8, q - 16, q - 128 (signed Q8_0)
        d = half(blocks, 0)
        return d, d * -{"Q4_0": 8, "Q5_0": 16, "Q8_0": 128}[kind]
    if kind in ("Q4_1", "Q5_1"):
        return half(blocks, 0), half(blocks, 2)
    from gguf.quants import Q4_K  # the 6-bit scales and minima of Q4_K and Q5_K

    sc, m = Q4_K.get_scale_min(blocks[:, 4:16])
    d, dmin = half(blocks, 0)[:, None], half(blocks, 2)[:, None]
    return d * sc.astype(np.float32), -(dmin * m.astype(np.float32))


def to_mlx_layout(t, rows_at_once: int = 4096) -> dict:
    """weight / scales / biases of a 2-D tensor `t` of a type in BITS, a few rows at a time.

    gguf de-quantizes each block; the integers are recovered as (value - bias) / scale and
    checked: they give back exactly the de-quantized values, or this raises (a bug, never a
    silent change)."""
    import gguf

    kind, bits = t.tensor_type.name, BITS[t.tensor_type.name]
    data = np.asarray(t.data)
    rows = data.shape[0]
    half_exact = kind not in ("Q4_K", "Q5_K")  # header values that float16 holds exactly
    parts = {"weight": [], "scales": [], "biases": []}
    for start in range(0, rows, rows_at_once):
        chunk = data[start:start + rows_at_once]
        values = gguf.quants.dequantize(chunk, t.tensor_type).astype(np.float32)
        n, cols = values.shape
        blocks = chunk.reshape(-1, gguf.GGML_QUANT_SIZES[t.tensor_type][1])
        scales, biases = (a.reshape(n, cols // GROUP) for a in scales_and_biases(kind, blocks))
        grouped = values.reshape(n, cols // GROUP, GROUP)
        safe = np.where(scales == 0, 1, scales)[..., None]
        q = np.clip(np.rint((grouped - biases[..., None]) / safe), 0, 2 ** bits - 1)
        q = np.where(scales[..., None] == 0, 0, q)
        if not np.array_equal(q * scales[..., None] + biases[..., None], grouped):
            raise AssertionError(f"{t.name}: {kind} does not map exactly onto MLX {bits}-bit")
        parts["weight"].append(pack(q.reshape(n, cols), bits))
        for name, a in (("scales", scales), ("biases", biases)):
            parts[name].append(a.astype(np.float16 if half_exact else np.float32))
    return {name: np.concatenate(a) for name, a in parts.items()}
