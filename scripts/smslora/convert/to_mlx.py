"""One GGUF file into one model folder: model.safetensors, config.json, the tokenizer, and
source.json saying where it came from."""

from __future__ import annotations

import hashlib
from collections import Counter
from pathlib import Path

import mlx.core as mx

from .. import bases
from ..artifacts import atomic_write_json
from ..errors import UserError
from . import archs
from .gguf_file import read_gguf
from .tokenizer import build_tokenizer, tokenizer_config

DTYPES = ("auto", "float32")
GROUP = 32  # llama.cpp's block size: MLX keeps Q4_0/Q4_1/Q8_0 as groups of 32


def check_gguf(path: Path) -> tuple[dict, dict]:
    """Read and check a GGUF before anything is written: (weights, metadata)."""
    weights, meta = read_gguf(path)
    archs.architecture(meta)
    return weights, meta


def bits_of(w: mx.array, scales: mx.array) -> int:
    """Bits per weight of an MLX-quantized tensor in groups of GROUP (uint32 words per group)."""
    return w.shape[-1] // scales.shape[-1]


def dequantize_all(weights: dict) -> dict:
    """Every MLX-quantized tensor as float32, exactly (float16 scales widened first)."""
    out = {}
    for name, w in weights.items():
        prefix = name.removesuffix(".weight")
        if name.endswith((".scales", ".biases")):
            continue
        if f"{prefix}.scales" not in weights:
            out[name] = w.astype(mx.float32)
            continue
        scales, biases = weights[f"{prefix}.scales"], weights[f"{prefix}.biases"]
        out[name] = mx.dequantize(w, scales.astype(mx.float32), biases.astype(mx.float32),
                                  group_size=GROUP, bits=bits_of(w, scales))
    return out


def quantization(weights: dict) -> dict | None:
    """config.json's quantization: the bits most layers have. mlx-lm reads each layer's own
    layout from its shapes (SmolLM2's 8-bit embedding among 4-bit blocks, for one)."""
    bits = [bits_of(weights[name.replace(".scales", ".weight")], s)
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
                 checked: tuple[dict, dict] | None = None) -> dict:
    """Write config, weights, tokenizer and source.json of a GGUF into the existing out_dir."""
    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    weights, meta = checked or check_gguf(gguf_path)
    try:
        tok = build_tokenizer(meta)  # before the weights: fail fast on an unsupported tokenizer
        weights = archs.convert_weights(weights, meta)
        config = archs.build_config(meta, weights)
        tcfg = tokenizer_config(meta, config["max_position_embeddings"])
    except KeyError as e:
        raise UserError(f"the GGUF's metadata lacks {e}: pass a complete GGUF") from None
    if dtype == "float32":
        weights = dequantize_all(weights)
        print("--dtype float32: every tensor de-quantized to float32")
    q = quantization(weights)
    if q is not None:
        config["quantization"] = q
        config["quantization_config"] = q  # as mlx_lm.utils.save_config writes
    mx.save_safetensors(str(out_dir / "model.safetensors"), weights, metadata={"format": "mlx"})
    atomic_write_json(out_dir / "config.json", config)
    tok.save(str(out_dir / "tokenizer.json"))
    atomic_write_json(out_dir / "tokenizer_config.json", tcfg)
    atomic_write_json(out_dir / "special_tokens_map.json",
                      {k: v for k, v in tcfg.items() if k.endswith("_token")})
    source = {"source": "gguf", "path": str(gguf_path.resolve()), "name": meta.get("general.name"),
              "size_bytes": gguf_path.stat().st_size, "md5": file_md5(gguf_path)}
    base = bases.base_of(gguf_path)
    if base is not None:
        source.update(base=base.name, package=base.package(), licence=base.licence)
    atomic_write_json(out_dir / "source.json", source)
    return config
