"""Step 5, the stress test -> reports/stress_<name>.json: the 10 fixed messages plus the stress
suite (the tutorial's two adversarial messages, its five "final boss" messages, and modern
smishing and hard ham written for this project). Every miss is listed."""

from __future__ import annotations

from pathlib import Path

from .artifacts import atomic_write_json, read_jsonl
from .errors import UserError, require
from .model import load_model
from .paths import FIXED_MESSAGES, stress_report
from .scoring import p_spam
from .task import LABELS, is_blank, verdict
from .threshold import read_threshold


def load_suite(path: Path) -> list[dict]:
    rows = read_jsonl(require(path, "the stress suite", "git checkout data/"))
    fixed = read_jsonl(require(FIXED_MESSAGES, "the fixed test messages",
                                             "git checkout data/"))
    fixed = [{"id": f"fixed-{i + 1}", "category": "fixed", **r} for i, r in enumerate(fixed)]
    for r in rows + fixed:
        if r.get("label") not in LABELS or is_blank(str(r.get("text", ""))):
            raise UserError(f"{path}: entry {r.get('id', '?')} needs a text and a ham/spam label")
    return fixed + rows


def stress_test(model_dir: Path, adapter_path: Path | None, suite: list[dict],
                trust_remote_code: bool = False) -> dict:
    model, tokenizer = load_model(model_dir, adapter_path,
                                         trust_remote_code=trust_remote_code)
    threshold = read_threshold(adapter_path or model_dir)
    probs = p_spam(model, tokenizer, [r["text"] for r in suite])
    results = []
    for r, p in zip(suite, probs):
        label = verdict(p, threshold)
        results.append({**r, "p_spam": round(float(p), 4), "verdict": label,
                        "correct": label == r["label"]})
    misses = [r for r in results if not r["correct"]]
    return {"model": str(model_dir), "adapter_path": str(adapter_path) if adapter_path else None,
            "threshold": threshold, "messages": len(results), "misses": len(misses),
            "results": results}


def run(model_dir: Path, adapter_path: Path | None, suite: Path, name: str, out_dir: Path,
        trust_remote_code: bool = False, log=print) -> dict:
    """Step 5 whole: the suite scored, its report written, the misses and the tutorial's own
    messages listed."""
    report = stress_test(model_dir, adapter_path, load_suite(suite), trust_remote_code)
    atomic_write_json(Path(out_dir) / stress_report(name), report)
    for r in report["results"]:
        if r["category"] in ("final-boss", "tutorial-adversarial") or not r["correct"]:
            mark = "ok  " if r["correct"] else "MISS"
            log(f"{mark} {r['id']:36s} {r['label']:4s} -> {r['verdict']:4s} "
                f"P(spam)={r['p_spam']:.3f}  {r['text'][:60]}")
    log(f"[{name}] {report['messages'] - report['misses']}/{report['messages']} correct, "
        f"{report['misses']} misses (threshold {report['threshold']:.3f})")
    return report
