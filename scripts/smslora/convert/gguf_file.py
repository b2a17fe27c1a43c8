"""Reading a GGUF file: its metadata as plain Python values, its tensors as MLX arrays.

MLX's own GGUF reader keeps the llama.cpp types Q4_0, Q4_1 (as MLX 4-bit) and Q8_0 (as MLX
8-bit) with the same numbers: group size 32, float16 scales and biases.
"""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx

from ..errors import UserError


def read_gguf(path: Path) -> tuple[dict, dict]:
    """Tensors and metadata of a GGUF; any unreadable file becomes a UserError."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"GGUF file not found at {path}: pass --gguf with an existing file")
    try:
        weights, meta = mx.load(str(path), format="gguf", return_metadata=True)
    except Exception as e:  # mlx raises RuntimeError/ValueError for truncated or foreign files
        raise UserError(f"cannot read GGUF {path} ({str(e).splitlines()[0]}): "
                        "re-download it or pass another --gguf") from None
    return weights, {k: plain(v) for k, v in meta.items()}


def plain(v):
    """A metadata value as a plain Python value (mlx gives 0-d arrays); float32 noise rounded."""
    if isinstance(v, mx.array):
        v = v.item() if v.ndim == 0 else v.tolist()
        if isinstance(v, float):
            v = float(f"{v:.7g}")  # 9.999999747e-06 (float32) -> 1e-05
    return v
