"""Loading a model folder (and LoRA adapters on it) strictly, from safetensors only, ready to
score or train on this device."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import mlx.core as mx

from . import folder_checks
from .artifacts import verify_checksums
from .errors import UserError

# What building a model from a folder that passed the checks may still raise (an odd value in a
# key no check knows): each becomes one line, never a traceback.
BUILD_ERRORS = (ValueError, KeyError, OSError, RuntimeError, TypeError, AttributeError,
                IndexError, ZeroDivisionError, OverflowError, RecursionError)


def on_cpu() -> bool:
    return mx.default_device().type == mx.cpu


def fast_ops_enabled() -> bool:
    """fastops.py's CPU exp/SiLU/softmax; SMS_LORA_FAST_OPS=0 keeps MLX's own."""
    return os.environ.get("SMS_LORA_FAST_OPS", "1") != "0"


def release_memory() -> None:
    """Hand freed memory back to the system: MLX's buffer cache, then glibc's free lists (which
    fastblas tells glibc to keep, for speed, until asked like this)."""
    mx.clear_cache()
    if sys.platform.startswith("linux"):
        import ctypes

        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):  # not glibc
            pass


def upcast_half(model):
    """float16 parameters (4-bit scales and biases included) to float32, so that de-quantizing
    gives the exact weights instead of weights rounded to float16."""
    from mlx.utils import tree_map

    model.update(tree_map(lambda v: v.astype(mx.float32) if v.dtype == mx.float16 else v,
                          model.parameters()))
    return model


def check_remote_code(model_dir: Path, trust: bool = False) -> None:
    """A model folder that asks to run its own Python (mlx-lm's model_file, transformers'
    auto_map) is refused unless the user said --trust-remote-code."""
    asks = []
    for name in ("config.json", "tokenizer_config.json"):
        path = Path(model_dir) / name
        cfg = folder_checks.read_json_object(path) if path.is_file() else {}
        asks += [f"{name}:{k}" for k in ("model_file", "auto_map") if k in cfg]
    if asks and not trust:
        raise UserError(f"{model_dir} asks to run its own code ({', '.join(asks)}); "
                        "pass --trust-remote-code only if you trust its source")


def check_folders(model_dir: Path, adapter_path: Path | None = None,
                  trust_remote_code: bool = False) -> None:
    """Everything about the folders that can be known before a model is built, in bounded
    memory and time (folder_checks): files first (nothing is read from a FIFO or a device),
    then the code it asks to run, the checksums, and config.json against the weights."""
    model_dir = Path(model_dir)
    folder_checks.check_model_files(model_dir)
    if adapter_path is not None:
        adapter_path = Path(adapter_path)
        if not (adapter_path / "adapter_config.json").is_file():
            raise UserError(f"no adapters at {adapter_path}: run scripts/03_train.py first")
        folder_checks.check_entries(adapter_path)
    check_remote_code(model_dir, trust_remote_code)
    verify_checksums(model_dir)
    folder_checks.check_model_contents(model_dir, trust_remote_code)
    if adapter_path is not None:
        # A missing checksums.json is refused after check_adapters_fit: a folder that does
        # not fit the model says how first.
        verify_checksums(adapter_path, missing_ok=True)
        folder_checks.check_adapter_contents(adapter_path)


def load_model(model_dir: Path, adapter_path: Path | None = None, dequantize: bool | None = None,
               trust_remote_code: bool = False):
    """A model folder (+ optional LoRA adapters) ready to score; both folders are checked
    (check_folders) before anything is built from them.

    On a CPU the 4-bit weights are de-quantized to float32: MLX's CPU quantized matmul runs at
    ~3 GFLOP/s, its fp32 matmul through MKL at ~200. On Metal/CUDA the 4-bit path is kept."""
    from mlx_lm.utils import dequantize_model, load_model as mlx_load_model, load_tokenizer

    model_dir = Path(model_dir)
    check_folders(model_dir, adapter_path, trust_remote_code)
    try:
        model, config = mlx_load_model(model_dir, lazy=False, strict=True,
                                       trust_remote_code=trust_remote_code)
        tokenizer = load_tokenizer(model_dir, {"trust_remote_code": trust_remote_code},
                                   eos_token_ids=config.get("eos_token_id"))
    except BUILD_ERRORS as e:
        raise UserError(f"cannot load the model in {model_dir}: {str(e).splitlines()[0][:200]}")
    if dequantize if dequantize is not None else on_cpu():
        # One block at a time, so the 4-bit and float32 copies of the whole model never coexist
        # (peak memory ~0.55 GB instead of ~0.7).
        blocks = getattr(getattr(model, "model", None), "layers", [])
        for part in [*blocks, model]:
            dequantize_model(upcast_half(part))
            part.set_dtype(mx.float32)
            mx.eval(part.parameters())
        release_memory()
    if on_cpu() and fast_ops_enabled():
        from . import fastops

        fastops.install()
    if adapter_path is not None:
        check_adapters_fit(model, Path(adapter_path), model_dir)
        verify_checksums(adapter_path)  # now a missing checksums.json too
    model.eval()
    mx.eval(model.parameters())
    return model, tokenizer


def check_adapters_fit(model, adapter_path: Path, model_dir: Path) -> None:
    """Apply the adapters, listing every way they do not fit the model (not just the first)."""
    from mlx.utils import tree_flatten
    from mlx_lm.tuner.utils import load_adapters

    where = f"adapters in {adapter_path} do not fit the model in {model_dir}"
    try:
        cfg = json.loads((Path(adapter_path) / "adapter_config.json").read_text(encoding="utf-8"))
        n = int(cfg["num_layers"])
        rank = int(cfg["lora_parameters"]["rank"])
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"{adapter_path}/adapter_config.json is not a LoRA config ({e!r})")
    if n < 1 or n > len(model.layers) or rank < 1:
        raise UserError(f"{where}: num_layers={n}, rank={rank} but the model has "
                        f"{len(model.layers)} layers")
    if not (Path(adapter_path) / "adapters.safetensors").is_file():
        raise UserError(f"{adapter_path} has no adapters.safetensors: re-run scripts/03_train.py")
    try:
        load_adapters(model, str(adapter_path))
    except (ValueError, KeyError, OSError, RuntimeError) as e:
        lines = [ln.strip() for ln in str(e).splitlines()[1:]] or [str(e).splitlines()[0]]
        raise UserError(f"{where}: {len(lines)} mismatch(es): {'; '.join(lines)}")
    stored = set(mx.load(str(Path(adapter_path) / "adapters.safetensors")))
    wanted = {k for k, _ in tree_flatten(model.parameters()) if k.endswith(("lora_a", "lora_b"))}
    if wanted - stored:
        missing = sorted(wanted - stored)
        raise UserError(f"{where}: {len(missing)} adapter tensor(s) missing: {'; '.join(missing)}")
