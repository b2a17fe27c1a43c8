#!/usr/bin/env python
"""Step 3: LoRA fine-tuning -> models/retrained/adapters/.

mlx-lm supplies the LoRA layers, the schedules and the adapter format (so `mlx_lm.load(...,
adapter_path=...)` and `mlx_lm fuse` read the result); the loop itself is a plain function here
because the project needs what mlx-lm's trainer cannot give: a loss over the completion only that
projects just the label positions onto the vocabulary, a stop on NaN, early stopping and a
best-validation copy.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shutil
import signal
import sys
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (first: sets up the fast BLAS before anything imports mlx)
from common import UserError  # noqa: E402

import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402
import mlx.optimizers as optim  # noqa: E402
import numpy as np  # noqa: E402
import yaml  # noqa: E402
from mlx.utils import tree_flatten, tree_map, tree_unflatten  # noqa: E402
from mlx_lm.tuner.utils import build_schedule, linear_to_lora_layers  # noqa: E402
from mlx_lm.utils import get_total_parameters  # noqa: E402


@dataclass
class TrainConfig:
    """Everything a run depends on; saved as adapter_config.json beside the adapters."""

    model: str = field(default=str(common.BASELINE_DIR), metadata={"help": "base model folder"})
    data: str = field(default=str(common.DATA_DIR), metadata={"help": "folder with the splits"})
    train_file: str = field(default="train.jsonl", metadata={
        "help": "training split in --data: train.jsonl (the tutorial's 800) or train_all.jsonl"})
    balance: str = field(default="none", metadata={
        "help": "none (length-bucketed batches) | label (half spam, half ham) | group (evenly "
                "from each source x label: collection/modern supplement x spam/ham)"})
    supplement_repeats: int = field(default=1, metadata={
        "help": "times each message of the modern supplement (rows with a 'source') is in the "
                "training rows: > 1 weighs today's texts more against the 2011 collection"})
    adapter_path: str = field(default=str(common.ADAPTERS_DIR), metadata={"help": "output folder"})
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
    max_seq_length: int = field(default=common.MAX_PROMPT_TOKENS + 8,
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


def load_config(name_or_path: str | None, overrides: dict) -> TrainConfig:
    """Defaults, then a YAML file (configs/NAME.yaml or a path), then command-line flags."""
    values = {}
    if name_or_path:
        path = Path(name_or_path)
        if not path.suffix:
            path = common.CONFIGS_DIR / f"{name_or_path}.yaml"
        if not path.is_file():
            known = ", ".join(sorted(p.stem for p in common.CONFIGS_DIR.glob("*.yaml")))
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


def resume_config(config_name: str | None, flags: dict) -> tuple[TrainConfig, tuple[Path, dict]]:
    """The settings of the interrupted run; any asked for on the command line must agree."""
    adapter_path = Path(flags.get("adapter_path", common.ADAPTERS_DIR))
    folder, state = read_checkpoint(run_dir_of(adapter_path))
    saved = dataclasses.replace(TrainConfig(**state["config"]), adapter_path=str(adapter_path))
    asked = dataclasses.asdict(load_config(config_name, flags)) if config_name else flags
    differ = [f"{k}={getattr(saved, k)!r} (asked: {v!r})" for k, v in asked.items()
              if k != "adapter_path" and getattr(saved, k) != v]
    if differ:
        raise UserError(f"--resume: the checkpoint was made with {', '.join(differ)}; "
                        "drop those settings, or start over without --resume")
    return saved, (folder, state)


def adapter_config(cfg: TrainConfig) -> dict:
    """mlx-lm's adapter_config.json, plus the project's own settings."""
    return {**dataclasses.asdict(cfg), "fine_tune_type": "lora", "num_layers": cfg.num_layers,
            "lora_parameters": {"rank": cfg.lora_rank, "scale": cfg.lora_scale,
                                "dropout": cfg.lora_dropout}}


# ---------------------------------------------------------------------------------------------
# Data: token ids with the completion's position, in length-bucketed batches.


def tokenize(tokenizer, rows: list[dict], max_len: int) -> list[tuple[list[int], int]]:
    """(ids of prompt + completion + EOS, index where the completion starts)."""
    labels = common.label_token_ids(tokenizer)
    out = []
    for r in rows:
        prompt = common.encode_prompt(tokenizer, r["message"], max_len - 4)
        completion = labels[r["label"]] + [tokenizer.eos_token_id]
        out.append((prompt + completion, len(prompt)))
    return out


def make_batches(examples, batch_size: int) -> list[list[int]]:
    """Batches of similar length (little padding), fixed for the run like mlx-lm's."""
    order = sorted(range(len(examples)), key=lambda i: len(examples[i][0]))
    return [order[i: i + batch_size] for i in range(0, len(order) - batch_size + 1, batch_size)]


def batch_at(step: int, batches: list, seed: int) -> list[int]:
    """The batch of 0-based step `step`: a pure function of (step, seed), so a resumed or
    repeated run sees exactly the same data order."""
    epoch, pos = divmod(step, len(batches))
    return batches[np.random.default_rng([seed, epoch]).permutation(len(batches))[pos]]


def balanced_batch_at(step: int, by_class: list[list[int]], batch_size: int, seed: int) -> list[int]:
    """An equal share of each batch from each group, each group cycled in its own seeded order;
    like batch_at, a pure function of (step, seed)."""
    out = []
    for c, members in enumerate(by_class):
        k = batch_size // len(by_class) + (c < batch_size % len(by_class))
        for j in range(step * k, step * k + k):
            epoch, pos = divmod(j, len(members))
            out.append(members[np.random.default_rng([seed, c, epoch]).permutation(len(members))[pos]])
    return out


class FrozenStates:
    """What the frozen blocks below the first LoRA block output for each message, computed once.

    Those blocks (14 of SmolLM2's 30 with LoRA on the last 16) never change, so running them at
    every step and every validation is waste: the steps start from these states instead. The
    prompt's opening, the same in every message, goes through them once (a batch of one) and
    each message attends to its keys and values, as scoring does; only the messages' own states
    are kept, packed into one array (a zero row at the end for padding), computed in
    length-sorted batches in a fixed order, so a resumed run gets exactly the same numbers."""

    def __init__(self, model, examples, first: int, indices=None, budget: int = 1024):
        """States of examples[i] for i in indices (default: all of them)."""
        self.first = first
        indices = list(range(len(examples))) if indices is None else sorted(set(indices))
        self.shared = shared = shared_opening([examples[i][0][:-1] for i in indices])
        # each message's own inputs: all its tokens but the last, after the shared opening
        lengths = np.zeros(len(examples), dtype=np.int64)
        lengths[indices] = [len(examples[i][0]) - 1 - shared for i in indices]
        self.lengths = lengths
        self.offsets = np.concatenate([[0], np.cumsum(lengths)])
        self.cached = np.zeros(len(examples), dtype=bool)
        self.cached[indices] = True
        caches = [common.Opening() for _ in range(first)]
        self.opening = lower_blocks(model, mx.array([examples[indices[0]][0][:shared]]), first,
                                    caches) if shared else None
        parts = {}
        for n, idx in enumerate(token_batches(examples, indices, budget)):
            ids, _ = common.pad_batch([examples[i][0][shared:-1] for i in idx])
            h = lower_blocks(model, mx.array(ids), first,
                             [common.Opening(c.keys, c.values) for c in caches] if shared else None)
            mx.eval(h)
            for row, i in enumerate(idx):
                parts[i] = h[row, : lengths[i]]
            if n % 16 == 15:  # batches of every length fragment the heap: hand it back (~150 MB)
                common.release_memory()
        some = parts[indices[0]]
        pad = mx.zeros((1, some.shape[-1]), dtype=some.dtype)
        self.packed = mx.concatenate([parts[i] for i in indices] + [pad])
        mx.eval(self.packed, self.opening)
        del parts, h, caches
        common.release_memory()
        self.pad_row = int(self.offsets[-1])
        self.spilled = None

    @property
    def nbytes(self) -> int:
        return self.packed.nbytes

    def spill(self, keep: int, path: Path) -> None:
        """Keep the states of examples [0, keep) in memory and move the others to `path` until
        restore(): the held-out messages are scored only after the last step (~60 MB)."""
        cut = int(self.offsets[keep])
        save_weights({"states": self.packed[cut:]}, path)
        pad = self.packed[-1:]
        self.packed = mx.concatenate([self.packed[:cut], pad])  # a copy: the old buffer goes
        mx.eval(self.packed)
        self.spilled, self.pad_row = (path, cut, self.cached[keep:].copy()), cut
        self.cached[keep:] = False
        common.release_memory()

    def restore(self) -> None:
        path, cut, cached = self.spilled
        rest = mx.load(str(path))["states"]
        self.packed = mx.concatenate([self.packed[:cut], rest])
        mx.eval(self.packed)
        self.cached[len(self.cached) - len(cached):] = cached
        self.pad_row, self.spilled = int(self.offsets[-1]), None
        path.unlink()

    def gather(self, idx) -> mx.array:
        """(batch, longest, hidden) states of examples idx, right-padded with zeros."""
        assert self.cached[idx].all(), "asked for states that were not computed"
        lens = self.lengths[idx]
        index = np.full((len(idx), int(lens.max())), self.pad_row, dtype=np.int64)
        for row, (i, n) in enumerate(zip(idx, lens)):
            index[row, :n] = np.arange(self.offsets[i], self.offsets[i] + n)
        own = self.packed[mx.array(index.astype(np.int32))]
        if self.opening is None:
            return own
        opening = mx.broadcast_to(self.opening, (len(idx), *self.opening.shape[1:]))
        return mx.concatenate([opening, own], axis=1)


def shared_opening(seqs: list[list[int]]) -> int:
    """How many leading tokens every sequence has in common (the prompt's opening), leaving
    each at least one of its own."""
    shortest = min(len(s) for s in seqs)
    head = np.array([s[:shortest] for s in seqs])
    same = (head == head[0]).all(axis=0)
    return min(int(np.argmin(same)) if not same.all() else shortest, shortest - 1)


def lower_blocks(model, ids: mx.array, first: int, caches=None) -> mx.array:
    h = model.model.embed_tokens(ids)
    for i, layer in enumerate(model.model.layers[:first]):
        h = layer(h, "causal", caches[i] if caches else None)
    return h


HELD_OUT_STATES = ".held_out_states.safetensors"  # FrozenStates.spill's file in the run folder
# Positions of a batch whose activations every block keeps (~1 MB a position for the 16 blocks
# of the seed config): on a CPU, with 192, peak RSS over the whole seed run stays under 1.0 GB;
# a GPU has the memory for any batch of the configs, and recomputing costs it launches.
CHECKPOINT_TOKENS = 192
CHECKPOINT_TOKENS_GPU = 16384


def blocks_to_recompute(positions: int, blocks: int) -> int:
    """How many of `blocks` recompute their activations in the backward pass (mx.checkpoint)
    instead of keeping them, so that what is kept stays what CHECKPOINT_TOKENS positions
    through every block would keep: none for a short batch, all of them only in the limit."""
    keep = CHECKPOINT_TOKENS if common.on_cpu() else CHECKPOINT_TOKENS_GPU
    if positions <= keep:
        return 0
    return math.ceil(blocks * (1 - keep / positions))


def upper_blocks(model, h: mx.array, first: int, shared: int = 0) -> mx.array:
    """Blocks [first, end) and the final norm.

    shared: the first `shared` positions are the prompt's opening, the same in every row; they
    go through the blocks once (a batch of one) and the messages attend to their keys and
    values, instead of every row recomputing them (a third of a batch's positions).
    For a long batch the lowest blocks recompute their activations in the backward pass
    instead of keeping them (blocks_to_recompute): the few long messages would otherwise set
    the run's peak memory (~2.4 GB for 4 x 200 tokens instead of ~0.9), and recomputing only
    as many blocks as that needs costs a fraction of a forward pass, not a whole one."""
    layers = model.model.layers[first:]
    batch, width, dim = h.shape
    remat = blocks_to_recompute(batch * (width - shared), len(layers))
    if shared:
        opening = h[:1, :shared]
        caches = [common.Opening() for _ in layers]
        for layer, cache in zip(layers, caches):
            opening = layer(opening, "causal", cache)
        h = h[:, shared:]
    for i, layer in enumerate(layers):
        kv = (caches[i].keys, caches[i].values) if shared else ()
        if i < remat:
            h = checkpointed(layer, h, kv)
        else:
            h = layer(h, "causal", common.Opening(*kv) if kv else None)
    if shared:
        h = mx.concatenate([mx.broadcast_to(opening, (batch, shared, dim)), h], axis=1)
    return model.model.norm(h)


def checkpointed(layer, h: mx.array, kv=()) -> mx.array:
    def run(params, x, *kv):
        layer.update(params)
        return layer(x, "causal", common.Opening(*kv) if kv else None)

    return mx.checkpoint(run)(layer.trainable_parameters(), h, *kv)


def opening_shared(frozen: FrozenStates) -> int:
    """upper_blocks' `shared` for steps from these states: on a CPU the opening's positions,
    which the LoRA blocks then run once a batch (a third fewer positions, README "Performance");
    on a GPU 0, every row carrying its own copy: there a step costs its operations (~5 µs each
    on an H200), and the opening's own pass adds 60% to them (a step: 36 -> 70 ms). The same
    loss either way (tests/test_train.py)."""
    return frozen.shared if common.on_cpu() else 0


def frozen_prefix_supported(model) -> bool:
    """The llama family's layout (embed_tokens -> layers -> norm), which the split above follows."""
    inner = getattr(model, "model", None)
    return (getattr(getattr(model, "args", None), "model_type", None) == "llama"
            and all(hasattr(inner, a) for a in ("embed_tokens", "layers", "norm")))


def collate(examples, idx, frozen: FrozenStates | None = None):
    seqs = [examples[i][0] for i in idx]
    ids, lengths = common.pad_batch(seqs)
    starts = np.array([examples[i][1] for i in idx], dtype=np.int32)
    states = frozen.gather(np.asarray(idx)) if frozen is not None else None
    return mx.array(ids), mx.array(lengths), mx.array(starts), states


def loss_fn(model, ids, lengths, starts, states, completion_only: bool, first: int = 0,
            shared: int = 0, grad: bool = True):
    """Mean cross-entropy per predicted token: over every token (the tutorial), or over the
    completion only, where just those few positions are projected onto the vocabulary.
    states: the output of blocks [0, first) for ids[:, :-1] (FrozenStates), or None;
    shared: with states, how many leading positions every row shares (upper_blocks);
    grad=False: for measuring only (common.projected_cross_entropy)."""
    inputs, targets = ids[:, :-1], ids[:, 1:]
    if states is not None:
        h = upper_blocks(model, states, first, shared)
    else:
        h = common.hidden_states(model, inputs)
    if completion_only:
        width = int(ids.shape[1])  # label tokens + EOS <= 4 positions per message
        offs = mx.arange(4)[None, :]
        pos = mx.minimum(starts[:, None] - 1 + offs, width - 2)
        mask = (starts[:, None] - 1 + offs) < (lengths[:, None] - 1)
        h = mx.take_along_axis(h, pos[..., None], axis=1)
        targets = mx.take_along_axis(targets, pos, axis=1)
    else:
        mask = mx.arange(targets.shape[1])[None, :] < (lengths[:, None] - 1)
    ntoks = mask.sum()
    return summed_cross_entropy(model, h, targets, mask, grad) / ntoks, ntoks


def summed_cross_entropy(model, h, targets, mask, grad: bool = True):
    """Sum of the masked cross-entropy over the 49,152-word vocabulary, the output layer read in
    chunks (common.projected_cross_entropy: bounded memory for a long batch's logits)."""
    return (common.projected_cross_entropy(model, h, targets, grad=grad) * mask).sum()


VAL_TOKENS = 512  # padded positions per forward pass when measuring validation loss


def token_batches(examples, indices, budget: int) -> list[list[int]]:
    """examples[i] for i in indices, grouped by length with at most `budget` padded positions
    a batch (common.length_batches): big enough for fast matrix products, small enough to bound
    the logits' memory."""
    lengths = [len(examples[i][0]) for i in indices]
    return [[indices[j] for j in b] for b in common.length_batches(lengths, len(indices), budget)]


def evaluate_loss(model, examples, batches, completion_only, frozen=None) -> float:
    total, count = 0.0, 0
    first, shared = (frozen.first, opening_shared(frozen)) if frozen is not None else (0, 0)
    for idx in batches:
        loss, n = loss_fn(model, *collate(examples, idx, frozen), completion_only, first, shared,
                          grad=False)
        mx.eval(loss, n)
        total += loss.item() * n.item()
        count += n.item()
    return total / max(count, 1)


# ---------------------------------------------------------------------------------------------
# The loop.


def add_lora(model, cfg: TrainConfig) -> int:
    if cfg.num_layers > len(model.layers):
        raise UserError(f"num_layers={cfg.num_layers} but the model has {len(model.layers)}")
    mx.random.seed(cfg.seed)  # LoRA's A matrices are drawn here
    model.freeze()
    linear_to_lora_layers(model, cfg.num_layers, adapter_config(cfg)["lora_parameters"])
    return sum(v.size for _, v in tree_flatten(model.trainable_parameters()))


def save_weights(weights: dict, path: Path):
    """Safetensors under a temporary name, renamed into place."""
    tmp = path.with_name(f".{path.stem}.tmp.safetensors")
    mx.save_safetensors(str(tmp), weights)
    tmp.replace(path)


def save_adapters(model, path: Path):
    save_weights(dict(tree_flatten(model.trainable_parameters())), path)


# ---------------------------------------------------------------------------------------------
# Checkpoints: everything a resumed run needs. The data order and the dropout noise are pure
# functions of (seed, step), so the adapter, the optimizer state and the loop's counters suffice.

CHECKPOINT = "checkpoint"


def run_dir_of(adapter_path: Path) -> Path:
    """The hidden folder a run works in; it replaces adapter_path when the run is done."""
    adapter_path = Path(adapter_path)
    return adapter_path.parent / f".{adapter_path.name}.partial"


def save_checkpoint(run_dir: Path, snap: dict, cfg: TrainConfig):
    """One folder that appears whole or not at all (written aside, then renamed)."""
    with common.atomic_dir(run_dir / CHECKPOINT) as tmp:
        mx.save_safetensors(str(tmp / "adapters.safetensors"), snap["params"])
        mx.save_safetensors(str(tmp / "optimizer.safetensors"), snap["optimizer"])
        best = run_dir / "best_adapters.safetensors"
        if best.exists():
            shutil.copy(best, tmp / best.name)
        common.atomic_write_json(tmp / "state.json", {
            "step": snap["step"], "config": dataclasses.asdict(cfg), **snap["progress"]})
        common.write_checksums(tmp, "scripts/03_train.py")


def read_checkpoint(run_dir: Path) -> tuple[Path, dict]:
    """The checkpoint folder of an interrupted run and its state; a folder caught between the
    two renames of a swap (killed at that instant) is found under its old name."""
    for folder in (run_dir / CHECKPOINT, run_dir / f".{CHECKPOINT}.old"):
        if (folder / "state.json").is_file():
            common.verify_checksums(folder)
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


def train(model, tokenizer, train_rows, valid_rows, cfg: TrainConfig, run_dir: Path, log=print,
          resume: tuple[Path, dict] | None = None, held_out_rows=()):
    """Train LoRA adapters into run_dir; returns the history (losses, timings, diagnosis) and
    the shipped adapter's P(spam) of each validation message, then of each held_out_rows
    message (scored only at the end, to choose the threshold on).

    resume: (checkpoint folder, its state) of an interrupted run, which continues from there."""
    mx.random.seed(cfg.seed)
    completion_only = cfg.loss == "completion"
    train_ex = tokenize(tokenizer, train_rows, cfg.max_seq_length)
    select_ex = tokenize(tokenizer, list(valid_rows) + list(held_out_rows), cfg.max_seq_length)
    valid_ex = select_ex[: len(valid_rows)]
    batches = make_batches(train_ex, cfg.batch_size)
    if not batches:
        raise UserError(f"need at least batch_size={cfg.batch_size} training messages")
    def group(r):
        return ("modern" if "source" in r else "collection", r["label"]) if cfg.balance == "group" \
            else r["label"]

    groups = sorted({group(r) for r in train_rows})
    by_class = [[i for i, r in enumerate(train_rows) if group(r) == g] for g in groups]
    if cfg.balance != "none" and len({r["label"] for r in train_rows}) < 2:
        raise UserError("balance needs both spam and ham in the training split")

    def batch_of(step):
        if cfg.balance != "none":
            return balanced_batch_at(step, by_class, cfg.batch_size, cfg.seed)
        return batch_at(step, batches, cfg.seed)
    if len(valid_ex) < cfg.batch_size:
        raise UserError(f"need at least batch_size={cfg.batch_size} validation messages")
    # The messages of `val_batches` batches (mlx-lm's meaning), evaluated in larger batches:
    # a token-weighted mean does not depend on how the messages are grouped.
    n_val = len(valid_ex) if cfg.val_batches < 0 else cfg.val_batches * cfg.batch_size
    picked = np.random.default_rng(cfg.seed).permutation(len(valid_ex))[:n_val].tolist()
    val_batches = token_batches(valid_ex, picked, VAL_TOKENS)

    lr = cfg.learning_rate
    schedule = lr if cfg.lr_schedule == "constant" else build_schedule(
        {"name": "cosine_decay", "arguments": [lr, max(cfg.iters - cfg.warmup, 1), lr * 0.1],
         "warmup": cfg.warmup})
    if cfg.lr_schedule == "constant" and cfg.warmup:
        schedule = build_schedule({"name": "linear_schedule", "arguments": [lr, lr, 1],
                                   "warmup": cfg.warmup})
    optimizer = optim.Adam(learning_rate=schedule)

    # The frozen blocks' output, computed once for every message the run will use (the batch
    # order is known in advance); then those blocks' weights are let go.
    first = len(model.layers) - cfg.num_layers
    train_frozen = val_frozen = None
    if first > 0 and frozen_prefix_supported(model):
        tic = time.perf_counter()
        visited = {i for step in range(cfg.iters) for i in batch_of(step)}
        val_frozen = FrozenStates(model, select_ex, first)
        nbytes = val_frozen.nbytes
        if len(select_ex) > len(valid_ex):  # to disk before the training states are computed
            val_frozen.spill(len(valid_ex), run_dir / HELD_OUT_STATES)
        train_frozen = FrozenStates(model, train_ex, first, visited)
        nbytes += train_frozen.nbytes
        release_blocks(model, first)
        log(f"Frozen blocks 0-{first - 1}: their output for {len(visited)} training and "
            f"{len(select_ex)} validation and held-out messages computed once "
            f"({nbytes / 1e6:.0f} MB, "
            f"{time.perf_counter() - tic:.1f}s)")
    train_first, shared = ((first, opening_shared(train_frozen)) if train_frozen is not None
                           else (0, 0))
    value_and_grad = nn.value_and_grad(
        model, lambda m, *b: loss_fn(m, *b, completion_only, train_first, shared))

    progress = {"history": {"train": [], "val": [], "diagnosis": []}, "best": math.inf,
                "evals_since_best": 0, "trained_tokens": 0, "recent_losses": [], "spikes": 0}
    done = 0
    if resume is not None:
        folder, saved = resume
        progress = {k: saved[k] for k in progress}
        done = saved["step"]
        restore_checkpoint(folder, saved, model, optimizer, run_dir)
        log(f"Resumed from the checkpoint after iteration {done}")
    else:
        optimizer.init(model.trainable_parameters())
    step = training_step(model, optimizer, value_and_grad)  # after the state is what it will stay
    history = progress["history"]

    def snapshot(step):  # arrays are immutable and these flat dicts are new containers:
        return {"step": step,  # holding them is cheap, and nothing mid-step changes them
                "params": dict(tree_flatten(model.trainable_parameters())),
                "optimizer": dict(tree_flatten(optimizer.state)),
                "progress": json.loads(json.dumps(progress))}

    snap = snapshot(done)
    window_loss, window_toks, window_time, window_steps = 0.0, 0, 0.0, 0
    it = done
    try:
        for it in range(done + 1, cfg.iters + 1):
            if it == 1 or it % cfg.steps_per_eval == 0 or it == cfg.iters:
                if validate(it, model, (valid_ex, val_batches, val_frozen), completion_only,
                            progress, cfg, run_dir, log):
                    break

            tic = time.perf_counter()
            mx.random.seed(cfg.seed * 1_000_003 + it)  # dropout noise: a function of the step
            batch = collate(train_ex, batch_of(it - 1), train_frozen)
            loss, ntoks = step(*batch)
            mx.eval(model.parameters(), optimizer.state, loss, ntoks)
            loss_value = loss.item()
            check_explosion(loss_value, it, progress, model, run_dir, cfg)
            window_loss += loss_value
            window_toks += int(batch[1].sum().item())  # every input token, as mlx-lm counts
            window_time += time.perf_counter() - tic
            window_steps += 1
            if it % cfg.steps_per_report == 0 or it == cfg.iters:
                progress["trained_tokens"] += window_toks
                entry = {"iteration": it, "train_loss": window_loss / window_steps,
                         "learning_rate": float(optimizer.learning_rate),
                         "iterations_per_second": window_steps / window_time,
                         "tokens_per_second": window_toks / window_time,
                         "trained_tokens": progress["trained_tokens"],
                         "peak_memory_gb": mx.get_peak_memory() / 1e9}
                history["train"].append(entry)
                log(f"Iter {it}: Train loss {entry['train_loss']:.3f}, Learning Rate "
                    f"{entry['learning_rate']:.3e}, It/sec {entry['iterations_per_second']:.3f}, "
                    f"Tokens/sec {entry['tokens_per_second']:.3f}, Trained Tokens "
                    f"{progress['trained_tokens']}, Peak mem {entry['peak_memory_gb']:.3f} GB")
                window_loss, window_toks, window_time, window_steps = 0.0, 0, 0.0, 0
            snap = snapshot(it)
            if it % cfg.steps_per_save == 0:
                save_adapters(model, run_dir / f"{it:07d}_adapters.safetensors")
                save_checkpoint(run_dir, snap, cfg)
                log(f"Iter {it}: Saved adapter weights to {it:07d}_adapters.safetensors "
                    "and a checkpoint")
    except KeyboardInterrupt:
        save_checkpoint(run_dir, snap, cfg)
        log(f"Interrupted: checkpoint after iteration {snap['step']} saved in "
            f"{run_dir / CHECKPOINT}; continue with: python scripts/03_train.py --resume "
            f"--adapter-path {cfg.adapter_path}")
        raise

    history["iterations_run"] = it
    common.release_memory()  # the steps' buffers, before scoring and plotting
    save_adapters(model, run_dir / "final_adapters.safetensors")
    shipped = run_dir / f"{cfg.ship}_adapters.safetensors"
    model.load_weights(str(shipped), strict=False)
    model.eval()
    if val_frozen is not None:
        if val_frozen.spilled:
            val_frozen.restore()
        probs = cached_p_spam(model, tokenizer, select_ex, val_frozen)
    else:
        probs = common.p_spam(model, tokenizer, [r["message"]
                                                 for r in list(valid_rows) + list(held_out_rows)])
    return history, probs


STEP_WIDTH = 32  # a compiled step's batches are padded to a multiple of this many positions


def compile_whole_step() -> bool:
    """Whether a step is one compiled function (gradients and update, as mlx-lm does, one graph
    per padded batch width) instead of operations with only the update compiled. Off by
    default: on an H200 (session 9, README "Performance") it was slower, 102-112 ms a step
    against 76-83, and a fresh machine spent minutes compiling its kernels; on a CPU padding
    adds arithmetic. SMS_LORA_COMPILE_STEP=1 turns it on (the same adapter, tests)."""
    choice = os.environ.get("SMS_LORA_COMPILE_STEP", "")
    if choice not in ("", "0", "1"):
        raise UserError(f"SMS_LORA_COMPILE_STEP={choice!r}: use 1 (compile the whole step) or 0")
    return choice == "1"


def padded(batch, multiple: int):
    """collate()'s batch with its width rounded up to a multiple: more padding at the end of
    every row, which no real position attends to (causal) and no loss counts."""
    ids, lengths, starts, states = batch
    extra = -ids.shape[1] % multiple
    if extra:
        ids = mx.pad(ids, [(0, 0), (0, extra)])
        states = None if states is None else mx.pad(states, [(0, 0), (0, extra), (0, 0)])
    return ids, lengths, starts, states


def training_step(model, optimizer, value_and_grad):
    """step(ids, lengths, starts, states) -> (loss, tokens): the gradients, then the update."""
    if not compile_whole_step():
        update = compiled_update(model, optimizer)

        def step(*batch):
            (loss, ntoks), grads = value_and_grad(model, *batch)
            update(grads)
            return loss, ntoks

        return step
    state = [model.state, optimizer.state, mx.random.state]  # dropout noise goes through too

    @partial(mx.compile, inputs=state, outputs=state)
    def compiled(ids, lengths, starts, *states):  # no frozen states: called without them
        (loss, ntoks), grads = value_and_grad(model, ids, lengths, starts,
                                              states[0] if states else None)
        optimizer.update(model, grads)
        return loss, ntoks

    def step(*batch):
        ids, lengths, starts, states = padded(batch, STEP_WIDTH)
        return compiled(ids, lengths, starts, *([] if states is None else [states]))

    return step


def compiled_update(model, optimizer):
    """optimizer.update(model, grads) as one compiled function: each parameter's Adam update is
    one fused operation instead of about ten, ~2,000 fewer operations a step (224 LoRA matrices
    in the default config). A GPU step of 8 messages costs what its operations cost (H200: 126
    -> 80 ms with this, README "Performance"); on this CPU the update takes 5 ms instead of 16.
    The same numbers bit for bit on a CPU (tests/test_train.py)."""
    state = [model.state, optimizer.state]
    return partial(mx.compile, inputs=state, outputs=state)(
        lambda grads: optimizer.update(model, grads))


def release_blocks(model, first: int):
    """Drop the weights of blocks [0, first): their work is in FrozenStates (saves ~200 MB)."""
    for layer in model.model.layers[:first]:
        layer.update(tree_map(lambda a: mx.zeros((0,), a.dtype), layer.parameters()))
    common.release_memory()


def cached_p_spam(model, tokenizer, examples, frozen: FrozenStates) -> np.ndarray:
    """P(spam) of each example from its cached states: the last prompt position's logits of the
    two labels' first tokens, as common.p_spam computes them."""
    labels = common.label_token_ids(tokenizer)
    pair = [labels["spam"][0], labels["ham"][0]]
    out = np.zeros(len(examples))
    for idx in token_batches(examples, list(range(len(examples))), VAL_TOKENS):
        h = upper_blocks(model, frozen.gather(np.array(idx)), frozen.first, frozen.shared)
        last = mx.array([examples[i][1] - 1 for i in idx])  # the prompt's last position
        h = mx.take_along_axis(h, last[:, None, None], axis=1)[:, 0]
        logits = common.label_logits(model, h, pair).astype(mx.float32)
        out[idx] = np.array(mx.sigmoid(logits[:, 0] - logits[:, 1]))
    return out


SPIKE_FACTOR, SPIKE_STEPS, SPIKE_FLOOR = 10.0, 3, 1.0


def check_explosion(loss: float, it: int, progress: dict, model, run_dir: Path, cfg):
    """Stop on a NaN/Inf loss, or on a loss far above the running one for several steps in a
    row (one hard batch is not an explosion); the last good adapter stays on disk."""
    recent = progress["recent_losses"]
    median = float(np.median(recent)) if len(recent) >= 10 else math.inf
    spiking = math.isfinite(loss) and loss > max(SPIKE_FLOOR, SPIKE_FACTOR * median)
    progress["spikes"] = progress["spikes"] + 1 if spiking else 0
    if math.isfinite(loss) and progress["spikes"] < SPIKE_STEPS:
        progress["recent_losses"] = (recent + [loss])[-20:]
        return
    save_adapters(model, run_dir / "exploded_adapters.safetensors")
    what = (f"loss exploded to {loss}" if not math.isfinite(loss) else
            f"loss exploded: {loss:.3f}, over {SPIKE_FACTOR:g}x the running median "
            f"{median:.3f} for {SPIKE_STEPS} steps")
    raise UserError(f"{what} at iteration {it}; the last good adapter is "
                    f"{run_dir / 'best_adapters.safetensors'}. Try halving the learning rate "
                    f"(now {cfg.learning_rate:g})")


def validate(it, model, val, completion_only, progress, cfg, run_dir, log) -> bool:
    """Validation loss before iteration `it`: best copy, overfitting warning, early stop.
    Returns True when training should stop."""
    history = progress["history"]
    tic = time.perf_counter()
    model.eval()
    subset, batches, frozen = val
    val = evaluate_loss(model, subset, batches, completion_only, frozen)
    common.release_memory()  # validation's chunks are not needed by the steps: keep RSS down
    model.train()
    log(f"Iter {it}: Val loss {val:.3f}, Val took {time.perf_counter() - tic:.3f}s")
    history["val"].append({"iteration": it, "val_loss": val})
    if val < progress["best"]:
        progress["best"], progress["evals_since_best"] = val, 0
        save_adapters(model, run_dir / "best_adapters.safetensors")
        history["best"] = {"iteration": it, "val_loss": val}
    else:
        progress["evals_since_best"] += 1
    vals = [v["val_loss"] for v in history["val"]]
    if (len(vals) >= 4 and vals[-1] > vals[-2] > vals[-3] > vals[-4]
            and "overfitting" not in history["diagnosis"]):
        history["diagnosis"].append("overfitting")
        log(f"WARNING: validation loss rose for 3 evaluations in a row ({vals[-4]:.3f} -> "
            f"{vals[-1]:.3f}): overfitting. The best-validation adapter (iteration "
            f"{history['best']['iteration']}) is best_adapters.safetensors; ship: best "
            "uses it, early_stopping: N stops the run")
    if cfg.early_stopping and progress["evals_since_best"] >= cfg.early_stopping:
        log(f"Early stop at iteration {it}: validation loss has not improved for "
            f"{progress['evals_since_best']} evaluations (best {progress['best']:.3f})")
        history["diagnosis"].append("early-stopped")
        return True
    return False


HELD_OUT = ("calibration.jsonl", "valid_modern.jsonl")


def natural_ratio(data: Path) -> float:
    """Ham per spam message in the wild: the test split's ratio (stratified), as 02 recorded it;
    the collection's 4,517:642 when there is no record."""
    try:
        counts = json.loads((data / "split.json").read_text(encoding="utf-8"))["counts"]["test"]
        return counts["ham"] / counts["spam"]
    except (OSError, ValueError, KeyError, TypeError, ZeroDivisionError):
        return 4517 / 642


def choose_threshold(p_spam: np.ndarray, is_spam: np.ndarray, ham_weight: float) -> dict:
    """The P(spam) cut with the fewest held-out errors, a false alarm on ham weighted by
    ham_weight (so that the held-out set counts as if at the natural ham:spam ratio).
    Returns the midpoint of the best gap between scores, so it is not glued to one message."""
    cuts = np.unique(np.concatenate([[0.0, 1.0], p_spam]))
    mids = np.concatenate([[cuts[0] / 2], (cuts[:-1] + cuts[1:]) / 2, [(cuts[-1] + 1) / 2]])
    best = None
    for t in mids:
        flagged = p_spam > t
        fp = int(np.sum(flagged & ~is_spam))
        fn = int(np.sum(~flagged & is_spam))
        cost = ham_weight * fp + fn
        if best is None or cost < best["cost"] or (cost == best["cost"] and
                                                   abs(t - 0.5) < abs(best["threshold"] - 0.5)):
            best = {"threshold": float(t), "cost": float(cost), "valid_false_positives": fp,
                    "valid_false_negatives": fn}
    return best


def plot_history(history: dict, path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([e["iteration"] for e in history["train"]], [e["train_loss"] for e in history["train"]],
            label="train loss")
    ax.plot([e["iteration"] for e in history["val"]], [e["val_loss"] for e in history["val"]],
            "o-", label="validation loss")
    ax.set_xlabel("iteration")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)


def raise_interrupt(signum, frame):
    raise KeyboardInterrupt


@common.cli
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", help="configs/NAME.yaml or a YAML path (default: 'default')")
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        if isinstance(f.default, bool):
            p.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction,
                           default=None, help=f.metadata.get("help"))
        else:
            p.add_argument(flag, dest=f.name, type=type(f.default), default=None,
                           help=f.metadata.get("help"))
    p.add_argument("--reports", type=Path, default=common.REPORTS_DIR, help="where curves go")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="allow the model folder to run its own Python code (off: refused)")
    p.add_argument("--resume", action="store_true",
                   help="continue the interrupted run of --adapter-path from its last checkpoint "
                        "(its settings are the checkpoint's)")
    args = vars(p.parse_args(argv))
    reports = args.pop("reports")
    config_name, resume = args.pop("config"), args.pop("resume")
    trust = args.pop("trust_remote_code")
    if resume:
        cfg, checkpoint = resume_config(config_name, {k: v for k, v in args.items() if v is not None})
    else:
        cfg, checkpoint = load_config(config_name or "default", args), None
    common.require_model(Path(cfg.model))
    compile_whole_step()  # a bad SMS_LORA_COMPILE_STEP stops the run here, before any work
    data = Path(cfg.data)
    for split in (cfg.train_file, "valid.jsonl"):
        common.require(data / split, split, "scripts/02_prepare_data.py")
    train_rows = common.read_split(data / cfg.train_file)
    train_rows += [r for r in train_rows if "source" in r] * (cfg.supplement_repeats - 1)
    valid_rows = common.read_split(data / "valid.jsonl")
    # optional, held out beside valid.jsonl for the threshold and the figures it is chosen by:
    # more collection ham (natural ratio) and modern messages (never trained on)
    held_out_files = [f for f in HELD_OUT if (data / f).is_file()]
    held_out_rows = [r for f in held_out_files for r in common.read_split(data / f)]
    model, tokenizer = common.load_model(Path(cfg.model), trust_remote_code=trust)
    n_base = get_total_parameters(model)  # 4-bit weights counted unpacked, as on a CPU
    n_lora = add_lora(model, cfg)
    print(f"Trainable parameters: {100 * n_lora / n_base:.3f}% "
          f"({n_lora / 1e6:.3f}M/{n_base / 1e6:.3f}M)")
    print(f"Training: {len(train_rows)} messages, validation: {len(valid_rows)}, "
          f"{cfg.iters} iterations of {cfg.batch_size}, lr {cfg.learning_rate:g}, loss {cfg.loss}")

    out = Path(cfg.adapter_path)
    # Work in a hidden folder beside the output that survives a crash (its checkpoints and
    # best-validation copy stay inspectable) and replaces the output only when the run is done.
    run_dir = run_dir_of(out)
    if checkpoint is None:
        if (run_dir / CHECKPOINT).is_dir():
            print(f"Starting over: the checkpoint of an interrupted run in {run_dir} is discarded "
                  "(--resume continues it instead)")
        shutil.rmtree(run_dir, ignore_errors=True)
        run_dir.mkdir(parents=True)
    # SIGTERM (a shutdown, `kill`) is handled like Ctrl-C: a checkpoint first, then exit.
    signal.signal(signal.SIGTERM, raise_interrupt)
    tic = time.perf_counter()
    history, probs = train(model, tokenizer, train_rows, valid_rows, cfg, run_dir,
                           resume=checkpoint, held_out_rows=held_out_rows)
    history["train_seconds"] = time.perf_counter() - tic
    shutil.copy(run_dir / f"{cfg.ship}_adapters.safetensors",
                run_dir / "adapters.safetensors")  # the file mlx-lm loads
    common.atomic_write_json(run_dir / "adapter_config.json", adapter_config(cfg))
    select_rows = valid_rows + held_out_rows
    chosen_on = " + ".join(["valid.jsonl", *held_out_files])
    is_spam = np.array([r["label"] == "spam" for r in select_rows])
    ham_weight = natural_ratio(data) / (np.sum(~is_spam) / max(np.sum(is_spam), 1))
    chosen = choose_threshold(probs, is_spam, ham_weight)
    selection = common.classifier_metrics(is_spam, probs, chosen["threshold"])
    modern = np.array(["source" in r for r in select_rows])
    for part, rows in (("collection", ~modern), ("modern", modern)):
        if rows.any():
            selection[part] = common.classifier_metrics(is_spam[rows], probs[rows],
                                                        chosen["threshold"])
    common.atomic_write_json(run_dir / common.THRESHOLD_FILE, {
        **chosen, "chosen_on": chosen_on, "ham_weight": ham_weight, "shipped": cfg.ship,
        "held_out": selection})
    majority = max(np.mean(probs > chosen["threshold"]), np.mean(probs <= chosen["threshold"]))
    if majority > 0.95:
        history["diagnosis"].append("majority-class collapse")
        print(f"WARNING: the model gives one class to {majority:.0%} of validation messages "
              "(majority-class collapse): train longer or with a higher learning rate")
    history["threshold"] = chosen
    history["held_out"] = {"on": chosen_on, **selection}
    common.atomic_write_json(run_dir / "history.json", history)
    shutil.rmtree(run_dir / CHECKPOINT, ignore_errors=True)  # the run is done: nothing to resume
    common.write_checksums(run_dir, "scripts/03_train.py")
    common.replace_dir(run_dir, out)

    common.atomic_write_json(reports / "train_history.json", history)
    plot_history(history, reports / "loss_curve.png")
    print(f"Threshold {chosen['threshold']:.3f} chosen on {chosen_on} "
          f"({chosen['valid_false_positives']} false alarms of {np.sum(~is_spam)} ham, "
          f"{chosen['valid_false_negatives']} misses of {np.sum(is_spam)} spam; accuracy "
          f"{selection['accuracy']:.2%}, spam F1 {selection['f1']:.3f}, ROC-AUC "
          f"{selection['roc_auc'] or float('nan'):.4f})")
    if "modern" in selection:
        print(f"  of them modern: {selection['modern']['wrong']['ham_flagged']} false alarms, "
              f"{selection['modern']['wrong']['spam_missed']} misses of "
              f"{selection['modern']['messages']}")
    print(f"Saved {cfg.ship} adapters to {out} in {history['train_seconds']:.1f}s")


if __name__ == "__main__":
    main()
