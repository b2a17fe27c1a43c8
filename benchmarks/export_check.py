#!/usr/bin/env python
"""Step 9's exports checked by their real consumers on a real model: llama.cpp (through
llama-cpp-python, in .venv-llama) on the GGUF files, transformers + PEFT (in .venv-torch) on the
PEFT adapter, each against MLX on the whole test split: token ids, max |ΔP(spam)|, verdicts
(every disagreement listed with both P(spam)), and messages per second beside MLX's.

    python benchmarks/export_check.py --setup llama      # build .venv-llama (compiles llama.cpp)
    python benchmarks/export_check.py --setup torch      # build .venv-torch (CPU torch + peft)
    python benchmarks/export_check.py                     # the fused model, f16 and q8_0, PEFT
    python benchmarks/export_check.py --model models/baseline --limit 200 --skip peft

Without a fused model (step 6) pass --model models/baseline: the base's own P(spam) is then
compared. Without trained adapters the PEFT check uses a random adapter on the base (say so).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import tempfile
import time
from pathlib import Path

import _project  # noqa: F401  (scripts/ on sys.path)
from smslora import cli
from smslora.errors import UserError
from smslora.paths import (
    ADAPTERS_DIR,
    BASELINE_DIR,
    DATA_DIR,
    FUSED_DIR,
    REPORTS_DIR,
    ROOT,
)

LLAMA_CPP_PYTHON = "llama-cpp-python==0.3.36"  # compiles llama.cpp at install
TORCH = "torch==2.13.0"  # a CPU wheel on this machine's disk; PyPI's default pulls CUDA


def setup(which: str) -> float:
    """Create the consumer's virtual environment from the registries; the seconds it took."""
    venv = ROOT / (".venv-llama" if which == "llama" else ".venv-torch")
    start = time.perf_counter()
    if not (venv / "bin" / "python").is_file():
        subprocess.run(["python3", "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet"]
    if which == "llama":
        env = {**os.environ, "CMAKE_BUILD_PARALLEL_LEVEL": str(os.cpu_count() or 2)}
        subprocess.run([*pip, LLAMA_CPP_PYTHON], check=True, env=env)
    else:
        subprocess.run([*pip, TORCH], check=True)
        subprocess.run([*pip, "-r", str(ROOT / "benchmarks" / "requirements.txt")], check=True)
    seconds = time.perf_counter() - start
    print(f"{venv.name} ready in {seconds:.0f} s")
    return seconds


def gguf_rows(model: Path, messages: list[str], kinds: list[str], threshold: float, python,
              tmp: Path, threads: int | None) -> list[dict]:
    from smslora.export import check, step

    rows = []
    for kind in kinds:
        out = tmp / f"gguf-{kind}"
        step.run(model, out, kind, log=lambda *a: None)
        r = check.check_gguf(out / step.gguf_file(kind), model, messages, threshold, python,
                             threads)
        r.update(type=kind, bytes=(out / step.gguf_file(kind)).stat().st_size)
        rows.append(r)
        print(f"| llama.cpp {kind} | {r['bytes'] / 1e6:.0f} MB | {r['token_ids_identical']}/"
              f"{len(messages)} | {r['max_abs_dp']:.5f} | {r['mean_abs_dp']:.6f} | "
              f"{r['verdicts_differ']} | {r['llama_msg_per_s']:.1f} | {r['mlx_msg_per_s']:.1f} |",
              flush=True)
    return rows


def peft_row(base: Path, adapters: Path | None, messages: list[str], threshold: float, python,
             tmp: Path) -> dict:
    from smslora.export import check, peft, step

    random = adapters is None or not (adapters / "adapters.safetensors").is_file()
    if random:
        adapters = check.random_adapter(base, tmp / "random-adapter", num_layers=16, b_std=0.005)
    out = tmp / "peft"
    step.run(base, out, None, adapters, base_id=peft.hf_id(base) or "local-base",
             log=lambda *a: None)
    hf_base = check.write_hf_base(base, tmp / "hf-base")
    r = check.check_peft(out, hf_base, base, adapters, messages, threshold, python)
    r.update(adapter=str(adapters), random_adapter=random)
    print(f"| transformers + PEFT{' (random adapter)' if random else ''} | - | - | "
          f"{r['max_abs_dp']:.5f} | {r['mean_abs_dp']:.6f} | {r['verdicts_differ']} | - | - |")
    return r


@cli.cli
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--setup", choices=["llama", "torch"], default=None,
                   help="only build that consumer's virtual environment (timed)")
    p.add_argument("--model", type=Path, default=FUSED_DIR, help="model for the GGUF checks")
    p.add_argument("--base", type=Path, default=BASELINE_DIR, help="base for the PEFT check")
    p.add_argument("--adapter-path", type=Path, default=ADAPTERS_DIR)
    p.add_argument("--data", type=Path, default=DATA_DIR)
    p.add_argument("--limit", type=int, default=0, help="first N test messages (0: all)")
    p.add_argument("--peft-limit", type=int, default=200,
                   help="messages for the PEFT check (PyTorch scores one at a time; 0: all)")
    p.add_argument("--types", nargs="+", default=["f16", "q8_0"], choices=["f16", "q8_0"])
    p.add_argument("--threads", type=int, default=None,
                   help="llama.cpp's threads (default: every core)")
    p.add_argument("--skip", nargs="*", default=[], choices=["gguf", "peft"])
    p.add_argument("--out", type=Path, default=REPORTS_DIR / "export_check.json")
    args = p.parse_args(argv)
    if args.setup:
        setup(args.setup)
        return 0
    return run_checks(args)


def run_checks(args) -> int:
    from smslora.artifacts import atomic_write_json, read_split
    from smslora.export import check
    from smslora.threshold import read_threshold

    messages = [r["message"] for r in read_split(args.data / "test.jsonl")]
    messages = messages[: args.limit] if args.limit else messages
    results = {"messages": len(messages), "cores": os.cpu_count(),
               "llama_threads": args.threads or os.cpu_count(),
               "load_average_at_start": os.getloadavg()[0]}
    print("| consumer | file | token ids identical | max abs dP | mean abs dP | verdicts differ "
          "| msg/s | MLX msg/s |\n|---|---|---|---|---|---|---|---|", flush=True)
    with tempfile.TemporaryDirectory(prefix="export-check-") as tmp:
        if "gguf" not in args.skip:
            python = need(check.LLAMA_VENV, "llama_cpp", "llama")
            results.update(model=str(args.model), gguf=gguf_rows(
                args.model, messages, args.types, read_threshold(args.model), python, Path(tmp),
                args.threads))
        if "peft" not in args.skip:
            python = need(check.TORCH_VENV, "peft", "torch")
            some = messages[: args.peft_limit] if args.peft_limit else messages
            results["peft"] = peft_row(args.base, args.adapter_path, some,
                                       read_threshold(args.adapter_path), python, Path(tmp))
    for part in [*results.get("gguf", []), results.get("peft") or {}]:
        for d in part.get("disagreements", []):
            print(f"  {part.get('type', 'peft')}: message {d['index']}: P(spam) MLX "
                  f"{d['p_spam_mlx']:.4f}, other {d['p_spam_other']:.4f}")
    atomic_write_json(args.out, results)
    print(f"wrote {args.out}")
    return 0


def need(venv: Path, module: str, which: str):
    from smslora.export import check

    python = check.consumer_python(venv, module)
    if python is None:
        raise UserError(f"no {module} in {venv}: python benchmarks/export_check.py --setup {which}")
    return python


if __name__ == "__main__":
    cli.run(main)
