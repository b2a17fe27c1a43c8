"""The model folder an export reads: checked to be a project model of an architecture the GGUF
writer knows (archs.py), then loaded strictly (smslora.model) and handed over as float32 arrays
under mlx-lm's names."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..errors import UserError
from . import archs


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


def target(config: dict, model_dir: Path) -> archs.Target:
    """The architecture the GGUF export writes for this model (archs.TARGETS); other model
    types, and variants whose graph llama.cpp would compute differently, are refused before
    anything is loaded."""
    kind = config.get("model_type")
    if kind not in archs.TARGETS:
        raise UserError(f"{model_dir} holds a {kind!r} model: the GGUF export writes "
                        f"{archs.SUPPORTED}; --peft exports the adapter of any base")
    found = archs.TARGETS[kind]
    odd = archs.odd_values(found, config)
    if odd:
        raise UserError(f"{model_dir}: a {found.name} variant the GGUF export does not support "
                        f"({', '.join(odd)})")
    return found


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
