"""Reading a GGUF file: its metadata as plain Python values, its tensors as MLX arrays.

The `gguf` package (llama.cpp's own reader) reads every tensor type llama.cpp writes and
de-quantizes it in numpy (`gguf.quants.dequantize`); layouts.py writes the types that MLX's
affine layout holds exactly.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import UserError

FLOATS = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}
MLX_READS = {"F32", "F16", "Q4_0", "Q4_1", "Q8_0"}  # what mlx.core.load(format="gguf") keeps


@dataclass
class GGUF:
    path: Path
    meta: dict  # key -> plain Python value (str, int, float, bool or list)
    tensors: dict  # name -> gguf.ReaderTensor, in file order

    def types(self) -> Counter:
        return Counter(t.tensor_type.name for t in self.tensors.values())


def open_gguf(path: Path) -> GGUF:
    """Metadata and tensor directory of a GGUF; an unreadable file is a one-line UserError."""
    import gguf

    path = Path(path)
    if not path.is_file():
        raise UserError(f"GGUF file not found at {path}: pass --gguf with an existing file")
    try:
        reader = gguf.GGUFReader(path)
    except ValueError as e:
        if "GGMLQuantizationType" in str(e):  # a tensor type id llama.cpp's reader does not know
            kind = (re.findall(r"\d+", str(e).split("is not")[0]) or ["?"])[-1]
            raise UserError(f"{path} holds a tensor of unknown type {kind} (not one llama.cpp "
                            "writes): pass another --gguf") from None
        raise unreadable(path, e) from None
    except Exception as e:  # a truncated or foreign file fails in many ways inside the reader
        raise unreadable(path, e) from None
    tensors = {t.name: t for t in reader.tensors}
    short = [n for n, t in tensors.items() if t.data.nbytes != t.n_bytes]
    if short:
        raise UserError(f"{path} is truncated (tensor {short[0]} is incomplete): "
                        "re-download it or pass another --gguf")
    meta = {k: plain(f) for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    return GGUF(path, meta, tensors)


def unreadable(path: Path, e: Exception) -> UserError:
    return UserError(f"cannot read GGUF {path}: truncated, damaged or not a GGUF file "
                     f"({type(e).__name__}: {str(e)[:80]}): re-download it or pass another --gguf")


def plain(field):
    """A metadata field as a plain Python value; a float32 scalar's noise rounded off (1e-05,
    not 9.999999747e-06). Arrays (token scores) stay as stored."""
    import gguf

    v = field.contents()
    if field.types == [gguf.GGUFValueType.FLOAT32]:
        v = float(f"{v:.7g}")
    return v


def shape_of(t) -> tuple[int, ...]:
    """The tensor's shape in MLX (row-major) order; GGUF lists dimensions the other way."""
    return tuple(int(d) for d in reversed(t.shape.tolist()))


def dequantize(t) -> np.ndarray:
    """Any tensor as float32 in its MLX shape, as llama.cpp itself de-quantizes it."""
    import gguf

    values = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type)
    return np.asarray(values, dtype=np.float32).reshape(shape_of(t))


def check_types(g: GGUF) -> None:
    """Refuse a file with a tensor type that cannot be read as weights (an integer type,
    Q8_K...), before anything is written: de-quantize one block of each type present."""
    import gguf

    for kind in g.types():
        qtype = gguf.GGMLQuantizationType[kind]
        try:
            gguf.quants.dequantize(np.zeros(gguf.GGML_QUANT_SIZES[qtype][1], np.uint8), qtype)
        except NotImplementedError:
            name = next(n for n, t in g.tensors.items() if t.tensor_type == qtype)
            raise UserError(f"tensor {name} has type {kind}, which llama.cpp's reader cannot "
                            "de-quantize (not a weight type): pass another --gguf") from None
