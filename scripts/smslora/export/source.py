"""The model folder an export reads: checked to be a project model of an architecture the GGUF
writer knows, then loaded strictly (smslora.model) and handed over as float32 arrays under
mlx-lm's names."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..errors import UserError

# config.json values llama.cpp's llama graph computes the same way; anything else is refused.
LLAMA_AS_IS = {"hidden_act": ("silu", None), "attention_bias": (False, None),
               "mlp_bias": (False, None), "rope_scaling": (None,), "rope_traditional": (False, None)}


def read_config(model_dir: Path) -> dict:
    """config.json of a project model folder (step 1 or step 6), or a one-line UserError."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise UserError(f"no model folder at {model_dir}: run scripts/06_fuse.py, or pass --model "
                        "with a folder step 1 or 6 wrote (models/baseline, models/retrained/fused)")
    path = model_dir / "config.json"
    if not path.is_file():
        hint = (" (it is an adapter folder: fuse it with scripts/06_fuse.py, or export it "
                "with --peft)") if (model_dir / "adapter_config.json").is_file() else ""
        raise UserError(f"{model_dir} is not a project model folder: no config.json{hint}")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError):
        raise UserError(f"{path} is not valid JSON: re-run the step that wrote {model_dir}")
    if not isinstance(config, dict):
        raise UserError(f"{path}: expected a JSON object")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        if not (model_dir / name).is_file():
            raise UserError(f"{model_dir} is not a project model folder: no {name}")
    if not list(model_dir.glob("*.safetensors")):
        raise UserError(f"{model_dir} has no .safetensors weights: re-run the step that made it")
    return config


def check_llama(config: dict, model_dir: Path) -> None:
    """The GGUF export writes llama.cpp's `llama` architecture (SmolLM2); other model types and
    llama variants whose graph differs are refused before anything is loaded."""
    kind = config.get("model_type")
    if kind != "llama":
        raise UserError(f"{model_dir} holds a {kind!r} model: the GGUF export supports llama "
                        "(SmolLM2) only; --peft exports the adapter of any base")
    odd = [f"{k}={config[k]!r}" for k, allowed in LLAMA_AS_IS.items()
           if k in config and config[k] not in allowed]
    heads = config.get("num_attention_heads", 0)
    head_dim = config.get("head_dim") or config.get("hidden_size", 0) // max(heads, 1)
    if head_dim * heads != config.get("hidden_size"):
        odd.append(f"head_dim={head_dim}")
    if odd:
        raise UserError(f"{model_dir}: a llama variant the GGUF export does not support "
                        f"({', '.join(odd)})")


def float_weights(model_dir: Path, trust_remote_code: bool = False):
    """Every weight of the model as float32 (4-bit layers de-quantized exactly), keyed by
    mlx-lm's (= Hugging Face's) names: model.layers.0.self_attn.q_proj.weight ...; and the
    model's tokenizer."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    from ..model import load_model

    model, tokenizer = load_model(model_dir, dequantize=True, trust_remote_code=trust_remote_code)
    weights = {}
    for name, value in tree_flatten(model.parameters()):
        weights[name] = np.array(value.astype(mx.float32))
    return weights, tokenizer
