"""Every step past step 1 on tiny random gemma3 and qwen2 models, as the llama one has it
(tests/test_pipeline.py): train (LoRA, frozen-block cache, label-only loss, checkpoints, resume),
evaluate, stress, fuse with its self-check, chat and serve, through the real scripts.

The models are step 1's own output: a tiny GGUF of each (test_gguf_convert.write_tiny_gguf)
converted by make_baseline, their tokenizers from the GGUF metadata: Gemma's SentencePiece one
adds a BOS, Qwen's byte-level one does not. Each vocabulary gets the pieces of " spam" and
" not", so that the two labels start with different tokens as in the real ones. The gemma3 model
mixes 4-, 5- and 8-bit layers with float ones, has 6 blocks (5 sliding-window ones, then a
global one) and a window of 4 positions, so every prompt passes it: the prefix cache and the
frozen-block split must apply the windowed masks (and Gemma's embedding scale) themselves."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import mlx.core as mx
import numpy as np
import pytest

import tiny
from conftest import ROOT, run_script
from smslora import artifacts, scoring
from smslora.batches import collate, tokenize
from smslora.frozen import FrozenStates, cached_label_logits, frozen_prefix_supported
from smslora.model import load_model
from smslora.trainer import loss_fn
from test_gguf_convert import SPACE, gpt2_vocab, spm_vocab, write_tiny_gguf

ARCHS = ["gemma3", "qwen2"]
LABEL_PIECES = ["s", "p", "m", "n", "o", "t"]  # with "a", already in both vocabularies


def vocab_with_labels(arch: str) -> dict:
    """The test vocabulary of `arch` plus whole-word pieces for " spam" and " not"."""
    if arch == "gemma3":
        v = spm_vocab()
        words = [SPACE + w[:i] for w in ("spam", "not") for i in range(1, len(w) + 1)]
        v["tokens"] = v["tokens"] + LABEL_PIECES + words
        v["types"] = v["types"] + [1] * (len(LABEL_PIECES) + len(words))
        v["scores"] = [-float(i) for i in range(len(v["tokens"]))]
        return v
    v = gpt2_vocab()  # byte-level: every letter is a token already; merges build the words
    space = "\u0120"
    merges = [f"{space}{w[:i - 1]} {w[i - 1]}" if i > 1 else f"{space} {w[0]}"
              for w in ("spam", "not") for i in range(1, len(w) + 1)]
    words = [space + w[:i] for w in ("spam", "not") for i in range(1, len(w) + 1)]
    v["tokens"] = v["tokens"] + words
    v["types"] = v["types"] + [1] * len(words)
    v["merges"] = v["merges"] + merges
    return v


@pytest.fixture(scope="module", params=ARCHS)
def arch_model(request, tmp_path_factory):
    from smslora.convert.step import make_baseline

    arch = request.param
    tmp = tmp_path_factory.mktemp(arch)
    write_tiny_gguf(tmp / "m.gguf", arch, hidden=64, vocab=vocab_with_labels(arch))
    assert make_baseline(tmp / "baseline", gguf=tmp / "m.gguf") == 0
    return arch, tmp / "baseline"


def test_each_tiny_model_is_what_it_should_test(arch_model):
    arch, path = arch_model
    model, tok = load_model(path)
    config = json.loads((path / "config.json").read_text())
    assert config["model_type"] == {"gemma3": "gemma3_text", "qwen2": "qwen2"}[arch]
    assert frozen_prefix_supported(model)
    bos = tok.encode("")
    assert bos == ([tok.bos_token_id] if arch == "gemma3" else [])
    labels = scoring.label_token_ids(tok)
    assert len(labels["spam"]) == 1 and len(labels["ham"]) == 2  # " spam" / " not" + " spam"
    if arch == "gemma3":
        assert set(layer_bits(path).values()) == {4, 5, 8}  # each layer its own


def full_pass_logits(model, tok, messages) -> np.ndarray:
    """The label logits of a plain forward pass of the whole model, one message at a time."""
    pair = scoring.label_pair(tok)
    out = []
    for m in messages:
        logits = model(mx.array([scoring.encode_prompt(tok, m)]))[0, -1]
        out.append(np.array(logits[mx.array(pair)].astype(mx.float32)))
    return np.array(out)


def test_cached_and_frozen_scores_equal_a_plain_forward_pass(arch_model, data_dir):
    """The prefix cache (scoring) and the frozen-block states (training, the threshold) give the
    plain forward pass's logits: embedding scale, windowed masks and BOS all as the model has
    them. Long messages included (cut, with the BOS only at the start)."""
    arch, path = arch_model
    model, tok = load_model(path)
    rows = artifacts.read_jsonl(data_dir / "valid.jsonl")[:12]
    rows.append({"message": "spam not " * 400, "label": "spam"})
    messages = [r["message"] for r in rows]
    want = full_pass_logits(model, tok, messages)
    assert np.abs(want[:, 0] - want[:, 1]).max() > 1e-2  # the two logits differ: not vacuous

    np.testing.assert_allclose(scoring.score_logits(model, tok, messages), want, atol=1e-4)
    np.testing.assert_allclose(scoring.score_logits(model, tok, messages, batch_size=1), want,
                               atol=1e-4)

    long = scoring.encode_prompt(tok, messages[-1])
    assert len(long) <= 512 and long[:3] == scoring.prompt_prefix_ids(tok)[:3]
    if arch == "gemma3":
        assert long.count(tok.bos_token_id) == 1 and long[0] == tok.bos_token_id

    examples = tokenize(tok, rows, 512 + 4)  # prompts cut as encode_prompt cuts them
    for first in sorted({1, len(model.layers) - 1}):  # gemma3: below a sliding/global block
        frozen = FrozenStates(model, examples, first)
        assert frozen.shared > 0
        np.testing.assert_allclose(cached_label_logits(model, tok, examples, frozen), want,
                                   atol=1e-4)
        idx = list(range(4))
        with_states = loss_fn(model, *collate(examples, idx, frozen), True, first, frozen.shared,
                              grad=False)[0]
        whole = loss_fn(model, *collate(examples, idx, None), True, grad=False)[0]
        np.testing.assert_allclose(with_states.item(), whole.item(), rtol=1e-5)


TRAIN = ["--iters", "6", "--steps-per-eval", "3", "--steps-per-save", "2", "--val-batches", "2",
         "--batch-size", "4"]


def train_args(arch: str) -> list[str]:
    """LoRA on the top blocks (2 of gemma3's 6, 1 of qwen2's 2): the frozen split below them."""
    return [*TRAIN, "--num-layers", "2" if arch == "gemma3" else "1"]


@pytest.fixture(scope="module")
def trained(arch_model, data_dir, tmp_path_factory):
    """Adapters on the top blocks (the frozen split below them), with large random B matrices
    afterwards so that the adapter visibly changes the logits."""
    arch, path = arch_model
    ad = tmp_path_factory.mktemp(f"{arch}_run") / "adapters"
    r = run_script("03_train.py", "--model", path, "--data", data_dir, "--adapter-path", ad,
                   "--reports", ad.parent / "reports", *train_args(arch))
    assert r.returncode == 0, r.stderr
    assert "Frozen blocks 0-" in r.stdout
    history = json.loads((ad / "history.json").read_text())
    assert history["iterations_run"] == 6
    weights = mx.load(str(ad / "adapters.safetensors"))
    assert weights and all(".layers." in k for k in weights)
    return tiny.strengthen_adapters(ad)


def test_resume_after_a_kill_gives_the_same_adapter(arch_model, data_dir, trained, tmp_path):
    """Killed after a checkpoint, then --resume: the adapters of the uninterrupted run."""
    arch, path = arch_model
    ad, rep = tmp_path / "ad", tmp_path / "rep"
    cmd = [sys.executable, str(ROOT / "scripts" / "03_train.py"), "--model", str(path),
           "--data", str(data_dir), "--adapter-path", str(ad), "--reports", str(rep),
           *train_args(arch)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    state = tmp_path / ".ad.partial" / "checkpoint" / "state.json"
    deadline = time.time() + 300
    while proc.poll() is None and time.time() < deadline:
        try:
            if json.loads(state.read_text())["step"] >= 2:
                break
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.05)
    assert proc.poll() is None, proc.communicate()
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    r = run_script("03_train.py", "--resume", "--adapter-path", ad)
    assert r.returncode == 0, r.stderr
    assert "Resumed from the checkpoint after iteration" in r.stdout
    for name in ("final_adapters.safetensors", "best_adapters.safetensors"):
        wa, wb = mx.load(str(ad / name)), mx.load(str(trained / name))
        assert wa.keys() == wb.keys()
        for k in wa:
            np.testing.assert_allclose(np.array(wa[k]), np.array(wb[k]), rtol=1e-5, atol=1e-6)


def test_evaluate_stress_fuse_chat_and_serve(arch_model, data_dir, trained, tmp_path):
    arch, path = arch_model
    rep = tmp_path / "reports"
    r = run_script("04_evaluate.py", "--model", path, "--data", data_dir, "--out", rep,
                   "--adapter-path", trained, "--name", "retrained")
    assert r.returncode == 0, r.stderr
    t = json.loads((rep / "eval_retrained.json").read_text())["test"]
    assert t["messages"] == 1031 and sum(t["confusion"].values()) == 1031

    r = run_script("05_stress_test.py", "--model", path, "--adapter-path", trained,
                   "--name", "retrained", "--out", rep)
    assert r.returncode == 0, r.stderr
    assert json.loads((rep / "stress_retrained.json").read_text())["messages"] == 80

    fused = tmp_path / "fused"
    r = run_script("06_fuse.py", "--model", path, "--adapter-path", trained, "--save-path", fused,
                   "--data", data_dir, "--out", rep)
    assert r.returncode == 0, r.stderr
    check = json.loads((rep / "fuse_check.json").read_text())
    assert check["passed"] and check["messages"] == 1031

    messages = ["WIN a free prize, call now", "see you at 6", "spam not " * 400]
    base, tok = load_model(path)
    with_adapter, _ = load_model(path, trained)
    fused_model, fused_tok = load_model(fused)
    adapter_logits = scoring.score_logits(with_adapter, tok, messages)
    assert np.abs(adapter_logits - scoring.score_logits(base, tok, messages)).max() > 1e-2
    np.testing.assert_allclose(scoring.score_logits(fused_model, fused_tok, messages),
                               adapter_logits, atol=5e-3)

    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text("".join(json.dumps({"text": m}) + "\n" for m in messages))
    r = run_script("07_chat.py", "--model", fused, "--input", src, "--output", out)
    assert r.returncode == 0, r.stderr
    rows = artifacts.read_jsonl(out)
    want = scoring.p_spam(fused_model, fused_tok, messages)
    np.testing.assert_allclose([x["p_spam"] for x in rows], want, atol=1e-4)

    from smslora.server.app import create_app
    from smslora.server.info import model_info
    from smslora.server.run import BackgroundServer
    from smslora.server.settings import Settings
    from smslora.threshold import read_threshold
    from test_serve import classify

    threshold = read_threshold(fused)
    app = create_app(fused_model, fused_tok, threshold, model_info(fused, None, threshold),
                     Settings(max_wait_ms=10))
    with BackgroundServer(app) as srv:
        status, body, _ = classify(srv.url, messages[:2])  # the third is over its limit
    assert status == 200, body
    np.testing.assert_allclose([x["p_spam"] for x in body["results"]], want[:2], atol=1e-4)


def layer_bits(path) -> dict[str, int]:
    """Each quantized layer's bits, from its shapes (32-bit words per group of 32)."""
    weights = mx.load(str(path / "model.safetensors"))
    return {k[: -len(".scales")]: weights[k.replace(".scales", ".weight")].shape[-1] // v.shape[-1]
            for k, v in weights.items() if k.endswith(".scales")}


def test_fuse_keeping_quantized_layers_keeps_each_layer_s_bits(arch_model, trained, tmp_path):
    """--keep-quantized re-quantizes W + BA at each layer's own bits (gemma3's 4/5/8-bit mix),
    and the folder loads."""
    from smslora.fuse import fuse

    arch, path = arch_model
    fuse(path, trained, tmp_path / "fused", dequantize=False)
    assert layer_bits(tmp_path / "fused") == layer_bits(path)
    load_model(tmp_path / "fused")
