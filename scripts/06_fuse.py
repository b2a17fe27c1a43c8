#!/usr/bin/env python
"""Step 6: fuse the LoRA adapters into the base -> models/retrained/fused/.

The result is a self-contained folder that `mlx_lm.load` reads with no adapter. It checks itself
before it is put in place: the logits of the fused model must match base + adapter on the test
messages, and every verdict on the test split must be the same; otherwise nothing is written.

By default the fused weights are de-quantized to float32 (540 MB): re-quantizing W + BA to 4 bits
rounds most of the small LoRA update away, and float16 rounding alone moves logits by ~0.03.
`--keep-quantized` gives mlx-lm's default 4-bit fuse anyway.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (first: sets up the fast BLAS before anything imports mlx)
from common import UserError  # noqa: E402

import numpy as np  # noqa: E402
from mlx.utils import tree_unflatten  # noqa: E402
from mlx_lm.tuner.utils import load_adapters  # noqa: E402
from mlx_lm.utils import dequantize_model, load_model, load_tokenizer, save  # noqa: E402

CARRIED = ("adapter_config.json", common.THRESHOLD_FILE)


def fuse(model_dir: Path, adapter_path: Path, save_path: Path, dequantize: bool = True,
         trust_remote_code: bool = False) -> None:
    """mlx-lm's fuse (the same calls as `mlx_lm fuse`), written to save_path with checksums."""
    common.check_remote_code(model_dir, trust_remote_code)
    common.verify_checksums(model_dir)
    common.verify_checksums(adapter_path)
    model, config = load_model(model_dir, strict=True, trust_remote_code=trust_remote_code)
    tokenizer = load_tokenizer(model_dir, {"trust_remote_code": trust_remote_code},
                               eos_token_ids=config.get("eos_token_id"))
    if dequantize:
        common.upcast_half(model)  # W + BA computed and stored in float32
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
    common.write_checksums(save_path, "scripts/06_fuse.py")


def reusable_adapter_logits(evaluation: Path | None, model_dir: Path, adapter_path: Path,
                            test_path: Path, dequantized: bool) -> np.ndarray | None:
    """The adapter side of the check as 04_evaluate already computed it, when its record says it
    scored these very weights and messages the way verify() would; else None."""
    if evaluation is None or not evaluation.is_file():
        return None
    try:
        scored = json.loads(evaluation.read_text(encoding="utf-8")).get("scored")
        rows = common.read_jsonl(evaluation.with_name(
            evaluation.name.replace("eval_", "scores_", 1).replace(".json", ".jsonl")))
        logits = np.array([r["logits"] for r in rows], dtype=np.float32)
    except (ValueError, KeyError, TypeError, OSError, UserError):
        return None
    if scored != common.scoring_provenance(model_dir, adapter_path, test_path) or (
            scored["dequantized"] != dequantized) or logits.shape[1:] != (2,):
        return None
    return logits


def verify(model_dir: Path, adapter_path: Path, fused_dir: Path, messages: list[str],
           sample: int = 64, trust_remote_code: bool = False, dequantized: bool = True,
           adapter_logits: np.ndarray | None = None) -> dict:
    """Adapter mode vs fused mode: max |Δlogit| (label tokens) and verdict agreement. A float32
    fuse is compared with base + adapter de-quantized to float32 on every backend (on a GPU the
    4-bit base would otherwise run in float16 and differ by its rounding, not by the fuse).
    adapter_logits: the adapter side, already computed (reusable_adapter_logits)."""
    threshold = common.read_threshold(adapter_path)
    results = {} if adapter_logits is None else {"adapter": adapter_logits}
    for mode, (path, adapters) in {"adapter": (model_dir, adapter_path),
                                   "fused": (fused_dir, None)}.items():
        if mode in results:
            continue
        model, tokenizer = common.load_model(path, adapters, dequantize=dequantized or None,
                                             trust_remote_code=trust_remote_code)
        logits = common.score_logits(model, tokenizer, messages)
        results[mode] = logits
        del model
    delta = np.abs(results["adapter"] - results["fused"])
    verdicts = {m: common.p_spam_of(r) > threshold for m, r in results.items()}
    return {
        "messages": len(messages),
        "max_abs_logit_delta": float(delta.max()),
        "max_abs_logit_delta_first": float(delta[:sample].max()),
        "verdicts_differ": int(np.sum(verdicts["adapter"] != verdicts["fused"])),
        "spam_adapter": int(verdicts["adapter"].sum()),
        "spam_fused": int(verdicts["fused"].sum()),
        "threshold": threshold,
    }


@common.cli
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, default=common.BASELINE_DIR, help="base model folder")
    p.add_argument("--adapter-path", type=Path, default=common.ADAPTERS_DIR)
    p.add_argument("--save-path", type=Path, default=common.FUSED_DIR)
    p.add_argument("--keep-quantized", action="store_true",
                   help="re-quantize the fused weights to the base's 4 bits (mlx-lm's default)")
    p.add_argument("--data", type=Path, default=common.DATA_DIR, help="folder with test.jsonl")
    p.add_argument("--max-delta", type=float, default=None,
                   help="largest |Δlogit| accepted between adapter and fused mode (default 0.01 "
                        "on a CPU; 0.05 on a GPU, whose float32 products round to TF32)")
    p.add_argument("--out", type=Path, default=common.REPORTS_DIR, help="reports folder")
    p.add_argument("--reuse", type=Path, default=None, metavar="EVAL_JSON",
                   help="04_evaluate's report of base + these adapters (e.g. "
                        "reports/eval_retrained.json): its test logits stand for the adapter "
                        "side of the check when it scored the same weights and messages")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="allow the model folder to run its own Python code (off: refused)")
    args = p.parse_args(argv)
    if args.max_delta is None:
        args.max_delta = 0.01 if common.on_cpu() else 0.05
    common.require(args.model / "config.json", "the base model", "scripts/01_download_model.py")
    common.require(args.adapter_path / "adapters.safetensors", "the adapters",
                   "scripts/03_train.py")
    test = common.read_split(args.data / "test.jsonl")
    reused = reusable_adapter_logits(args.reuse, args.model, args.adapter_path,
                                     args.data / "test.jsonl", not args.keep_quantized)
    if args.reuse is not None:
        print(f"adapter side of the check: reused from {args.reuse}" if reused is not None else
              f"adapter side of the check: computed ({args.reuse} does not match these weights "
              "and messages)")
    with common.atomic_dir(args.save_path) as tmp:
        fuse(args.model, args.adapter_path, tmp, not args.keep_quantized, args.trust_remote_code)
        check = verify(args.model, args.adapter_path, tmp, [r["message"] for r in test],
                       trust_remote_code=args.trust_remote_code,
                       dequantized=not args.keep_quantized, adapter_logits=reused)
        check["dequantized"] = not args.keep_quantized
        check["adapter_side_reused"] = reused is not None
        print("| mode    | spam verdicts | max abs logit delta |")
        print("|---------|---------------|---------------------|")
        print(f"| adapter | {check['spam_adapter']:13d} | {'-':>19s} |")
        print(f"| fused   | {check['spam_fused']:13d} | {check['max_abs_logit_delta']:19.4f} |")
        ok = check["verdicts_differ"] == 0 and check["max_abs_logit_delta"] <= args.max_delta
        common.atomic_write_json(args.out / "fuse_check.json", {**check, "passed": ok})
        if not ok:
            raise UserError(
                f"fused model disagrees with base + adapter ({check['verdicts_differ']} verdicts "
                f"differ, max |Δlogit| {check['max_abs_logit_delta']:.4f} > {args.max_delta}); "
                "nothing was written" + ("" if not args.keep_quantized else
                                         ": 4-bit re-quantization loses the update, drop "
                                         "--keep-quantized"))
    print(f"Fused model saved to {args.save_path}: {check['messages']} test verdicts identical, "
          f"max |Δlogit| {check['max_abs_logit_delta']:.4f}")


if __name__ == "__main__":
    main()
