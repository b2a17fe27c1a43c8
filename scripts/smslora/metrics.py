"""The figures a spam filter is judged by, for a set of P(spam) and the true labels."""

from __future__ import annotations

import numpy as np

from .task import is_spam


def classifier_metrics(spam: np.ndarray, p_spam: np.ndarray, threshold: float) -> dict:
    """spam: the true labels (booleans); verdicts by task.is_spam; the figures every report shows."""
    from sklearn.metrics import roc_auc_score

    pred = is_spam(p_spam, threshold)
    tp = int(np.sum(pred & spam))
    fp = int(np.sum(pred & ~spam))
    fn = int(np.sum(~pred & spam))
    tn = int(np.sum(~pred & ~spam))
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    both = len(set(spam.tolist())) == 2
    return {
        "messages": int(len(spam)), "threshold": threshold,
        "accuracy": (tp + tn) / len(spam), "precision": precision, "recall": recall,
        "f1": 2 * precision * recall / (precision + recall) if precision + recall else 0.0,
        "roc_auc": float(roc_auc_score(spam, p_spam)) if both else None,
        "ham_false_positive_rate": fp / (fp + tn) if fp + tn else 0.0,
        "confusion": {"tp": tp, "fp": fp, "fn": fn, "tn": tn},
        "wrong": {"ham_flagged": fp, "spam_missed": fn},
    }


def spam_labels(rows: list[dict]) -> np.ndarray:
    """The true labels of labelled rows as booleans (True: spam), as classifier_metrics takes."""
    return np.array([r["label"] == "spam" for r in rows], dtype=bool)
