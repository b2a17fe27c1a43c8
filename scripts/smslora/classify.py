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

import codecs
import csv
import fcntl
import json
import os
import sys
import time
from pathlib import Path

from .artifacts import atomic_write_json, folder_fingerprint, sha256
from .errors import UserError
from .folder_checks import check_entries, read_json
from .scoring import p_spam
from .task import LABELS, is_blank, verdict

SHOWN = {"spam": "SPAM", "ham": "NOT SPAM"}  # how the chat prints a verdict
MAX_LINE_CHARS = 1 << 20  # a JSONL or text line (a CSV field: csv's own 131,072)
RECORD_FORMAT = "sms-lora verdicts 1"  # the partial file's lines: {"text", "label", "p_spam"}


def lone_surrogate(text: str) -> bool:
    """Half a UTF-16 pair (JSON's "\\ud800", or a byte that is not UTF-8, escaped): not text."""
    return not text.isascii() and any("\ud800" <= c <= "\udfff" for c in text)


def check_utf8(path: Path) -> None:
    """The whole file decodes as UTF-8; else the line of the first bad byte is named."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    line = 1
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            try:
                decoder.decode(chunk)
            except UnicodeDecodeError as e:
                line += chunk.count(b"\n", 0, max(e.start, 0))
                raise UserError(f"{path} line {line}: not UTF-8 text") from None
            line += chunk.count(b"\n")
        if decoder.getstate()[0]:
            raise UserError(f"{path} line {line}: not UTF-8 text (cut short)")


def jsonl_message(line: str, where: str) -> str:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError:
        raise UserError(f"{where}: not JSON") from None
    except RecursionError:
        raise UserError(f"{where}: JSON nested too deeply") from None
    if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
        raise UserError(f"{where}: expected an object with a 'text' string")
    if lone_surrogate(obj["text"]):
        raise UserError(f"{where}: the message holds a lone surrogate (an escape such as "
                        "\\ud800 that is half a character), not text")
    return obj["text"]


def csv_messages(f, path: Path):
    reader = csv.DictReader(f)
    try:
        if "text" not in (reader.fieldnames or []):
            raise UserError(f"{path}: no 'text' column in the header")
        for row in reader:
            if is_blank(row["text"] or ""):
                raise UserError(f"{path} line {reader.line_num}: empty message")
            yield row["text"]
    except csv.Error as e:  # line_num: the lines of the records read whole
        raise UserError(f"{path} line {reader.line_num + 1}: not CSV ({e})") from None


def iter_messages(path: Path):
    """Messages from JSONL (a `text` field), CSV (a `text` column) or plain text (a line each),
    read line by line: a file of any size is never held in memory."""
    if not path.is_file():
        raise UserError(f"input file {path} not found")
    suffix = path.suffix.lower()
    with open(path, encoding="utf-8-sig", newline="") as f:
        try:
            if suffix == ".csv":
                yield from csv_messages(f, path)
                return
            for i, line in enumerate(iter(lambda: f.readline(MAX_LINE_CHARS + 1), ""), 1):
                if len(line) > MAX_LINE_CHARS:
                    raise UserError(f"{path} line {i}: longer than {MAX_LINE_CHARS:,} characters")
                if not line.strip():
                    continue
                if suffix == ".jsonl":
                    text = jsonl_message(line, f"{path} line {i}")
                elif is_blank(line):
                    raise UserError(f"{path} line {i}: only control characters")
                else:
                    text = line.rstrip("\r\n")
                if is_blank(text):
                    raise UserError(f"{path} line {i}: empty message")
                yield text
        except UnicodeDecodeError:
            raise UserError(f"{path} is not UTF-8 text") from None


def count_messages(path: Path) -> int:
    """Validate the whole file (one line error) before any model work; returns the count."""
    if path.is_file():
        check_utf8(path)
    n = sum(1 for _ in iter_messages(path))
    if not n:
        raise UserError(f"{path} has no messages")
    return n


def check_paths(src: Path, dst: Path) -> None:
    """--output names a new or replaceable file in an existing folder, never the input."""
    if dst.is_dir():
        raise UserError(f"--output {dst} is a folder: name a file in it")
    if not dst.parent.is_dir():
        raise UserError(f"--output {dst}: no folder {dst.parent} (create it first)")
    if dst.exists() and not dst.is_file():
        raise UserError(f"--output {dst} exists and is not a file: name a file")
    for out in (dst, dst.with_name(dst.name + ".partial")):
        if out.resolve() == src.resolve() or (out.exists() and os.path.samefile(out, src)):
            raise UserError(f"--output {dst} would replace --input {src}: name another file")


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


def classify_file(model, tokenizer, threshold: float, src: Path, out: Output, record: dict,
                  total: int, chunk: int = 256):
    """Score src into the locked partial file in chunks (resuming when start() allows), then
    put it in place of the output."""
    done, messages = start(out, record, src, threshold)
    started, counts = time.perf_counter(), {"spam": 0, "ham": 0}
    out.file.seek(0, os.SEEK_END)
    while part := [m for _, m in zip(range(chunk), messages)]:
        lines = []
        for text, p in zip(part, p_spam(model, tokenizer, part)):
            label = verdict(p, threshold)
            counts[label] += 1
            lines.append(json.dumps({"text": text, "label": label, "p_spam": round(float(p), 6)},
                                    ensure_ascii=False) + "\n")
        out.file.write("".join(lines).encode("utf-8"))
        out.file.flush()
        os.fsync(out.file.fileno())
        progress(done + sum(counts.values()), total, started, done)
    print(file=sys.stderr)
    return counts


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
    out = Output(output_path)
    try:
        model, tokenizer = load_model(model_dir, adapter_path,
                                      trust_remote_code=trust_remote_code)
        record = run_record(input_path, model_dir, adapter_path, threshold)
        counts = classify_file(model, tokenizer, threshold, input_path, out, record, total)
    except BaseException:
        out.close()
        raise
    out.close(done=True)
    print(f"Classified {total} messages ({counts['spam']} spam in this run) -> {output_path}")
