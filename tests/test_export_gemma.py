"""Step 9's GGUF export of a tiny random Gemma 3: step 1's own output from a tiny GGUF, as
tests/test_architectures.py makes it (6 blocks, five with a window of 4 positions, then a global
one; a SentencePiece tokenizer with BOS, byte fallback, a user-defined run of spaces), and that
model fused with a random adapter. The file's metadata is what the tiny GGUF said, step 1 reads
it back as the same model, and llama.cpp (.venv-llama, skipped without it) tokenizes and scores
it as MLX does. Bad Gemma variants: one line, exit 2, nothing written."""

import json
import shutil

import gguf
import numpy as np
import pytest
from conftest import read_back_logits
from smslora import artifacts, fuse
from smslora.commands import export as export_cmd
from smslora.convert.step import make_baseline
from smslora.export import archs, check, sentencepiece, step
from smslora.export.gguf import gguf_name
from smslora.model import load_model
from smslora.scoring import score_logits
from test_architectures import vocab_with_labels
from test_export import LLAMA, ODD, TORCH, edit_json, export, fails, needs_llama, needs_peft
from test_gguf_convert import write_tiny_gguf


@pytest.fixture(scope="module")
def gemma(tmp_path_factory):
    """The tiny GGUF, step 1's 4/5/8-bit folder made of it, and that folder fused in float32
    with a random adapter (what step 6 ships)."""
    root = tmp_path_factory.mktemp("gemma-export")
    write_tiny_gguf(root / "m.gguf", "gemma3", hidden=64, vocab=vocab_with_labels("gemma3"))
    assert make_baseline(root / "base", gguf=root / "m.gguf") == 0
    adapter = check.random_adapter(root / "base", root / "adapters", num_layers=2, rank=4,
                                   b_std=0.05)
    fuse.fuse(root / "base", adapter, root / "fused")
    return {"gguf": root / "m.gguf", "base": root / "base", "fused": root / "fused"}


@pytest.fixture(scope="module")
def f16(gemma, tmp_path_factory):
    out = tmp_path_factory.mktemp("gemma-f16") / "out"
    step.run(gemma["fused"], out, "f16", log=lambda *a: None)
    return out / step.gguf_file("f16")


@pytest.fixture(scope="module")
def messages(data_dir):
    return [r["message"] for r in artifacts.read_jsonl(data_dir / "test.jsonl")[:40]] + ODD


def fields(path) -> dict:
    return {k: f.contents() for k, f in gguf.GGUFReader(path).fields.items()}


def test_gemma3_names_are_llama_cpp_s():
    g = archs.GEMMA3
    assert gguf_name("model.layers.2.input_layernorm.weight", g) == "blk.2.attn_norm.weight"
    assert gguf_name("model.layers.2.post_attention_layernorm.weight", g) == \
        "blk.2.post_attention_norm.weight"
    assert gguf_name("model.layers.2.pre_feedforward_layernorm.weight", g) == \
        "blk.2.ffn_norm.weight"
    assert gguf_name("model.layers.2.post_feedforward_layernorm.weight", g) == \
        "blk.2.post_ffw_norm.weight"
    assert gguf_name("model.layers.2.self_attn.k_norm.weight", g) == "blk.2.attn_k_norm.weight"
    assert gguf_name("model.norm.weight", g) == "output_norm.weight"
    known = {gguf.TENSOR_NAMES[t].split(".")[-1]
             for t in gguf.MODEL_TENSORS[gguf.MODEL_ARCH.GEMMA3]}  # llama.cpp's own list
    assert {*g.block_names().values(), *g.top_names().values()} == known


def test_gemma3_metadata_is_the_tiny_gguf_s(gemma, f16):
    """Hyper-parameters and tokenizer as in the GGUF step 1 read: every token (the run of spaces
    spelled with spaces again), type and special id, BOS added, no space prefix; the scores of
    the tokens merges make in the same order."""
    ours, theirs = fields(f16), fields(gemma["gguf"])
    assert ours["general.architecture"] == "gemma3" and ours["tokenizer.ggml.model"] == "llama"
    keys = [k for k in theirs if k.startswith(("gemma3.", "tokenizer.")) and
            k != "tokenizer.ggml.scores"]
    assert len(keys) > 15
    for key in keys:
        assert ours[key] == theirs[key], key
    assert "  " in ours["tokenizer.ggml.tokens"]
    assert ours["tokenizer.ggml.add_bos_token"] is True
    assert ours["tokenizer.ggml.add_eos_token"] is False
    assert ours["tokenizer.ggml.add_space_prefix"] is False
    merged = [i for i, (t, k) in enumerate(zip(ours["tokenizer.ggml.tokens"],
                                               ours["tokenizer.ggml.token_type"]))
              if k == sentencepiece.NORMAL and len(t) > 1]
    mine = np.array(ours["tokenizer.ggml.scores"])[merged]
    file = np.array(theirs["tokenizer.ggml.scores"])[merged]
    assert list(np.argsort(-mine, kind="stable")) == list(np.argsort(-file, kind="stable"))


@pytest.mark.parametrize("kind,atol", [("f16", 0.02), ("q8_0", 0.3)])
def test_gemma3_gguf_read_back_by_step_1_gives_the_same_model(tmp_path, gemma, f16, messages,
                                                              kind, atol):
    """Step 1 undoes what the export did (1 + w norms, the embedding scale): the same logits."""
    path = f16
    if kind != "f16":
        step.run(gemma["fused"], tmp_path / "out", kind, log=lambda *a: None)
        path = tmp_path / "out" / step.gguf_file(kind)
    want = score_logits(*load_model(gemma["fused"]), messages)
    got = read_back_logits(path, tmp_path / "back", messages)
    np.testing.assert_allclose(got, want, atol=atol)


def test_gemma3_modelfile_stops_at_the_tokenizer_s_end_token(f16):
    text = (f16.parent / step.MODELFILE).read_text()
    assert 'PARAMETER stop "<eos>"' in text and "<|im_end|>" not in text


BAD_GEMMAS = {
    "another local rope base": ({"rope_local_base_freq": 20000.0}, "rope_local_base_freq"),
    "another layer pattern": ({"sliding_window_pattern": 4}, "sliding_window_pattern"),
    "no sliding window": ({"sliding_window": None}, "sliding_window=None"),
    "another query scale": ({"query_pre_attn_scalar": 64}, "query_pre_attn_scalar"),
    "soft-capping": ({"final_logit_softcapping": 30.0}, "final_logit_softcapping"),
    "qwen2": ({"model_type": "qwen2"}, "writes llama (SmolLM2) and gemma3 (Gemma 3)"),
}


@pytest.mark.parametrize("case", BAD_GEMMAS, ids=list(BAD_GEMMAS))
def test_gemma3_variants_llama_cpp_computes_otherwise_are_refused(tmp_path, gemma, capsys, case):
    changes, needle = BAD_GEMMAS[case]
    bad = tmp_path / "bad"
    shutil.copytree(gemma["base"], bad)
    edit_json("config.json", **changes)(bad)
    fails(capsys, export_cmd.main, ["--model", bad, "--out", tmp_path / "out"], needle)
    assert [p.name for p in tmp_path.iterdir()] == ["bad"]


def test_a_sentencepiece_tokenizer_of_another_shape_is_refused(tmp_path, gemma, capsys):
    bad = tmp_path / "bad"
    shutil.copytree(gemma["base"], bad)
    edit_json("tokenizer.json", normalizer={"type": "NFKC"})(bad)
    fails(capsys, export_cmd.main, ["--model", bad, "--out", tmp_path / "out"],
          "SentencePiece-style")
    assert [p.name for p in tmp_path.iterdir()] == ["bad"]


@needs_llama
@pytest.mark.parametrize("which,kind,max_dp", [("fused", "f16", 0.01), ("fused", "q8_0", 0.05),
                                               ("base", "f16", 0.01)])
def test_llama_cpp_tokenizes_and_scores_gemma3_like_mlx(tmp_path, gemma, f16, messages, which,
                                                        kind, max_dp):
    path = f16
    if (which, kind) != ("fused", "f16"):
        step.run(gemma[which], tmp_path / "out", kind, log=lambda *a: None)
        path = tmp_path / "out" / step.gguf_file(kind)
    got = check.check_gguf(path, gemma[which], messages, 0.5, LLAMA, threads=1)
    assert got["token_ids_identical"] == len(messages), got["first_token_mismatch"]
    assert got["label_ids_identical"] and got["llama_adds_bos"]
    assert got["max_abs_dp"] <= max_dp, got
    # The random model puts many messages near 0.5: a verdict may differ only there.
    assert all(abs(d["p_spam_mlx"] - 0.5) <= max_dp for d in got["disagreements"]), got
    assert kind != "f16" or got["verdicts_differ"] == 0, got["disagreements"]
    assert json.loads((path.parent / step.MANIFEST).read_text())["gguf"]["architecture"] == \
        "gemma3"


@needs_peft
def test_transformers_peft_scores_a_gemma3_adapter_like_mlx(tmp_path, messages):
    """The PEFT export of a Gemma 3 adapter, loaded by transformers on write_hf_base's copy of the
    base. Width 96: mlx-lm's bfloat16 embedding scale (9.8125) is not sqrt(96), so the copy must
    undo step 1's correction, as for llama.cpp, for the logits to agree to float32 rounding."""
    write_tiny_gguf(tmp_path / "m.gguf", "gemma3", hidden=96, vocab=vocab_with_labels("gemma3"))
    assert make_baseline(tmp_path / "base", gguf=tmp_path / "m.gguf") == 0
    adapter = check.random_adapter(tmp_path / "base", tmp_path / "adapters", num_layers=2,
                                   rank=4, b_std=0.05)
    export("--peft", "--adapter-path", adapter, "--out", tmp_path / "peft", "--base-id", "tiny")
    hf_base = check.write_hf_base(tmp_path / "base", tmp_path / "hf_base")
    got = check.check_peft(tmp_path / "peft", hf_base, tmp_path / "base", adapter, messages, 0.5,
                           TORCH)
    assert got["loaded_exactly"] and got["adapter_moves_p_spam_by"] > 0.05, got
    assert got["max_abs_dlogit"] <= 1e-4 and got["verdicts_differ"] == 0, got
