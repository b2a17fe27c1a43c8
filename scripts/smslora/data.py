"""Reading labelled SMS files: the collection's TSV, a CSV or TSV with a header, JSONL, or the
Hub's copy; labels and whitespace normalised, duplicates dropped."""

from __future__ import annotations

import csv
import io
import json
import re
from pathlib import Path

from .errors import UserError
from .task import LABELS, is_blank


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
        if is_blank(text):
            raise UserError(f"{where}: empty message (only blanks or control characters)")
        key = dedupe_key(text)
        if key in seen:
            continue
        seen[key] = label
        out.append({"message": text, "label": label})
    if not out:
        raise UserError("the dataset has no messages")
    missing = sorted(set(LABELS) - {r["label"] for r in out})
    if missing:
        raise UserError(f"the dataset has no {' or '.join(missing)} messages: a classifier "
                        "needs both")
    return out
