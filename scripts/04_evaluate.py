#!/usr/bin/env python
"""Step 4: evaluate a model -> reports/eval_<name>.json.

Two views: the tutorial's language-model table (loss, perplexity, token accuracy on the 10 fixed
messages) and what a spam filter is judged by (accuracy, precision, recall, F1, ROC-AUC, ham
false-positive rate, confusion matrix) on the whole held-out test split, with P(spam) from one
forward pass per message and the threshold chosen on validation.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (first: sets up the fast BLAS before anything imports mlx)
from common import UserError  # noqa: E402

import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402
import numpy as np  # noqa: E402


def token_metrics(model, tokenizer, rows: list[dict]) -> dict:
    """Loss, perplexity and next-token accuracy over every token of prompt + label + EOS, as
    `mlx_lm lora --test` measures them on the tutorial's text lines."""
    total_loss, correct, count = 0.0, 0, 0
    for r in rows:
        ids = tokenizer.encode(common.format_example(r["message"], r["label"]))
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
    common.require_model(model_dir, adapter_path)
    test_path = common.require(data_dir / "test.jsonl", "test.jsonl", "scripts/02_prepare_data.py")
    fixed = [{"message": r["text"], "label": r["label"]} for r in common.read_jsonl(
        common.require(common.FIXED_MESSAGES, "the fixed test messages", "git checkout data/"))]
    test = common.read_split(test_path)
    model, tokenizer = common.load_model(model_dir, adapter_path,
                                         trust_remote_code=trust_remote_code)
    threshold = common.read_threshold(adapter_path or model_dir)
    tic = time.perf_counter()
    lm = token_metrics(model, tokenizer, fixed)
    logits = common.score_logits(model, tokenizer, [r["message"] for r in test], batch_size)
    probs = common.p_spam_of(logits)
    seconds = time.perf_counter() - tic
    is_spam = np.array([r["label"] == "spam" for r in test])
    result = {
        "name": name, "model": str(model_dir),
        "adapter_path": str(adapter_path) if adapter_path else None,
        "fixed_messages": lm, "test": common.classifier_metrics(is_spam, probs, threshold),
        "seconds": seconds,
        # what the scores were computed from, so that 06_fuse can reuse them as its adapter side
        "scored": common.scoring_provenance(model_dir, adapter_path, test_path),
    }
    common.write_jsonl(out_dir / f"scores_{name}.jsonl",
                       [{"label": r["label"], "p_spam": float(p), "logits": [float(a), float(b)]}
                        for r, p, (a, b) in zip(test, probs, logits)])
    common.atomic_write_json(out_dir / f"eval_{name}.json", result)
    return result


TFIDF = ("tfidf-logreg", "tfidf-svm")


def tfidf_model(name: str):
    """A classic filter, untrained: TF-IDF over word 1-2-grams and character 2-5-grams, with
    logistic regression (tfidf-logreg) or a linear SVM (tfidf-svm)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline, make_union
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.svm import LinearSVC

    if name == "tfidf-logreg":
        clf = LogisticRegression(C=10, max_iter=2000, class_weight="balanced")
    else:
        clf = LinearSVC(C=1.0, class_weight="balanced", random_state=0)
    features = make_union(TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True),
                          TfidfVectorizer(analyzer="char_wb", ngram_range=(2, 5),
                                          sublinear_tf=True))
    return make_pipeline(features, clf)


def tfidf_baselines(data_dir: Path, train_file: str, out_dir: Path) -> list[dict]:
    """The classic filters, trained on exactly the LoRA model's training rows."""
    train = common.read_split(data_dir / train_file)
    test = common.read_split(data_dir / "test.jsonl")
    stress = common.read_jsonl(common.STRESS_SUITE)
    # the held-out sets the LoRA recipe is chosen on, for the README's side-by-side table
    held_out = {"collection": [r for f in ("valid.jsonl", "calibration.jsonl")
                               if (data_dir / f).exists() for r in common.read_split(data_dir / f)],
                "modern": common.read_split(data_dir / "valid_modern.jsonl")
                if (data_dir / "valid_modern.jsonl").exists() else []}
    y = np.array([r["label"] == "spam" for r in train])
    is_spam = np.array([r["label"] == "spam" for r in test])
    results = []
    for name in TFIDF:
        model = tfidf_model(name).fit([r["message"] for r in train], y)
        if hasattr(model, "predict_proba"):
            threshold = 0.5
            def score(texts): return model.predict_proba(texts)[:, 1]
        else:  # the SVM's margin: spam above 0
            threshold = 0.0
            score = model.decision_function
        stress_pred = score([r["text"] for r in stress]) > threshold
        stress_misses = int(np.sum(stress_pred != np.array([r["label"] == "spam" for r in stress])))
        result = {"name": name, "model": f"scikit-learn {type(model[-1]).__name__}",
                  "train_file": train_file, "fixed_messages": None,
                  "test": common.classifier_metrics(
                      is_spam, np.asarray(score([r["message"] for r in test])), threshold),
                  "held_out": {part: common.classifier_metrics(
                      np.array([r["label"] == "spam" for r in rows]),
                      np.asarray(score([r["message"] for r in rows])), threshold)
                      for part, rows in held_out.items() if rows},
                  "stress_misses": stress_misses, "stress_messages": len(stress)}
        common.atomic_write_json(out_dir / f"eval_{name}.json", result)
        results.append(result)
    return results


@common.cli
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common.add_model_args(p, common.BASELINE_DIR, "the base model")
    p.add_argument("--data", type=Path, default=common.DATA_DIR, help="folder with test.jsonl")
    p.add_argument("--name", default=None, help="report name (default: baseline or retrained)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--out", type=Path, default=common.REPORTS_DIR, help="reports folder")
    p.add_argument("--tfidf", action="store_true",
                   help="evaluate the TF-IDF baselines on the training rows of --adapter-path "
                        "(default models/retrained/adapters) instead of a model")
    args = p.parse_args(argv)
    if args.batch_size <= 0:
        raise UserError("--batch-size must be positive")
    if args.tfidf:
        adapters = args.adapter_path or common.ADAPTERS_DIR
        cfg = common.require(adapters / "adapter_config.json", "the adapters", "scripts/03_train.py")
        train_file = json.loads(cfg.read_text()).get("train_file", "train.jsonl")
        for r in tfidf_baselines(args.data, train_file, args.out):
            t = r["test"]
            print(f"[{r['name']}] trained on {train_file}: accuracy {t['accuracy']:.2%}, "
                  f"F1 {t['f1']:.3f}, ROC-AUC {t['roc_auc']:.4f}, ham FPR "
                  f"{t['ham_false_positive_rate']:.2%}, stress misses {r['stress_misses']}")
            for part, h in r["held_out"].items():
                print(f"[{r['name']}]   held-out {part} ({h['messages']}): accuracy "
                      f"{h['accuracy']:.2%}, F1 {h['f1']:.3f}, ROC-AUC {h['roc_auc']:.4f}, "
                      f"{h['wrong']['ham_flagged']} ham flagged + {h['wrong']['spam_missed']} "
                      "spam missed")
        return
    name = args.name or ("retrained" if args.adapter_path or args.model != common.BASELINE_DIR
                         else "baseline")
    r = evaluate(args.model, args.adapter_path, args.data, name, args.out, args.batch_size,
                 args.trust_remote_code)
    lm, t = r["fixed_messages"], r["test"]
    print(f"[{name}] fixed messages: loss {lm['loss']:.3f}, perplexity {lm['perplexity']:.2f}, "
          f"token accuracy {lm['token_accuracy']:.1%}")
    print(f"[{name}] test split ({t['messages']} messages, threshold {t['threshold']:.3f}): "
          f"accuracy {t['accuracy']:.2%}, precision {t['precision']:.3f}, recall "
          f"{t['recall']:.3f}, F1 {t['f1']:.3f}, ROC-AUC {t['roc_auc']:.4f}, ham FPR "
          f"{t['ham_false_positive_rate']:.2%}  ({r['seconds']:.1f}s)")


if __name__ == "__main__":
    main()
