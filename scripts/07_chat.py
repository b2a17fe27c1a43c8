#!/usr/bin/env python
"""Step 7: talk to the classifier, or classify a file.

Interactive: type a message, get the verdict and P(spam) (an empty line or Ctrl-D quits).
Batch: --input F.jsonl|.csv|.txt --output G.jsonl writes one line per message with `text`,
`label` (spam/ham) and `p_spam`, in the input's order. The file is streamed in chunks (any size,
bounded memory); an interrupted run resumes where it stopped when started again.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (first: sets up the fast BLAS before anything imports mlx)
from common import UserError  # noqa: E402


def iter_messages(path: Path):
    """Messages from JSONL (a `text` field), CSV (a `text` column) or plain text (a line each),
    read line by line: a file of any size is never held in memory."""
    if not path.is_file():
        raise UserError(f"input file {path} not found")
    suffix = path.suffix.lower()
    with open(path, encoding="utf-8-sig", newline="") as f:
        try:
            if suffix == ".csv":
                reader = csv.DictReader(f)
                if "text" not in (reader.fieldnames or []):
                    raise UserError(f"{path}: no 'text' column in the header")
                for i, row in enumerate(reader, 2):
                    if common.is_blank(row["text"] or ""):
                        raise UserError(f"{path} line {i}: empty message")
                    yield row["text"]
                return
            for i, line in enumerate(f, 1):
                if not line.strip():
                    continue
                if suffix != ".jsonl":
                    if common.is_blank(line):
                        raise UserError(f"{path} line {i}: only control characters")
                    yield line.rstrip("\r\n")
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError:
                    raise UserError(f"{path} line {i}: not JSON")
                if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
                    raise UserError(f"{path} line {i}: expected an object with a 'text' string")
                if common.is_blank(obj["text"]):
                    raise UserError(f"{path} line {i}: empty message")
                yield obj["text"]
        except UnicodeDecodeError:
            raise UserError(f"{path} is not UTF-8 text")


def count_messages(path: Path) -> int:
    """Validate the whole file (one line error) before any model work; returns the count."""
    n = sum(1 for _ in iter_messages(path))
    if not n:
        raise UserError(f"{path} has no messages")
    return n


def progress(done: int, total: int, started: float, skipped: int = 0):
    rate = (done - skipped) / max(time.perf_counter() - started, 1e-9)
    bar = "#" * int(30 * done / max(total, 1))
    print(f"\r[{bar:<30s}] {done}/{total}  {rate:.1f} msg/s", end="", file=sys.stderr, flush=True)


def classify_file(model, tokenizer, threshold: float, src: Path, dst: Path, chunk: int = 256):
    """Stream src to dst in chunks. Lines go to `dst.partial` as they are scored; an interrupted
    run started again with the same arguments resumes after the last complete line, and dst
    appears (by rename) only once every message is scored."""
    total = count_messages(src)
    partial = dst.with_name(dst.name + ".partial")
    done = 0
    if partial.exists():
        lines = partial.read_bytes().split(b"\n")
        done = len(lines) - 1  # the last element is b"" or a cut-off line
        partial.write_bytes(b"\n".join(lines[:done]) + (b"\n" if done else b""))
        print(f"resuming {partial} after {done} messages", file=sys.stderr)
    dst.parent.mkdir(parents=True, exist_ok=True)
    started, counts = time.perf_counter(), {"spam": 0, "ham": 0}
    messages = iter_messages(src)
    for _ in range(done):
        next(messages)
    with open(partial, "a", encoding="utf-8") as out:
        while True:
            part = [m for _, m in zip(range(chunk), messages)]
            if not part:
                break
            for text, p in zip(part, common.p_spam(model, tokenizer, part)):
                label = "spam" if p > threshold else "ham"
                counts[label] += 1
                out.write(json.dumps({"text": text, "label": label, "p_spam": round(float(p), 6)},
                                     ensure_ascii=False) + "\n")
            out.flush()
            os.fsync(out.fileno())
            progress(done + sum(counts.values()), total, started, done)
    print(file=sys.stderr)
    os.replace(partial, dst)
    return total, counts


def chat(model, tokenizer, threshold: float):
    print(f"Type an SMS message (threshold {threshold:.3f}); an empty line quits.")
    while True:
        try:
            text = input("> ")
        except EOFError:
            break
        if common.is_blank(text):
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
    common.add_threshold_arg(p)
    args = p.parse_args(argv)
    if (args.input is None) != (args.output is None):
        raise UserError("--input and --output go together")
    threshold = common.verdict_threshold(args)
    if args.input is not None:
        count_messages(args.input)  # fail on a bad file before loading the model
    model, tokenizer = common.load_model(args.model, args.adapter_path,
                                         trust_remote_code=args.trust_remote_code)
    if args.input is None:
        chat(model, tokenizer, threshold)
        return
    total, counts = classify_file(model, tokenizer, threshold, args.input, args.output)
    print(f"Classified {total} messages ({counts['spam']} spam in this run) -> {args.output}")


if __name__ == "__main__":
    main()
