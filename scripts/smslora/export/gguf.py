"""A model folder as one GGUF file, written with the `gguf` package (llama.cpp's own writer) the
way llama.cpp's convert_hf_to_gguf.py writes the Hugging Face model (archs.py: llama, gemma3):

  * llama.cpp's tensor names: token_embd, blk.N.attn_q ... ffn_down, output_norm, and output only
    when the output layer is not tied to the embedding (the inverse of step 1's reader,
    convert/archs.py); what the architecture changes on the way (archs.py: llama's q/k row
    permutation, Gemma's 1 + w norms and embedding scale);
  * 1-D tensors (the norms) in float32, matrices in float16 (`f16`) or Q8_0 blocks of 32
    (`q8_0`, gguf.quants: the same bytes llama-quantize gives);
  * the <arch>.* hyper-parameters and the tokenizer's metadata (vocab.py).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..errors import UserError
from . import archs, source, vocab

TYPES = ("f16", "q8_0")


def gguf_name(name: str, target: archs.Target = archs.LLAMA) -> str:
    """mlx-lm's model.layers.3.self_attn.q_proj.weight -> llama.cpp's blk.3.attn_q.weight."""
    parts = name.split(".")
    blocks, top = target.block_names(), target.top_names()
    if parts[:2] == ["model", "layers"] and len(parts) >= 5:
        module = ".".join(parts[3:-1])
        if module in blocks:
            return f"blk.{parts[2]}.{blocks[module]}.{parts[-1]}"
    elif ".".join(parts[:-1]) in top:
        return f"{top['.'.join(parts[:-1])]}.{parts[-1]}"
    raise UserError(f"the model has a tensor {name!r} that llama.cpp's {target.name} has no "
                    "place for")


def permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Hugging Face's rotary layout of q/k rows -> llama.cpp's (convert_hf_to_gguf's permute)."""
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def ggml_tensors(weights: dict, config: dict, kind: str, target: archs.Target = archs.LLAMA):
    """(gguf name, data, ggml type) for each weight, in the order llama.cpp lists them."""
    import gguf

    if target.tied_by_config and config.get("tie_word_embeddings", True):
        weights.pop(archs.HEAD, None)
    target.prepare(weights, config)
    heads = {"attn_q": config["num_attention_heads"], "attn_k": archs.kv_heads(config)}
    matrix = {"f16": gguf.GGMLQuantizationType.F16, "q8_0": gguf.GGMLQuantizationType.Q8_0}[kind]
    for name in sorted(weights, key=tensor_order):
        new = gguf_name(name, target)
        data = weights.pop(name)  # free each float32 copy as soon as it is converted
        role = new.split(".")[-2]
        if target.arch.permuted_qk and role in heads:
            data = permute(data, heads[role])
        if target.arch.norm_shift and role.endswith("norm"):
            data = data + np.float32(target.arch.norm_shift)
        qtype = matrix if data.ndim == 2 else gguf.GGMLQuantizationType.F32
        try:
            packed = gguf.quants.quantize(data, qtype)
        except gguf.QuantError:  # a row length Q8_0 cannot block: as llama.cpp, float16
            qtype = gguf.GGMLQuantizationType.F16
            packed = gguf.quants.quantize(data, qtype)
        yield new, packed, qtype


def tensor_order(name: str):
    parts = name.split(".")
    if parts[:2] == ["model", "layers"]:
        return (1, int(parts[2]), name)
    return (0 if "embed" in name else 2, 0, name)


def add_hyperparameters(writer, config: dict, kind: str, name: str,
                        target: archs.Target = archs.LLAMA) -> None:
    import gguf

    writer.add_name(name)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_file_type({"f16": gguf.LlamaFileType.MOSTLY_F16,
                          "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[kind])
    target.hyperparameters(writer, config)


def check(model_dir: Path, kind: str) -> dict:
    """Refuse what cannot be exported before anything slow runs; the model's config."""
    if kind not in TYPES:
        raise UserError(f"--gguf {kind!r}: choose one of {', '.join(TYPES)}")
    config = source.read_config(model_dir)
    source.target(config, model_dir)
    vocab.tokenizer_kind(vocab.read_tokenizer(model_dir))
    return config


def write_gguf(weights: dict, config: dict, model_dir: Path, path: Path, kind: str,
               name: str, tokenizer) -> dict:
    """The model (its float32 weights, config and model_dir's tokenizer, loaded as `tokenizer`)
    as a GGUF file at path (in a temporary folder that the caller puts in place). The weights
    dict is emptied as it is converted. Returns what was written: architecture, tensor types,
    tokenizer, size."""
    import gguf

    n_vocab = weights["model.embed_tokens.weight"].shape[0]
    if n_vocab != config["vocab_size"]:
        raise UserError(f"{model_dir}: vocab_size {config['vocab_size']} but the embedding has "
                        f"{n_vocab} rows")
    target = source.target(config, model_dir)
    writer = gguf.GGUFWriter(path, target.name)
    add_hyperparameters(writer, config, kind, name, target)
    pre = vocab.add_tokenizer(writer, model_dir, n_vocab, tokenizer, target.space_runs)
    types: dict[str, int] = {}
    for new, packed, qtype in ggml_tensors(weights, config, kind, target):
        writer.add_tensor(new, packed, raw_dtype=qtype)
        types[qtype.name] = types.get(qtype.name, 0) + 1
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()
    with open(path, "rb+") as f:  # the bytes on disk before the folder is renamed into place
        os.fsync(f.fileno())
    return {"file": Path(path).name, "type": kind, "architecture": target.name, **pre,
            "tensor_types": types, "bytes": Path(path).stat().st_size}
