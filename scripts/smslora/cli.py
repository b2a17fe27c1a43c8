"""What the command lines share: the error wrapper, the model and threshold flags, and the
entry point that sets up the fast BLAS before mlx is imported."""

from __future__ import annotations

import sys
from pathlib import Path

from .errors import UserError, cli  # noqa: F401  (re-exported for the scripts)


def add_model_args(parser, default_model: Path, what: str = "the fused model") -> None:
    """--model and --adapter-path, as every step that loads a model takes them."""
    parser.add_argument("--model", type=Path, default=default_model,
                        help=f"model folder (default: {what})")
    parser.add_argument("--adapter-path", type=Path, default=None,
                        help="LoRA adapters on top of --model (the tutorial's 'purest' mode)")
    add_trust_arg(parser)


def add_trust_arg(parser, what: str = "a model folder") -> None:
    """--trust-remote-code: off, a folder that asks to run its own Python is refused."""
    parser.add_argument("--trust-remote-code", action="store_true",
                        help=f"allow {what} to run its own Python code (off: refused)")


def add_threshold_arg(parser) -> None:
    """--threshold, for the steps that give verdicts to users (chat, serve)."""
    parser.add_argument("--threshold", type=float, default=None,
                        help="call a message spam when P(spam) is above this (default: the "
                        "threshold chosen on the held-out sets, stored with the model)")


def run(main) -> None:
    """A script's entry point: re-execute with the fast BLAS if needed (before anything imports
    mlx, which is why scripts import the heavy modules inside main), then main() and its exit
    code."""
    from . import fastblas

    fastblas.ensure()
    sys.exit(main())
