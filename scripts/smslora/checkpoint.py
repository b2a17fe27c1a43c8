"""Checkpoints: everything a resumed run needs. The data order and the dropout noise are pure
functions of (seed, step), so the adapter, the optimizer state and the loop's counters suffice."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten, tree_unflatten

from .artifacts import atomic_dir, atomic_write_json, verify_checksums, write_checksums
from .config import TrainConfig, load_config
from .errors import UserError
from .paths import ADAPTERS_DIR


def save_weights(weights: dict, path: Path):
    """Safetensors under a temporary name, renamed into place."""
    tmp = path.with_name(f".{path.stem}.tmp.safetensors")
    mx.save_safetensors(str(tmp), weights)
    tmp.replace(path)


def save_adapters(model, path: Path):
    save_weights(dict(tree_flatten(model.trainable_parameters())), path)


CHECKPOINT = "checkpoint"


def run_dir_of(adapter_path: Path) -> Path:
    """The hidden folder a run works in; it replaces adapter_path when the run is done."""
    adapter_path = Path(adapter_path)
    return adapter_path.parent / f".{adapter_path.name}.partial"


def save_checkpoint(run_dir: Path, snap: dict, cfg: TrainConfig):
    """One folder that appears whole or not at all (written aside, then renamed)."""
    with atomic_dir(run_dir / CHECKPOINT) as tmp:
        mx.save_safetensors(str(tmp / "adapters.safetensors"), snap["params"])
        mx.save_safetensors(str(tmp / "optimizer.safetensors"), snap["optimizer"])
        best = run_dir / "best_adapters.safetensors"
        if best.exists():
            shutil.copy(best, tmp / best.name)
        atomic_write_json(tmp / "state.json", {
            "step": snap["step"], "config": dataclasses.asdict(cfg), **snap["progress"]})
        write_checksums(tmp, "scripts/03_train.py")


def read_checkpoint(run_dir: Path) -> tuple[Path, dict]:
    """The checkpoint folder of an interrupted run and its state; a folder caught between the
    two renames of a swap (killed at that instant) is found under its old name."""
    for folder in (run_dir / CHECKPOINT, run_dir / f".{CHECKPOINT}.old"):
        if (folder / "state.json").is_file():
            verify_checksums(folder)
            return folder, json.loads((folder / "state.json").read_text(encoding="utf-8"))
    raise UserError(f"nothing to resume: no checkpoint in {run_dir} "
                    "(run scripts/03_train.py without --resume)")


def restore_checkpoint(folder: Path, state: dict, model, optimizer, run_dir: Path) -> dict:
    model.load_weights(str(folder / "adapters.safetensors"), strict=False)
    optimizer.state = tree_unflatten(list(mx.load(str(folder / "optimizer.safetensors")).items()))
    optimizer.init(model.trainable_parameters())  # keeps the loaded entries
    if (folder / "best_adapters.safetensors").exists():
        shutil.copy(folder / "best_adapters.safetensors", run_dir / "best_adapters.safetensors")
    return state


def resume_config(config_name: str | None, flags: dict) -> tuple[TrainConfig, tuple[Path, dict]]:
    """The settings of the interrupted run; any asked for on the command line must agree."""
    adapter_path = Path(flags.get("adapter_path", ADAPTERS_DIR))
    folder, state = read_checkpoint(run_dir_of(adapter_path))
    saved = dataclasses.replace(TrainConfig(**state["config"]), adapter_path=str(adapter_path))
    asked = dataclasses.asdict(load_config(config_name, flags)) if config_name else flags
    differ = [f"{k}={getattr(saved, k)!r} (asked: {v!r})" for k, v in asked.items()
              if k != "adapter_path" and getattr(saved, k) != v]
    if differ:
        raise UserError(f"--resume: the checkpoint was made with {', '.join(differ)}; "
                        "drop those settings, or start over without --resume")
    return saved, (folder, state)
