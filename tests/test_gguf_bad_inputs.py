"""Step 1 refuses a GGUF it cannot convert faithfully: one line on stderr, exit code 2, and
nothing written (not even the output's parent folder)."""

from __future__ import annotations

import gguf
import pytest

from conftest import run_script
from test_gguf_convert import write_tiny_gguf

SCRIPT = "01_download_model.py"


def assert_refused(tmp_path, src, *words):
    r = run_script(SCRIPT, "--gguf", src, "--out", tmp_path / "models" / "out")
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert "Traceback" not in r.stderr
    for word in words:
        assert word in lines[0], lines[0]
    assert not (tmp_path / "models").exists()


def patch_tensor(path, name: str, **fields) -> None:
    """Rewrite a tensor's type id or name in place (same byte length), as a damaged or foreign
    file would have it."""
    reader = gguf.GGUFReader(path, mode="r+")
    field = next(t.field for t in reader.tensors if t.name == name)
    if "type_id" in fields:
        field.parts[4][0] = fields["type_id"]
    if "rename" in fields:
        assert len(fields["rename"]) == len(name)
        field.parts[1][:] = list(fields["rename"].encode())
    reader.data.flush()


def test_unsupported_architecture(tmp_path):
    src = tmp_path / "phi.gguf"
    w = gguf.GGUFWriter(str(src), "phi3")
    w.add_block_count(1)
    import numpy as np

    w.add_tensor("token_embd.weight", np.zeros((4, 32), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    assert_refused(tmp_path, src, "'phi3'")


def test_unknown_tensor_type(tmp_path):
    write_tiny_gguf(tmp_path / "m.gguf", "llama")
    patch_tensor(tmp_path / "m.gguf", "blk.0.attn_norm.weight", type_id=99)
    assert_refused(tmp_path, tmp_path / "m.gguf", "unknown type 99")


def test_tensor_type_that_is_not_a_weight_type(tmp_path):
    """I32 has the size of F32, so the file stays consistent: only the type is wrong."""
    write_tiny_gguf(tmp_path / "m.gguf", "llama")
    patch_tensor(tmp_path / "m.gguf", "blk.0.attn_norm.weight",
                 type_id=int(gguf.GGMLQuantizationType.I32))
    assert_refused(tmp_path, tmp_path / "m.gguf", "blk.0.attn_norm.weight", "I32")


@pytest.mark.parametrize("keep", [0.6, 0.01])
def test_truncated_gguf(tmp_path, keep):
    """Cut in the tensor data, and cut in the header."""
    write_tiny_gguf(tmp_path / "m.gguf", "gemma3")
    data = (tmp_path / "m.gguf").read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[: int(len(data) * keep)])
    assert_refused(tmp_path, tmp_path / "cut.gguf", "cut.gguf", "truncated")


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_missing_tokenizer_metadata(tmp_path, arch):
    write_tiny_gguf(tmp_path / "m.gguf", arch, drop=("tokens",))
    assert_refused(tmp_path, tmp_path / "m.gguf", "tokenizer.ggml.tokens")


def test_unexpected_tensor(tmp_path):
    write_tiny_gguf(tmp_path / "m.gguf", "qwen2")
    patch_tensor(tmp_path / "m.gguf", "output_norm.weight", rename="output_nerm.weight")
    assert_refused(tmp_path, tmp_path / "m.gguf", "output_nerm.weight")


def test_unsupported_rope_scaling(tmp_path):
    write_tiny_gguf(tmp_path / "m.gguf", "llama",
                    extra={"{arch}.rope.scaling.type": ("yarn", gguf.GGUFValueType.STRING)})
    assert_refused(tmp_path, tmp_path / "m.gguf", "'yarn'")


def test_not_a_gguf(tmp_path):
    (tmp_path / "x.gguf").write_text("not a model\n")
    assert_refused(tmp_path, tmp_path / "x.gguf", "x.gguf")
