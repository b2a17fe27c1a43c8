"""Step 7, the classifier in use: an interactive chat, or a file classified line by line.

A file is streamed in chunks (any size, bounded memory) to `OUTPUT.partial`, which is renamed to
OUTPUT once every message is scored; an interrupted run resumes where it stopped."""

from __future__ import annotations

import csv
import json
import os
import sys
import time
from pathlib import Path

from .errors import UserError
from .scoring import p_spam
from .task import is_blank, verdict

SHOWN = {"spam": "SPAM", "ham": "NOT SPAM"}  # how the chat prints a verdict

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
                    if is_blank(row["text"] or ""):
                        raise UserError(f"{path} line {i}: empty message")
                    yield row["text"]
                return
            for i, line in enumerate(f, 1):
                if not line.strip():
                    continue
                if suffix != ".jsonl":
                    if is_blank(line):
                        raise UserError(f"{path} line {i}: only control characters")
                    yield line.rstrip("\r\n")
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError:
                    raise UserError(f"{path} line {i}: not JSON")
                if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
                    raise UserError(f"{path} line {i}: expected an object with a 'text' string")
                if is_blank(obj["text"]):
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
            for text, p in zip(part, p_spam(model, tokenizer, part)):
                label = verdict(p, threshold)
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
        if is_blank(text):
            break
        p = float(p_spam(model, tokenizer, [text])[0])
        print(f"{SHOWN[verdict(p, threshold)]}  P(spam)={p:.3f}")


def run(model_dir: Path, adapter_path: Path | None, threshold: float | None,
        input_path: Path | None = None, output_path: Path | None = None,
        trust_remote_code: bool = False) -> None:
    """Step 7 whole: the chat, or (input_path and output_path) a file classified."""
    from .model import load_model
    from .threshold import threshold_for

    if (input_path is None) != (output_path is None):
        raise UserError("--input and --output go together")
    threshold = threshold_for(threshold, model_dir, adapter_path)
    if input_path is not None:
        count_messages(input_path)  # fail on a bad file before loading the model
    model, tokenizer = load_model(model_dir, adapter_path, trust_remote_code=trust_remote_code)
    if input_path is None:
        chat(model, tokenizer, threshold)
        return
    total, counts = classify_file(model, tokenizer, threshold, input_path, output_path)
    print(f"Classified {total} messages ({counts['spam']} spam in this run) -> {output_path}")
