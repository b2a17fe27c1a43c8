#!/usr/bin/env python
"""Scoring speed: scoring.p_spam at batch 1, 8 and 64 vs a naive generate() classifier, and the
fraction of the machine's roofline that reaches.

  ours     scoring.p_spam over the test split in file order, --batch messages per call (what a
           client sending that many at a time sees): messages/s, p50/p95 latency of a call
  naive    in a separate process, mlx_lm.load + mlx_lm.generate(prompt, max_tokens=3) per
           message, the verdict parsed from the text (what one would write with mlx-lm alone)
  roofline the measured float32 matmul FLOP/s of this machine divided by the FLOPs one message
           needs (its tokens after the shared prompt opening through every block, plus attention;
           the vocabulary projection of just the two label tokens)

    python benchmarks/score.py                      # the fused model, the whole test split
    python benchmarks/score.py --limit 256 --naive-limit 50
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import _project  # noqa: F401  (scripts/ on sys.path)
from smslora import cli
from smslora.artifacts import atomic_write_json, read_split
from smslora.errors import UserError, require_model
from smslora.paths import DATA_DIR, FUSED_DIR, REPORTS_DIR

NAIVE = r'''
import json, sys, time
from mlx_lm import generate, load
model_dir, adapters, src, limit = sys.argv[1], sys.argv[2] or None, sys.argv[3], int(sys.argv[4])
model, tokenizer = load(model_dir, adapter_path=adapters)
prompt = "Classify the following SMS message as spam or not spam.\nMessage: {text}\nClassification:"
messages = [json.loads(l)["message"] for l in open(src)][:limit]
generate(model, tokenizer, prompt.format(text="hello"), max_tokens=3)  # warm-up
verdicts, times = [], []
for m in messages:
    tic = time.perf_counter()
    text = generate(model, tokenizer, prompt.format(text=m), max_tokens=3)
    times.append(time.perf_counter() - tic)
    verdicts.append("ham" if "not" in text.lower() else "spam" if "spam" in text.lower() else "?")
print(json.dumps({"times": times, "verdicts": verdicts}))
'''


def percentile(values, q):
    return float(np.percentile(np.array(values), q)) if values else float("nan")


def matmul_flops(seconds: float = 3.0) -> float:
    """Best sustained float32 matmul rate of this process (MLP-shaped: 2048 x 576 x 1536)."""
    import mlx.core as mx

    a, w = mx.random.normal((2048, 576)), mx.random.normal((1536, 576))
    mx.eval(a, w)
    best, deadline = 0.0, time.monotonic() + seconds
    while time.monotonic() < deadline:
        tic = time.perf_counter()
        for _ in range(10):
            mx.eval(a @ w.T)
        best = max(best, 10 * 2 * 2048 * 576 * 1536 / (time.perf_counter() - tic))
    return best


def flops_per_message(model, tokenizer, messages: list[str]) -> np.ndarray:
    """FLOPs of scoring each message behind the shared prompt opening (cached once)."""
    from smslora.scoring import encode_prompt, prompt_prefix_ids

    args = model.args
    d, layers = args.hidden_size, args.num_hidden_layers
    heads, kv = args.num_attention_heads, args.num_key_value_heads
    head_dim = d // heads
    per_token = layers * 2 * (d * heads * head_dim + 2 * d * kv * head_dim + heads * head_dim * d
                              + 3 * d * args.intermediate_size)
    prefix = len(prompt_prefix_ids(tokenizer))
    out = []
    for m in messages:
        t = len(encode_prompt(tokenizer, m)) - prefix
        attention = layers * 4 * heads * head_dim * t * (prefix + (t + 1) / 2)
        out.append(per_token * t + attention + 2 * 2 * d)
    return np.array(out)


def bench_ours(model, tokenizer, messages: list[str], batch: int) -> dict:
    from smslora.scoring import p_spam

    p_spam(model, tokenizer, messages[:batch], batch_size=batch)  # warm-up
    latencies = []
    tic = time.perf_counter()
    for start in range(0, len(messages), batch):
        t0 = time.perf_counter()
        p_spam(model, tokenizer, messages[start: start + batch], batch_size=batch)
        latencies.append(time.perf_counter() - t0)
    seconds = time.perf_counter() - tic
    return {"batch": batch, "messages": len(messages), "messages_per_s": len(messages) / seconds,
            "p50_ms": 1000 * percentile(latencies, 50), "p95_ms": 1000 * percentile(latencies, 95)}


def bench_naive(model_dir: Path, adapters: Path | None, test: Path, limit: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        script = Path(tmp) / "naive.py"
        script.write_text(NAIVE)
        r = subprocess.run([sys.executable, str(script), str(model_dir), str(adapters or ""),
                            str(test), str(limit)], capture_output=True, text=True)
    if r.returncode != 0:
        raise UserError(f"the naive classifier failed: {r.stderr.strip().splitlines()[-1:]}")
    data = json.loads(r.stdout.strip().splitlines()[-1])
    times = data["times"]
    return {"messages": len(times), "messages_per_s": len(times) / sum(times),
            "p50_ms": 1000 * percentile(times, 50), "p95_ms": 1000 * percentile(times, 95),
            "unparsed": data["verdicts"].count("?")}


@cli.cli
def main(argv=None):
    from smslora.model import load_model
    from train import machine

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    cli.add_model_args(p, FUSED_DIR)
    p.add_argument("--data", type=Path, default=DATA_DIR)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8, 64])
    p.add_argument("--limit", type=int, default=0, help="first N test messages (0: all)")
    p.add_argument("--naive-limit", type=int, default=100,
                   help="messages for the naive generate() classifier")
    p.add_argument("--out", type=Path, default=REPORTS_DIR / "bench_score.json")
    args = p.parse_args(argv)
    if min(args.batches) < 1 or args.naive_limit < 1 or args.limit < 0:
        raise UserError("--batches, --naive-limit must be positive and --limit >= 0")
    require_model(args.model, args.adapter_path)
    test = args.data / "test.jsonl"
    messages = [r["message"] for r in read_split(test)]
    messages = messages[: args.limit] if args.limit else messages

    model, tokenizer = load_model(args.model, args.adapter_path,
                                  trust_remote_code=args.trust_remote_code)
    peak = matmul_flops()
    need = flops_per_message(model, tokenizer, messages)
    roofline = peak / need.mean()
    results = {"machine": machine(), "model": str(args.model),
               "adapter_path": str(args.adapter_path) if args.adapter_path else None,
               "matmul_gflops": peak / 1e9, "gflop_per_message": need.mean() / 1e9,
               "roofline_messages_per_s": roofline, "ours": []}
    print(f"matmul {peak / 1e9:.0f} GFLOP/s; {need.mean() / 1e9:.2f} GFLOP a message -> roofline "
          f"{roofline:.1f} messages/s", flush=True)
    for b in args.batches:
        r = bench_ours(model, tokenizer, messages, b)
        r["fraction_of_roofline"] = r["messages_per_s"] / roofline
        results["ours"].append(r)
        print(f"batch {b}: {r['messages_per_s']:.1f} messages/s", flush=True)
    del model
    results["naive"] = bench_naive(args.model, args.adapter_path, test, args.naive_limit)

    print(f"\n{results['machine']['cpu']}, {results['machine']['cores']} cores, MLX "
          f"{results['machine']['mlx']} ({results['machine']['device']}, BLAS "
          f"{results['machine']['blas']}); {len(messages)} test messages")
    print("| scorer | batch | messages/s | p50 ms | p95 ms | of roofline |")
    print("|---|---|---|---|---|---|")
    for r in results["ours"]:
        print(f"| ours | {r['batch']} | {r['messages_per_s']:.1f} | {r['p50_ms']:.0f} | "
              f"{r['p95_ms']:.0f} | {r['fraction_of_roofline']:.0%} |")
    n = results["naive"]
    print(f"| naive generate() | 1 | {n['messages_per_s']:.1f} | {n['p50_ms']:.0f} | "
          f"{n['p95_ms']:.0f} | {n['messages_per_s'] / roofline:.0%} |")
    for r in results["ours"]:
        r["speedup_vs_naive"] = r["messages_per_s"] / n["messages_per_s"]
    print(f"batch {results['ours'][-1]['batch']} is {results['ours'][-1]['speedup_vs_naive']:.1f}x "
          "the naive classifier")
    atomic_write_json(args.out, results)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    cli.run(main)
