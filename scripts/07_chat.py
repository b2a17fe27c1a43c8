#!/usr/bin/env python
"""Step 7: talk to the classifier, or classify a file.

Interactive: type a message, get the verdict and P(spam) (an empty line or Ctrl-D quits).
Batch: --input F.jsonl|.csv|.txt --output G.jsonl writes one line per message with `text`,
`label` (spam/ham) and `p_spam`, in the input's order.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (first: sets up the fast BLAS before anything imports mlx)
from common import UserError  # noqa: E402


def read_messages(path: Path) -> list[str]:
    """Messages from JSONL (a `text` field), CSV (a `text` column) or plain text (a line each)."""
    if not path.is_file():
        raise UserError(f"input file {path} not found")
    try:
        raw = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError:
        raise UserError(f"{path} is not UTF-8 text")
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        out = []
        for i, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                raise UserError(f"{path} line {i}: not JSON")
            if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
                raise UserError(f"{path} line {i}: expected an object with a 'text' string")
            if not obj["text"].strip():
                raise UserError(f"{path} line {i}: empty message")
            out.append(obj["text"])
        return out
    if suffix == ".csv":
        reader = csv.DictReader(io.StringIO(raw))
        if "text" not in (reader.fieldnames or []):
            raise UserError(f"{path}: no 'text' column in the header")
        out = []
        for i, row in enumerate(reader, 2):
            if not (row["text"] or "").strip():
                raise UserError(f"{path} line {i}: empty message")
            out.append(row["text"])
        return out
    return [line for line in raw.splitlines() if line.strip()]


def progress(done: int, total: int, started: float):
    rate = done / max(time.perf_counter() - started, 1e-9)
    bar = "#" * int(30 * done / max(total, 1))
    print(f"\r[{bar:<30s}] {done}/{total}  {rate:.1f} msg/s", end="", file=sys.stderr, flush=True)


def classify_file(model, tokenizer, threshold: float, src: Path, dst: Path, chunk: int = 256):
    messages = read_messages(src)
    if not messages:
        raise UserError(f"{src} has no messages")
    rows, started = [], time.perf_counter()
    for start in range(0, len(messages), chunk):
        part = messages[start: start + chunk]
        for text, p in zip(part, common.p_spam(model, tokenizer, part)):
            rows.append({"text": text, "label": "spam" if p > threshold else "ham",
                         "p_spam": round(float(p), 6)})
        progress(len(rows), len(messages), started)
    print(file=sys.stderr)
    common.write_jsonl(dst, rows)
    return rows


def chat(model, tokenizer, threshold: float):
    print(f"Type an SMS message (threshold {threshold:.3f}); an empty line quits.")
    while True:
        try:
            text = input("> ")
        except EOFError:
            break
        if not text.strip():
            break
        p = float(common.p_spam(model, tokenizer, [text])[0])
        verdict = "SPAM" if p > threshold else "NOT SPAM"
        print(f"{verdict}  P(spam)={p:.3f}")


@common.cli
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common.add_model_args(p, common.FUSED_DIR)
    p.add_argument("--input", type=Path, help="classify this file (.jsonl, .csv or .txt)")
    p.add_argument("--output", type=Path, help="write the verdicts here (JSONL)")
    args = p.parse_args(argv)
    if (args.input is None) != (args.output is None):
        raise UserError("--input and --output go together")
    if args.input is not None:
        read_messages(args.input)  # fail on a bad file before loading the model
    model, tokenizer = common.load_model(args.model, args.adapter_path)
    threshold = common.read_threshold(args.adapter_path or args.model)
    if args.input is None:
        chat(model, tokenizer, threshold)
        return
    rows = classify_file(model, tokenizer, threshold, args.input, args.output)
    spam = sum(r["label"] == "spam" for r in rows)
    print(f"Classified {len(rows)} messages ({spam} spam) -> {args.output}")


if __name__ == "__main__":
    main()
