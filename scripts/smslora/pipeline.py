"""Steps 1-6 and the report, in order, in one Python process: what `./runme.sh` runs.

Each step calls the same package function as its numbered script, with the arguments a user
would type, so every artifact is the one `python scripts/NN_....py ARGS` writes (a test compares
the two). One process instead of nine saves each step's start: importing MLX, mlx-lm and their
dependencies, and on a GPU creating the device context and loading the compiled kernels again
(~10 s a step on an H200). A step that fails stops the run with its exit code; each step's wall
time goes to a timings file, which the report prints."""

from __future__ import annotations

import gc
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .errors import cli
from .paths import (ADAPTERS_DIR, BASELINE_DIR, DATA_DIR, FUSED_DIR, REPORTS_DIR, ROOT,
                    STRESS_SUITE, eval_report)


@dataclass
class Step:
    name: str
    command: str  # the command line that runs this step alone
    call: Callable[[], object]


def relative(path: Path) -> Path:
    """A project path as the README writes it (the pipeline runs from the project's root)."""
    return Path(path).relative_to(ROOT)


def default_steps(config: str | None = None, resume: bool = False,
                  base: str | None = None) -> list[Step]:
    """runme.sh's pipeline, in order. config=None: the base model's own recipe (step 3's
    default, decided once step 1 has made the base folder)."""
    from . import baselines, evaluate, finetune, fuse, splits, stress
    from .convert.step import make_baseline
    from .checkpoint import resume_config
    from .config import default_config_name, load_config

    base_dir, adapters, fused = relative(BASELINE_DIR), relative(ADAPTERS_DIR), relative(FUSED_DIR)
    data, reports, suite = relative(DATA_DIR), relative(REPORTS_DIR), relative(STRESS_SUITE)

    def train():
        cfg, checkpoint = (resume_config(config, {}) if resume
                           else (load_config(config or default_config_name(base_dir), {}),
                                 None))
        return finetune.run(cfg, reports, checkpoint)

    return [
        Step("download", "01_download_model.py" + (f" --base {base}" if base else ""),
             lambda: make_baseline(base_dir, base=base)),
        Step("prepare", "02_prepare_data.py", lambda: splits.run("shipped", data)),
        Step("eval-base", f"04_evaluate.py --model {base_dir} --name baseline",
             lambda: evaluate.run(base_dir, None, data, "baseline", reports)),
        Step("stress-base", f"05_stress_test.py --model {base_dir} --name baseline",
             lambda: stress.run(base_dir, None, suite, "baseline", reports)),
        Step("train", "03_train.py" + (f" --config {config}" if config else "")
             + (" --resume" if resume else ""), train),
        Step("baselines", "04_evaluate.py --tfidf",
             lambda: baselines.run(adapters, data, reports)),
        Step("eval-lora", f"04_evaluate.py --model {base_dir} --adapter-path {adapters} "
             "--name retrained", lambda: evaluate.run(base_dir, adapters, data, "retrained",
                                                      reports)),
        Step("fuse", f"06_fuse.py --reuse {reports / eval_report('retrained')}",
             lambda: fuse.run(base_dir, adapters, fused, data, reports,
                              reuse=reports / eval_report("retrained"))),
        Step("stress-fused", f"05_stress_test.py --model {fused} --name fused",
             lambda: stress.run(fused, None, suite, "fused", reports)),
    ]


def run_steps(steps: list[Step], timings: Path) -> int:
    """Run each step in turn, appending "name<TAB>seconds" to `timings`; the first failure
    stops the run and its exit code (2 for an error, 130 for Ctrl-C) is returned."""
    from .model import release_memory

    for step in steps:
        print(f"\n== {step.name}: python scripts/{step.command}", flush=True)
        handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
        tic = time.perf_counter()
        try:
            cli(lambda argv: step.call())(None)
            code = 0
        except SystemExit as e:  # cli turns errors into SystemExit(2), Ctrl-C into 130
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        finally:
            for s, h in handlers.items():  # a step's own handlers (training's) end with it
                signal.signal(s, h)
            gc.collect()
            release_memory()
        dt = time.perf_counter() - tic
        sys.stdout.flush()
        if code:
            print(f"-- {step.name} failed (exit code {code})", file=sys.stderr)
            return code
        with open(timings, "a", encoding="utf-8") as f:
            f.write(f"{step.name}\t{dt:.1f}\n")
        print(f"-- {step.name} took {dt:.1f} s", flush=True)
    return 0
