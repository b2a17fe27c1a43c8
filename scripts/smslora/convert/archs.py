"""Each architecture's GGUF tensor names, conversion details and config.json for mlx-lm.

What llama.cpp's converter (convert_hf_to_gguf.py) changed on the way in is undone here:
  * llama: the rows of q and k are permuted per head (rotary halves interleaved);
  * gemma3: every RMSNorm weight is stored as 1 + w (mlx-lm, like Hugging Face, computes
    x * (1 + w)); the embedding scale is made exact (exact_embedding_scale); the local layers'
    rope base (10,000) and the layer pattern (five sliding-window
    layers, then a global one) are not in the file, and neither is the query scale, which
    llama.cpp takes as 1/sqrt(head_dim) (1/sqrt(hidden/heads) for the 62-block 27B).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import mlx.core as mx

from ..errors import UserError

# llama.cpp tensor names -> mlx-lm's module names.
BLOCK_NAMES = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm",
}
TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
LLAMA_NORMS = {"ffn_norm": "post_attention_layernorm"}
QK_NORMS = {"attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm"}
GEMMA_NORMS = {"post_attention_norm": "post_attention_layernorm",
               "ffn_norm": "pre_feedforward_layernorm",
               "post_ffw_norm": "post_feedforward_layernorm", **QK_NORMS}
GEMMA3_LOCAL_ROPE_BASE = 10_000.0
GEMMA3_PATTERN = 6  # five sliding-window layers, then one global


@dataclass(frozen=True)
class Arch:
    name: str  # general.architecture, and the prefix of its metadata keys
    model_type: str  # mlx-lm's module
    hf_class: str
    norms: dict = field(default_factory=dict)
    permuted_qk: bool = False  # llama.cpp permuted the rows of q and k
    norm_shift: float = 0.0  # llama.cpp stored norm weights as w + norm_shift

    def block_names(self) -> dict:
        return {**BLOCK_NAMES, **self.norms}


ARCHS = {
    "llama": Arch("llama", "llama", "LlamaForCausalLM", LLAMA_NORMS, permuted_qk=True),
    "qwen2": Arch("qwen2", "qwen2", "Qwen2ForCausalLM", LLAMA_NORMS),
    "qwen3": Arch("qwen3", "qwen3", "Qwen3ForCausalLM", {**LLAMA_NORMS, **QK_NORMS}),
    "gemma3": Arch("gemma3", "gemma3_text", "Gemma3ForCausalLM", GEMMA_NORMS, norm_shift=1.0),
}


def architecture(meta: dict) -> Arch:
    name = meta.get("general.architecture")
    if name not in ARCHS:
        raise UserError(f"the GGUF holds a {name!r} model, not one of {', '.join(ARCHS)}: "
                        "pass another --gguf, or an MLX model with --hf-repo")
    return ARCHS[name]


def unpermute(w: mx.array, n_head: int) -> mx.array:
    """Undo llama.cpp's HF->GGUF row permutation of q/k (rotary halves interleaved per head).

    llama.cpp: w.reshape(n_head, 2, rows // n_head // 2, *rest).swapaxes(1, 2).reshape(w.shape).
    Quantization packs along columns, so the same row shuffle applies to weight, scales and
    biases."""
    rows, rest = w.shape[0], w.shape[1:]
    return w.reshape(n_head, rows // n_head // 2, 2, *rest).swapaxes(1, 2).reshape(w.shape)


def mlx_name(name: str, arch: Arch) -> tuple[str, str]:
    """(mlx-lm name, llama.cpp kind) of a GGUF tensor name like blk.3.attn_q.weight."""
    parts = name.split(".")  # blk.N.attn_q.weight | token_embd.scales | ...
    try:
        if parts[0] == "blk" and len(parts) == 4:
            return f"model.layers.{parts[1]}.{arch.block_names()[parts[2]]}.{parts[3]}", parts[2]
        if len(parts) == 2:
            return f"{TOP_NAMES[parts[0]]}.{parts[1]}", parts[0]
    except KeyError:
        pass
    hint = " (Llama 3 rope scaling is not supported)" if parts[0] == "rope_freqs" else ""
    raise UserError(f"unexpected tensor {name!r} in a {arch.name} GGUF{hint}: pass another "
                    "--gguf or use --hf-repo")


def convert_weights(weights: dict, meta: dict, arch: Arch) -> dict:
    """GGUF tensors (weight/scales/biases/bias) under mlx-lm's names, with the converter's
    changes undone."""
    heads = {"attn_q": meta[f"{arch.name}.attention.head_count"],
             "attn_k": meta.get(f"{arch.name}.attention.head_count_kv",
                                meta[f"{arch.name}.attention.head_count"])}
    out = {}
    for name, w in weights.items():
        new, kind = mlx_name(name, arch)
        if arch.permuted_qk and kind in heads:
            w = unpermute(w, heads[kind])
        if arch.norm_shift and kind.endswith("norm"):
            w = w.astype(mx.float32) - arch.norm_shift  # exact for stored values in [0.5, 2]
        out[new] = w
    if "model.embed_tokens.weight" not in out:
        raise UserError("the GGUF has no token_embd tensor: pass a complete GGUF")
    if arch.name == "gemma3":
        exact_embedding_scale(out, meta["gemma3.embedding_length"])
    return out


def exact_embedding_scale(weights: dict, hidden: int) -> None:
    """Make mlx-lm's gemma3_text compute the float32 model: it multiplies the embeddings by
    sqrt(hidden) rounded to bfloat16 (25.25 for 640), Hugging Face's float32 model by sqrt(hidden)
    itself (25.2982), which moves logits by up to 0.03. The embedding rows are scaled by the
    ratio, and the final norm's factor (1 + w) divided by it: the output layer is the same
    (tied) embedding, so the logits are unchanged (to float32 rounding)."""
    ratio = embedding_scale_ratio(hidden)
    if ratio == 1.0:
        return
    parts = ["scales", "biases"] if "model.embed_tokens.scales" in weights else ["weight"]
    for part in parts:  # float32: float16 scales would round the product
        weights[f"model.embed_tokens.{part}"] = weights[f"model.embed_tokens.{part}"].astype(
            mx.float32) * ratio
    norm = weights["model.norm.weight"].astype(mx.float32)
    weights["model.norm.weight"] = (1 + norm) / ratio - 1


def embedding_scale_ratio(hidden: int) -> float:
    """sqrt(hidden) over mlx-lm's gemma3_text embedding scale (sqrt(hidden) in bfloat16)."""
    exact = hidden ** 0.5
    return exact / mx.array(exact, dtype=mx.bfloat16).item()


def rope_scaling(meta: dict, arch: Arch) -> dict | None:
    kind = meta.get(f"{arch.name}.rope.scaling.type", "none")
    if kind == "none":
        return None
    if kind == "linear":
        return {"rope_type": "linear", "factor": meta[f"{arch.name}.rope.scaling.factor"]}
    raise UserError(f"rope scaling {kind!r} is not supported (only linear): pass another --gguf")


def build_config(meta: dict, arch: Arch, tied: bool) -> dict:
    """config.json for mlx-lm from the GGUF's <arch>.* keys (tied: no separate output layer)."""
    p = arch.name
    hidden, n_head = meta[f"{p}.embedding_length"], meta[f"{p}.attention.head_count"]
    if isinstance(n_head, list) or isinstance(meta.get(f"{p}.attention.head_count_kv"), list):
        raise UserError("per-layer head counts are not supported: pass another --gguf")
    head_dim = meta.get(f"{p}.attention.key_length", hidden // n_head)
    if meta.get(f"{p}.rope.dimension_count", head_dim) != head_dim:
        raise UserError("partial rotary embeddings are not supported: pass another --gguf")
    config = {
        "architectures": [arch.hf_class], "model_type": arch.model_type,
        "hidden_size": hidden, "num_hidden_layers": meta[f"{p}.block_count"],
        "intermediate_size": meta[f"{p}.feed_forward_length"],
        "num_attention_heads": n_head,
        "num_key_value_heads": meta.get(f"{p}.attention.head_count_kv", n_head),
        "head_dim": head_dim,
        "rms_norm_eps": meta[f"{p}.attention.layer_norm_rms_epsilon"],
        "rope_theta": meta.get(f"{p}.rope.freq_base", 10000.0),
        "vocab_size": meta.get(f"{p}.vocab_size", len(meta["tokenizer.ggml.tokens"])),
        "max_position_embeddings": meta[f"{p}.context_length"],
        "tie_word_embeddings": tied,
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
    }
    if (scaling := rope_scaling(meta, arch)) is not None:
        config["rope_scaling"] = scaling
    if arch.name == "llama":
        config.update(hidden_act="silu", attention_bias=False, mlp_bias=False)
    elif arch.name == "qwen2" and head_dim != hidden // n_head:
        raise UserError("a qwen2 GGUF whose head size is not hidden/heads is not supported")
    elif arch.name == "gemma3":
        config.update(gemma3_config(meta, config))
    return config


def gemma3_config(meta: dict, config: dict) -> dict:
    """What mlx-lm's gemma3_text needs beyond the common keys (see the module docstring)."""
    if meta.get("gemma3.final_logit_softcapping"):
        raise UserError("a gemma3 GGUF with logit soft-capping is not supported (mlx-lm's "
                        "gemma3_text has none)")
    window = meta.get("gemma3.attention.sliding_window")
    blocks = config["num_hidden_layers"]
    big = blocks == 62  # llama.cpp's test for the 27B, which scales queries by hidden/heads
    return {
        "hidden_activation": "gelu_pytorch_tanh",
        "rope_local_base_freq": GEMMA3_LOCAL_ROPE_BASE,
        "query_pre_attn_scalar": (config["hidden_size"] // config["num_attention_heads"]
                                  if big else config["head_dim"]),
        "sliding_window": window or config["max_position_embeddings"],
        "sliding_window_pattern": GEMMA3_PATTERN if window else 1,
    }
