#!/usr/bin/env python
"""Trained runs combined offline, each candidate's threshold chosen on the held-out sets by
03_train's rule (the fewest errors, a false alarm weighted up to the natural ham:spam ratio):

  runs        every average of the runs' log-odds (one run alone is its own candidate: its
              threshold is the one 03_train stored)
  --tfidf     the first run's log-odds blended with TF-IDF + logistic regression's (trained on
              train_all.jsonl), weight 0 to 1 in steps of 0.05
  --neighbours the first run's log-odds plus a vote of the most similar training message
              (character 2-5-gram TF-IDF cosine): weight x (similarity to the nearest spam minus
              to the nearest ham), counted where the nearer one is above a similarity floor

The candidate with the fewest weighted held-out errors is the one the rule would choose. --test
adds each candidate's test-split and stress-suite figures, to be looked at after that choice.

    python benchmarks/combine.py --runs models/retrained/adapters models/blocks8 --tfidf --test
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import numpy as np

import _project  # noqa: F401  (scripts/ on sys.path)
from smslora import cli
from smslora.artifacts import atomic_write_json, read_split
from smslora.errors import UserError, require_model
from smslora.metrics import classifier_metrics
from smslora.paths import ADAPTERS_DIR, BASELINE_DIR, DATA_DIR, HELD_OUT_SPLITS, REPORTS_DIR
from smslora.paths import STRESS_SUITE
from smslora.task import is_spam
from smslora.threshold import choose_threshold, natural_ratio

BLEND_WEIGHTS = np.round(np.arange(0, 1.0001, 0.05), 2)
VOTE_WEIGHTS = (5, 10, 20, 40, 80)
VOTE_FLOORS = (0.0, 0.3, 0.5, 0.7)


def message_sets(data: Path) -> dict[str, list[dict]]:
    """held (what 03_train chooses the threshold on), test, stress: rows with message, label."""
    from smslora.stress import load_suite

    held = read_split(data / "valid.jsonl") + [
        r for f in HELD_OUT_SPLITS if (data / f).is_file() for r in read_split(data / f)]
    stress = [{"message": r["text"], "label": r["label"]} for r in load_suite(STRESS_SUITE)]
    return {"held": held, "test": read_split(data / "test.jsonl"), "stress": stress}


def log_odds(model_dir: Path, adapter_path: Path, sets: dict) -> dict[str, np.ndarray]:
    from smslora.model import load_model
    from smslora.scoring import score_logits

    model, tokenizer = load_model(model_dir, adapter_path)
    out = {}
    for name, rows in sets.items():
        logits = score_logits(model, tokenizer, [r["message"] for r in rows])
        out[name] = logits[:, 0] - logits[:, 1]
    return out


def neighbour_similarity(train: list[dict], sets: dict) -> dict[str, tuple]:
    """For each message: cosine similarity to its nearest training spam and nearest ham."""
    from sklearn.feature_extraction.text import TfidfVectorizer

    vectorizer = TfidfVectorizer(analyzer="char_wb", ngram_range=(2, 5), sublinear_tf=True)
    known = vectorizer.fit_transform([r["message"] for r in train])
    spam = np.array([r["label"] == "spam" for r in train])
    out = {}
    for name, rows in sets.items():
        sim = (vectorizer.transform([r["message"] for r in rows]) @ known.T).toarray()
        out[name] = (sim[:, spam].max(1), sim[:, ~spam].max(1))
    return out


def candidates(runs: dict, sets: dict, train: list[dict], tfidf: bool, sim: dict | None):
    """(name, number of parts, {set: log-odds}) for every combination asked for; sim is
    neighbour_similarity's, for the votes."""
    for n in range(1, len(runs) + 1):
        for combo in itertools.combinations(runs, n):
            yield " + ".join(combo), n, {k: np.mean([runs[c][k] for c in combo], 0) for k in sets}
    first = next(iter(runs))
    if tfidf:
        from smslora.baselines import tfidf_model

        model = tfidf_model("tfidf-logreg").fit(
            [r["message"] for r in train], [r["label"] == "spam" for r in train])
        lexical = {k: model.decision_function([r["message"] for r in rows])
                   for k, rows in sets.items()}
        for a in BLEND_WEIGHTS:
            yield (f"{a:.2f} x {first} + {1 - a:.2f} x tfidf-logreg", 2,
                   {k: a * runs[first][k] + (1 - a) * lexical[k] for k in sets})
    if sim is not None:
        for b, floor in itertools.product(VOTE_WEIGHTS, VOTE_FLOORS):
            vote = {k: np.where(np.maximum(s, h) > floor, s - h, 0) for k, (s, h) in sim.items()}
            yield (f"{first} + {b} x nearest-neighbour vote (floor {floor})", 2,
                   {k: runs[first][k] + b * vote[k] for k in sets})


def sigmoid(z):
    return 1 / (1 + np.exp(-z))


def print_table(rows: list[dict], best: dict, with_test: bool) -> None:
    header = ["candidate", "held-out weighted errors", "ham flagged + spam missed", "threshold",
              "held-out ROC-AUC"]
    if with_test:
        header += ["test accuracy", "spam F1", "ROC-AUC", "test errors", "stress misses"]
    print("| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for r in rows:
        line = (f"| {r['candidate']}{' (chosen)' if r is best else ''} | {r['cost']:.2f} | "
                f"{r['valid_false_positives']} + {r['valid_false_negatives']} | "
                f"{r['threshold']:.3f} | {r['held_roc_auc']:.4f} |")
        if with_test:
            t, s = r["test"], r["stress"]
            line += (f" {100 * t['accuracy']:.2f}% | {t['f1']:.3f} | {t['roc_auc']:.4f} | "
                     f"{t['wrong']['ham_flagged']} + {t['wrong']['spam_missed']} | "
                     f"{sum(s['wrong'].values())}/{s['messages']} |")
        print(line)


@cli.cli
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=Path, nargs="+", default=[ADAPTERS_DIR],
                   help="adapter folders of 03_train runs on --model (the first leads the blends)")
    p.add_argument("--model", type=Path, default=BASELINE_DIR)
    p.add_argument("--data", type=Path, default=DATA_DIR)
    p.add_argument("--tfidf", action="store_true", help="blends with TF-IDF + logistic regression")
    p.add_argument("--neighbours", action="store_true", help="nearest-neighbour votes")
    p.add_argument("--test", action="store_true", help="test and stress figures too")
    p.add_argument("--out", type=Path, default=REPORTS_DIR / "bench_combine.json")
    args = p.parse_args(argv)
    for run in args.runs:
        require_model(args.model, run)
    if len(set(args.runs)) != len(args.runs) or len(args.runs) > 6:
        raise UserError("--runs: up to 6 different adapter folders")
    sets = message_sets(args.data)
    labels = {k: np.array([r["label"] == "spam" for r in rows]) for k, rows in sets.items()}
    ham_weight = natural_ratio(args.data) / (
        np.sum(~labels["held"]) / max(np.sum(labels["held"]), 1))
    names = [run.name if run.name != "adapters" else run.parent.name for run in args.runs]
    if len(set(names)) != len(names):
        names = [str(run) for run in args.runs]
    runs = {}
    for name, run in zip(names, args.runs):
        print(f"scoring {sum(map(len, sets.values()))} messages with {run}", file=sys.stderr)
        runs[name] = log_odds(args.model, run, sets)

    train = read_split(args.data / "train_all.jsonl")
    sim = neighbour_similarity(train, sets) if args.neighbours else None
    rows = []
    for name, parts, z in candidates(runs, sets, train, args.tfidf, sim):
        p_spam = {k: sigmoid(v) for k, v in z.items()}
        chosen = choose_threshold(p_spam["held"], labels["held"], ham_weight)
        row = {"candidate": name, "parts": parts, **chosen,
               "held_roc_auc": classifier_metrics(labels["held"], p_spam["held"],
                                                  chosen["threshold"])["roc_auc"]}
        if args.test:
            for k in ("test", "stress"):
                row[k] = classifier_metrics(labels[k], p_spam[k], chosen["threshold"])
        rows.append(row)
    best = min(rows, key=lambda r: (r["cost"], r["parts"]))

    print_table(rows, best, args.test)
    atomic_write_json(args.out, {"runs": [str(r) for r in args.runs],
                                 "ham_weight": ham_weight, "chosen": best["candidate"],
                                 "candidates": rows})
    if args.neighbours:  # what the first run gets wrong on held-out, and how near training it is
        first, (near_spam, near_ham) = rows[0], sim["held"]
        wrong = is_spam(sigmoid(runs[names[0]]["held"]), first["threshold"]) != labels["held"]
        print(f"\n{first['candidate']}'s held-out errors: truth, P(spam), cosine similarity to "
              "the nearest training spam / ham, the message")
        for i in np.flatnonzero(wrong):
            print(f"  {sets['held'][i]['label']:4s}  {sigmoid(runs[names[0]]['held'][i]):.3f}  "
                  f"{near_spam[i]:.2f} / {near_ham[i]:.2f}  {sets['held'][i]['message'][:70]!r}")
    print(f"chosen on the held-out sets: {best['candidate']} -> {args.out}")


if __name__ == "__main__":
    cli.run(main)
