#!/usr/bin/env python
"""Step 2: the SMS Spam Collection -> data/{train,valid,test}.jsonl.

Deduplicate first (the raw corpus repeats ~400 messages, so a naive split leaks test messages
into training), then hold out a stratified test split at the natural ham/spam ratio, and draw the
tutorial's balanced train/valid sets from what is left. Same seed, same split, every time.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (first: sets up the fast BLAS before anything imports mlx)
from common import UserError  # noqa: E402

import numpy as np  # noqa: E402

LABEL_WORDS = {"ham": "ham", "spam": "spam", "not spam": "ham", "0": "ham", "1": "spam"}
TEXT_COLUMNS = ("text", "message", "sms", "v2")
LABEL_COLUMNS = ("label", "class", "category", "v1")


def normalize_label(raw, where: str) -> str:
    key = str(raw).strip().lower()
    if key not in LABEL_WORDS:
        raise UserError(f"{where}: unknown label {str(raw)[:30]!r} (expected ham or spam)")
    return LABEL_WORDS[key]


def normalize_text(raw) -> str:
    """Collapse whitespace runs; the text is otherwise kept as written."""
    return re.sub(r"\s+", " ", str(raw)).strip()


def dedupe_key(text: str) -> str:
    return text.casefold()


def _decode(path: Path) -> str:
    data = path.read_bytes()
    if not data.strip():
        raise UserError(f"{path} is empty")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise UserError(f"{path} line {line}: not valid UTF-8 (re-save the file as UTF-8)")


def _pick(columns, wanted, what: str, path: Path) -> str:
    lower = {c.strip().lower(): c for c in columns}
    for name in wanted:
        if name in lower:
            return lower[name]
    raise UserError(f"{path}: no {what} column (expected one of {', '.join(wanted)})")


def read_rows(path: Path) -> list[tuple[str, str, str]]:
    """(raw text, label, where) from a TSV with no header (the collection's format), a CSV/TSV
    with a header, or JSONL with text/label fields."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"dataset {path} not found")
    text = _decode(path)
    rows = []
    if path.suffix.lower() in (".jsonl", ".json"):
        for i, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                raise UserError(f"{path} line {i}: not a JSON object")
            if not isinstance(obj, dict):
                raise UserError(f"{path} line {i}: not a JSON object")
            t = _pick(obj, TEXT_COLUMNS, "text", path)
            lab = _pick(obj, LABEL_COLUMNS, "label", path)
            rows.append((obj[t], obj[lab], f"{path.name} line {i}"))
        return rows
    delimiter = "," if path.suffix.lower() == ".csv" else "\t"
    quoting = csv.QUOTE_MINIMAL if delimiter == "," else csv.QUOTE_NONE  # SMS text has bare quotes
    reader = csv.reader(io.StringIO(text), delimiter=delimiter, quoting=quoting)
    try:
        records = list(reader)
    except csv.Error as e:  # e.g. a field over csv's 128 KB limit: not an SMS
        raise UserError(f"{path} line {reader.line_num}: {e}")
    first = [c.strip().lower() for c in records[0]] if records else []
    headered = any(c in LABEL_COLUMNS or c in TEXT_COLUMNS for c in first)
    if headered:
        t = first.index(_pick(first, TEXT_COLUMNS, "text", path))
        lab = first.index(_pick(first, LABEL_COLUMNS, "label", path))
        records = records[1:]
    else:  # the collection's own layout: label<TAB>text
        lab, t = 0, 1
    for i, rec in enumerate(records, 2 if headered else 1):
        if not any(c.strip() for c in rec):
            continue
        if len(rec) <= max(t, lab):
            raise UserError(
                f"{path} line {i}: expected label{'<TAB>' if delimiter == chr(9) else ','}text"
            )
        rows.append((rec[t], rec[lab], f"{path.name} line {i}"))
    return rows


def read_hf(dataset_id: str = "ucirvine/sms_spam") -> list[tuple[str, str, str]]:
    """The same corpus from the Hugging Face Hub (needs network)."""
    try:
        from datasets import load_dataset

        ds = load_dataset(dataset_id, split="train")
    except Exception as e:  # the datasets library raises many types; all mean "could not load"
        raise UserError(f"could not load {dataset_id} from the Hub ({type(e).__name__}); "
                        "use the shipped copy (default) or --source PATH")
    names = ds.features["label"].names if hasattr(ds.features["label"], "names") else None
    return [(r["sms"], names[r["label"]] if names else r["label"], f"{dataset_id}[{i}]")
            for i, r in enumerate(ds)]


def clean(rows) -> list[dict]:
    """Validate, normalise and deduplicate (first occurrence wins)."""
    seen, out = {}, []
    for raw_text, raw_label, where in rows:
        label = normalize_label(raw_label, where)
        text = normalize_text(raw_text)
        if common.is_blank(text):
            raise UserError(f"{where}: empty message (only blanks or control characters)")
        key = dedupe_key(text)
        if key in seen:
            continue
        seen[key] = label
        out.append({"message": text, "label": label})
    if not out:
        raise UserError("the dataset has no messages")
    missing = sorted(set(common.COMPLETIONS) - {r["label"] for r in out})
    if missing:
        raise UserError(f"the dataset has no {' or '.join(missing)} messages: a classifier "
                        "needs both")
    return out


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
    line = {"text": common.format_example(m["message"], m["label"]), "label": m["label"],
            "message": m["message"]}
    if "source" in m:
        line["source"] = m["source"]
    return line


def prepare(source: str, out: Path, test_fraction=0.2, train_per_class=400,
            valid_per_class=80, seed=42, supplement=common.SUPPLEMENTS,
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
        path = common.SHIPPED_TSV if source == "shipped" else Path(source)
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
        common.write_jsonl(out / f"{name}.jsonl", [to_line(m) for m in rows])
    counts = {name: {lab: sum(r["label"] == lab for r in rows) for lab in ("ham", "spam")}
              for name, rows in splits.items()}
    manifest = {
        "source": origin, "raw_rows": raw_rows, "seed": seed, "test_fraction": test_fraction,
        "distinct_messages": len(messages), "counts": counts,
        "supplement": added,
        "sha256": {name: common.sha256(out / f"{name}.jsonl")
                   for name in splits},
    }
    common.atomic_write_json(out / "split.json", manifest)
    return manifest


@common.cli
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--source", default="shipped",
                   help="'shipped' (data/SMSSpamCollection.tsv, default), 'hf' (ucirvine/sms_spam "
                        "from the Hub) or a path to a TSV/CSV/JSONL with text and label columns")
    p.add_argument("--out", type=Path, default=common.DATA_DIR, help="output folder (data/)")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--test-fraction", type=float, default=0.2)
    p.add_argument("--train-per-class", type=int, default=400,
                   help="messages per class in train.jsonl (the tutorial's balanced set)")
    p.add_argument("--valid-per-class", type=int, default=80)
    p.add_argument("--calibration-ham", type=int, default=480,
                   help="ham messages held out beside valid.jsonl (calibration.jsonl) so the two "
                        "together are at the natural ratio: the threshold is chosen on them")
    p.add_argument("--supplement", nargs="+", default=[str(f) for f in common.SUPPLEMENTS],
                   help="files of modern messages for train_all.jsonl and valid_modern.jsonl "
                        "(default: data/modern_sms.jsonl data/modern_sms_2.jsonl; 'none' to skip)")
    p.add_argument("--supplement-holdout", type=int, default=50,
                   help="messages of each label of each supplement file held out in "
                        "valid_modern.jsonl (the recipe and threshold are chosen on them too, "
                        "never trained on)")
    args = p.parse_args(argv)
    supplement = None if args.supplement == ["none"] else args.supplement
    m = prepare(args.source, args.out, args.test_fraction, args.train_per_class,
                args.valid_per_class, args.seed, supplement, args.calibration_ham,
                args.supplement_holdout)
    print(f"{m['distinct_messages']} distinct messages from {m['source']} (seed {m['seed']})")
    for name, c in m["counts"].items():
        print(f"  {name:12s} {c['ham'] + c['spam']:5d}  ({c['spam']} spam, {c['ham']} ham)")
    for f in m["supplement"]:
        print(f"  + {f['messages'] - f['held_out']} messages of {f['file']} in train_all, "
              f"{f['held_out']} in valid_modern")
    print(f"wrote {args.out}/{{train,train_all,valid,calibration,valid_modern,test}}.jsonl "
          "and split.json")


if __name__ == "__main__":
    main()
