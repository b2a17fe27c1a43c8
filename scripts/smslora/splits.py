"""Step 2, the splits: deduplicate first (the raw corpus repeats ~400 messages, so a naive split
leaks test messages into training), then hold out a stratified test split at the natural
ham/spam ratio, and draw the tutorial's balanced train/valid sets from what is left. Same seed,
same split, every time."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .artifacts import atomic_write_json, sha256, write_jsonl
from .data import clean, dedupe_key, read_hf, read_rows
from .errors import UserError
from .paths import SHIPPED_TSV, SPLIT_MANIFEST, SUPPLEMENTS
from .task import format_example


def split(messages: list[dict], test_fraction: float, train_per_class: int,
          valid_per_class: int, seed: int, calibration_ham: int = 0) -> dict[str, list[dict]]:
    """Stratified test split at the natural ratio; balanced train/valid from the rest;
    calibration: more ham, outside train, so that valid + calibration is at about the natural
    ratio (the threshold and the recipe are chosen on it, never on test); and train_all: every
    message in none of test, valid, calibration."""
    rng = np.random.default_rng(seed)
    by_label = {lab: [m for m in messages if m["label"] == lab] for lab in ("ham", "spam")}
    test, rest = [], {}
    for lab, items in by_label.items():
        order = rng.permutation(len(items))
        n_test = int(round(test_fraction * len(items)))
        test += [items[i] for i in order[:n_test]]
        rest[lab] = [items[i] for i in order[n_test:]]
    train, valid, train_all, calibration = [], [], [], []
    for lab, items in rest.items():
        need = valid_per_class + train_per_class
        extra = calibration_ham if lab == "ham" else 0
        if len(items) < need + extra:
            raise UserError(f"only {len(items)} {lab} messages left after the test split; "
                            f"need {need + extra} (lower --train-per-class/--valid-per-class"
                            f"{'/--calibration-ham' if extra else ''})")
        valid += items[:valid_per_class]
        train += items[valid_per_class:need]
        calibration += items[need:need + extra]
        train_all += items[valid_per_class:need] + items[need + extra:]
    shuffled = {}
    for name, rows in (("train", train), ("valid", valid), ("test", test),
                       ("train_all", train_all), ("calibration", calibration)):
        shuffled[name] = [rows[i] for i in rng.permutation(len(rows))]
    return shuffled


def read_supplement(path: Path, known: set[str]) -> list[dict]:
    """Extra messages (data/modern_sms*.jsonl), dropped where they repeat a message already
    read: added to train_all, but for those held out in valid_modern."""
    rows = clean(read_rows(path))
    return [{**r, "source": path.stem} for r in rows if dedupe_key(r["message"]) not in known]


def hold_out(rows: list[dict], per_label: int, seed: int) -> tuple[list[dict], list[dict]]:
    """(held out: per_label of each label, the rest), drawn with the seed."""
    rng = np.random.default_rng([seed, 1])
    held, rest = [], []
    for lab in ("ham", "spam"):
        items = [r for r in rows if r["label"] == lab]
        order = rng.permutation(len(items))
        if len(items) < per_label:
            raise UserError(f"the supplement has only {len(items)} {lab} messages; "
                            f"--supplement-holdout asks for {per_label}")
        held += [items[i] for i in order[:per_label]]
        rest += [items[i] for i in order[per_label:]]
    return held, rest


def to_line(m: dict) -> dict:
    line = {"text": format_example(m["message"], m["label"]), "label": m["label"],
            "message": m["message"]}
    if "source" in m:
        line["source"] = m["source"]
    return line


def prepare(source: str, out: Path, test_fraction=0.2, train_per_class=400,
            valid_per_class=80, seed=42, supplement=SUPPLEMENTS,
            calibration_ham: int = 480, supplement_holdout: int = 50) -> dict:
    """supplement: a file of modern messages, or several (None: none); supplement_holdout of
    each label of each file go to valid_modern, drawn within the file, so that adding a file
    leaves the messages held out of the others as they were."""
    if not 0 < test_fraction < 1:
        raise UserError("--test-fraction must be between 0 and 1")
    if train_per_class <= 0 or valid_per_class <= 0:
        raise UserError("--train-per-class and --valid-per-class must be positive")
    if calibration_ham < 0 or supplement_holdout < 0:
        raise UserError("--calibration-ham and --supplement-holdout must be 0 or more")
    if source == "hf":
        rows, origin = read_hf(), "hf:ucirvine/sms_spam"
    else:
        path = SHIPPED_TSV if source == "shipped" else Path(source)
        rows, origin = read_rows(path), str(path.name)
    raw_rows = len(rows)
    messages = clean(rows)
    splits = split(messages, test_fraction, train_per_class, valid_per_class, seed,
                   calibration_ham)
    files = [] if supplement is None else (
        [Path(supplement)] if isinstance(supplement, (str, Path)) else [Path(f) for f in supplement])
    known = {dedupe_key(m["message"]) for m in messages}
    held, rest, added = [], [], []
    for path in files:
        extra = read_supplement(path, known)
        known |= {dedupe_key(m["message"]) for m in extra}
        h, r = hold_out(extra, supplement_holdout, seed)
        held, rest = held + h, rest + r
        added.append({"file": path.name, "messages": len(extra), "held_out": len(h)})
    splits["valid_modern"] = [held[i] for i in np.random.default_rng(seed).permutation(len(held))]
    if files:
        rows = splits["train_all"] + rest
        splits["train_all"] = [rows[i] for i in np.random.default_rng(seed).permutation(len(rows))]
    out = Path(out)
    for name, rows in splits.items():
        write_jsonl(out / f"{name}.jsonl", [to_line(m) for m in rows])
    counts = {name: {lab: sum(r["label"] == lab for r in rows) for lab in ("ham", "spam")}
              for name, rows in splits.items()}
    manifest = {
        "source": origin, "raw_rows": raw_rows, "seed": seed, "test_fraction": test_fraction,
        "distinct_messages": len(messages), "counts": counts,
        "supplement": added,
        "sha256": {name: sha256(out / f"{name}.jsonl")
                   for name in splits},
    }
    atomic_write_json(out / SPLIT_MANIFEST, manifest)
    return manifest


def run(source: str = "shipped", out: Path = None, log=print, **options) -> dict:
    """Step 2 whole: prepare() and a summary of the splits written."""
    from .paths import DATA_DIR

    out = Path(out or DATA_DIR)
    m = prepare(source, out, **options)
    log(f"{m['distinct_messages']} distinct messages from {m['source']} (seed {m['seed']})")
    for name, c in m["counts"].items():
        log(f"  {name:12s} {c['ham'] + c['spam']:5d}  ({c['spam']} spam, {c['ham']} ham)")
    for f in m["supplement"]:
        log(f"  + {f['messages'] - f['held_out']} messages of {f['file']} in train_all, "
            f"{f['held_out']} in valid_modern")
    log(f"wrote {out}/{{train,train_all,valid,calibration,valid_modern,test}}.jsonl "
        "and split.json")
    return m
