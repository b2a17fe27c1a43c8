"""Verifying an export with its real consumers, each in its own virtual environment so that
neither llama.cpp nor PyTorch is ever imported into an MLX process:

  * GGUF: llama.cpp through llama-cpp-python (.venv-llama) tokenizes every prompt (the ids must
    equal ours) and evaluates it; P(spam) from the two label tokens' logits at the last position
    is compared with MLX's (smslora.scoring), and so are the verdicts at the model's threshold;
  * PEFT: transformers + PEFT on PyTorch (.venv-torch) load a Hugging Face copy of the base and
    the exported adapter with PeftModel.from_pretrained; the same comparison against MLX's base +
    adapter.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import numpy as np

from ..errors import UserError
from ..paths import ROOT
from ..scoring import encode_prompt, label_pair, p_spam_of, score_logits
from ..task import COMPLETIONS, format_prompt, is_spam

LLAMA_VENV = ROOT / ".venv-llama"
TORCH_VENV = ROOT / ".venv-torch"
HERE = Path(__file__).resolve().parent
# Scripts, not modules: run by the consumers' own Pythons, from a folder holding nothing that
# could shadow the packages they import (this package has a peft.py and a gguf.py).
LLAMA_RUNNER = HERE / "consumers" / "run_llama_cpp.py"
PEFT_RUNNER = HERE / "consumers" / "run_peft.py"


def consumer_python(venv: Path, module: str) -> Path | None:
    """The venv's Python if it can import module, else None (the check is then skipped)."""
    python = Path(venv) / "bin" / "python"
    if not python.is_file():
        return None
    ok = subprocess.run([str(python), "-c", f"import {module}"], capture_output=True,
                        timeout=120, check=False).returncode == 0
    return python if ok else None


def run_runner(python: Path, runner: Path, request: dict, timeout: int = 3600) -> dict:
    r = subprocess.run([str(python), "-I", str(runner)], input=json.dumps(request), text=True,
                       capture_output=True, timeout=timeout, check=False)
    if r.returncode != 0:
        tail = " | ".join(r.stderr.strip().splitlines()[-3:])
        raise UserError(f"{runner.name} failed under {python}: {tail[:400]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def compare(ours: np.ndarray, theirs: np.ndarray, threshold: float) -> dict:
    """P(spam) and verdicts of two (n, 2) label-logit arrays; every disagreement listed."""
    p_ours, p_theirs = p_spam_of(np.asarray(ours)), p_spam_of(np.asarray(theirs))
    dp = np.abs(p_ours - p_theirs)
    differ = np.flatnonzero(is_spam(p_ours, threshold) != is_spam(p_theirs, threshold))
    return {"messages": len(dp), "max_abs_dp": float(dp.max()), "mean_abs_dp": float(dp.mean()),
            "max_abs_dlogit": float(np.abs(np.asarray(ours) - np.asarray(theirs)).max()),
            "threshold": threshold, "verdicts_differ": len(differ),
            "disagreements": [{"index": int(i), "p_spam_mlx": float(p_ours[i]),
                               "p_spam_other": float(p_theirs[i])} for i in differ]}


def mlx_scores(model, tokenizer, messages: list[str]) -> tuple[np.ndarray, float]:
    """MLX's label logits and its messages per second (the project's batched scoring)."""
    score_logits(model, tokenizer, messages[:4])  # warm-up: compile, prefix cache
    start = time.perf_counter()
    logits = score_logits(model, tokenizer, messages)
    return logits, len(messages) / (time.perf_counter() - start)


def check_gguf(gguf_path: Path, model_dir: Path, messages: list[str], threshold: float,
               python: Path, threads: int | None = None) -> dict:
    """llama.cpp on the GGUF vs MLX on model_dir: token ids, P(spam), verdicts, speed."""
    from ..model import load_model

    model, tokenizer = load_model(model_dir)
    probe = [format_prompt("x") + c for c in COMPLETIONS.values()]
    texts = [format_prompt(m) for m in messages] + probe
    reply = run_runner(python, LLAMA_RUNNER, {
        "gguf": str(gguf_path), "texts": texts, "threads": threads,
        "eval_ids": [encode_prompt(tokenizer, m) for m in messages],
        "label_ids": label_pair(tokenizer)})
    same = [a == tokenizer.encode(t) for a, t in zip(reply["ids"], texts)]
    ours, mlx_rate = mlx_scores(model, tokenizer, messages)
    result = compare(ours, np.array(reply["logits"]), threshold)
    result.update({"token_ids_identical": int(sum(same[:len(messages)])),
                   "label_ids_identical": all(same[len(messages):]),
                   "first_token_mismatch": next((i for i, s in enumerate(same) if not s), None),
                   "llama_adds_bos": reply["add_bos"],
                   "llama_msg_per_s": len(messages) / reply["seconds"],
                   "mlx_msg_per_s": mlx_rate})
    return result


def write_hf_base(model_dir: Path, out_dir: Path) -> Path:
    """A float32 copy of a project model folder in Hugging Face's layout (config.json without
    mlx's quantization keys, model.safetensors, tokenizer files): what transformers loads as the
    base of a PEFT adapter. mlx-lm's llama and gemma3_text names are Hugging Face's; Gemma's
    embedding scale is undone as for llama.cpp (transformers, too, scales by sqrt(hidden) in
    float32)."""
    import shutil

    from safetensors.numpy import save_file

    from . import source
    from .archs import TARGETS

    config = source.read_config(model_dir)
    weights, _ = source.float_weights(model_dir)
    if config.get("model_type") in TARGETS:
        TARGETS[config["model_type"]].prepare(weights, config)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(weights, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    for key in ("quantization", "quantization_config"):
        config.pop(key, None)
    config.update(architectures=config.get("architectures") or ["LlamaForCausalLM"],
                  torch_dtype="float32")
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (Path(model_dir) / name).is_file():
            shutil.copy(Path(model_dir) / name, out_dir / name)
    return out_dir


def check_peft(peft_dir: Path, hf_base: Path, model_dir: Path, adapter_dir: Path,
               messages: list[str], threshold: float, python: Path) -> dict:
    """transformers + PEFT (hf_base + peft_dir) vs MLX (model_dir + adapter_dir)."""
    from ..model import load_model

    model, tokenizer = load_model(model_dir, adapter_dir)
    ids = [encode_prompt(tokenizer, m) for m in messages]
    reply = run_runner(python, PEFT_RUNNER, {"base": str(hf_base), "adapter": str(peft_dir),
                                             "ids": ids, "label_ids": label_pair(tokenizer)})
    ours, _ = mlx_scores(model, tokenizer, messages)
    result = compare(ours, np.array(reply["logits"]), threshold)
    base = np.array(reply["base_logits"])
    base_dp = np.abs(p_spam_of(base) - p_spam_of(ours[:len(base)]))
    result.update({"loaded_exactly": reply["loaded_exactly"], "lora_tensors": reply["lora_tensors"],
                   "adapter_moves_p_spam_by": float(base_dp.max())})
    return result


def random_adapter(model_dir: Path, out_dir: Path, num_layers: int = 2, rank: int = 8,
                   scale: float = 20.0, b_std: float = 0.01, seed: int = 0) -> Path:
    """An mlx-lm LoRA adapter folder on model_dir's last num_layers blocks, every linear layer,
    with random (non-zero) B matrices: something to check the PEFT path with when there is no
    trained adapter (a zero B would make any conversion pass)."""
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.tuner.utils import linear_to_lora_layers
    from mlx_lm.utils import load_model as mlx_load_model

    from ..artifacts import atomic_write_json, write_checksums
    from ..config import TrainConfig, adapter_config

    cfg = adapter_config(TrainConfig(model=str(model_dir), adapter_path=str(out_dir),
                                     num_layers=num_layers, lora_rank=rank, lora_scale=scale))
    mx.random.seed(seed)
    model, _ = mlx_load_model(Path(model_dir))
    model.freeze()
    linear_to_lora_layers(model, num_layers, cfg["lora_parameters"])
    weights = {k: (mx.random.normal(v.shape) * b_std if k.endswith("lora_b") else v)
               for k, v in tree_flatten(model.trainable_parameters())}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(out_dir / "adapters.safetensors"), weights)
    atomic_write_json(out_dir / "adapter_config.json", cfg)
    write_checksums(out_dir, "smslora.export.check.random_adapter")
    return out_dir
