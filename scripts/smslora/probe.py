"""The frozen-feature baseline: logistic regression on a base model's own final hidden state at
the prompt's last position, with no fine-tuning at all: how far the base model's features go
before LoRA changes them. Trained on exactly the LoRA model's training rows; its one setting
(the regularisation C) and its threshold are chosen on the held-out sets by the rule that
chooses the LoRA model's threshold (fewest errors, false alarms weighted to the natural ratio)."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from .artifacts import read_split
from .bases import recorded_base
from .baselines import held_out_rows, log_result, measure, training_file
from .errors import require_model
from .metrics import spam_labels
from .threshold import choose_threshold, false_alarm_weight

C_GRID = (0.01, 0.1, 1.0, 10.0)  # inverse regularisation strengths tried, on standardised features


def probe_name(model_dir: Path) -> str:
    """probe-<base>: the registry name step 1 recorded, else the folder's name."""
    return f"probe-{recorded_base(model_dir) or Path(model_dir).resolve().name}"


def fit(x: np.ndarray, y: np.ndarray, held_x: np.ndarray, held_y: np.ndarray,
        ham_weight: float) -> dict:
    """The probe with the fewest weighted held-out errors over C_GRID, each with its threshold
    chosen on the held-out sets by step 3's rule (ties: the stronger regularisation)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    best = None
    for c in C_GRID:
        clf = make_pipeline(StandardScaler(),
                            LogisticRegression(C=c, max_iter=5000, class_weight="balanced"))
        clf.fit(x, y)
        chosen = choose_threshold(clf.predict_proba(held_x)[:, 1], held_y, ham_weight)
        if best is None or chosen["cost"] < best["cost"]:
            best = {"model": clf, "C": c, **chosen}
    return best


def run(model_dir: Path, adapter_path: Path, data_dir: Path, out_dir: Path,
        trust_remote_code: bool = False, log=print) -> dict:
    """Step 4's --probe: the probe of model_dir's features, trained on the rows the adapters in
    adapter_path were trained on -> reports/eval_probe-<base>.json."""
    from .model import load_model
    from .scoring import features

    require_model(model_dir)
    train_file = training_file(adapter_path)
    train = read_split(Path(data_dir) / train_file)
    held = [r for rows in held_out_rows(Path(data_dir)).values() for r in rows]
    tic = time.perf_counter()
    model, tokenizer = load_model(Path(model_dir), trust_remote_code=trust_remote_code)
    cache: dict[str, np.ndarray] = {}

    def feats(texts: list[str]) -> np.ndarray:
        missing = list(dict.fromkeys(t for t in texts if t not in cache))
        if missing:
            for t, f in zip(missing, features(model, tokenizer, missing)):
                cache[t] = f
        return np.stack([cache[t] for t in texts])

    held_spam = spam_labels(held)
    ham_weight = false_alarm_weight(Path(data_dir), held_spam)
    best = fit(feats([r["message"] for r in train]), spam_labels(train),
               feats([r["message"] for r in held]), held_spam, ham_weight)
    clf = best.pop("model")
    result = measure(probe_name(model_dir), f"logistic regression (C={best['C']:g}) on "
                     f"{Path(model_dir).name}'s final hidden state", train_file,
                     lambda texts: clf.predict_proba(feats(texts))[:, 1], best.pop("threshold"),
                     Path(data_dir), Path(out_dir), **best, ham_weight=ham_weight,
                     features=int(next(iter(cache.values())).shape[-1]),
                     seconds=round(time.perf_counter() - tic, 1))
    log_result(result, log)
    return result
