"""What the server says about itself: the served model (/v1/model) and the page's examples.

/v1/model names folders, never their place on the server's disk, and shows the test figures
stored in the served folder itself (metrics.json, written with the fused model), so that serving
another model never shows this one's figures."""

from __future__ import annotations

import json
import logging
import os
import stat
from pathlib import Path, PurePath

from ..artifacts import read_jsonl
from ..paths import ADAPTER_CONFIG, METRICS_FILE

MAX_JSON_BYTES = 1 << 20  # a model folder's small JSON files; anything bigger is not one

log = logging.getLogger("sms_serve")


def read_small_json(path: Path):
    """The JSON in a regular file of at most MAX_JSON_BYTES, else None (a FIFO, a device, a
    huge or unreadable file: never waited for, never read whole)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size > MAX_JSON_BYTES:
            log.warning("%s is not a small regular file: ignored", Path(path).name)
            return None
        with os.fdopen(fd, "rb", closefd=False) as f:
            return json.loads(f.read(MAX_JSON_BYTES + 1))
    except (OSError, ValueError, RecursionError):
        return None
    finally:
        os.close(fd)


def without_paths(value):
    """A copy in which every absolute path (a string starting with / or ~) is its last part."""
    if isinstance(value, dict):
        return {k: without_paths(v) for k, v in value.items()}
    if isinstance(value, list):
        return [without_paths(v) for v in value]
    if isinstance(value, str) and value.startswith(("/", "~")):
        return PurePath(value).name
    return value


def stored_metrics(folder: Path) -> dict | None:
    """The test figures stored in the folder (metrics.json's "test" object), or None."""
    metrics = read_small_json(Path(folder) / METRICS_FILE)
    if not isinstance(metrics, dict) or not isinstance(metrics.get("test"), dict):
        return None
    on = metrics.get("on")
    return without_paths({**({"on": on} if isinstance(on, str) else {}), **metrics["test"]})


def model_info(model_dir: Path, adapter_path: Path | None, threshold: float) -> dict:
    """The served model: its folder's name, the base model, the adapter config (in the adapter
    folder, or carried into a fused folder), the threshold and the served folder's test
    metrics (None when it has none)."""
    model_dir = Path(model_dir)
    served = Path(adapter_path) if adapter_path is not None else model_dir
    adapter_config = read_small_json(served / ADAPTER_CONFIG)
    if not isinstance(adapter_config, dict):
        adapter_config = None
    base = (adapter_config or {}).get("model") if adapter_path is None else None
    return without_paths({
        "model": model_dir.name,
        "base_model": str(base) if base else model_dir.name,
        "adapter_path": None if adapter_path is None else Path(adapter_path).name,
        "fused": adapter_path is None and adapter_config is not None,
        "adapter_config": adapter_config,
        "threshold": threshold,
        "test_metrics": stored_metrics(served),
    })


def read_examples(path: Path) -> list[dict]:
    """The stress suite's "final boss" messages, for the page's one-click examples."""
    try:
        rows = read_jsonl(path)
    except (OSError, ValueError):
        log.warning("no examples: cannot read %s", path)
        return []
    return [{"id": r.get("id"), "text": r["text"], "label": r.get("label")}
            for r in rows if r.get("category") == "final-boss" and isinstance(r.get("text"), str)]
