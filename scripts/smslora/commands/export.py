"""The command line of scripts/09_export.py."""

from __future__ import annotations

import argparse
from pathlib import Path

from .. import cli
from ..paths import ADAPTERS_DIR, FUSED_DIR

DESCRIPTION = ("Step 9: export the classifier for llama.cpp / Ollama (GGUF + Modelfile) and its "
               "LoRA adapter for Hugging Face PEFT.")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=DESCRIPTION)
    p.add_argument("--model", type=Path, default=FUSED_DIR,
                   help="model folder for --gguf: float32 or quantized, llama (SmolLM2) or "
                        "gemma3 (Gemma 3) (default: the fused classifier, "
                        "models/retrained/fused)")
    p.add_argument("--out", type=Path, required=True, help="export folder (new, or --force)")
    p.add_argument("--gguf", choices=["f16", "q8_0"], default=None,
                   help="write the model as one GGUF file of this type, with an Ollama Modelfile "
                        "(the default when --peft is not given: f16)")
    p.add_argument("--peft", action="store_true",
                   help="write the adapter (--adapter-path) in PEFT's format")
    p.add_argument("--adapter-path", type=Path, default=ADAPTERS_DIR,
                   help="adapter folder for --peft (default: models/retrained/adapters)")
    p.add_argument("--base-id", default=None,
                   help="base_model_name_or_path for --peft (default: the Hugging Face id of the "
                        "adapter's base, from its source.json)")
    p.add_argument("--force", action="store_true", help="replace --out if it is an earlier export")
    cli.add_trust_arg(p, "the model folder")
    return p


@cli.cli
def main(argv=None):
    args = build_parser().parse_args(argv)
    from ..export import step

    kind = args.gguf or (None if args.peft else "f16")
    step.run(args.model, args.out, kind, args.adapter_path if args.peft else None,
             args.base_id, args.force, args.trust_remote_code)
