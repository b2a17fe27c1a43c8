"""The training loop: a plain function over ready batches, an optimizer and a validation
callback, with what the project needs beyond mlx-lm's trainer: a loss over the completion only
that projects just the label positions onto the vocabulary, a stop on NaN or a loss explosion,
numbered checkpoints, a best-validation copy and early stopping."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from .batches import STEP_WIDTH, collate, padded
from .checkpoint import CHECKPOINT, save_adapters, save_checkpoint
from .config import TrainConfig
from .distributed import Ranks, Watchdog
from .errors import UserError
from .frozen import opening_shared, upper_blocks
from .loss import projected_cross_entropy
from .model import release_memory
from .scoring import hidden_states


@dataclass
class Progress:
    """The loop's counters and history: saved in every checkpoint, restored on --resume."""

    history: dict = field(default_factory=lambda: {"train": [], "val": [], "diagnosis": []})
    best: float = math.inf
    evals_since_best: int = 0
    trained_tokens: int = 0
    recent_losses: list = field(default_factory=list)
    spikes: int = 0

    @classmethod
    def from_state(cls, state: dict) -> "Progress":
        return cls(**{f.name: state[f.name] for f in dataclasses.fields(cls)})

    def snapshot(self) -> dict:
        return json.loads(json.dumps(dataclasses.asdict(self)))  # a deep copy, as JSON saves it


def loss_fn(model, ids, lengths, starts, states, completion_only: bool, first: int = 0,
            shared: int = 0, grad: bool = True):
    """Mean cross-entropy per predicted token: over every token (the tutorial), or over the
    completion only, where just those few positions are projected onto the vocabulary.
    states: the output of blocks [0, first) for ids[:, :-1] (FrozenStates), or None;
    shared: with states, how many leading positions every row shares (upper_blocks);
    grad=False: for measuring only (projected_cross_entropy)."""
    inputs, targets = ids[:, :-1], ids[:, 1:]
    if states is not None:
        h = upper_blocks(model, states, first, shared)
    else:
        h = hidden_states(model, inputs)
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
    chunks (projected_cross_entropy: bounded memory for a long batch's logits)."""
    return (projected_cross_entropy(model, h, targets, grad=grad) * mask).sum()


def evaluate_loss(model, examples, batches, completion_only, frozen=None,
                  ranks: Ranks | None = None) -> float:
    """Mean loss per predicted token over the batches (with ranks: this rank's share of them,
    the sums combined across ranks)."""
    total, count = 0.0, 0
    first, shared = (frozen.first, opening_shared(frozen)) if frozen is not None else (0, 0)
    for idx in batches if ranks is None else ranks.shard(batches):
        loss, n = loss_fn(model, *collate(examples, idx, frozen), completion_only, first, shared,
                          grad=False)
        mx.eval(loss, n)
        total += loss.item() * n.item()
        count += n.item()
    if ranks is not None and ranks.size > 1:
        total, count = ranks.sum(mx.array([total, count], dtype=mx.float32)).tolist()
    return total / max(count, 1)


def compile_whole_step() -> bool:
    """Whether a step is one compiled function (gradients and update, as mlx-lm does, one graph
    per padded batch width) instead of operations with only the update compiled. Off by
    default: on an H200 (docs/performance.md) it was slower, 102-112 ms a step
    against 76-83, and a fresh machine spent minutes compiling its kernels; on a CPU padding
    adds arithmetic. SMS_LORA_COMPILE_STEP=1 turns it on (the same adapter, tests)."""
    choice = os.environ.get("SMS_LORA_COMPILE_STEP", "")
    if choice not in ("", "0", "1"):
        raise UserError(f"SMS_LORA_COMPILE_STEP={choice!r}: use 1 (compile the whole step) or 0")
    return choice == "1"


def training_step(model, optimizer, value_and_grad, ranks: Ranks | None = None):
    """step(ids, lengths, starts, states) -> (loss, tokens): the gradients, then the update.
    With ranks of a distributed job, the loss, tokens and gradients of the whole batch."""
    distributed = ranks is not None and ranks.size > 1
    if distributed and compile_whole_step():
        raise UserError("SMS_LORA_COMPILE_STEP=1 is for one process: unset it under mlx.launch")
    if not compile_whole_step():
        update = compiled_update(model, optimizer)

        def step(*batch):
            (loss, ntoks), grads = value_and_grad(model, *batch)
            if distributed:
                loss, ntoks, grads = ranks.combine(loss, ntoks, grads)
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
    -> 80 ms with this, docs/performance.md); on this CPU the update takes 5 ms instead of 16.
    The same numbers bit for bit on a CPU (tests/test_train.py)."""
    state = [model.state, optimizer.state]
    return partial(mx.compile, inputs=state, outputs=state)(
        lambda grads: optimizer.update(model, grads))


SPIKE_FACTOR, SPIKE_STEPS, SPIKE_FLOOR = 10.0, 3, 1.0


def check_explosion(loss: float, it: int, progress: Progress, model, run_dir: Path,
                    cfg: TrainConfig, writes: bool = True):
    """Stop on a NaN/Inf loss, or on a loss far above the running one for several steps in a
    row (one hard batch is not an explosion); the last good adapter stays on disk."""
    recent = progress.recent_losses
    median = float(np.median(recent)) if len(recent) >= 10 else math.inf
    spiking = math.isfinite(loss) and loss > max(SPIKE_FLOOR, SPIKE_FACTOR * median)
    progress.spikes = progress.spikes + 1 if spiking else 0
    if math.isfinite(loss) and progress.spikes < SPIKE_STEPS:
        progress.recent_losses = (recent + [loss])[-20:]
        return
    if writes:
        save_adapters(model, run_dir / "exploded_adapters.safetensors")
    what = (f"loss exploded to {loss}" if not math.isfinite(loss) else
            f"loss exploded: {loss:.3f}, over {SPIKE_FACTOR:g}x the running median "
            f"{median:.3f} for {SPIKE_STEPS} steps")
    raise UserError(f"{what} at iteration {it}; the last good adapter is "
                    f"{run_dir / 'best_adapters.safetensors'}. Try halving the learning rate "
                    f"(now {cfg.learning_rate:g})")


def validate(it: int, val_loss: Callable[[], float], progress: Progress, cfg: TrainConfig,
             model, run_dir: Path, log, writes: bool = True) -> bool:
    """Validation loss before iteration `it`: best copy, overfitting warning, early stop.
    Returns True when training should stop."""
    history = progress.history
    tic = time.perf_counter()
    model.eval()
    val = val_loss()
    release_memory()  # validation's chunks are not needed by the steps: keep RSS down
    model.train()
    log(f"Iter {it}: Val loss {val:.3f}, Val took {time.perf_counter() - tic:.3f}s")
    history["val"].append({"iteration": it, "val_loss": val})
    if val < progress.best:
        progress.best, progress.evals_since_best = val, 0
        if writes:
            save_adapters(model, run_dir / "best_adapters.safetensors")
        history["best"] = {"iteration": it, "val_loss": val}
    else:
        progress.evals_since_best += 1
    vals = [v["val_loss"] for v in history["val"]]
    if (len(vals) >= 4 and vals[-1] > vals[-2] > vals[-3] > vals[-4]
            and "overfitting" not in history["diagnosis"]):
        history["diagnosis"].append("overfitting")
        log(f"WARNING: validation loss rose for 3 evaluations in a row ({vals[-4]:.3f} -> "
            f"{vals[-1]:.3f}): overfitting. The best-validation adapter (iteration "
            f"{history['best']['iteration']}) is best_adapters.safetensors; ship: best "
            "uses it, early_stopping: N stops the run")
    if cfg.early_stopping and progress.evals_since_best >= cfg.early_stopping:
        log(f"Early stop at iteration {it}: validation loss has not improved for "
            f"{progress.evals_since_best} evaluations (best {progress.best:.3f})")
        history["diagnosis"].append("early-stopped")
        return True
    return False


def train(model, optimizer, step, batch_at: Callable[[int], tuple],
          val_loss: Callable[[], float], cfg: TrainConfig, run_dir: Path, progress: Progress,
          start: int = 0, log=print, ranks: Ranks | None = None) -> int:
    """Iterations start+1 .. cfg.iters: `step(*batch_at(i))` (training_step) on the batch of
    0-based step i, validation (`val_loss()`) every cfg.steps_per_eval, checkpoints into
    run_dir. Returns the last iteration run; Ctrl-C saves a checkpoint, then re-raises.
    ranks: a distributed job's (batch_at gives this rank's share); only rank 0 writes."""
    writes = ranks is None or ranks.main
    def snapshot(it):  # arrays are immutable and these flat dicts are new containers:
        return {"step": it,  # holding them is cheap, and nothing mid-step changes them
                "params": dict(tree_flatten(model.trainable_parameters())),
                "optimizer": dict(tree_flatten(optimizer.state)),
                "progress": progress.snapshot()}

    snap = snapshot(start)
    window = {"loss": 0.0, "tokens": 0, "seconds": 0.0, "steps": 0}
    it = start

    def where():
        saved = (run_dir / CHECKPOINT / "state.json").is_file()
        return (f"the last checkpoint, in {run_dir / CHECKPOINT}, is intact (--resume)" if saved
                else "no checkpoint was saved yet")

    try:
        with Watchdog(ranks or Ranks(), where) as dog:
            for it in range(start + 1, cfg.iters + 1):
                if it == 1 or it % cfg.steps_per_eval == 0 or it == cfg.iters:
                    if validate(it, val_loss, progress, cfg, model, run_dir, log, writes):
                        break
                    dog.beat()
                run_step(it, step, batch_at, model, optimizer, progress, window, cfg, run_dir,
                         log, ranks)
                dog.beat()
                snap = snapshot(it)
                if it % cfg.steps_per_save == 0 and writes:
                    save_adapters(model, run_dir / f"{it:07d}_adapters.safetensors")
                    save_checkpoint(run_dir, snap, cfg)
                    log(f"Iter {it}: Saved adapter weights to {it:07d}_adapters.safetensors "
                        "and a checkpoint")
    except RuntimeError as e:
        if ranks is None or ranks.size == 1:
            raise
        # a collective failed: a peer is gone (mlx.launch will stop this process too)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if writes:
            save_checkpoint(run_dir, snap, cfg)
        raise UserError(f"rank {ranks.rank}: the distributed job lost a process "
                        f"({str(e).splitlines()[0][:120]}); " + (
                            f"checkpoint after iteration {snap['step']} saved in "
                            f"{run_dir / CHECKPOINT}: continue with --resume" if writes else
                            "rank 0 keeps the checkpoint")) from None
    except KeyboardInterrupt:
        if not writes:
            raise
        save_checkpoint(run_dir, snap, cfg)
        if ranks is not None and ranks.size > 1:  # mlx.launch stops the job when a rank ends
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            raise UserError(f"rank 0: stopped (another process of the distributed job ended, "
                            f"or Ctrl-C); checkpoint after iteration {snap['step']} saved in "
                            f"{run_dir / CHECKPOINT}: continue with --resume") from None
        log(f"Interrupted: checkpoint after iteration {snap['step']} saved in "
            f"{run_dir / CHECKPOINT}; continue with: python scripts/03_train.py --resume "
            f"--adapter-path {cfg.adapter_path}")
        raise
    return it


def run_step(it: int, step, batch_at, model, optimizer, progress: Progress, window: dict,
             cfg: TrainConfig, run_dir: Path, log, ranks: Ranks | None) -> None:
    """One optimizer step on the batch of iteration `it`, its checks and its share of the
    train-loss line."""
    tic = time.perf_counter()
    mx.random.seed(cfg.seed * 1_000_003 + it)  # dropout noise: a function of the step
    batch = batch_at(it - 1)
    loss, ntoks = step(*batch)
    mx.eval(model.parameters(), optimizer.state, loss, ntoks)
    loss_value = loss.item()
    check_explosion(loss_value, it, progress, model, run_dir, cfg, ranks is None or ranks.main)
    tokens = batch[1].sum() if ranks is None else ranks.sum(batch[1].sum())
    window["loss"] += loss_value
    window["tokens"] += int(tokens.item())  # every input token, as mlx-lm counts
    window["seconds"] += time.perf_counter() - tic
    window["steps"] += 1
    if it % cfg.steps_per_report == 0 or it == cfg.iters:
        report_window(it, window, progress, optimizer, log)
        window.update(loss=0.0, tokens=0, seconds=0.0, steps=0)


def report_window(it: int, window: dict, progress: Progress, optimizer, log) -> None:
    """The train-loss line of the last steps_per_report steps, logged and kept in history."""
    progress.trained_tokens += window["tokens"]
    entry = {"iteration": it, "train_loss": window["loss"] / window["steps"],
             "learning_rate": float(optimizer.learning_rate),
             "iterations_per_second": window["steps"] / window["seconds"],
             "tokens_per_second": window["tokens"] / window["seconds"],
             "trained_tokens": progress.trained_tokens,
             "peak_memory_gb": mx.get_peak_memory() / 1e9}
    progress.history["train"].append(entry)
    log(f"Iter {it}: Train loss {entry['train_loss']:.3f}, Learning Rate "
        f"{entry['learning_rate']:.3e}, It/sec {entry['iterations_per_second']:.3f}, "
        f"Tokens/sec {entry['tokens_per_second']:.3f}, Trained Tokens "
        f"{progress.trained_tokens}, Peak mem {entry['peak_memory_gb']:.3f} GB")
