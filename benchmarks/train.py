#!/usr/bin/env python
"""Training speed: the project's loop vs the tutorial's `mlx_lm lora` vs a plain PyTorch + PEFT loop.

All three train the seed config's job (data/train.jsonl, LoRA rank 8 / scale 20 on the last 16
blocks of the same base model, batch 4, lr 5e-5, loss over every token) for --iters iterations,
each in its own process (its peak RSS is its own), one after the other:

  ours     scripts/03_train.py --config seed
  mlx-lm   python -m mlx_lm lora ... (the tutorial's command, same MLX build, same MKL preload)
  torch    a naive loop written below: transformers' LlamaForCausalLM in float32 with PEFT LoRA,
           loss over all tokens, padded random batches (runs only when torch and peft import)

It prints seconds per iteration (steady state: the second half of the iterations), tokens/s,
setup seconds, peak RSS and the ratios, and writes reports/bench_train.json (or --out).

    python benchmarks/train.py                 # 40 iterations each
    python benchmarks/train.py --iters 20 --skip torch
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _project  # noqa: F401  (scripts/ on sys.path)
from smslora import cli, fastblas
from smslora.artifacts import atomic_write_json, read_split
from smslora.errors import UserError, require_model
from smslora.paths import BASELINE_DIR, DATA_DIR, REPORTS_DIR, ROOT

ITER_LINE = re.compile(r"Iter (\d+): Train loss ([\d.]+).*?It/sec ([\d.]+), Tokens/sec ([\d.]+)")


def run(cmd: list[str], env: dict | None = None, cwd: Path = ROOT) -> dict:
    """Run cmd to the end; its output, wall time and peak RSS (its own, via wait4)."""
    tic = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise UserError(f"{' '.join(map(str, cmd[:4]))} failed (exit {proc.returncode}): "
                        f"{out.strip().splitlines()[-1] if out.strip() else ''}")
    return {"output": out, "wall_s": time.perf_counter() - tic,
            "peak_rss_gb": usage.ru_maxrss * 1024 / 1e9}


def steady(output: str, iters: int) -> dict:
    """s/iteration and tokens/s over the report windows of the second half of the run."""
    rows = [(int(i), float(ips), float(tps)) for i, _, ips, tps in ITER_LINE.findall(output)]
    late = [r for r in rows if r[0] > iters // 2] or rows
    if not late:
        raise UserError("no 'Iter N: ... It/sec ...' lines in the output")
    ips = sum(r[1] for r in late) / len(late)
    return {"s_per_iteration": 1 / ips, "tokens_per_s": sum(r[2] for r in late) / len(late)}


def bench_ours(model: Path, data: Path, iters: int, tmp: Path, layers: int) -> dict:
    r = run([sys.executable, str(ROOT / "scripts" / "03_train.py"), "--config", "seed",
             "--num-layers", str(layers),
             "--model", str(model), "--data", str(data), "--iters", str(iters),
             "--adapter-path", str(tmp / "ours"), "--reports", str(tmp / "ours-reports"),
             "--steps-per-report", str(max(iters // 4, 1)), "--steps-per-eval", "100000",
             "--steps-per-save", "100000"])
    history = json.loads((tmp / "ours" / "history.json").read_text())
    return {**steady(r["output"], iters), "wall_s": r["wall_s"], "peak_rss_gb": r["peak_rss_gb"],
            "train_seconds": history["train_seconds"],
            "final_train_loss": history["train"][-1]["train_loss"]}


MLX_LM_LORA = r'''
# `mlx_lm lora` itself (mlx_lm.lora.main), with only its progress display swapped for lines
# that give the trainer's own It/sec and Tokens/sec figures.
import sys
from mlx_lm import lora
from mlx_lm.tuner.callbacks import TrainingCallback

class Lines(TrainingCallback):
    def on_train_loss_report(self, info):
        print(f"Iter {info['iteration']}: Train loss {info['train_loss']:.3f}, "
              f"It/sec {info['iterations_per_second']:.4f}, "
              f"Tokens/sec {info['tokens_per_second']:.3f}", flush=True)

lora.get_reporting_callbacks = lambda *args, **kwargs: Lines()
sys.argv = ["mlx_lm.lora", *sys.argv[1:]]
lora.main()
'''


def bench_mlx_lm(model: Path, data: Path, iters: int, tmp: Path, layers: int) -> dict:
    """The tutorial's command (its data are the 'text' lines of train/valid.jsonl)."""
    script = tmp / "mlx_lm_lora.py"
    script.write_text(MLX_LM_LORA)
    r = run([sys.executable, str(script), "--model", str(model), "--train",
             "--data", str(data), "--iters", str(iters), "--batch-size", "4",
             "--num-layers", str(layers), "--learning-rate", "5e-5", "--steps-per-report",
             str(max(iters // 4, 1)), "--steps-per-eval", "100000", "--val-batches", "1",
             "--save-every", "100000", "--adapter-path", str(tmp / "mlx-lm")])
    return {**steady(r["output"], iters), "wall_s": r["wall_s"], "peak_rss_gb": r["peak_rss_gb"]}


TORCH_LOOP = r'''
import json, random, sys, time
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

weights, model_dir, data, iters, lora_layers = sys.argv[1:4] + [int(a) for a in sys.argv[4:6]]
cfg = json.load(open(f"{model_dir}/config.json"))
cfg.pop("quantization", None); cfg.pop("quantization_config", None)
model = LlamaForCausalLM(LlamaConfig(**cfg))
model.load_state_dict(load_file(weights), strict=False)  # tied lm_head: not in the file
model.tie_weights()
device = "cuda" if torch.cuda.is_available() else "cpu"  # what a torch user would do
model.to(device)
layers = cfg["num_hidden_layers"]
model = get_peft_model(model, LoraConfig(
    r=8, lora_alpha=160, lora_dropout=0.0,  # mlx-lm's scale 20 = alpha / r
    target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    layers_to_transform=list(range(layers - lora_layers, layers))))
tok = AutoTokenizer.from_pretrained(model_dir)
tok.pad_token = tok.pad_token or tok.eos_token
texts = [json.loads(l)["text"] for l in open(f"{data}/train.jsonl")]
opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=5e-5)
random.seed(0)
model.train()
times, tokens = [], []
for it in range(1, iters + 1):
    batch = tok(random.sample(texts, 4), return_tensors="pt", padding=True).to(device)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    tic = time.perf_counter()
    loss = model(**batch, labels=labels).loss
    loss.backward()
    opt.step()
    opt.zero_grad()
    if device == "cuda":
        torch.cuda.synchronize()
    times.append(time.perf_counter() - tic)
    tokens.append(int(batch["attention_mask"].sum()))
    if it % max(iters // 4, 1) == 0:
        k = max(iters // 4, 1)
        print(f"Iter {it}: Train loss {loss.item():.3f}, It/sec {k / sum(times[-k:]):.3f}, "
              f"Tokens/sec {sum(tokens[-k:]) / sum(times[-k:]):.3f}", flush=True)
'''


TORCH_PYTHON = ROOT / ".venv-torch" / "bin" / "python"


def bench_torch(model: Path, data: Path, iters: int, tmp: Path, layers: int) -> dict | None:
    """In its own environment (.venv-torch, see benchmarks/requirements.txt): with torch in
    .venv, transformers would import it into every MLX process too (+250 MB of RSS)."""
    python = str(TORCH_PYTHON if TORCH_PYTHON.exists() else sys.executable)
    probe = subprocess.run([python, "-c", "import torch, peft; print(torch.__version__)"],
                           capture_output=True, text=True, env=plain_env())
    if probe.returncode != 0:
        return None
    import mlx.core as mx
    from mlx.utils import tree_flatten

    from smslora.model import load_model

    loaded, _ = load_model(model, dequantize=True)  # float32: the same numbers
    weights = tmp / "torch-weights.safetensors"
    mx.save_safetensors(str(weights), {k: v for k, v in tree_flatten(loaded.parameters())})
    del loaded
    script = tmp / "torch_loop.py"
    script.write_text(TORCH_LOOP)
    r = run([python, str(script), str(weights), str(model), str(data), str(iters), str(layers)],
            env=plain_env())
    return {**steady(r["output"], iters), "wall_s": r["wall_s"], "peak_rss_gb": r["peak_rss_gb"],
            "torch": probe.stdout.strip()}


def plain_env() -> dict:
    """torch as a user runs it: no MKL preload (it brings its own BLAS) and none of the malloc
    settings fastblas gives this project's processes."""
    ours = ("LD_PRELOAD", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")
    env = {k: v for k, v in os.environ.items() if k not in ours}
    env[fastblas.FAST_BLAS_ENV] = "0"
    return env


def machine() -> dict:
    import mlx.core as mx

    cpu = next((line.split(":", 1)[1].strip() for line in
                Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")),
               platform.processor()) if Path("/proc/cpuinfo").exists() else platform.processor()
    return {"cpu": cpu, "cores": os.cpu_count(), "device": str(mx.default_device()),
            "mlx": mx.__version__, "blas": fastblas.blas_in_use(),
            "python": platform.python_version()}


@cli.cli
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, default=BASELINE_DIR)
    p.add_argument("--data", type=Path, default=DATA_DIR)
    p.add_argument("--iters", type=int, default=40, help="iterations of ours and torch")
    p.add_argument("--mlx-lm-iters", type=int, default=8,
                   help="iterations of mlx_lm lora (slow here: its 4-bit CPU kernels)")
    p.add_argument("--num-layers", type=int, default=16, help="LoRA on the last N blocks")
    p.add_argument("--skip", nargs="*", default=[], choices=["ours", "mlx-lm", "torch"])
    p.add_argument("--out", type=Path, default=REPORTS_DIR / "bench_train.json")
    args = p.parse_args(argv)
    if args.iters < 4 or args.mlx_lm_iters < 4:
        raise UserError("--iters and --mlx-lm-iters must be at least 4")
    require_model(args.model)
    read_split(args.data / "train.jsonl")
    read_split(args.data / "valid.jsonl")
    results = {"machine": machine(), "iters": args.iters, "mlx_lm_iters": args.mlx_lm_iters}
    with tempfile.TemporaryDirectory() as tmp:
        for name, fn in (("ours", bench_ours), ("mlx-lm", bench_mlx_lm), ("torch", bench_torch)):
            if name in args.skip:
                continue
            iters = args.mlx_lm_iters if name == "mlx-lm" else args.iters
            print(f"== {name}: {iters} iterations", flush=True)
            results[name] = fn(args.model, args.data, iters, Path(tmp), args.num_layers)
            if results[name] is None:
                print("   skipped: no torch + peft (see benchmarks/requirements.txt)")
    rows = [n for n in ("ours", "mlx-lm", "torch") if results.get(n)]
    print(f"\n{results['machine']['cpu']}, {results['machine']['cores']} cores, MLX "
          f"{results['machine']['mlx']} ({results['machine']['device']}, BLAS "
          f"{results['machine']['blas']})")
    print("| loop | s/iteration | tokens/s | peak RSS GB | wall s |")
    print("|---|---|---|---|---|")
    for n in rows:
        r = results[n]
        print(f"| {n} | {r['s_per_iteration']:.3f} | {r['tokens_per_s']:.0f} | "
              f"{r['peak_rss_gb']:.2f} | {r['wall_s']:.0f} |")
    if results.get("ours"):
        for n in ("mlx-lm", "torch"):
            if results.get(n):
                ratio = results[n]["s_per_iteration"] / results["ours"]["s_per_iteration"]
                results[f"speedup_vs_{n}"] = ratio
                print(f"ours is {ratio:.2f}x faster per iteration than {n}")
    atomic_write_json(args.out, results)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    cli.run(main)
