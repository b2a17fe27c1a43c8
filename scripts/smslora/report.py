"""The before/after report: reports/report.md and report.json, from what steps 3-6 wrote.

Reads only the JSON files in reports/ (no model is loaded), so it can be re-run at any time."""

from __future__ import annotations

import json
from pathlib import Path

from .artifacts import atomic_write_json, atomic_write_text
from .baselines import TFIDF
from .errors import UserError
from .paths import eval_report, scores_file, stress_report
from .plots import plot_scores


def load(reports: Path, name: str, step: str, required: bool = True):
    path = reports / name
    if not path.is_file():
        if required:
            raise UserError(f"{path} not found: run {step} first")
        return None
    return json.loads(path.read_text(encoding="utf-8"))


def pct(x):
    return "n/a" if x is None else f"{100 * x:.2f}%"


def num(x, fmt=".3f"):
    return "n/a" if x is None else format(x, fmt)


def build(reports: Path, timings: Path | None) -> tuple[str, dict]:
    """report.md's text and report.json's content."""
    before = load(reports, eval_report("baseline"), "scripts/04_evaluate.py --name baseline")
    after = load(reports, eval_report("retrained"), "scripts/04_evaluate.py --name retrained")
    history = load(reports, "train_history.json", "scripts/03_train.py", required=False)
    fuse = load(reports, "fuse_check.json", "scripts/06_fuse.py", required=False)
    baselines = [b for b in (load(reports, eval_report(n), "scripts/04_evaluate.py --tfidf",
                                  required=False) for n in TFIDF) if b]
    probes = [load(reports, p.name, "scripts/04_evaluate.py --probe")
              for p in sorted(reports.glob(eval_report("probe-*")))]
    stress = {n: load(reports, stress_report(n), "scripts/05_stress_test.py", required=False)
              for n in ("baseline", "fused")}
    steps = []
    if timings and timings.is_file():
        steps = [line.split("\t") for line in timings.read_text().splitlines() if "\t" in line]

    md = ["# Before / after report", ""]
    md += model_tables(reports, before, after, baselines + probes)
    for name, s in stress.items():
        if s is not None:
            md += stress_section(name, s)
    if history:
        md += training_section(history)
    if fuse:
        md += ["", "## Fuse check", "",
               f"Adapter mode vs fused mode on {fuse['messages']} test messages: max |Δlogit| "
               f"{fuse['max_abs_logit_delta']:.4f}, {fuse['verdicts_differ']} verdicts differ "
               f"({'passed' if fuse['passed'] else 'FAILED'})."]
    if steps:
        md += ["", "## Wall time per step", "", "| step | seconds |", "|---|---|"]
        md += [f"| {n} | {s} |" for n, s in steps]
        md.append(f"| total | {sum(float(s) for _, s in steps):.1f} |")
    data = {"baseline": before, "retrained": after, "tfidf": baselines, "probes": probes,
            "stress": {
        n: (None if s is None else {k: v for k, v in s.items() if k != "results"})
        for n, s in stress.items()}, "fuse_check": fuse, "timings": dict(steps)}
    return "\n".join(md) + "\n", data


def model_tables(reports: Path, before: dict, after: dict, baselines: list[dict]) -> list[str]:
    """The tutorial's language-model table, then the classifier table and its plots."""
    md = ["## Language-model view (the tutorial's table, 10 fixed messages)", "",
          "| model | eval loss | perplexity | token accuracy |", "|---|---|---|---|"]
    for r in (before, after):
        lm = r["fixed_messages"]
        md.append(f"| {r['name']} | {lm['loss']:.3f} | {lm['perplexity']:.2f} | "
                  f"{pct(lm['token_accuracy'])} |")
    md += ["", f"## Classifier view (held-out test split, {after['test']['messages']} messages "
           "at the natural ratio)", "",
           "| model | threshold | accuracy | precision | recall | spam F1 | ROC-AUC | ham FPR | "
           "ham flagged | spam missed |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in (before, *baselines, after):
        t = r["test"]
        md.append(f"| {r['name']} | {t['threshold']:.3f} | {pct(t['accuracy'])} | "
                  f"{num(t['precision'])} | {num(t['recall'])} | {num(t['f1'])} | "
                  f"{num(t['roc_auc'], '.4f')} | {pct(t['ham_false_positive_rate'])} | "
                  f"{t['wrong']['ham_flagged']} | {t['wrong']['spam_missed']} |")
    if baselines:
        md += ["", "Baselines (TF-IDF filters; frozen-feature probes: logistic regression on a "
               "base model's final hidden state): trained on the same rows as the LoRA model "
               f"(`{baselines[0]['train_file']}`); stress-suite misses: " + ", ".join(
                   f"{b['name']} {b['stress_misses']}/{b['stress_messages']}" for b in baselines)
               + "."]
    if (reports / scores_file(after["name"])).is_file():
        for png in plot_scores(reports, after["name"], after["test"]["threshold"]):
            md += ["", f"![ROC, confusion matrix and P(spam) histogram]({png})"]
    c = after["test"]["confusion"]
    return md + ["", "Confusion matrix of the retrained model (rows: truth, columns: verdict):",
                 "", "| | spam | ham |", "|---|---|---|", f"| spam | {c['tp']} | {c['fn']} |",
                 f"| ham | {c['fp']} | {c['tn']} |"]


def stress_section(name: str, s: dict) -> list[str]:
    md = ["", f"## Stress test: {name} ({s['messages'] - s['misses']}/{s['messages']} "
          "correct)", "", "| id | truth | verdict | P(spam) | |", "|---|---|---|---|---|"]
    for r in s["results"]:
        if r["category"] in ("final-boss", "tutorial-adversarial") or not r["correct"]:
            md.append(f"| {r['id']} | {r['label']} | {r['verdict']} | {r['p_spam']:.3f} | "
                      f"{'ok' if r['correct'] else '**MISS**'} |")
    return md


def training_section(history: dict) -> list[str]:
    best = history.get("best", {})
    md = ["", "## Training", "",
          f"{history['iterations_run']} iterations in {history['train_seconds']:.0f} s; "
          f"best validation loss {best.get('val_loss', float('nan')):.3f} at iteration "
          f"{best.get('iteration')}."]
    held = history.get("held_out")
    if held:
        line = (f"Threshold {history['threshold']['threshold']:.3f} chosen on {held['on']} "
                f"({held['messages']} held-out messages, never trained on): accuracy "
                f"{pct(held['accuracy'])}, spam F1 {num(held['f1'])}, ROC-AUC "
                f"{num(held['roc_auc'], '.4f')}, {held['wrong']['ham_flagged']} ham flagged, "
                f"{held['wrong']['spam_missed']} spam missed")
        if "modern" in held:
            m = held["modern"]
            line += (f"; of the {m['messages']} modern ones {m['wrong']['ham_flagged']} ham "
                     f"flagged, {m['wrong']['spam_missed']} spam missed")
        md += ["", line + "."]
    md += ["", "![loss curve](loss_curve.png)", "", "## Diagnosis", ""]
    found = set(history["diagnosis"])
    for key, what in (("loss explosion", "loss explosion (NaN/Inf)"),
                      ("overfitting", "overfitting (validation loss rising)"),
                      ("majority-class collapse", "majority-class collapse")):
        md.append(f"- 🔴 **{what}: yes**" if key in found else f"- ✅ {what}: no")
    if "early-stopped" in found:
        md.append("- early stopping ended the run")
    return md


def run(reports: Path, timings: Path | None = None, log=print) -> str:
    """Write report.md and report.json into `reports` and show the markdown."""
    md, data = build(Path(reports), timings)
    atomic_write_text(Path(reports) / "report.md", md)
    atomic_write_json(Path(reports) / "report.json", data)
    log(md)
    return md
