"""The classic filters the LoRA model is measured against: TF-IDF features with logistic
regression or a linear SVM, trained on exactly the LoRA model's training rows."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .artifacts import atomic_write_json, read_jsonl, read_split
from .errors import require
from .metrics import classifier_metrics, spam_labels
from .task import is_spam
from .paths import ADAPTER_CONFIG, STRESS_SUITE, eval_report


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


def held_out_rows(data_dir: Path) -> dict[str, list[dict]]:
    """The held-out sets the LoRA recipe is chosen on, by part, for the side-by-side tables."""
    return {"collection": [r for f in ("valid.jsonl", "calibration.jsonl")
                           if (data_dir / f).exists() for r in read_split(data_dir / f)],
            "modern": read_split(data_dir / "valid_modern.jsonl")
            if (data_dir / "valid_modern.jsonl").exists() else []}


def measure(name: str, description: str, train_file: str, score, threshold: float,
            data_dir: Path, out_dir: Path, **extra) -> dict:
    """A baseline's report, eval_<name>.json: test, held-out and stress figures of score (texts
    -> scores, spam above threshold), in the form of step 4's model reports."""
    test = read_split(data_dir / "test.jsonl")
    stress = read_jsonl(STRESS_SUITE)
    stress_pred = is_spam(np.asarray(score([r["text"] for r in stress])), threshold)
    result = {"name": name, "model": description, "train_file": train_file,
              "fixed_messages": None, **extra,
              "test": classifier_metrics(spam_labels(test),
                                         np.asarray(score([r["message"] for r in test])),
                                         threshold),
              "held_out": {part: classifier_metrics(
                  spam_labels(rows), np.asarray(score([r["message"] for r in rows])), threshold)
                  for part, rows in held_out_rows(data_dir).items() if rows},
              "stress_misses": int(np.sum(stress_pred != spam_labels(stress))),
              "stress_messages": len(stress)}
    atomic_write_json(out_dir / eval_report(name), result)
    return result


def tfidf_baselines(data_dir: Path, train_file: str, out_dir: Path) -> list[dict]:
    """The classic filters, trained on exactly the LoRA model's training rows."""
    train = read_split(data_dir / train_file)
    results = []
    for name in TFIDF:
        model = tfidf_model(name).fit([r["message"] for r in train], spam_labels(train))
        if hasattr(model, "predict_proba"):
            threshold = 0.5
            def score(texts): return model.predict_proba(texts)[:, 1]
        else:  # the SVM's margin: spam above 0
            threshold = 0.0
            score = model.decision_function
        results.append(measure(name, f"scikit-learn {type(model[-1]).__name__}", train_file,
                               score, threshold, data_dir, out_dir))
    return results


def training_file(adapter_path: Path) -> str:
    """The training split the adapters in adapter_path were trained on (adapter_config.json)."""
    cfg = require(Path(adapter_path) / ADAPTER_CONFIG, "the adapters", "scripts/03_train.py")
    return json.loads(cfg.read_text()).get("train_file", "train.jsonl")


def log_result(r: dict, log=print) -> None:
    t = r["test"]
    log(f"[{r['name']}] trained on {r['train_file']}: accuracy {t['accuracy']:.2%}, "
        f"F1 {t['f1']:.3f}, ROC-AUC {t['roc_auc']:.4f}, ham FPR "
        f"{t['ham_false_positive_rate']:.2%}, stress misses {r['stress_misses']}")
    for part, h in r["held_out"].items():
        log(f"[{r['name']}]   held-out {part} ({h['messages']}): accuracy "
            f"{h['accuracy']:.2%}, F1 {h['f1']:.3f}, ROC-AUC {h['roc_auc']:.4f}, "
            f"{h['wrong']['ham_flagged']} ham flagged + {h['wrong']['spam_missed']} "
            "spam missed")


def run(adapter_path: Path, data_dir: Path, out_dir: Path, log=print) -> list[dict]:
    """Step 4's --tfidf: both baselines on the training rows the adapters in adapter_path were
    trained on (their adapter_config.json says which file)."""
    results = tfidf_baselines(data_dir, training_file(adapter_path), out_dir)
    for r in results:
        log_result(r, log)
    return results
