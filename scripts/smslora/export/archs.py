"""Each architecture the GGUF export writes, as llama.cpp's convert_hf_to_gguf.py writes it: the
tensor names (step 1's table, convert/archs.py, read the other way), the config.json values
llama.cpp's graph computes the same way (anything else is refused), the <arch>.* hyper-parameters
in the converter's order, and what is changed on the way out:

  * llama (SmolLM2): the rows of q and k permuted per head (llama.cpp's rotary layout);
  * gemma3 (Gemma 3): every RMSNorm weight stored as 1 + w (llama.cpp multiplies by the stored
    weight, mlx-lm by 1 + w); the embedding divided by sqrt(hidden) / bfloat16(sqrt(hidden)),
    since llama.cpp scales embeddings by sqrt(hidden) exactly where mlx-lm rounds the factor to
    bfloat16; with a tied output layer the final norm's factor is multiplied by that ratio, so the
    logits are unchanged. llama.cpp fixes what the file does not say: five sliding-window layers
    then a global one, a rope base of 10,000 on the sliding-window layers, queries scaled by
    1/sqrt(head_dim) (1/sqrt(hidden/heads) for the 62-block 27B).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ..convert.archs import (
    ARCHS,
    GEMMA3_LOCAL_ROPE_BASE,
    GEMMA3_PATTERN,
    TOP_NAMES,
    Arch,
    embedding_scale_ratio,
)

EMBED, NORM, HEAD = "model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"


def head_dim(config: dict) -> int:
    return config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]


def kv_heads(config: dict) -> int:
    return config.get("num_key_value_heads", config["num_attention_heads"])


@dataclass(frozen=True)
class Target:
    arch: Arch  # step 1's entry: llama.cpp's names, q/k permutation, norm shift
    product: str  # the model family, for messages
    as_is: dict  # config.json key -> the values llama.cpp computes the same way
    odd: Callable[[dict], list[str]]  # further config values llama.cpp would compute otherwise
    hyperparameters: Callable  # (gguf writer, config) -> None
    prepare: Callable[[dict, dict], None] = lambda weights, config: None
    tied_by_config: bool = True  # mlx-lm ties the output layer by config (llama) or by weights
    space_runs: bool = False  # its SentencePiece vocabulary spells runs of spaces with spaces

    @property
    def name(self) -> str:
        return self.arch.name

    def block_names(self) -> dict:
        """mlx-lm module in a block -> llama.cpp tensor name (self_attn.q_proj -> attn_q)."""
        return {mlx: gguf_name for gguf_name, mlx in self.arch.block_names().items()}

    @staticmethod
    def top_names() -> dict:
        """mlx-lm top-level module -> llama.cpp tensor name (model.norm -> output_norm)."""
        return {mlx: gguf_name for gguf_name, mlx in TOP_NAMES.items()}


# --- llama -------------------------------------------------------------------------------------

def llama_odd(config: dict) -> list[str]:
    heads = config.get("num_attention_heads", 0)
    dim = config.get("head_dim") or config.get("hidden_size", 0) // max(heads, 1)
    return [f"head_dim={dim}"] if dim * heads != config.get("hidden_size") else []


def llama_hyperparameters(writer, config: dict) -> None:
    writer.add_context_length(config.get("max_position_embeddings", 2048))
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(config["num_attention_heads"])
    writer.add_head_count_kv(kv_heads(config))
    writer.add_rope_freq_base(float(config.get("rope_theta", 10000.0)))
    writer.add_layer_norm_rms_eps(float(config.get("rms_norm_eps", 1e-5)))
    writer.add_vocab_size(config["vocab_size"])
    writer.add_rope_dimension_count(head_dim(config))


LLAMA = Target(
    ARCHS["llama"], "llama (SmolLM2)",
    as_is={"hidden_act": ("silu", None), "attention_bias": (False, None),
           "mlp_bias": (False, None), "rope_scaling": (None,), "rope_traditional": (False, None)},
    odd=llama_odd, hyperparameters=llama_hyperparameters)


# --- gemma3 ------------------------------------------------------------------------------------

def gemma3_args(config: dict):
    """The config as mlx-lm's gemma3_text reads it, its defaults filled in."""
    from mlx_lm.models.gemma3_text import ModelArgs

    return ModelArgs.from_dict(config)


def gemma3_odd(config: dict) -> list[str]:
    a = gemma3_args(config)
    odd = [f"{k}={getattr(a, k)!r}" for k, want in (
        ("rope_local_base_freq", GEMMA3_LOCAL_ROPE_BASE),
        ("sliding_window_pattern", GEMMA3_PATTERN)) if getattr(a, k) != want]
    if not a.sliding_window:
        odd.append(f"sliding_window={a.sliding_window!r}")
    big = a.num_hidden_layers == 62  # llama.cpp's test for the 27B
    scale = a.hidden_size // a.num_attention_heads if big else a.head_dim
    if a.query_pre_attn_scalar != scale:
        odd.append(f"query_pre_attn_scalar={a.query_pre_attn_scalar!r}")
    scaling = a.rope_scaling
    if scaling is not None and (not isinstance(scaling, dict) or set(scaling) - {
            "rope_type", "type", "factor"} or scaling.get("rope_type", scaling.get("type"))
            != "linear"):
        odd.append(f"rope_scaling={scaling!r}")
    return odd


def gemma3_hyperparameters(writer, config: dict) -> None:
    import gguf

    a = gemma3_args(config)
    writer.add_context_length(a.max_position_embeddings)
    writer.add_embedding_length(a.hidden_size)
    writer.add_block_count(a.num_hidden_layers)
    writer.add_feed_forward_length(a.intermediate_size)
    writer.add_head_count(a.num_attention_heads)
    writer.add_layer_norm_rms_eps(float(a.rms_norm_eps))
    writer.add_key_length(a.head_dim)
    writer.add_value_length(a.head_dim)
    writer.add_rope_freq_base(float(a.rope_theta))
    writer.add_sliding_window(a.sliding_window)
    writer.add_head_count_kv(a.num_key_value_heads)
    if a.rope_scaling:
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(a.rope_scaling["factor"]))


def gemma3_prepare(weights: dict, config: dict) -> None:
    """llama.cpp's embedding scale (see the module docstring); float32 throughout."""
    ratio = embedding_scale_ratio(config["hidden_size"])
    if ratio == 1.0:
        return
    weights[EMBED] = (weights[EMBED].astype(np.float64) / ratio).astype(np.float32)
    if HEAD not in weights:  # the output layer is the embedding: keep the logits as they are
        norm = weights[NORM].astype(np.float64)
        weights[NORM] = ((1 + norm) * ratio - 1).astype(np.float32)


GEMMA3 = Target(
    ARCHS["gemma3"], "gemma3 (Gemma 3)",
    as_is={"hidden_activation": ("gelu_pytorch_tanh", None),
           "final_logit_softcapping": (None,), "attn_logit_softcapping": (None,)},
    odd=gemma3_odd, hyperparameters=gemma3_hyperparameters, prepare=gemma3_prepare,
    tied_by_config=False, space_runs=True)


TARGETS = {"llama": LLAMA, "gemma3_text": GEMMA3}  # config.json model_type -> target
SUPPORTED = " and ".join(t.product for t in TARGETS.values())


def odd_values(target: Target, config: dict) -> list[str]:
    """config.json values of the model that llama.cpp's graph would compute differently."""
    return [f"{k}={config[k]!r}" for k, allowed in target.as_is.items()
            if k in config and config[k] not in allowed] + target.odd(config)

