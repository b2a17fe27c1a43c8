"""The benchmark scripts run end to end on the tiny model (their figures come from the real one;
speed is measured there, never asserted here)."""

import json
import shutil
import subprocess
import sys

import pytest

from conftest import ROOT, run_script


def bench(script, *args):
    return subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *map(str, args)],
                          capture_output=True, text=True, cwd=ROOT, timeout=600)


def test_train_benchmark_runs_ours_and_mlx_lm(tiny_model, data_dir, tmp_path):
    out = tmp_path / "train.json"
    r = bench("train.py", "--model", tiny_model, "--data", data_dir, "--iters", "8",
              "--mlx-lm-iters", "4", "--num-layers", "1", "--skip", "torch", "--out", out)
    assert r.returncode == 0, r.stderr + r.stdout
    result = json.loads(out.read_text())
    for loop in ("ours", "mlx-lm"):
        assert result[loop]["s_per_iteration"] > 0 and result[loop]["peak_rss_gb"] > 0
    assert result["speedup_vs_mlx-lm"] > 0 and "| ours |" in r.stdout


def test_score_benchmark_runs(tiny_model, data_dir, tmp_path):
    out = tmp_path / "score.json"
    r = bench("score.py", "--model", tiny_model, "--data", data_dir, "--limit", "16",
              "--naive-limit", "3", "--batches", "1", "8", "--out", out)
    assert r.returncode == 0, r.stderr + r.stdout
    result = json.loads(out.read_text())
    assert [o["batch"] for o in result["ours"]] == [1, 8]
    assert result["naive"]["messages"] == 3 and result["roofline_messages_per_s"] > 0
    assert all(0 < o["fraction_of_roofline"] for o in result["ours"])


def test_probe_measures_each_variant(tiny_model, data_dir, tmp_path):
    out = tmp_path / "probe.json"
    variants = ["4-bit", "4-bit+opening-once", "dequantized", "4-bit+plain-attention",
                "4-bit+recompute", "4-bit+compiled-step"]
    r = bench("probe.py", "--model", tiny_model, "--data", data_dir, "--messages", "8",
              "--steps", "2", "--num-layers", "1", "--variants", *variants, "--out", out)
    assert r.returncode == 0, r.stderr + r.stdout
    result = json.loads(out.read_text())
    for v in variants:
        assert result[v]["scoring_again_s"] > 0 and result[v]["steps_one_shape_ms"] > 0, v
        assert result[v]["steps_overlapped_ms"] > 0 and result[v]["operations_per_step"] > 224, v
    assert result["4-bit+compiled-step"]["padded_compiled_loss_diff"] < 1e-5
    r = bench("probe.py", "--model", tiny_model, "--data", data_dir, "--messages", "0",
              "--steps", "1", "--num-layers", "1", "--variants", "4-bit", "--out", out)
    assert r.returncode == 0, r.stderr + r.stdout
    assert "scoring_first_s" not in json.loads(out.read_text())["4-bit"]  # --messages 0


def test_combine_reproduces_a_runs_own_threshold_and_combines(tiny_model, data_dir, tmp_path):
    runs = []
    for seed in ("1", "2"):
        ad = tmp_path / f"run{seed}"
        r = run_script("03_train.py", "--model", tiny_model, "--data", data_dir, "--adapter-path",
                       ad, "--reports", tmp_path / "rep", "--iters", "4", "--num-layers", "1",
                       "--seed", seed)
        assert r.returncode == 0, r.stderr
        runs.append(ad)
    out = tmp_path / "combine.json"
    r = bench("combine.py", "--model", tiny_model, "--data", data_dir, "--runs", *runs,
              "--tfidf", "--neighbours", "--test", "--out", out)
    assert r.returncode == 0, r.stderr + r.stdout
    rows = {c["candidate"]: c for c in json.loads(out.read_text())["candidates"]}
    assert len(rows) == 3 + 21 + 20  # averages of 2 runs, blend weights, vote settings
    stored = json.loads((runs[0] / "threshold.json").read_text())
    alone = rows["run1"]  # scored anew, chosen by the same rule on the same held-out sets
    assert alone["threshold"] == pytest.approx(stored["threshold"], abs=1e-4)
    assert (alone["valid_false_positives"], alone["valid_false_negatives"]) == (
        stored["valid_false_positives"], stored["valid_false_negatives"])
    assert rows["1.00 x run1 + 0.00 x tfidf-logreg"]["cost"] == alone["cost"]
    chosen = json.loads(out.read_text())["chosen"]
    assert rows[chosen]["cost"] == min(c["cost"] for c in rows.values())
    assert alone["test"]["messages"] == 1031 and "(chosen) |" in r.stdout
    assert "run1's held-out errors: truth, P(spam)" in r.stdout

    partial = tmp_path / "data"  # the held-out sets are what it chooses on: no valid.jsonl, no run
    shutil.copytree(data_dir, partial)
    (partial / "valid.jsonl").unlink()
    r = bench("combine.py", "--model", tiny_model, "--data", partial, "--runs", runs[0])
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        f"error: valid.jsonl not found at {partial / 'valid.jsonl'}: "
        "run scripts/02_prepare_data.py first"]
