"""The training configuration: one typed dataclass, overridden in order by a YAML file
(configs/NAME.yaml) and then by command-line flags. Saved beside the adapters."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .errors import UserError
from .paths import ADAPTERS_DIR, BASELINE_DIR, CONFIGS_DIR, DATA_DIR
from .task import MAX_PROMPT_TOKENS


@dataclass
class TrainConfig:
    """Everything a run depends on; saved as adapter_config.json beside the adapters."""

    model: str = field(default=str(BASELINE_DIR), metadata={"help": "base model folder"})
    data: str = field(default=str(DATA_DIR), metadata={"help": "folder with the splits"})
    train_file: str = field(default="train.jsonl", metadata={
        "help": "training split in --data: train.jsonl (the tutorial's 800) or train_all.jsonl"})
    balance: str = field(default="none", metadata={
        "help": "none (length-bucketed batches) | label (half spam, half ham) | group (evenly "
                "from each source x label: collection/modern supplement x spam/ham)"})
    supplement_repeats: int = field(default=1, metadata={
        "help": "times each message of the modern supplement (rows with a 'source') is in the "
                "training rows: > 1 weighs today's texts more against the 2011 collection"})
    adapter_path: str = field(default=str(ADAPTERS_DIR), metadata={"help": "output folder"})
    seed: int = field(default=42, metadata={"help": "seeds init, dropout and batch order"})
    num_layers: int = field(default=16, metadata={"help": "LoRA on the last N blocks"})
    lora_rank: int = field(default=8, metadata={"help": "LoRA rank"})
    lora_scale: float = field(default=20.0, metadata={"help": "LoRA scale (mlx-lm's, not alpha)"})
    lora_dropout: float = field(default=0.0, metadata={"help": "LoRA dropout"})
    batch_size: int = field(default=4, metadata={"help": "messages per step"})
    iters: int = field(default=400, metadata={"help": "optimizer steps"})
    learning_rate: float = field(default=5e-5, metadata={"help": "peak learning rate (Adam)"})
    lr_schedule: str = field(default="constant", metadata={"help": "constant | cosine"})
    warmup: int = field(default=0, metadata={"help": "linear warm-up steps"})
    loss: str = field(default="all", metadata={"help": "all tokens (the tutorial) | completion"})
    steps_per_report: int = field(default=10, metadata={"help": "train-loss log interval"})
    steps_per_eval: int = field(default=50, metadata={"help": "validation interval"})
    val_batches: int = field(default=10, metadata={"help": "validation batches (-1: all)"})
    steps_per_save: int = field(default=150, metadata={"help": "numbered checkpoint interval"})
    early_stopping: int = field(default=0, metadata={"help": "stop after N evals without "
                                                     "improvement (0: never)"})
    ship: str = field(default="final", metadata={"help": "adapter to ship: final | best"})
    max_seq_length: int = field(default=MAX_PROMPT_TOKENS + 8,
                                metadata={"help": "longer examples are truncated"})

    def validate(self):
        checks = [
            (self.num_layers > 0, "num_layers must be positive"),
            (self.lora_rank > 0, "lora_rank must be positive"),
            (self.batch_size > 0, "batch_size must be positive"),
            (self.supplement_repeats > 0, "supplement_repeats must be positive"),
            (self.iters > 0, "iters must be positive"),
            (self.learning_rate > 0, "learning_rate must be positive"),
            (self.steps_per_eval > 0 and self.steps_per_report > 0 and self.steps_per_save > 0,
             "steps_per_* must be positive"),
            (self.lr_schedule in ("constant", "cosine"), "lr_schedule must be constant or cosine"),
            (self.loss in ("all", "completion"), "loss must be 'all' or 'completion'"),
            (self.ship in ("final", "best"), "ship must be 'final' or 'best'"),
            (self.balance in ("none", "label", "group"), "balance must be none, label or group"),
            (0 <= self.lora_dropout < 1, "lora_dropout must be in [0, 1)"),
            (self.warmup >= 0 and self.early_stopping >= 0, "warmup/early_stopping must be >= 0"),
        ]
        for ok, msg in checks:
            if not ok:
                raise UserError(f"config: {msg}")
        return self


def default_config_name(model_dir: str | Path) -> str:
    """The recipe a base model trains with when no --config is given: configs/BASE.yaml for a
    folder step 1 made from a registered base that has its own recipe (source.json's "base"),
    else configs/default.yaml (SmolLM2-135M's, and any other base's)."""
    from .bases import recorded_base

    base = recorded_base(Path(model_dir))
    if base and re.fullmatch(r"[a-z0-9][a-z0-9.-]*", base) \
            and (CONFIGS_DIR / f"{base}.yaml").is_file():
        return base
    return "default"


def load_config(name_or_path: str | None, overrides: dict) -> TrainConfig:
    """Defaults, then a YAML file (configs/NAME.yaml or a path), then command-line flags."""
    values = {}
    if name_or_path:
        path = Path(name_or_path)
        if not path.suffix:
            path = CONFIGS_DIR / f"{name_or_path}.yaml"
        if not path.is_file():
            known = ", ".join(sorted(p.stem for p in CONFIGS_DIR.glob("*.yaml")))
            raise UserError(f"config {name_or_path} not found (known: {known})")
        try:
            values = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as e:
            raise UserError(f"{path}: not valid YAML ({str(e).splitlines()[0]})")
        except UnicodeDecodeError:
            raise UserError(f"{path}: not UTF-8 text")
        if not isinstance(values, dict):
            raise UserError(f"{path}: expected a mapping of settings")
    values.update({k: v for k, v in overrides.items() if v is not None})
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise UserError(f"unknown config key(s): {', '.join(unknown)}")
    for key, value in values.items():
        want = type(getattr(TrainConfig(), key))
        if want is float and isinstance(value, int) and not isinstance(value, bool):
            values[key] = float(value)
        elif not isinstance(value, want) or isinstance(value, bool) != (want is bool):
            raise UserError(f"config key {key}: expected {want.__name__}, got {value!r}")
    return TrainConfig(**values).validate()


def adapter_config(cfg: TrainConfig) -> dict:
    """mlx-lm's adapter_config.json, plus the project's own settings."""
    return {**dataclasses.asdict(cfg), "fine_tune_type": "lora", "num_layers": cfg.num_layers,
            "lora_parameters": {"rank": cfg.lora_rank, "scale": cfg.lora_scale,
                                "dropout": cfg.lora_dropout}}


def add_config_args(parser) -> None:
    """One command-line flag per TrainConfig field (default None: "not given")."""
    import argparse

    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        if isinstance(f.default, bool):
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction,
                                default=None, help=f.metadata.get("help"))
        else:
            parser.add_argument(flag, dest=f.name, type=type(f.default), default=None,
                                help=f.metadata.get("help"))


def config_flags(args: dict) -> dict:
    """The TrainConfig fields among parsed arguments that were given."""
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    return {k: v for k, v in args.items() if k in names and v is not None}
