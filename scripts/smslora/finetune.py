"""Step 3, LoRA fine-tuning: from a config to a finished run folder (adapters, threshold,
history), through data preparation, the frozen-block cache and the training loop.

mlx-lm supplies the LoRA layers, the schedules and the adapter format (so `mlx_lm.load(...,
adapter_path=...)` and `mlx_lm fuse` read the result); the loop is trainer.train."""

from __future__ import annotations

import shutil
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten
from mlx_lm.tuner.utils import build_schedule, linear_to_lora_layers
from mlx_lm.utils import get_total_parameters

from . import batches as B
from .artifacts import atomic_write_json, read_split, replace_dir, write_checksums
from .checkpoint import CHECKPOINT, restore_checkpoint, run_dir_of, save_adapters
from .config import TrainConfig, adapter_config
from .distributed import Ranks, log_on_main
from .errors import UserError, require, require_model
from .frozen import (HELD_OUT_STATES, FrozenStates, cached_label_logits, frozen_prefix_supported,
                     opening_shared, release_blocks)
from .metrics import classifier_metrics, spam_labels
from .model import load_model, release_memory
from .paths import ADAPTER_CONFIG, ADAPTERS_FILE, HELD_OUT_SPLITS, THRESHOLD_FILE
from .plots import plot_history
from .scoring import p_spam, p_spam_of
from .task import is_spam
from .threshold import choose_threshold, false_alarm_weight
from .trainer import Progress, compile_whole_step, evaluate_loss, loss_fn, train, training_step


@dataclass
class Rows:
    """The messages of a run: trained on, validated on, and held out for the threshold."""

    train: list[dict]
    valid: list[dict]
    held_out: list[dict]
    held_out_files: list[str]

    @property
    def select(self) -> list[dict]:
        """The messages the threshold is chosen on: validation, then the held-out ones."""
        return list(self.valid) + list(self.held_out)


def read_rows(cfg: TrainConfig) -> Rows:
    data = Path(cfg.data)
    for split in (cfg.train_file, "valid.jsonl"):
        require(data / split, split, "scripts/02_prepare_data.py")
    train_rows = read_split(data / cfg.train_file)
    train_rows += [r for r in train_rows if "source" in r] * (cfg.supplement_repeats - 1)
    # optional, held out beside valid.jsonl for the threshold and the figures it is chosen by:
    # more collection ham (natural ratio) and modern messages (never trained on)
    files = [f for f in HELD_OUT_SPLITS if (data / f).is_file()]
    return Rows(train_rows, read_split(data / "valid.jsonl"),
                [r for f in files for r in read_split(data / f)], files)


def add_lora(model, cfg: TrainConfig) -> int:
    """LoRA layers on the last cfg.num_layers blocks (everything else frozen); their count."""
    if cfg.num_layers > len(model.layers):
        raise UserError(f"num_layers={cfg.num_layers} but the model has {len(model.layers)}")
    mx.random.seed(cfg.seed)  # LoRA's A matrices are drawn here
    model.freeze()
    linear_to_lora_layers(model, cfg.num_layers, adapter_config(cfg)["lora_parameters"])
    return sum(v.size for _, v in tree_flatten(model.trainable_parameters()))


def make_optimizer(cfg: TrainConfig) -> optim.Optimizer:
    """Adam with the configured schedule: constant or cosine decay to 10%, after a warm-up."""
    lr = cfg.learning_rate
    schedule = lr if cfg.lr_schedule == "constant" else build_schedule(
        {"name": "cosine_decay", "arguments": [lr, max(cfg.iters - cfg.warmup, 1), lr * 0.1],
         "warmup": cfg.warmup})
    if cfg.lr_schedule == "constant" and cfg.warmup:
        schedule = build_schedule({"name": "linear_schedule", "arguments": [lr, lr, 1],
                                   "warmup": cfg.warmup})
    return optim.Adam(learning_rate=schedule)


def batch_schedule(train_rows: list[dict], train_ex, cfg: TrainConfig) -> Callable[[int], list]:
    """The indices of the batch of each 0-based step: length-bucketed batches in a seeded order,
    or (balance: label | group) an equal share of each group in every batch."""
    batches = B.make_batches(train_ex, cfg.batch_size)
    if not batches:
        raise UserError(f"need at least batch_size={cfg.batch_size} training messages")
    if cfg.balance == "none":
        return lambda step: B.batch_at(step, batches, cfg.seed)
    if len({r["label"] for r in train_rows}) < 2:
        raise UserError("balance needs both spam and ham in the training split")

    def group(r):
        return ("modern" if "source" in r else "collection", r["label"]) \
            if cfg.balance == "group" else r["label"]

    groups = sorted({group(r) for r in train_rows})
    by_class = [[i for i, r in enumerate(train_rows) if group(r) == g] for g in groups]
    return lambda step: B.balanced_batch_at(step, by_class, cfg.batch_size, cfg.seed)


def shard_of(batch_of: Callable[[int], list], ranks: Ranks) -> Callable[[int], list]:
    """This rank's share of each step's global batch."""
    return lambda step: ranks.shard(batch_of(step))


def fit(model, tokenizer, rows: Rows, cfg: TrainConfig, run_dir: Path, log=print,
        resume: tuple[Path, dict] | None = None,
        ranks: Ranks | None = None) -> tuple[dict, np.ndarray | None]:
    """Train LoRA adapters into run_dir; returns the history (losses, timings, diagnosis) and
    the shipped adapter's P(spam) of each message of rows.select (the held-out ones scored only
    at the end, to choose the threshold on).

    resume: (checkpoint folder, its state) of an interrupted run, which continues from there.
    ranks: the processes of a distributed job (default: this one alone); each trains on its
    share of every batch, and only rank 0 scores the held-out messages (the others: None)."""
    ranks = ranks or Ranks()
    mx.random.seed(cfg.seed)
    completion_only = cfg.loss == "completion"
    train_ex = B.tokenize(tokenizer, rows.train, cfg.max_seq_length)
    select_ex = B.tokenize(tokenizer, rows.select, cfg.max_seq_length)
    valid_ex = select_ex[: len(rows.valid)]
    batch_of = batch_schedule(rows.train, train_ex, cfg)
    if cfg.batch_size < ranks.size:
        raise UserError(f"batch_size={cfg.batch_size} is smaller than the {ranks.size} processes")
    if ranks.size > 1:
        batch_of = shard_of(batch_of, ranks)
    if len(valid_ex) < cfg.batch_size:
        raise UserError(f"need at least batch_size={cfg.batch_size} validation messages")
    # The messages of `val_batches` batches (mlx-lm's meaning), evaluated in larger batches:
    # a token-weighted mean does not depend on how the messages are grouped.
    n_val = len(valid_ex) if cfg.val_batches < 0 else cfg.val_batches * cfg.batch_size
    picked = np.random.default_rng(cfg.seed).permutation(len(valid_ex))[:n_val].tolist()
    val_batches = B.token_batches(valid_ex, picked, B.VAL_TOKENS)
    optimizer = make_optimizer(cfg)
    train_frozen, val_frozen = freeze_lower_blocks(
        model, train_ex, select_ex if ranks.main else valid_ex, len(valid_ex), batch_of, cfg,
        run_dir, log)
    first, shared = ((train_frozen.first, opening_shared(train_frozen))
                     if train_frozen is not None else (0, 0))
    value_and_grad = nn.value_and_grad(
        model, lambda m, *b: loss_fn(m, *b, completion_only, first, shared))

    progress, done = Progress(), 0
    if resume is not None:
        folder, saved = resume
        progress, done = Progress.from_state(saved), saved["step"]
        restore_checkpoint(folder, saved, model, optimizer, run_dir)
        log(f"Resumed from the checkpoint after iteration {done}")
    else:
        optimizer.init(model.trainable_parameters())
    # after the state is what it will stay:
    step = training_step(model, optimizer, value_and_grad, ranks)
    if ranks.size > 1:  # every process ready (frozen states done) before the watchdog starts
        mx.eval(ranks.sum(mx.array(1.0)))
    last = train(model, optimizer, step,
                 lambda i: B.collate(train_ex, batch_of(i), train_frozen),
                 lambda: evaluate_loss(model, valid_ex, val_batches, completion_only, val_frozen,
                                       ranks),
                 cfg, run_dir, progress, done, log, ranks)
    progress.history["iterations_run"] = last
    if not ranks.main:
        return progress.history, None
    release_memory()  # the steps' buffers, before scoring and plotting
    save_adapters(model, run_dir / "final_adapters.safetensors")
    model.load_weights(str(run_dir / f"{cfg.ship}_adapters.safetensors"), strict=False)
    model.eval()
    if val_frozen is not None:
        if val_frozen.spilled:
            val_frozen.restore()
        probs = p_spam_of(cached_label_logits(model, tokenizer, select_ex, val_frozen))
    else:
        probs = p_spam(model, tokenizer, [r["message"] for r in rows.select])
    return progress.history, probs


def freeze_lower_blocks(model, train_ex, select_ex, n_valid: int, batch_of, cfg: TrainConfig,
                        run_dir: Path, log) -> tuple[FrozenStates | None, FrozenStates | None]:
    """The frozen blocks' output, computed once for every message the run will use (the batch
    order is known in advance); then those blocks' weights are let go. (None, None) when every
    block trains or the model's layout is not one frozen.py splits."""
    first = len(model.layers) - cfg.num_layers
    if first <= 0 or not frozen_prefix_supported(model):
        return None, None
    tic = time.perf_counter()
    visited = {i for step in range(cfg.iters) for i in batch_of(step)}
    val_frozen = FrozenStates(model, select_ex, first)
    nbytes = val_frozen.nbytes
    if len(select_ex) > n_valid:  # to disk before the training states are computed
        val_frozen.spill(n_valid, run_dir / HELD_OUT_STATES)
    train_frozen = FrozenStates(model, train_ex, first, visited)
    nbytes += train_frozen.nbytes
    release_blocks(model, first)
    log(f"Frozen blocks 0-{first - 1}: their output for {len(visited)} training and "
        f"{len(select_ex)} validation and held-out messages computed once "
        f"({nbytes / 1e6:.0f} MB, {time.perf_counter() - tic:.1f}s)")
    return train_frozen, val_frozen


def raise_interrupt(signum, frame):
    raise KeyboardInterrupt


def run(cfg: TrainConfig, reports: Path, resume: tuple[Path, dict] | None = None,
        trust_remote_code: bool = False, log=print) -> dict:
    """Step 3 whole: train, choose the threshold, and put the finished run folder in place of
    cfg.adapter_path (only when everything succeeded); the curves go to `reports`. Under
    mlx.launch every process trains its share and rank 0 alone writes and logs."""
    ranks = Ranks()
    log = log_on_main(ranks, log)
    require_model(Path(cfg.model))
    compile_whole_step()  # a bad SMS_LORA_COMPILE_STEP stops the run here, before any work
    rows = read_rows(cfg)
    model, tokenizer = load_model(Path(cfg.model), trust_remote_code=trust_remote_code)
    n_base = get_total_parameters(model)  # 4-bit weights counted unpacked, as on a CPU
    n_lora = add_lora(model, cfg)
    log(f"Trainable parameters: {100 * n_lora / n_base:.3f}% "
        f"({n_lora / 1e6:.3f}M/{n_base / 1e6:.3f}M)")
    log(f"Training: {len(rows.train)} messages, validation: {len(rows.valid)}, "
        f"{cfg.iters} iterations of {cfg.batch_size}, lr {cfg.learning_rate:g}, loss {cfg.loss}")

    out = Path(cfg.adapter_path)
    # Work in a hidden folder beside the output that survives a crash (its checkpoints and
    # best-validation copy stay inspectable) and replaces the output only when the run is done.
    run_dir = run_dir_of(out)
    if resume is None and ranks.main:
        if (run_dir / CHECKPOINT).is_dir():
            log(f"Starting over: the checkpoint of an interrupted run in {run_dir} is discarded "
                "(--resume continues it instead)")
        shutil.rmtree(run_dir, ignore_errors=True)
        run_dir.mkdir(parents=True)
    # SIGTERM (a shutdown, `kill`) is handled like Ctrl-C: a checkpoint first, then exit.
    signal.signal(signal.SIGTERM, raise_interrupt)
    tic = time.perf_counter()
    history, probs = fit(model, tokenizer, rows, cfg, run_dir, log, resume, ranks)
    history["train_seconds"] = time.perf_counter() - tic
    if not ranks.main:
        return history
    shutil.copy(run_dir / f"{cfg.ship}_adapters.safetensors",
                run_dir / ADAPTERS_FILE)  # the file mlx-lm loads
    atomic_write_json(run_dir / ADAPTER_CONFIG, adapter_config(cfg))
    chosen = write_threshold(run_dir, probs, rows, cfg, history, log)
    atomic_write_json(run_dir / "history.json", history)
    shutil.rmtree(run_dir / CHECKPOINT, ignore_errors=True)  # the run is done: nothing to resume
    write_checksums(run_dir, "scripts/03_train.py")
    replace_dir(run_dir, out)

    atomic_write_json(Path(reports) / "train_history.json", history)
    plot_history(history, Path(reports) / "loss_curve.png")
    log_threshold(chosen, log)
    log(f"Saved {cfg.ship} adapters to {out} in {history['train_seconds']:.1f}s")
    return history


def write_threshold(run_dir: Path, probs: np.ndarray, rows: Rows, cfg: TrainConfig,
                    history: dict, log) -> dict:
    """Choose the verdict threshold on the held-out messages (as if at the natural ham:spam
    ratio), write threshold.json with the held-out figures, and add both to the history."""
    chosen_on = " + ".join(["valid.jsonl", *rows.held_out_files])
    spam = spam_labels(rows.select)
    ham_weight = false_alarm_weight(Path(cfg.data), spam)
    chosen = choose_threshold(probs, spam, ham_weight)
    selection = classifier_metrics(spam, probs, chosen["threshold"])
    modern = np.array(["source" in r for r in rows.select])
    for part, which in (("collection", ~modern), ("modern", modern)):
        if which.any():
            selection[part] = classifier_metrics(spam[which], probs[which], chosen["threshold"])
    atomic_write_json(run_dir / THRESHOLD_FILE, {
        **chosen, "chosen_on": chosen_on, "ham_weight": ham_weight, "shipped": cfg.ship,
        "held_out": selection})
    flagged = is_spam(probs, chosen["threshold"])
    majority = max(np.mean(flagged), np.mean(~flagged))
    if majority > 0.95:
        history["diagnosis"].append("majority-class collapse")
        log(f"WARNING: the model gives one class to {majority:.0%} of validation messages "
            "(majority-class collapse): train longer or with a higher learning rate")
    history["threshold"] = chosen
    history["held_out"] = {"on": chosen_on, **selection}
    return {**chosen, "selection": selection, "chosen_on": chosen_on,
            "ham": int(np.sum(~spam)), "spam": int(np.sum(spam))}


def log_threshold(chosen: dict, log) -> None:
    selection = chosen["selection"]
    log(f"Threshold {chosen['threshold']:.3f} chosen on {chosen['chosen_on']} "
        f"({chosen['valid_false_positives']} false alarms of {chosen['ham']} ham, "
        f"{chosen['valid_false_negatives']} misses of {chosen['spam']} spam; accuracy "
        f"{selection['accuracy']:.2%}, spam F1 {selection['f1']:.3f}, ROC-AUC "
        f"{selection['roc_auc'] or float('nan'):.4f})")
    if "modern" in selection:
        log(f"  of them modern: {selection['modern']['wrong']['ham_flagged']} false alarms, "
            f"{selection['modern']['wrong']['spam_missed']} misses of "
            f"{selection['modern']['messages']}")
