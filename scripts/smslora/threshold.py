"""The verdict threshold: chosen on the held-out sets by step 3, stored beside the weights,
read back by every step that gives verdicts."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .errors import UserError
from .paths import SPLIT_MANIFEST, THRESHOLD_FILE
from .task import DEFAULT_THRESHOLD, is_spam


def check_threshold(value, what: str) -> float:
    """A verdict threshold: a number from 0 to 1 (P(spam) above it is spam)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
        raise UserError(f"{what} must be a number from 0 to 1, not {value!r}")
    return float(value)


def read_threshold(model_or_adapter_dir: Path) -> float:
    """The threshold step 3 chose, stored beside the weights; 0.5 where there is none."""
    path = Path(model_or_adapter_dir) / THRESHOLD_FILE
    if not path.is_file():
        return DEFAULT_THRESHOLD
    try:
        value = json.loads(path.read_text())["threshold"]
    except (ValueError, KeyError, TypeError):  # not JSON, not UTF-8, not an object with one
        raise UserError(f"{path} is damaged (no threshold in it): run scripts/03_train.py "
                        "(and scripts/06_fuse.py for a fused model) again") from None
    return check_threshold(value, f"the threshold in {path}")


def threshold_for(threshold: float | None, model_dir: Path, adapter_path: Path | None) -> float:
    """--threshold if given, else the one stored with the adapters or the model."""
    if threshold is not None:
        return check_threshold(threshold, "--threshold")
    return read_threshold(adapter_path or model_dir)


def natural_ratio(data: Path) -> float:
    """Ham per spam message in the wild: the test split's ratio (stratified), as step 2
    recorded it; the collection's 4,517:642 when there is no record."""
    try:
        manifest = json.loads((Path(data) / SPLIT_MANIFEST).read_text(encoding="utf-8"))
        counts = manifest["counts"]["test"]
        return counts["ham"] / counts["spam"]
    except (OSError, ValueError, KeyError, TypeError, ZeroDivisionError):
        return 4517 / 642


def false_alarm_weight(data: Path, spam: np.ndarray) -> float:
    """The weight of a false alarm on a held-out set with labels `spam`: the natural ham:spam
    ratio over the set's own, so that the set counts as if at the natural ratio."""
    return natural_ratio(data) / (np.sum(~spam) / max(np.sum(spam), 1))


def choose_threshold(p_spam: np.ndarray, spam: np.ndarray, ham_weight: float) -> dict:
    """The P(spam) cut with the fewest held-out errors, a false alarm on ham weighted by
    ham_weight (so that the held-out set counts as if at the natural ham:spam ratio).
    Returns the midpoint of the best gap between scores, so it is not glued to one message."""
    cuts = np.unique(np.concatenate([[0.0, 1.0], p_spam]))
    mids = np.concatenate([[cuts[0] / 2], (cuts[:-1] + cuts[1:]) / 2, [(cuts[-1] + 1) / 2]])
    best = None
    for t in mids:
        flagged = is_spam(p_spam, t)
        fp = int(np.sum(flagged & ~spam))
        fn = int(np.sum(~flagged & spam))
        cost = ham_weight * fp + fn
        if best is None or cost < best["cost"] or (cost == best["cost"] and
                                                   abs(t - 0.5) < abs(best["threshold"] - 0.5)):
            best = {"threshold": float(t), "cost": float(cost), "valid_false_positives": fp,
                    "valid_false_negatives": fn}
    return best
