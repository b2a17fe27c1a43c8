"""Each architecture's GGUF tensor names, conversion details and config.json for mlx-lm."""

from __future__ import annotations

import mlx.core as mx

from ..errors import UserError

# llama.cpp tensor names -> mlx-lm's module names.
BLOCK_NAMES = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
SUPPORTED = ("llama",)


def architecture(meta: dict) -> str:
    arch = meta.get("general.architecture")
    if arch not in SUPPORTED:
        raise UserError(f"the GGUF holds a {arch!r} model, not one of {', '.join(SUPPORTED)}: "
                        "pass another --gguf, or an MLX model with --hf-repo")
    return arch


def unpermute(w: mx.array, n_head: int) -> mx.array:
    """Undo llama.cpp's HF->GGUF row permutation of q/k (rotary halves interleaved per head).

    llama.cpp: w.reshape(n_head, 2, rows // n_head // 2, *rest).swapaxes(1, 2).reshape(w.shape).
    Quantization packs along columns, so the same row shuffle applies to weight, scales and biases."""
    rows, rest = w.shape[0], w.shape[1:]
    return w.reshape(n_head, rows // n_head // 2, 2, *rest).swapaxes(1, 2).reshape(w.shape)


def mlx_name(name: str) -> tuple[str, str | None]:
    """(mlx-lm name, llama.cpp kind of tensor) of a GGUF tensor name like blk.3.attn_q.weight."""
    parts = name.split(".")  # blk.N.attn_q.weight | token_embd.scales | ...
    try:
        if parts[0] == "blk":
            return f"model.layers.{parts[1]}.{BLOCK_NAMES[parts[2]]}.{parts[3]}", parts[2]
        return f"{TOP_NAMES[parts[0]]}.{parts[1]}", parts[0]
    except (KeyError, IndexError):
        raise UserError(f"unexpected tensor {name!r} in the GGUF: not a plain llama model, "
                        "pass another --gguf or use --hf-repo") from None


def convert_weights(weights: dict, meta: dict) -> dict:
    """GGUF tensors renamed to mlx-lm's llama names, q/k rows restored to Hugging Face order."""
    heads = {"attn_q": meta["llama.attention.head_count"],
             "attn_k": meta["llama.attention.head_count_kv"]}
    out = {}
    for name, w in weights.items():
        new, kind = mlx_name(name)
        out[new] = unpermute(w, heads[kind]) if kind in heads else w
    if "model.embed_tokens.weight" not in out:
        raise UserError("the GGUF has no token_embd tensor: pass a complete GGUF")
    return out


def build_config(meta: dict, weights: dict) -> dict:
    """config.json for mlx-lm's llama from the GGUF's llama.* keys."""
    hidden, n_head = meta["llama.embedding_length"], meta["llama.attention.head_count"]
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": hidden, "num_hidden_layers": meta["llama.block_count"],
        "intermediate_size": meta["llama.feed_forward_length"],
        "num_attention_heads": n_head,
        "num_key_value_heads": meta.get("llama.attention.head_count_kv", n_head),
        "head_dim": meta.get("llama.attention.key_length", hidden // n_head),
        "rms_norm_eps": meta["llama.attention.layer_norm_rms_epsilon"],
        "rope_theta": meta.get("llama.rope.freq_base", 10000.0),
        "vocab_size": meta.get("llama.vocab_size", len(meta["tokenizer.ggml.tokens"])),
        "max_position_embeddings": meta["llama.context_length"],
        "tie_word_embeddings": "lm_head.weight" not in weights,
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
        "hidden_act": "silu", "attention_bias": False, "mlp_bias": False,
    }
