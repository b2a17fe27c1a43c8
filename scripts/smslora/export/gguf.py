"""A llama-type model folder as one GGUF file, written with the `gguf` package (llama.cpp's own
writer) the way llama.cpp's convert_hf_to_gguf.py writes a Hugging Face llama:

  * tensor names: token_embd, blk.N.attn_q ... ffn_down, output_norm, and output only when the
    output layer is not tied to the embedding (the inverse of step 1's reader, convert/archs.py);
  * the rows of q and k permuted per head (llama.cpp's rotary embedding pairs adjacent values,
    Hugging Face's and mlx-lm's pair the two halves of a head); k with the key/value head count;
  * 1-D tensors (the norms) in float32, matrices in float16 (`f16`) or Q8_0 blocks of 32
    (`q8_0`, gguf.quants: the same bytes llama-quantize gives);
  * the llama.* hyper-parameters and the tokenizer's metadata (vocab.py).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..convert.archs import BLOCK_NAMES, LLAMA_NORMS, TOP_NAMES
from ..errors import UserError
from . import source, vocab

TYPES = ("f16", "q8_0")
GGUF_NAMES = {mlx: gguf_name for gguf_name, mlx in {**BLOCK_NAMES, **LLAMA_NORMS}.items()}
TOP_GGUF_NAMES = {mlx: gguf_name for gguf_name, mlx in TOP_NAMES.items()}


def gguf_name(name: str) -> str:
    """mlx-lm's model.layers.3.self_attn.q_proj.weight -> llama.cpp's blk.3.attn_q.weight."""
    parts = name.split(".")
    if parts[:2] == ["model", "layers"] and len(parts) >= 5:
        module = ".".join(parts[3:-1])
        if module in GGUF_NAMES:
            return f"blk.{parts[2]}.{GGUF_NAMES[module]}.{parts[-1]}"
    elif ".".join(parts[:-1]) in TOP_GGUF_NAMES:
        return f"{TOP_GGUF_NAMES['.'.join(parts[:-1])]}.{parts[-1]}"
    raise UserError(f"the model has a tensor {name!r} that llama.cpp's llama has no place for")


def permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Hugging Face's rotary layout of q/k rows -> llama.cpp's (convert_hf_to_gguf's permute)."""
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def ggml_tensors(weights: dict, config: dict, kind: str):
    """(gguf name, data, ggml type) for each weight, in the order llama.cpp lists them."""
    import gguf

    if config.get("tie_word_embeddings", True):
        weights.pop("lm_head.weight", None)
    heads = {"attn_q": config["num_attention_heads"],
             "attn_k": config.get("num_key_value_heads", config["num_attention_heads"])}
    matrix = {"f16": gguf.GGMLQuantizationType.F16, "q8_0": gguf.GGMLQuantizationType.Q8_0}[kind]
    for name in sorted(weights, key=tensor_order):
        new = gguf_name(name)
        data = weights.pop(name)  # free each float32 copy as soon as it is converted
        role = new.split(".")[-2]
        if role in heads:
            data = permute(data, heads[role])
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


def add_hyperparameters(writer, config: dict, kind: str, name: str) -> None:
    import gguf

    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    writer.add_name(name)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_file_type({"f16": gguf.LlamaFileType.MOSTLY_F16,
                          "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[kind])
    writer.add_context_length(config.get("max_position_embeddings", 2048))
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(config.get("num_key_value_heads", heads))
    writer.add_rope_freq_base(float(config.get("rope_theta", 10000.0)))
    writer.add_layer_norm_rms_eps(float(config.get("rms_norm_eps", 1e-5)))
    writer.add_vocab_size(config["vocab_size"])
    writer.add_rope_dimension_count(head_dim)


def check(model_dir: Path, kind: str) -> dict:
    """Refuse what cannot be exported before anything slow runs; the model's config."""
    if kind not in TYPES:
        raise UserError(f"--gguf {kind!r}: choose one of {', '.join(TYPES)}")
    config = source.read_config(model_dir)
    source.check_llama(config, model_dir)
    vocab.pre_tokenizer_name(vocab.read_tokenizer(model_dir))
    return config


def write_gguf(weights: dict, config: dict, model_dir: Path, path: Path, kind: str,
               name: str) -> dict:
    """The model (its float32 weights, config and model_dir's tokenizer) as a GGUF file at path
    (in a temporary folder that the caller puts in place). The weights dict is emptied as it is
    converted. Returns what was written: tensor types, pre-tokenizer, size."""
    import gguf

    n_vocab = weights["model.embed_tokens.weight"].shape[0]
    if n_vocab != config["vocab_size"]:
        raise UserError(f"{model_dir}: vocab_size {config['vocab_size']} but the embedding has "
                        f"{n_vocab} rows")
    writer = gguf.GGUFWriter(path, "llama")
    add_hyperparameters(writer, config, kind, name)
    pre = vocab.add_tokenizer(writer, model_dir, n_vocab)
    types: dict[str, int] = {}
    for new, packed, qtype in ggml_tensors(weights, config, kind):
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
    return {"file": Path(path).name, "type": kind, "pre_tokenizer": pre,
            "tensor_types": types, "bytes": Path(path).stat().st_size}
