"""Step 4, evaluation -> reports/eval_<name>.json and scores_<name>.jsonl.

Two views: the tutorial's language-model table (loss, perplexity, token accuracy on the 10 fixed
messages) and what a spam filter is judged by (accuracy, precision, recall, F1, ROC-AUC, ham
false-positive rate, confusion matrix) on the whole held-out test split, with P(spam) from one
forward pass per message and the threshold chosen on the held-out sets."""

from __future__ import annotations

import math
import time
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

from .artifacts import atomic_write_json, read_jsonl, read_split, sha256, write_jsonl
from .errors import require, require_model
from .metrics import classifier_metrics, spam_labels
from .model import load_model, on_cpu
from .paths import FIXED_MESSAGES, eval_report, scores_file
from .scoring import p_spam_of, score_logits
from .task import format_example
from .threshold import read_threshold


def token_metrics(model, tokenizer, rows: list[dict]) -> dict:
    """Loss, perplexity and next-token accuracy over every token of prompt + label + EOS, as
    `mlx_lm lora --test` measures them on the tutorial's text lines."""
    total_loss, correct, count = 0.0, 0, 0
    for r in rows:
        ids = tokenizer.encode(format_example(r["message"], r["label"]))
        ids = mx.array(ids + [tokenizer.eos_token_id])[None]
        logits = model(ids[:, :-1]).astype(mx.float32)
        targets = ids[:, 1:]
        total_loss += nn.losses.cross_entropy(logits, targets).sum().item()
        correct += (logits.argmax(-1) == targets).sum().item()
        count += targets.size
    loss = total_loss / count
    return {"loss": loss, "perplexity": math.exp(loss), "token_accuracy": correct / count,
            "tokens": count}


def evaluate(model_dir: Path, adapter_path: Path | None, data_dir: Path, name: str,
             out_dir: Path, batch_size: int = 32, trust_remote_code: bool = False) -> dict:
    require_model(model_dir, adapter_path)
    test_path = require(data_dir / "test.jsonl", "test.jsonl", "scripts/02_prepare_data.py")
    fixed = [{"message": r["text"], "label": r["label"]} for r in read_jsonl(
        require(FIXED_MESSAGES, "the fixed test messages", "git checkout data/"))]
    test = read_split(test_path)
    model, tokenizer = load_model(model_dir, adapter_path,
                                         trust_remote_code=trust_remote_code)
    threshold = read_threshold(adapter_path or model_dir)
    tic = time.perf_counter()
    lm = token_metrics(model, tokenizer, fixed)
    logits = score_logits(model, tokenizer, [r["message"] for r in test], batch_size)
    probs = p_spam_of(logits)
    seconds = time.perf_counter() - tic
    spam = spam_labels(test)
    result = {
        "name": name, "model": str(model_dir),
        "adapter_path": str(adapter_path) if adapter_path else None,
        "fixed_messages": lm, "test": classifier_metrics(spam, probs, threshold),
        "seconds": seconds,
        # what the scores were computed from, so that 06_fuse can reuse them as its adapter side
        "scored": scoring_provenance(model_dir, adapter_path, test_path),
    }
    write_jsonl(out_dir / scores_file(name),
                       [{"label": r["label"], "p_spam": float(p), "logits": [float(a), float(b)]}
                        for r, p, (a, b) in zip(test, probs, logits)])
    atomic_write_json(out_dir / eval_report(name), result)
    return result
def scoring_provenance(model_dir, adapter_path, test_path) -> dict:
    import mlx.core as mx
    adapters = Path(adapter_path) / "adapters.safetensors" if adapter_path else None
    return {"model_weights": sorted(sha256(f) for f in Path(model_dir).glob("*.safetensors")),
            "adapters": sha256(adapters) if adapters else None,
            "test": sha256(test_path), "dequantized": on_cpu(),
            "device": str(mx.default_device())}


def run(model_dir: Path, adapter_path: Path | None, data_dir: Path, name: str, out_dir: Path,
        batch_size: int = 32, trust_remote_code: bool = False, log=print) -> dict:
    """Step 4 for one model: evaluate() and its two summary lines."""
    r = evaluate(model_dir, adapter_path, data_dir, name, out_dir, batch_size, trust_remote_code)
    lm, t = r["fixed_messages"], r["test"]
    log(f"[{name}] fixed messages: loss {lm['loss']:.3f}, perplexity {lm['perplexity']:.2f}, "
        f"token accuracy {lm['token_accuracy']:.1%}")
    log(f"[{name}] test split ({t['messages']} messages, threshold {t['threshold']:.3f}): "
        f"accuracy {t['accuracy']:.2%}, precision {t['precision']:.3f}, recall "
        f"{t['recall']:.3f}, F1 {t['f1']:.3f}, ROC-AUC {t['roc_auc']:.4f}, ham FPR "
        f"{t['ham_false_positive_rate']:.2%}  ({r['seconds']:.1f}s)")
    return r
