"""What the server says about itself: the served model (/v1/model) and the page's examples."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from ..artifacts import read_jsonl
from ..paths import REPORTS_DIR, eval_report

EVAL_REPORT = eval_report("retrained")

log = logging.getLogger("sms_serve")


def read_json(path: Path):
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def model_info(model_dir: Path, adapter_path: Path | None, threshold: float,
               reports_dir: Path | None = REPORTS_DIR) -> dict:
    """The served model: its folder, the base model, the adapter config (in the adapter folder,
    or carried into a fused folder), the threshold and the test metrics of step 4 if present."""
    model_dir = Path(model_dir)
    config_dir = Path(adapter_path) if adapter_path is not None else model_dir
    adapter_config = read_json(config_dir / "adapter_config.json")
    if not isinstance(adapter_config, dict):
        adapter_config = None
    base = (adapter_config or {}).get("model") if adapter_path is None else None
    test_metrics = None
    if reports_dir is not None:
        report = read_json(Path(reports_dir) / EVAL_REPORT)
        if isinstance(report, dict) and isinstance(report.get("test"), dict):
            test_metrics = {"report": str(Path(reports_dir) / EVAL_REPORT), **report["test"]}
    return {
        "model": str(model_dir),
        "base_model": str(base or model_dir),
        "adapter_path": None if adapter_path is None else str(adapter_path),
        "fused": adapter_path is None and adapter_config is not None,
        "adapter_config": adapter_config,
        "threshold": threshold,
        "test_metrics": test_metrics,
    }


def read_examples(path: Path) -> list[dict]:
    """The stress suite's "final boss" messages, for the page's one-click examples."""
    try:
        rows = read_jsonl(path)
    except (OSError, ValueError):
        log.warning("no examples: cannot read %s", path)
        return []
    return [{"id": r.get("id"), "text": r["text"], "label": r.get("label")}
            for r in rows if r.get("category") == "final-boss" and isinstance(r.get("text"), str)]
