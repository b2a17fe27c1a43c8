#!/usr/bin/env python
"""Step 5: the stress test -> reports/stress_<name>.json.

The 10 fixed messages plus the stress suite in data/stress_suite.jsonl (the tutorial's two
adversarial messages, its five "final boss" messages and modern smishing / hard ham written for
this project). Every miss is listed.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (first: sets up the fast BLAS before anything imports mlx)
from common import UserError  # noqa: E402


def load_suite(path: Path) -> list[dict]:
    rows = common.read_jsonl(common.require(path, "the stress suite", "git checkout data/"))
    fixed = common.read_jsonl(common.require(common.FIXED_MESSAGES, "the fixed test messages",
                                             "git checkout data/"))
    fixed = [{"id": f"fixed-{i + 1}", "category": "fixed", **r} for i, r in enumerate(fixed)]
    for r in rows + fixed:
        if r.get("label") not in common.COMPLETIONS or common.is_blank(str(r.get("text", ""))):
            raise UserError(f"{path}: entry {r.get('id', '?')} needs a text and a ham/spam label")
    return fixed + rows


def stress_test(model_dir: Path, adapter_path: Path | None, suite: list[dict],
                trust_remote_code: bool = False) -> dict:
    model, tokenizer = common.load_model(model_dir, adapter_path,
                                         trust_remote_code=trust_remote_code)
    threshold = common.read_threshold(adapter_path or model_dir)
    probs = common.p_spam(model, tokenizer, [r["text"] for r in suite])
    results = []
    for r, p in zip(suite, probs):
        verdict = "spam" if p > threshold else "ham"
        results.append({**r, "p_spam": round(float(p), 4), "verdict": verdict,
                        "correct": verdict == r["label"]})
    misses = [r for r in results if not r["correct"]]
    return {"model": str(model_dir), "adapter_path": str(adapter_path) if adapter_path else None,
            "threshold": threshold, "messages": len(results), "misses": len(misses),
            "results": results}


@common.cli
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common.add_model_args(p, common.FUSED_DIR)
    p.add_argument("--suite", type=Path, default=common.STRESS_SUITE)
    p.add_argument("--name", default=None, help="report name (default: the model folder's name)")
    p.add_argument("--out", type=Path, default=common.REPORTS_DIR)
    args = p.parse_args(argv)
    name = args.name or args.model.name
    report = stress_test(args.model, args.adapter_path, load_suite(args.suite),
                         args.trust_remote_code)
    common.atomic_write_json(args.out / f"stress_{name}.json", report)
    for r in report["results"]:
        if r["category"] in ("final-boss", "tutorial-adversarial") or not r["correct"]:
            mark = "ok  " if r["correct"] else "MISS"
            print(f"{mark} {r['id']:36s} {r['label']:4s} -> {r['verdict']:4s} "
                  f"P(spam)={r['p_spam']:.3f}  {r['text'][:60]}")
    print(f"[{name}] {report['messages'] - report['misses']}/{report['messages']} correct, "
          f"{report['misses']} misses (threshold {report['threshold']:.3f})")


if __name__ == "__main__":
    main()
