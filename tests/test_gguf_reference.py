"""Gemma 3 270M (the gemma3-270m base) against ../shared/data/gemma3_reference*.jsonl, made by
transformers' GGUF loader from the same file, every tensor de-quantized to float32.

  * --dtype float32 (the reference's own numbers): token ids exact (BOS included), the label
    logits and the top 5 within 1e-3 on the 67 short prompts and on the three long ones, which
    pass the 512-token sliding window (measured: max 3.2e-5 short, 1.7e-5 long);
  * the default folder (Q5_0/Q4_K/Q8_0 in MLX's layout with the same numbers, Q6_K re-quantized
    to MLX 8-bit), run de-quantized as the project runs it on a CPU: measured max 0.039 on the
    label logits, 0.071 on the top 5 (tolerance 0.15).
"""

from __future__ import annotations

import json

import pytest

from conftest import SHARED_DATA
from smslora import bases
from smslora.artifacts import read_jsonl
from smslora.convert.step import make_baseline
from smslora.model import load_model
from test_download_model import EXACT_TOL, last_logits

pytestmark = pytest.mark.slow
GEMMA = bases.get("gemma3-270m")
DEFAULT_TOL = 0.15
N_PARAMS = 268_098_176


def check_against_reference(logits, row: dict, tol: float) -> None:
    """The label logits and the reference's top 5 within tol; the top token the same unless the
    reference's first two are nearer than 2 tol (prompt 13: " Spam" and " spam", 7e-5 apart)."""
    assert abs(logits[row["spam_token"]] - row["logit_spam"]) < tol, row["prompt"][:80]
    assert abs(logits[row["not_token"]] - row["logit_not"]) < tol, row["prompt"][:80]
    for token, ref in row["top5"]:
        assert abs(logits[token] - ref) < tol, (row["prompt"][:80], token, logits[token], ref)
    (first, top), (_, second) = row["top5"][:2]
    assert int(logits.argmax()) == first or top - second < 2 * tol, row["prompt"][:80]


def rows(name: str) -> list[dict]:
    path = SHARED_DATA / name
    if not path.is_file():
        pytest.skip(f"reference logits not found at {path} (shared data not checked out)")
    return read_jsonl(path)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """The default folder and the float32 one, converted once for this module."""
    if not GEMMA.installed():
        pytest.skip(f"the gemma3-270m base is not installed (pip install '{GEMMA.requirement}')")
    folders = {}
    for dtype in ("auto", "float32"):
        folders[dtype] = tmp_path_factory.mktemp(dtype) / "baseline"
        assert make_baseline(folders[dtype], base="gemma3-270m", dtype=dtype) == 0
    return folders


def test_folder(converted, capsys):
    config = json.loads((converted["auto"] / "config.json").read_text())
    assert config["model_type"] == "gemma3_text" and config["tie_word_embeddings"] is True
    shape = (config["hidden_size"], config["num_hidden_layers"], config["vocab_size"])
    assert shape == (640, 18, 262144)
    assert (config["sliding_window"], config["sliding_window_pattern"]) == (512, 6)
    assert (config["rope_theta"], config["rope_local_base_freq"]) == (1e6, 10000.0)
    assert config["query_pre_attn_scalar"] == 256
    source = json.loads((converted["auto"] / "source.json").read_text())
    assert source["base"] == "gemma3-270m" and source["licence"] == "Gemma Terms of Use"
    assert source["tensor_types"] == {"F32": 109, "Q8_0": 10, "Q5_0": 81, "Q4_K": 27, "Q6_K": 9}
    from mlx_lm.utils import get_total_parameters

    for folder in converted.values():
        assert get_total_parameters(load_model(folder)[0]) == N_PARAMS


@pytest.mark.parametrize("name", ["gemma3_reference.jsonl", "gemma3_reference_long.jsonl"])
def test_tokenizer_matches_reference(converted, name):
    from mlx_lm import load

    _, tokenizer = load(str(converted["auto"]))
    for row in rows(name):
        assert tokenizer.encode(row["prompt"]) == row["input_ids"], row["prompt"][:80]
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id) == (2, 1)


@pytest.mark.parametrize("name", ["gemma3_reference.jsonl", "gemma3_reference_long.jsonl"])
def test_float32_matches_reference(converted, name):
    """Renaming, norms (stored 1 + w), embedding scale, query scale, rope bases, window."""
    model, _ = load_model(converted["float32"])
    want = rows(name)
    for row_logits, row in zip(last_logits(model, want, batch_size=8), want):
        check_against_reference(row_logits, row, EXACT_TOL)


def test_default_folder_is_close_to_reference(converted):
    model, _ = load_model(converted["auto"], dequantize=True)
    want = rows("gemma3_reference.jsonl")
    for row_logits, row in zip(last_logits(model, want, batch_size=8), want):
        check_against_reference(row_logits, row, DEFAULT_TOL)


def test_gemma_file_is_assembled_once_and_again_when_damaged(tmp_path, monkeypatch):
    """In the package's cache folder (under $HOME), under a temporary name, checked by SHA-256."""
    if not GEMMA.installed():
        pytest.skip("the gemma3-270m base is not installed")
    monkeypatch.setenv("HOME", str(tmp_path))
    path = GEMMA.gguf()
    assert path == tmp_path / ".cache" / GEMMA.module / GEMMA.file_name
    made = path.stat().st_mtime_ns
    assert GEMMA.gguf() == path and path.stat().st_mtime_ns == made  # checked, not rewritten
    with open(path, "r+b") as f:
        f.truncate(1000)
    assert GEMMA.gguf().stat().st_size == 253_113_024  # re-assembled
    from smslora.artifacts import sha256

    assert sha256(path) == "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
    assert [p.name for p in path.parent.iterdir()] == [GEMMA.file_name]  # no temporary left
