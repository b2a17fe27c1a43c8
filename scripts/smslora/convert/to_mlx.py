"""One GGUF file into one model folder: model.safetensors, config.json, the tokenizer, and
source.json saying where it came from.

What happens to each tensor (step 1 prints it, per type, with the reason):
  * Q4_0, Q4_1, Q8_0, Q5_0, Q5_1, Q4_K, Q5_K: written in MLX's 4-, 5- or 8-bit layout with the
    same numbers (layouts.py);
  * F32, F16, BF16: kept as they are;
  * Q6_K, Q2_K, Q3_K, IQ*...: no MLX layout holds them, so they are de-quantized with the
    `gguf` package and re-quantized in groups of 32: Q6_K to MLX 8-bit (6-bit codes would lose
    more in 4), the others, 4-bit codes or fewer, to 4-bit;
  * vectors (norms, biases) of any quantized type: float32;
  * --dtype float32: every tensor de-quantized to float32, exactly as llama.cpp computes it.
Re-quantizing the 5- and 6-bit parts of Gemma 3 270M's Q4_K_M file to 4-bit instead moved the
label logits by up to 3 (against ~0.01 for the rule above): hence no "everything 4-bit" rule.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from .. import bases
from ..artifacts import atomic_write_json
from ..errors import UserError
from . import archs
from .gguf_file import FLOATS, GGUF, MLX_READS, check_types, dequantize, open_gguf
from .layouts import BITS, GROUP, to_mlx_layout
from .tokenizer import build_tokenizer, tokenizer_config

DTYPES = ("auto", "float32")
REQUANT_BITS = {"Q6_K": 8}  # the rest: 4


@dataclass
class Checked:
    """A GGUF read and checked before anything is written: all but the tensor data."""
    gguf: GGUF
    arch: archs.Arch
    tokenizer: object
    config: dict
    tokenizer_config: dict


def check_gguf(path: Path) -> Checked:
    """Everything that can be wrong with a GGUF, found before a folder is made."""
    g = open_gguf(path)
    arch = archs.architecture(g.meta)
    check_types(g)
    for name in g.tensors:
        archs.mlx_name(name, arch)  # an unexpected tensor is refused here, not half way
    try:
        tok = build_tokenizer(g.meta, arch.name)
        config = archs.build_config(g.meta, arch, tied="output.weight" not in g.tensors)
        tcfg = tokenizer_config(g.meta, config["max_position_embeddings"])
    except (KeyError, IndexError, TypeError) as e:
        raise UserError(f"the GGUF's metadata lacks or garbles {e}: pass a complete "
                        "GGUF") from None
    return Checked(g, arch, tok, config, tcfg)


def read_tensors(g: GGUF, dtype: str) -> tuple[dict, Counter]:
    """GGUF-named MLX arrays (x.weight, x.scales, x.biases, x.bias) and what was done to each
    type: Counter of (type, action)."""
    import mlx.core as mx

    done = Counter((t.tensor_type.name, action(t.tensor_type.name, dtype, t))
                   for t in g.tensors.values())
    if set(g.types()) <= MLX_READS and not any(w.startswith("de-q") for _, w in done):
        # MLX's own reader gives the same arrays as the loop below, in the order in which
        # earlier versions of this step wrote them (so the same model.safetensors bytes).
        return mx.load(str(g.path), format="gguf"), done
    arrays = {}
    for name, t in g.tensors.items():
        kind, prefix = t.tensor_type.name, name.removesuffix(".weight")
        what = action(kind, dtype, t)
        if what.startswith("MLX"):
            layout = to_mlx_layout(t)
            arrays.update({f"{prefix}.{part}": mx.array(a) for part, a in layout.items()})
        elif what.startswith("kept"):
            arrays[name] = mx.array(dequantize(t)).astype(getattr(mx, FLOATS[kind]))
        elif what.startswith("re-quantized"):
            q, scales, biases = mx.quantize(mx.array(dequantize(t)), group_size=GROUP,
                                            bits=REQUANT_BITS.get(kind, 4))
            arrays.update({name: q, f"{prefix}.scales": scales.astype(mx.float16),
                           f"{prefix}.biases": biases.astype(mx.float16)})
        else:
            arrays[name] = mx.array(dequantize(t))
    return arrays, done


def action(kind: str, dtype: str, t) -> str:
    """What happens to a tensor of this type, and why (the line step 1 prints for it)."""
    matrix = len(t.shape) == 2 and int(t.shape[0]) % GROUP == 0  # shape[0]: the row length
    if dtype == "float32":
        return "de-quantized to float32 (--dtype float32)"
    if kind in FLOATS:
        return f"kept as {FLOATS[kind]}"
    if not matrix:
        return "de-quantized to float32 (MLX quantizes matrices only)"
    if kind in BITS:
        return f"MLX {BITS[kind]}-bit, the same numbers: MLX's layout holds this type exactly"
    return (f"re-quantized to MLX {REQUANT_BITS.get(kind, 4)}-bit after de-quantizing: no MLX "
            "layout holds this type (--dtype float32 keeps its exact values)")


def quantization(weights: dict) -> dict | None:
    """config.json's quantization: the bits most layers have. mlx-lm reads each layer's own
    layout from its shapes (an 8-bit embedding among 4-bit blocks, for one)."""
    bits = [weights[name.replace(".scales", ".weight")].shape[-1] // s.shape[-1]
            for name, s in weights.items() if name.endswith(".scales")]
    if not bits:
        return None
    return {"group_size": GROUP, "bits": Counter(bits).most_common(1)[0][0], "mode": "affine"}


def file_md5(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def convert_gguf(gguf_path: Path, out_dir: Path, dtype: str = "auto",
                 checked: Checked | None = None) -> dict:
    """Write config, weights, tokenizer and source.json of a GGUF into the existing out_dir."""
    import mlx.core as mx

    if dtype not in DTYPES:
        raise UserError(f"--dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    c = checked or check_gguf(gguf_path)
    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    arrays, done = read_tensors(c.gguf, dtype)
    for (kind, what), n in sorted(done.items()):
        print(f"  {kind} ({n} tensor{'s' if n > 1 else ''}): {what}")
    try:
        weights = archs.convert_weights(arrays, c.gguf.meta, c.arch)
    except KeyError as e:
        raise UserError(f"the GGUF's metadata lacks {e}: pass a complete GGUF") from None
    config = dict(c.config)
    if (q := quantization(weights)) is not None:
        config["quantization"] = q
        config["quantization_config"] = q  # as mlx_lm.utils.save_config writes
    mx.save_safetensors(str(out_dir / "model.safetensors"), weights, metadata={"format": "mlx"})
    atomic_write_json(out_dir / "config.json", config)
    c.tokenizer.save(str(out_dir / "tokenizer.json"))
    atomic_write_json(out_dir / "tokenizer_config.json", c.tokenizer_config)
    atomic_write_json(out_dir / "special_tokens_map.json",
                      {k: v for k, v in c.tokenizer_config.items() if k.endswith("_token")})
    meta = c.gguf.meta
    source = {"source": "gguf", "path": str(gguf_path.resolve()), "name": meta.get("general.name"),
              "size_bytes": gguf_path.stat().st_size, "md5": file_md5(gguf_path)}
    if (base := bases.base_of(gguf_path)) is not None:
        source.update(base=base.name, package=base.package(), licence=base.licence)
    source.update(architecture=c.arch.name, dtype=dtype, tensor_types=dict(c.gguf.types()))
    atomic_write_json(out_dir / "source.json", source)
    return config
