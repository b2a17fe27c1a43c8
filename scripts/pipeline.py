#!/usr/bin/env python
"""Steps 01-06 and the report, in order, in one Python process: what `./runme.sh` runs.

Each step is the numbered script's own main() called with the arguments a user would type, so
every artifact is the one `python scripts/NN_....py ARGS` writes (a test compares the two). One
process instead of nine saves each step's start: importing MLX, mlx-lm and their dependencies,
and on a GPU creating the device context and loading the compiled kernels again, ~10 s a step
on the H200 of README "Performance". A step that fails stops the run with its exit code; each
step's wall time goes to reports/.timings.tsv (or --timings), which report.py prints.

    python scripts/pipeline.py [--config NAME] [--resume]
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import os
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (first: sets up the fast BLAS before anything imports mlx)

SCRIPTS = Path(__file__).resolve().parent


def default_steps(config: str = "default", resume: bool = False) -> list[tuple[str, str, list]]:
    """(name, script, arguments) of runme.sh's pipeline, in order."""
    return [
        ("download", "01_download_model.py", []),
        ("prepare", "02_prepare_data.py", []),
        ("eval-base", "04_evaluate.py", ["--model", "models/baseline", "--name", "baseline"]),
        ("stress-base", "05_stress_test.py", ["--model", "models/baseline", "--name", "baseline"]),
        ("train", "03_train.py", ["--config", config, *(["--resume"] if resume else [])]),
        ("baselines", "04_evaluate.py", ["--tfidf"]),
        ("eval-lora", "04_evaluate.py", ["--model", "models/baseline", "--adapter-path",
                                         "models/retrained/adapters", "--name", "retrained"]),
        ("fuse", "06_fuse.py", ["--reuse", "reports/eval_retrained.json"]),
        ("stress-fused", "05_stress_test.py", ["--model", "models/retrained/fused",
                                               "--name", "fused"]),
    ]


def load_script(script: str):
    """scripts/NN_name.py as a module (a file name that starts with a digit cannot be imported)."""
    spec = importlib.util.spec_from_file_location(f"step_{Path(script).stem}", SCRIPTS / script)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def run_steps(steps, timings: Path) -> int:
    """Run each step's main(args) in turn, appending "name<TAB>seconds" to `timings`; the first
    non-zero exit code stops the run and is returned."""
    modules = {}
    for name, script, args in steps:
        print(f"\n== {name}: python scripts/{script} {' '.join(map(str, args))}".rstrip(),
              flush=True)
        if script not in modules:
            modules[script] = load_script(script)
        handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
        tic = time.perf_counter()
        try:
            modules[script].main([str(a) for a in args])
            code = 0
        except SystemExit as e:  # common.cli turns errors into SystemExit(2), Ctrl-C into 130
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        finally:
            for s, h in handlers.items():  # a step's own handlers (training's) end with it
                signal.signal(s, h)
            gc.collect()
            common.release_memory()
        dt = time.perf_counter() - tic
        sys.stdout.flush()
        if code:
            print(f"-- {name} failed (exit code {code})", file=sys.stderr)
            return code
        with open(timings, "a", encoding="utf-8") as f:
            f.write(f"{name}\t{dt:.1f}\n")
        print(f"-- {name} took {dt:.1f} s", flush=True)
    return 0


@common.cli
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="default", help="training config (configs/NAME.yaml)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted training run")
    p.add_argument("--timings", type=Path, default=common.REPORTS_DIR / ".timings.tsv")
    args = p.parse_args(argv)
    timings = args.timings.resolve()
    os.chdir(common.ROOT)  # the steps' arguments are relative to the project, as in the README
    timings.parent.mkdir(parents=True, exist_ok=True)
    timings.write_text("")
    code = run_steps(default_steps(args.config, args.resume), timings)
    if code == 0:
        load_script("report.py").main(["--timings", str(timings)])
    return code


if __name__ == "__main__":
    sys.exit(main())
