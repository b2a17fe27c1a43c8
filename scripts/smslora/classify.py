"""Step 7, the classifier in use: an interactive chat, or a file classified line by line.

A file is checked whole before the model is loaded: a bad line (not UTF-8, not JSON, nested too
deep, a lone surrogate, a CSV field over 131,072 characters, no message) stops the run there,
with its line number, exit code 2 and nothing written; no line is skipped, so the output always
has one verdict per input message, in order. The file is then streamed in chunks (any size,
bounded memory) to `OUTPUT.partial`, renamed to OUTPUT once every message is scored. Beside it,
`OUTPUT.partial.json` records what the lines are scored from (the input's SHA-256 and format, the
model's weights and config, the threshold): an interrupted run resumes only when all of these
match and its lines are this input's first messages, and otherwise starts over, saying why. While
a run writes, the partial file is locked: a second run on the same OUTPUT stops at once."""

from __future__ import annotations

import fcntl
import json
import os
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np

from .artifacts import atomic_write_json, folder_fingerprint, sha256
from .errors import UserError
from .folder_checks import check_entries, read_json
from .messages import MAX_LINE_CHARS, check_paths, count_messages, iter_messages, lone_surrogate
from .distributed import Ranks, Watchdog
from .scoring import p_spam, p_spam_of, score_logits
from .task import LABELS, is_blank, verdict

SHOWN = {"spam": "SPAM", "ham": "NOT SPAM"}  # how the chat prints a verdict
RECORD_FORMAT = "sms-lora verdicts 1"  # the partial file's lines: {"text", "label", "p_spam"}


def run_record(src: Path, model_dir: Path, adapter_path: Path | None, threshold: float) -> dict:
    """What the lines of a partial file depend on (a resumed run must match it all), under the
    words a message names them by."""
    suffix = src.suffix.lower()
    return {"output format": RECORD_FORMAT, "input": sha256(src),
            "input format": suffix if suffix in (".csv", ".jsonl") else "text",
            "threshold": threshold, "model": folder_fingerprint(model_dir, "config.json"),
            "adapters": adapter_path and folder_fingerprint(adapter_path, "adapter_config.json")}


class Output:
    """OUTPUT.partial, locked for this run, with its record beside it."""

    def __init__(self, dst: Path):
        self.dst, self.path = dst, dst.with_name(dst.name + ".partial")
        self.record_path = self.path.with_name(self.path.name + ".json")
        for _ in range(5):
            self.file = open(self.path, "a+b")
            try:
                fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                self.file.close()
                raise UserError(f"another run is writing {dst} (its {self.path.name} is "
                                "locked): wait for it to end, or choose another --output")
            locked, now = os.fstat(self.file.fileno()), self.path.exists() and self.path.stat()
            if now and (now.st_dev, now.st_ino) == (locked.st_dev, locked.st_ino):
                return
            self.file.close()  # renamed into place by a run that just ended: lock the new one
        raise UserError(f"{self.path} keeps changing: is another run writing {dst}?")

    def close(self, done: bool = False) -> None:
        """done: the partial file becomes dst. Not done: kept to resume from, unless empty."""
        try:
            if done:
                os.replace(self.path, self.dst)
                self.record_path.unlink(missing_ok=True)
            elif os.fstat(self.file.fileno()).st_size == 0:  # nothing scored: nothing left
                self.path.unlink(missing_ok=True)
                self.record_path.unlink(missing_ok=True)
        finally:
            self.file.close()  # and the lock with it


def resumable(out: Output, record: dict, messages, threshold: float) -> tuple[int, str]:
    """(messages already scored, why not) for the partial file of an interrupted run: 0 unless
    its record matches this run's and each complete line is the verdict of the input's next
    message. `messages` is consumed as far as the lines go."""
    kept = None
    if os.path.lexists(out.record_path):
        try:
            kept = read_json(out.record_path)
        except UserError:
            kept = {}
        if kept != record:
            differ = [k for k in record if not isinstance(kept, dict) or kept.get(k) != record[k]]
            return 0, f"it was scored from another {', '.join(differ)}"
    out.file.seek(0)
    done = 0
    for raw in iter(lambda: out.file.readline(8 * MAX_LINE_CHARS), b""):
        if not raw.endswith(b"\n"):
            break  # cut off by the interruption
        try:
            row = json.loads(raw)
            ok = (row["text"] == next(messages) and row["label"] in LABELS and
                  row["label"] == verdict(float(row["p_spam"]), threshold))
        except StopIteration:
            return 0, "it holds more lines than the input has messages"
        except (ValueError, KeyError, TypeError, RecursionError):
            ok = False
        if not ok:
            return 0, f"its line {done + 1} is not the verdict of this input's message {done + 1}"
        done += 1
    return done, "" if kept is not None else "no record of the model and threshold"


def start(out: Output, record: dict, src: Path, threshold: float):
    """The input's messages still to score, the partial file cut to its complete lines."""
    messages = iter_messages(src)
    done, why = resumable(out, record, messages, threshold)
    if done and why:  # a partial file with no record (an older version's): checked line by line
        print(f"resuming {out.path} after {done} messages ({why}: its texts are this input's "
              "and its verdicts agree with the threshold; delete it to score them again)",
              file=sys.stderr)
    elif done:
        print(f"resuming {out.path} after {done} messages", file=sys.stderr)
    elif why and os.fstat(out.file.fileno()).st_size:
        print(f"starting over: {out.path} is not this run's ({why})", file=sys.stderr)
    out.file.seek(0)
    kept = sum(len(line) for _, line in zip(range(done), out.file))
    out.file.truncate(kept)
    atomic_write_json(out.record_path, record)
    if not done:
        messages = iter_messages(src)
    return done, messages


def progress(done: int, total: int, started: float, skipped: int = 0):
    rate = (done - skipped) / max(time.perf_counter() - started, 1e-9)
    bar = "#" * int(30 * done / max(total, 1))
    print(f"\r[{bar:<30s}] {done}/{total}  {rate:.1f} msg/s", end="", file=sys.stderr, flush=True)


def classify_file(model, tokenizer, threshold: float, src: Path, out: Output | None,
                  record: dict | None, total: int, chunk: int = 256,
                  ranks: Ranks | None = None):
    """Score src into the locked partial file in chunks (resuming when start() allows).
    ranks: the processes of an mlx.launch job; each scores its share of every chunk's batches
    and rank 0 (the only one with `out`) writes every line, in input order: the same bytes as
    one process."""
    ranks = ranks or Ranks()
    done, messages = start(out, record, src, threshold) if ranks.main else (0, None)
    if ranks.size > 1:  # where rank 0 resumes, every rank resumes
        done = int(ranks.sum(mx.array(done)).item())
        if not ranks.main:
            messages = iter_messages(src)
            for _ in range(done):
                next(messages)
    started, counts = time.perf_counter(), {"spam": 0, "ham": 0}
    if out is not None:
        out.file.seek(0, os.SEEK_END)
    with Watchdog(ranks, lambda: f"{out.path if out else 'the output'} keeps the lines "
                  "scored so far: run again to resume") as dog:
        while part := [m for _, m in zip(range(chunk), messages)]:
            logits = score_logits(model, tokenizer, part, share=(ranks.rank, ranks.size))
            if ranks.size > 1:
                logits = np.array(ranks.sum(mx.array(logits)))
            dog.beat()
            if out is not None:
                write_verdicts(out, part, p_spam_of(logits), threshold, counts)
                progress(done + sum(counts.values()), total, started, done)
    if out is not None:
        print(file=sys.stderr)
    return counts


def write_verdicts(out: Output, texts: list[str], probs, threshold: float, counts: dict) -> None:
    lines = []
    for text, p in zip(texts, probs):
        label = verdict(p, threshold)
        counts[label] += 1
        lines.append(json.dumps({"text": text, "label": label, "p_spam": round(float(p), 6)},
                                ensure_ascii=False) + "\n")
    out.file.write("".join(lines).encode("utf-8"))
    out.file.flush()
    os.fsync(out.file.fileno())


def chat(model, tokenizer, threshold: float):
    print(f"Type an SMS message (threshold {threshold:.3f}); an empty line quits.")
    sys.stdin.reconfigure(errors="surrogateescape")  # a bad byte reaches us, not a traceback
    while True:
        try:
            text = input("> ")
        except EOFError:
            break
        if lone_surrogate(text):
            print("(not UTF-8 text: type it again)")
            continue
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
    for folder in (model_dir, adapter_path):  # threshold.json is read before the model
        if folder is not None and Path(folder).is_dir():
            check_entries(folder)
    threshold = threshold_for(threshold, model_dir, adapter_path)
    if input_path is None:
        chat(*load_model(model_dir, adapter_path, trust_remote_code=trust_remote_code), threshold)
        return
    input_path, output_path = Path(input_path), Path(output_path)
    total = count_messages(input_path)  # a bad file fails before the model is loaded
    check_paths(input_path, output_path)
    ranks = Ranks()  # under mlx.launch: rank 0 writes, every rank scores its share
    if not ranks.main:
        model, tokenizer = load_model(model_dir, adapter_path, trust_remote_code=trust_remote_code)
        classify_file(model, tokenizer, threshold, input_path, None, None, total, ranks=ranks)
        return
    out = Output(output_path)
    try:
        model, tokenizer = load_model(model_dir, adapter_path,
                                      trust_remote_code=trust_remote_code)
        record = run_record(input_path, model_dir, adapter_path, threshold)
        counts = classify_file(model, tokenizer, threshold, input_path, out, record, total,
                               ranks=ranks)
    except BaseException:
        out.close()
        raise
    out.close(done=True)
    print(f"Classified {total} messages ({counts['spam']} spam in this run) -> {output_path}")
