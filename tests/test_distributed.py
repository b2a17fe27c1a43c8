"""Data-parallel training under `mlx.launch` (ring backend on loopback): two processes train the
adapter one process trains, rank 0 alone writes, and a dead rank stops the job with one line
while the last checkpoint stays usable."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx
import pytest

from conftest import ROOT, run_script

LAUNCH = Path(sys.executable).parent / "mlx.launch"
pytestmark = pytest.mark.skipif(not LAUNCH.exists(), reason="mlx.launch is not installed")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(n: int, *args, env: dict | None = None) -> subprocess.Popen:
    """`mlx.launch -n N --backend ring -- python scripts/03_train.py ARGS` on this machine."""
    port = free_port()
    command = [str(LAUNCH), "-n", str(n), "--backend", "ring", "--starting-port", str(port),
               "--", sys.executable, str(ROOT / "scripts" / "03_train.py"), *map(str, args)]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=ROOT, env={**os.environ, **(env or {})})


def train_args(tiny_model, data_dir, out: Path, iters: int, **extra) -> list:
    args = ["--config", "default", "--model", tiny_model, "--data", data_dir, "--adapter-path",
            out / "adapters", "--reports", out / "reports", "--iters", iters,
            "--steps-per-eval", 5, "--steps-per-report", 3, "--num-layers", 1]
    for key, value in extra.items():
        args += [f"--{key.replace('_', '-')}", value]
    return args


def test_two_ranks_train_the_adapter_one_process_trains(tmp_path, tiny_model, data_dir):
    one, two = tmp_path / "one", tmp_path / "two"
    r = run_script("03_train.py", *train_args(tiny_model, data_dir, one, 12, steps_per_save=6))
    assert r.returncode == 0, r.stderr
    job = launch(2, *train_args(tiny_model, data_dir, two, 12, steps_per_save=6))
    out, err = job.communicate(timeout=600)
    assert "Saved best adapters" in out, err
    assert out.count("Trainable parameters") == 1  # rank 0 alone logs
    a = mx.load(str(one / "adapters" / "adapters.safetensors"))
    b = mx.load(str(two / "adapters" / "adapters.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        scale = float(mx.abs(a[k]).max())
        assert float(mx.abs(a[k] - b[k]).max()) <= 1e-5 * scale, k
    history = [json.loads((d / "adapters" / "history.json").read_text()) for d in (one, two)]
    assert [v["iteration"] for v in history[0]["val"]] == [v["iteration"] for v in history[1]["val"]]
    for x, y in zip(history[0]["val"], history[1]["val"]):
        assert abs(x["val_loss"] - y["val_loss"]) <= 1e-5 * abs(x["val_loss"])
    assert history[0]["train"][-1]["trained_tokens"] == \
        history[1]["train"][-1]["trained_tokens"]  # every rank's tokens counted once
    # one set of artifacts: the same files as one process writes, nothing else beside them
    assert sorted(p.name for p in (one / "adapters").iterdir()) == \
        sorted(p.name for p in (two / "adapters").iterdir())
    assert sorted(p.name for p in two.iterdir()) == ["adapters", "reports"]


def test_a_dead_rank_stops_the_job_and_the_checkpoint_resumes(tmp_path, tiny_model, data_dir):
    out = tmp_path / "run"
    args = train_args(tiny_model, data_dir, out, 400, steps_per_save=5, steps_per_eval=100)
    job = launch(2, *args, env={"SMS_LORA_DIST_TIMEOUT": "30"})
    checkpoint = out / ".adapters.partial" / "checkpoint" / "state.json"
    deadline = time.monotonic() + 300
    while not checkpoint.is_file():
        assert job.poll() is None and time.monotonic() < deadline, job.communicate()
        time.sleep(0.5)
    ranks = {}
    for pid in os.listdir("/proc"):
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except (OSError, ValueError):
            continue
        if str(out).encode() in cmdline:
            rank = [e for e in environ if e.startswith(b"MLX_RANK=")]
            if rank:
                ranks[int(rank[0].split(b"=")[1])] = int(pid)
    assert set(ranks) == {0, 1}
    os.kill(ranks[1], signal.SIGKILL)
    killed = time.monotonic()
    _, err = job.communicate(timeout=120)
    assert time.monotonic() - killed < 60  # no hang: the survivor stops by itself
    ours = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(ours) == 1 and "rank 0" in ours[0] and "checkpoint" in ours[0], err
    assert "Traceback" not in err
    # the checkpoint is the last numbered save, or (when rank 0 sees the collective fail
    # before mlx.launch stops it) the last step both ranks completed
    state = json.loads(checkpoint.read_text())
    assert state["step"] >= 5, state["step"]
    # one process takes over from the last checkpoint and finishes the run
    r = run_script("03_train.py", "--resume", "--adapter-path", out / "adapters",
                   "--reports", out / "reports", "--iters", 400)
    assert r.returncode == 0, r.stderr
    assert f"Resumed from the checkpoint after iteration {state['step']}" in r.stdout
    history = json.loads((out / "adapters" / "history.json").read_text())
    assert history["iterations_run"] == 400


def test_two_ranks_score_a_file_byte_for_byte_as_one(tmp_path, tiny_model):
    """07_chat.py --input under mlx.launch: each rank scores its share of every chunk's batches,
    rank 0 writes one output, in input order, the same bytes as one process."""
    src = tmp_path / "in.txt"
    words = ["win", "a", "prize", "call", "now", "see", "you", "at", "six", "mum", "free", "txt"]
    src.write_text("".join(" ".join(words[(i * 7 + j) % len(words)] for j in range(1 + i % 23))
                           + f" {i}\n" for i in range(600)))
    r = run_script("07_chat.py", "--model", tiny_model, "--input", src, "--output",
                   tmp_path / "one.jsonl")
    assert r.returncode == 0, r.stderr
    port = free_port()
    job = subprocess.run(
        [str(LAUNCH), "-n", "2", "--backend", "ring", "--starting-port", str(port), "--",
         sys.executable, str(ROOT / "scripts" / "07_chat.py"), "--model", str(tiny_model),
         "--input", str(src), "--output", str(tmp_path / "two.jsonl")],
        capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert job.stdout.count("Classified 600 messages") == 1, job.stderr  # rank 0 alone
    assert (tmp_path / "two.jsonl").read_bytes() == (tmp_path / "one.jsonl").read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.txt", "one.jsonl", "two.jsonl"]
