"""Puts the project's scripts/ folder on sys.path, so that the benchmarks import the smslora
package. Nothing else: importing it is cheap and loads no mlx (each benchmark's entry point,
smslora.cli.run, sets up the fast BLAS first)."""

import sys
from pathlib import Path

SCRIPTS = str(Path(__file__).resolve().parent.parent / "scripts")
if SCRIPTS not in sys.path:
    sys.path.insert(0, SCRIPTS)
