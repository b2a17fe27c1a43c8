#!/usr/bin/env python
"""Where a backend's time goes: a batch shape met before against a new one, 4-bit against
de-quantized weights, the prompt's opening run once a batch (the CPU's way) against in every row
(the GPU's), mlx-lm's attention against plain matrix products, recomputed blocks (mx.checkpoint)
against kept activations, the whole training step compiled (SMS_LORA_COMPILE_STEP=1: as mlx-lm
does, on batches padded to a multiple of 32 positions) against operation by operation.

A GPU does a pass of this 135M model in well under a millisecond of arithmetic, so what a pass
costs there is overhead: kernels launched, kernels compiled or planned for a shape not met
before. This measures, on the current device, for each variant of the model:

  scoring   scoring.score_logits over --messages test messages twice (first: shapes new; second:
            the same shapes again; --messages 0: skipped), and warm passes of fixed shapes
            (batch x 40 positions)
  training  03_train's step (LoRA on the last 16 blocks, frozen states, completion-only loss;
            operation by operation with the update compiled, as 03_train runs it, or all of it
            compiled for the compiled-step variant) over --steps batches of the default config's
            data, then the same batches again, then one batch repeated, then the batches once
            more with each step's graph built while the one before runs (overlapped); and how
            many operations a step's graph holds

    python benchmarks/probe.py                        # every variant this device runs
    python benchmarks/probe.py --variants dequantized --steps 10
"""

from __future__ import annotations

import argparse
import io
import json
import os
import time
from pathlib import Path

import numpy as np

import _project  # noqa: F401  (scripts/ on sys.path)
from smslora import cli
from smslora.artifacts import atomic_write_json, read_jsonl
from smslora.errors import UserError, require_model
from smslora.paths import BASELINE_DIR, DATA_DIR, REPORTS_DIR

# all of them by default on a GPU; on a CPU only "dequantized" (the CPU's own path: 4-bit is slow)
VARIANTS = ["4-bit", "4-bit+opening-once", "dequantized", "4-bit+plain-attention",
            "4-bit+recompute", "4-bit+compiled-step"]


def plain_attention(queries, keys, values, cache, scale, mask, sinks=None):
    """Grouped-query attention as matrix products and MLX's softmax (no fused kernel)."""
    import mlx.core as mx

    from smslora import fastops

    return fastops.scaled_dot_product_attention(
        queries, keys, values, cache, scale, mask, sinks,
        softmax=lambda x: mx.softmax(x.astype(mx.float32), axis=-1).astype(x.dtype))


def operations(*arrays) -> int:
    """How many operations evaluating these arrays would run (their graph, mx.export_to_dot)."""
    import mlx.core as mx

    dot = io.StringIO()
    mx.export_to_dot(dot, *arrays)
    return dot.getvalue().count("shape=rectangle")


def seconds(fn) -> float:
    import mlx.core as mx

    mx.synchronize()
    tic = time.perf_counter()
    mx.eval(fn())
    mx.synchronize()
    return time.perf_counter() - tic


def probe(variant: str, args, out: dict):
    import mlx.core as mx
    import mlx.nn as nn
    import mlx.optimizers as optim
    from mlx.utils import tree_flatten
    from mlx_lm.models import llama

    from smslora import frozen as frozen_blocks
    from smslora.batches import STEP_WIDTH, batch_at, collate, make_batches, padded, tokenize
    from smslora.config import load_config
    from smslora.finetune import add_lora
    from smslora.model import load_model, on_cpu, release_memory
    from smslora.scoring import hidden_states, score_logits
    from smslora.trainer import loss_fn, training_step

    say = lambda text: print(f"[{variant}] {text}", flush=True)  # noqa: E731
    original = llama.scaled_dot_product_attention
    keep_tokens = frozen_blocks.CHECKPOINT_TOKENS_GPU
    keep_compile = os.environ.get("SMS_LORA_COMPILE_STEP")
    if "recompute" in variant:  # what a CPU does (frozen.blocks_to_recompute)
        frozen_blocks.CHECKPOINT_TOKENS_GPU = frozen_blocks.CHECKPOINT_TOKENS
    on_gpu = not on_cpu()
    try:
        tic = time.perf_counter()
        model, tokenizer = load_model(args.model, dequantize=variant == "dequantized")
        res = {"load_s": time.perf_counter() - tic}
        if "plain-attention" in variant:  # after loading (which installs fastops' on a CPU)
            llama.scaled_dot_product_attention = plain_attention
        rows = read_jsonl(args.data / "test.jsonl")[: args.messages]
        messages = [r["message"] for r in rows]
        for name in ("scoring_first_s", "scoring_again_s") if messages else ():
            tic = time.perf_counter()
            score_logits(model, tokenizer, messages)
            res[name] = time.perf_counter() - tic
            say(f"{name} {res[name]:.2f} s for {len(messages)} messages")
        for batch in (1, 8, 64):
            ids = mx.array(np.full((batch, 40), 100, dtype=np.int32))
            seconds(lambda: hidden_states(model, ids))
            res[f"pass_{batch}x40_ms"] = 1000 * min(
                seconds(lambda: hidden_states(model, ids)) for _ in range(5))
            say(f"pass {batch}x40 {res[f'pass_{batch}x40_ms']:.1f} ms")

        cfg = load_config("default", {"iters": args.steps, "num_layers": args.num_layers})
        train_rows = read_jsonl(args.data / "train_all.jsonl")
        ex = tokenize(tokenizer, train_rows, cfg.max_seq_length)
        batches = make_batches(ex, cfg.batch_size)
        order = [batch_at(s, batches, cfg.seed) for s in range(args.steps)]
        add_lora(model, cfg)
        first = len(model.layers) - cfg.num_layers
        frozen = frozen_blocks.FrozenStates(model, ex, first, {i for b in order for i in b})

        # the opening's positions run once a batch: what a CPU does (frozen.opening_shared)
        shared = (frozen.shared if "opening-once" in variant
                  else frozen_blocks.opening_shared(frozen))
        step_fn = nn.value_and_grad(model, lambda m, *b: loss_fn(
            m, *b, True, first, shared))
        (loss, _), grads = step_fn(model, *collate(ex, order[0], frozen))
        res["operations_per_step"] = operations(loss, *(g for _, g in tree_flatten(grads))) + \
            (224 if "compiled" not in variant else 0)  # + the compiled update's fused ones
        say(f"operations of a step's gradients + the update: {res['operations_per_step']}")
        opt = optim.Adam(learning_rate=1e-5)
        opt.init(model.trainable_parameters())
        compiled = "compiled-step" in variant  # else operation by operation, the update compiled
        os.environ["SMS_LORA_COMPILE_STEP"] = "1" if compiled else "0"  # trainer.training_step's
        if compiled:
            def loss(*b):
                return loss_fn(model, *b, True, first, shared)[0]

            batch = collate(ex, order[0], frozen)  # padding and compiling change no loss
            res["padded_compiled_loss_diff"] = abs(
                mx.compile(loss)(*padded(batch, STEP_WIDTH)).item() - loss(*batch).item())
            say(f"padded + compiled loss - plain loss: {res['padded_compiled_loss_diff']:.2e}")
        train_step = training_step(model, opt, step_fn)

        def step(idx):
            return model.parameters(), opt.state, train_step(*collate(ex, idx, frozen))

        for name, batches_run in (("steps_first", order), ("steps_again", order),
                                  ("steps_one_shape", [order[0]] * len(order))):
            times = [seconds(lambda: step(idx)) for idx in batches_run]
            res[f"{name}_ms"] = 1000 * float(np.median(times))
            res[f"{name}_total_s"] = float(sum(times))
            shapes = len({(len(b), max(len(ex[i][0]) for i in b)) for b in batches_run})
            say(f"{name}: median {res[f'{name}_ms']:.1f} ms, total {sum(times):.2f} s "
                f"({len(times)} steps, {shapes} shapes)")
        # the same batches again, each step's graph built while the one before runs (at most
        # one step ahead, mx.async_eval): what overlapping the two in the training loop would give
        mx.synchronize()
        tic, before = time.perf_counter(), None
        for idx in order:
            now = step(idx)
            mx.async_eval(now)
            mx.eval(before)  # the step before this one
            before = now
        mx.eval(before)
        mx.synchronize()
        res["steps_overlapped_ms"] = 1000 * (time.perf_counter() - tic) / len(order)
        say(f"steps_overlapped: mean {res['steps_overlapped_ms']:.1f} ms")
        res["peak_memory_gb"] = mx.get_peak_memory() / 1e9
        out[variant] = res
        del model, frozen, step_fn, opt
        release_memory()
        if on_gpu:
            mx.reset_peak_memory()
    finally:
        llama.scaled_dot_product_attention = original
        frozen_blocks.CHECKPOINT_TOKENS_GPU = keep_tokens
        if keep_compile is None:
            os.environ.pop("SMS_LORA_COMPILE_STEP", None)
        else:
            os.environ["SMS_LORA_COMPILE_STEP"] = keep_compile


@cli.cli
def main(argv=None):
    import mlx.core as mx

    from smslora.model import on_cpu

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, default=BASELINE_DIR)
    p.add_argument("--data", type=Path, default=DATA_DIR)
    p.add_argument("--variants", nargs="*", choices=VARIANTS, default=None,
                   help="default: all on a GPU; de-quantized only on a CPU (4-bit is slow there)")
    p.add_argument("--messages", type=int, default=256)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--num-layers", type=int, default=None, help="LoRA blocks (default: config's)")
    p.add_argument("--out", type=Path, default=REPORTS_DIR / "bench_probe.json")
    args = p.parse_args(argv)
    if args.messages < 0 or args.steps < 1:
        raise UserError("--messages must be 0 (no scoring) or more, --steps positive")
    require_model(args.model)
    variants = args.variants or (VARIANTS if not on_cpu() else ["dequantized"])
    out = {"device": str(mx.default_device()), "mlx": mx.__version__}
    print(out, flush=True)
    for variant in variants:
        probe(variant, args, out)
        atomic_write_json(args.out, out)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    cli.run(main)
