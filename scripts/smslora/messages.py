"""The messages of a file to classify: JSONL (a `text` field), CSV (a `text` column) or plain
text (a line each), read line by line and checked whole before any model work: a bad line stops
the run with its line number."""

from __future__ import annotations

import codecs
import csv
import json
import os
from pathlib import Path

from .errors import UserError
from .task import is_blank


MAX_LINE_CHARS = 1 << 20  # a JSONL or text line (a CSV field: csv's own 131,072)


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
