"""Step 6, fuse the LoRA adapters into the base -> models/retrained/fused/.

The result is a self-contained folder that `mlx_lm.load` reads with no adapter. It checks itself
before it is put in place: the logits of the fused model must match base + adapter on the test
messages, and every verdict on the test split must be the same; otherwise nothing is written.
By default the fused weights are de-quantized to float32: re-quantizing W + BA to 4 bits rounds
most of the small LoRA update away, and float16 rounding alone moves logits by ~0.03."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
from mlx.utils import tree_unflatten
from mlx_lm.tuner.utils import load_adapters
from mlx_lm.utils import dequantize_model, load_model as mlx_load_model, load_tokenizer, save

from .artifacts import (atomic_dir, atomic_write_json, read_jsonl, read_split, sha256,
                        write_checksums)
from .errors import UserError, require
from .evaluate import scoring_provenance
from .metrics import classifier_metrics, spam_labels
from .model import check_folders, load_model, on_cpu, upcast_half
from .paths import ADAPTER_CONFIG, ADAPTERS_FILE, METRICS_FILE, THRESHOLD_FILE, scores_file
from .scoring import p_spam_of, score_logits
from .task import is_spam
from .threshold import read_threshold

CARRIED = (ADAPTER_CONFIG, THRESHOLD_FILE)  # copied from the adapter folder into the fused one


def fuse(model_dir: Path, adapter_path: Path, save_path: Path, dequantize: bool = True,
         trust_remote_code: bool = False) -> None:
    """mlx-lm's fuse (the same calls as `mlx_lm fuse`), written to save_path with checksums."""
    check_folders(model_dir, adapter_path, trust_remote_code)  # before anything is built
    model, config = mlx_load_model(model_dir, strict=True, trust_remote_code=trust_remote_code)
    tokenizer = load_tokenizer(model_dir, {"trust_remote_code": trust_remote_code},
                               eos_token_ids=config.get("eos_token_id"))
    if dequantize:
        upcast_half(model)  # W + BA computed and stored in float32
    load_adapters(model, str(adapter_path))
    fused = [(n, m.fuse(dequantize=dequantize)) for n, m in model.named_modules()
             if hasattr(m, "fuse")]
    model.update_modules(tree_unflatten(fused))
    if dequantize:
        model = dequantize_model(model)
        config.pop("quantization", None)
        config.pop("quantization_config", None)
    save(save_path, model_dir, model, tokenizer, config, donate_model=False)
    for name in CARRIED:
        if (adapter_path / name).exists():
            shutil.copy(adapter_path / name, save_path / name)
    write_checksums(save_path, "scripts/06_fuse.py")


def reusable_adapter_logits(evaluation: Path | None, model_dir: Path, adapter_path: Path,
                            test_path: Path, dequantized: bool) -> np.ndarray | None:
    """The adapter side of the check as 04_evaluate already computed it, when its record says it
    scored these very weights and messages the way verify() would; else None."""
    if evaluation is None or not evaluation.is_file():
        return None
    try:
        scored = json.loads(evaluation.read_text(encoding="utf-8")).get("scored")
        name = evaluation.name.removeprefix("eval_").removesuffix(".json")
        rows = read_jsonl(evaluation.with_name(scores_file(name)))
        logits = np.array([r["logits"] for r in rows], dtype=np.float32)
    except (ValueError, KeyError, TypeError, OSError, UserError):
        return None
    if scored != scoring_provenance(model_dir, adapter_path, test_path) or (
            scored["dequantized"] != dequantized) or logits.shape[1:] != (2,):
        return None
    return logits


def verify(model_dir: Path, adapter_path: Path, fused_dir: Path, messages: list[str],
           sample: int = 64, trust_remote_code: bool = False, dequantized: bool = True,
           adapter_logits: np.ndarray | None = None) -> dict:
    """Adapter mode vs fused mode: max |Δlogit| (label tokens) and verdict agreement. A float32
    fuse is compared with base + adapter de-quantized to float32 on every backend (on a GPU the
    4-bit base would otherwise run in float16 and differ by its rounding, not by the fuse).
    adapter_logits: the adapter side, already computed (reusable_adapter_logits).
    Returns the check's figures and the fused model's logits of the messages."""
    threshold = read_threshold(adapter_path)
    results = {} if adapter_logits is None else {"adapter": adapter_logits}
    for mode, (path, adapters) in {"adapter": (model_dir, adapter_path),
                                   "fused": (fused_dir, None)}.items():
        if mode in results:
            continue
        model, tokenizer = load_model(path, adapters, dequantize=dequantized or None,
                                      trust_remote_code=trust_remote_code)
        logits = score_logits(model, tokenizer, messages)
        results[mode] = logits
        del model
    delta = np.abs(results["adapter"] - results["fused"])
    verdicts = {m: is_spam(p_spam_of(r), threshold) for m, r in results.items()}
    check = {
        "messages": len(messages),
        "max_abs_logit_delta": float(delta.max()),
        "max_abs_logit_delta_first": float(delta[:sample].max()),
        "verdicts_differ": int(np.sum(verdicts["adapter"] != verdicts["fused"])),
        "spam_adapter": int(verdicts["adapter"].sum()),
        "spam_fused": int(verdicts["fused"].sum()),
        "threshold": threshold,
    }
    return check, results["fused"]


def run(model_dir: Path, adapter_path: Path, save_path: Path, data_dir: Path, out_dir: Path,
        dequantize: bool = True, max_delta: float | None = None, reuse: Path | None = None,
        trust_remote_code: bool = False, log=print) -> dict:
    """Step 6 whole: fuse into a temporary folder, check it against base + adapter on the test
    split, and only then put it in place of save_path, with its own test figures (metrics.json)
    and reports/fuse_check.json."""
    if max_delta is None:
        max_delta = 0.01 if on_cpu() else 0.05
    require(Path(model_dir) / "config.json", "the base model", "scripts/01_download_model.py")
    require(Path(adapter_path) / ADAPTERS_FILE, "the adapters", "scripts/03_train.py")
    test_path = Path(data_dir) / "test.jsonl"
    test = read_split(test_path)
    reused = reusable_adapter_logits(reuse, model_dir, adapter_path, test_path, dequantize)
    if reuse is not None:
        log(f"adapter side of the check: reused from {reuse}" if reused is not None else
            f"adapter side of the check: computed ({reuse} does not match these weights "
            "and messages)")
    with atomic_dir(save_path) as tmp:
        fuse(model_dir, adapter_path, tmp, dequantize, trust_remote_code)
        check, fused_logits = verify(model_dir, adapter_path, tmp, [r["message"] for r in test],
                                     trust_remote_code=trust_remote_code, dequantized=dequantize,
                                     adapter_logits=reused)
        check["dequantized"] = dequantize
        check["adapter_side_reused"] = reused is not None
        log("| mode    | spam verdicts | max abs logit delta |")
        log("|---------|---------------|---------------------|")
        log(f"| adapter | {check['spam_adapter']:13d} | {'-':>19s} |")
        log(f"| fused   | {check['spam_fused']:13d} | {check['max_abs_logit_delta']:19.4f} |")
        ok = check["verdicts_differ"] == 0 and check["max_abs_logit_delta"] <= max_delta
        atomic_write_json(Path(out_dir) / "fuse_check.json", {**check, "passed": ok})
        if not ok:
            raise UserError(
                f"fused model disagrees with base + adapter ({check['verdicts_differ']} verdicts "
                f"differ, max |Δlogit| {check['max_abs_logit_delta']:.4f} > {max_delta}); "
                "nothing was written" + ("" if dequantize else
                                         ": 4-bit re-quantization loses the update, drop "
                                         "--keep-quantized"))
        atomic_write_json(tmp / METRICS_FILE, {
            "on": "test.jsonl", "test_sha256": sha256(test_path),
            "test": classifier_metrics(spam_labels(test), p_spam_of(fused_logits),
                                       check["threshold"])})
    log(f"Fused model saved to {save_path}: {check['messages']} test verdicts identical, "
        f"max |Δlogit| {check['max_abs_logit_delta']:.4f}")
    return check
