"""Step 1 on tiny GGUF files written with the `gguf` package (llama.cpp's own writer): each
supported architecture and tensor type is converted, loaded strictly by mlx-lm and compared with
the model the file was made from.

A tiny reference model is drawn at random by mlx-lm's own classes, then written the way
llama.cpp's converter writes it (its tensor names, q/k rows permuted for llama, Gemma's norms
stored as 1 + w) in the tensor type under test. The reference keeps the numbers the file really
holds (its quantized values, de-quantized by the `gguf` package), so a conversion that keeps
them must give the reference's logits to float32 rounding.
"""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from smslora.convert.step import make_baseline

T = gguf.GGMLQuantizationType
SPACE = "\u2581"
NAMES = {  # mlx-lm module -> llama.cpp tensor, as llama.cpp's converter names them
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm",
    "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
    "pre_feedforward_layernorm": "ffn_norm", "post_feedforward_layernorm": "post_ffw_norm",
}
TOP = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}
# A mix of types whose numbers MLX keeps exactly (plus floats), one per kind of matrix.
EXACT_MIX = {"attn_q": T.Q5_0, "attn_k": T.Q4_1, "attn_v": T.Q8_0, "attn_output": T.Q4_0,
             "ffn_gate": T.F16, "ffn_up": T.BF16, "ffn_down": T.Q5_1, "token_embd": T.Q8_0,
             "output": T.Q4_0}


def configs(hidden: int) -> dict:
    common = dict(hidden_size=hidden, intermediate_size=2 * hidden, num_attention_heads=4,
                  num_key_value_heads=2, rms_norm_eps=1e-6, max_position_embeddings=256,
                  rope_theta=10000.0, num_hidden_layers=2)
    return {
        "llama": dict(common, model_type="llama", tie_word_embeddings=True),
        "qwen2": dict(common, model_type="qwen2", tie_word_embeddings=False),
        "qwen3": dict(common, model_type="qwen3", tie_word_embeddings=True, head_dim=32),
        # 6 blocks: five sliding-window ones (window 4, so 16 tokens use it) and a global one.
        "gemma3": dict(common, model_type="gemma3_text", num_hidden_layers=6, head_dim=32,
                       tie_word_embeddings=True,
                       num_key_value_heads=1, rope_theta=1e6, rope_local_base_freq=10000.0,
                       query_pre_attn_scalar=32, sliding_window=4, sliding_window_pattern=6),
    }


# ---------------------------------------------------------------------------------------------
# Tokenizer metadata: a byte-level BPE (gpt2) and a SentencePiece-style one (llama, as Gemma's).


def byte_alphabet() -> list[str]:
    """GPT-2's byte -> printable character table, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    extra = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(extra)) for b in range(256)]


def gpt2_vocab(pre: str = "smollm") -> dict:
    tokens = [*byte_alphabet(), "ab", "\u0120ab", "23", "<|endoftext|>"]
    return {"model": "gpt2", "pre": pre, "tokens": tokens, "types": [1] * 259 + [3],
            "merges": ["a b", "\u0120 ab", "2 3"], "bos": 259, "eos": 259, "add_bos": False}


def spm_vocab(space_prefix: bool = False) -> dict:
    """Gemma-style: control tokens, byte fallback, pieces ranked by position, and user-defined
    whitespace runs (the space run stored with plain spaces, as Gemma's GGUF does)."""
    tokens = ["<pad>", "<eos>", "<bos>", "<unk>", *(f"<0x{b:02X}>" for b in range(256)),
              SPACE, "a", "b", SPACE + "a", "ab", SPACE + "ab", "  ", "\n\n"]
    types = [3, 3, 3, 3, *[6] * 256, 1, 1, 1, 1, 1, 1, 4, 4]
    return {"model": "llama", "pre": "default", "tokens": tokens, "types": types,
            "scores": [-float(i) for i in range(len(tokens))], "bos": 2, "eos": 1, "unk": 3,
            "pad": 0, "add_bos": True, "space_prefix": space_prefix}


def add_tokenizer(w: gguf.GGUFWriter, v: dict, drop: tuple = ()) -> None:
    if "tokens" not in drop:
        w.add_token_list(v["tokens"])
    w.add_tokenizer_model(v["model"])
    w.add_tokenizer_pre(v["pre"])
    w.add_token_types(v["types"])
    if "merges" in v:
        w.add_token_merges(v["merges"])
    if "scores" in v:
        w.add_token_scores(v["scores"])
        w.add_unk_token_id(v["unk"])
        w.add_pad_token_id(v["pad"])
        w.add_add_space_prefix(v["space_prefix"])
    w.add_bos_token_id(v["bos"])
    w.add_eos_token_id(v["eos"])
    w.add_add_bos_token(v["add_bos"])


# ---------------------------------------------------------------------------------------------
# Writing a reference model as llama.cpp would.


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.permute of q/k rows."""
    rows, rest = w.shape[0], w.shape[1:]
    return w.reshape(n_head, 2, rows // n_head // 2, *rest).swapaxes(1, 2).reshape(w.shape)


def encode(values: np.ndarray, qtype, rng) -> np.ndarray:
    """The file's bytes (or floats) for values in type qtype: llama.cpp's quantizer where the
    gguf package has one, else random blocks (bytes < 0x20, so every float16 in them is a small
    finite number)."""
    if qtype == T.F32:
        return values.astype(np.float32)
    if qtype == T.F16:
        return values.astype(np.float16)
    try:
        return gguf.quants.quantize(values, qtype)
    except NotImplementedError:
        shape = gguf.quants.quant_shape_to_byte_shape(values.shape, qtype)
        return rng.integers(0, 0x20, size=shape, dtype=np.uint8)


def gguf_name(name: str, arch: str) -> tuple[str, str]:
    """(GGUF tensor name, kind) of an mlx-lm parameter name."""
    module, part = name.rsplit(".", 1)
    if module in TOP:
        return f"{TOP[module]}.{part}", TOP[module]
    _, _, layer, sub = module.split(".", 3)  # model.layers.N.<sub>
    kind = NAMES.get(sub) or {"post_attention_layernorm": "post_attention_norm" if arch == "gemma3"
                              else "ffn_norm"}[sub]
    return f"blk.{layer}.{kind}.{part}", kind


def write_tiny_gguf(path: Path, arch: str, types=EXACT_MIX, hidden: int = 96, seed: int = 0,
                    vocab: dict | None = None, drop: tuple = (), extra: dict | None = None):
    """Write a tiny random `arch` model as a GGUF; return (reference model, its config)."""
    import importlib

    rng = np.random.default_rng(seed)
    v = vocab or (spm_vocab() if arch == "gemma3" else gpt2_vocab())
    config = dict(configs(hidden)[arch], vocab_size=len(v["tokens"]))
    module = importlib.import_module(f"mlx_lm.models.{config['model_type']}")
    mx.random.seed(seed)
    model = module.Model(module.ModelArgs.from_dict(config))
    if config["tie_word_embeddings"] and hasattr(model, "lm_head"):
        model.pop("lm_head")
        model.tie_word_embeddings = True  # as gemma3_text's sanitize() does without lm_head
    w = gguf.GGUFWriter(str(path), arch)
    p = f"{arch}."
    w.add_block_count(config["num_hidden_layers"])
    w.add_context_length(config["max_position_embeddings"])
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(config["intermediate_size"])
    w.add_head_count(config["num_attention_heads"])
    w.add_head_count_kv(config["num_key_value_heads"])
    w.add_layer_norm_rms_eps(config["rms_norm_eps"])
    w.add_rope_freq_base(config["rope_theta"])
    if "head_dim" in config:
        w.add_key_length(config["head_dim"])
        w.add_value_length(config["head_dim"])
    if arch == "gemma3":
        w.add_sliding_window(config["sliding_window"])
    for key, value in (extra or {}).items():
        w.add_key_value(key.replace("{arch}.", p), *value)
    add_tokenizer(w, v, drop)
    reference = {}
    for name, value in tree_flatten(model.parameters()):
        value = np.array(value, dtype=np.float32)
        gname, kind = gguf_name(name, arch)
        if kind.endswith("norm"):  # norms drawn away from their init, so a swap would show
            value = (rng.standard_normal(value.shape) * 0.3 + (0 if arch == "gemma3" else 1))
        heads = {"attn_q": config["num_attention_heads"], "attn_k": config["num_key_value_heads"]}
        stored = value.astype(np.float32)
        if arch == "llama" and kind in heads:
            stored = llama_cpp_permute(stored, heads[kind])
        if arch == "gemma3" and kind.endswith("norm"):
            stored = stored + 1
        qtype = types.get(kind, T.F32) if stored.ndim == 2 else T.F32
        data = encode(stored, qtype, rng)
        held = gguf.quants.dequantize(data, qtype).astype(np.float32)  # what the file holds
        if arch == "llama" and kind in heads:  # back to Hugging Face order, by index
            held = held[np.argsort(llama_cpp_permute(np.arange(held.shape[0]), heads[kind]))]
        if arch == "gemma3" and kind.endswith("norm"):
            held = held - 1
        reference[name] = mx.array(held)
        if qtype in (T.F32, T.F16):
            w.add_tensor(gname, data)
        else:
            w.add_tensor(gname, data, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    model.update(tree_unflatten_dict(reference))
    return model, config


def tree_unflatten_dict(flat: dict):
    from mlx.utils import tree_unflatten

    return tree_unflatten(list(flat.items()))


def exact_scale(model, hidden: int):
    """The reference with Gemma's embedding scale sqrt(hidden) exact, as the float32 model
    (mlx-lm rounds it to bfloat16; step 1's folder computes the exact one)."""
    ratio = hidden ** 0.5 / mx.array(hidden ** 0.5, dtype=mx.bfloat16).item()
    embed = model.model.embed_tokens
    base = type(embed)
    embed.__class__ = type("ExactScale", (base,),
                           {"__call__": lambda s, x: base.__call__(s, x) * ratio})
    return model


def logits(model, n: int = 16) -> np.ndarray:
    ids = mx.array([[(7 * i + 3) % 250 for i in range(n)]])
    return np.array(model(ids)[0].astype(mx.float32))


def convert(tmp_path: Path, src: Path, dtype: str | None = None) -> Path:
    out = tmp_path / "out"
    assert make_baseline(out, gguf=src, dtype=dtype) == 0
    return out


# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [None, "float32"])
@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "gemma3"])
def test_each_architecture_converts_exactly(tmp_path, arch, dtype):
    """Kept types (default) or float32: the folder gives the reference's logits; hidden 96 makes
    Gemma's sqrt(96) differ from its bfloat16 rounding, and 16 tokens pass its window of 4."""
    from mlx_lm.utils import load_model

    reference, config = write_tiny_gguf(tmp_path / "m.gguf", arch)
    out = convert(tmp_path, tmp_path / "m.gguf", dtype)
    if arch == "gemma3":
        exact_scale(reference, config["hidden_size"])
    model, _ = load_model(out, strict=True)
    from smslora.model import load_model as project_load

    dequantized, _ = project_load(out, dequantize=True)
    want = logits(reference)
    np.testing.assert_allclose(logits(dequantized), want, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(logits(model), want, rtol=2e-2, atol=2e-2)  # mlx-lm's kernels
    written = json.loads((out / "config.json").read_text())
    assert ("quantization" in written) == (dtype is None)
    assert written["model_type"] == config["model_type"]


def test_mlx_layouts_equal_mlx_own_gguf_reader(tmp_path):
    """Q4_0, Q4_1 and Q8_0 written by layouts.py: the arrays MLX's reader makes, bit for bit."""
    from smslora.convert.gguf_file import open_gguf
    from smslora.convert.layouts import to_mlx_layout

    mix = {"attn_q": T.Q4_0, "attn_k": T.Q4_1, "attn_v": T.Q8_0, "token_embd": T.Q8_0}
    write_tiny_gguf(tmp_path / "m.gguf", "llama", mix)
    theirs = mx.load(str(tmp_path / "m.gguf"), format="gguf")
    checked = 0
    for name, t in open_gguf(tmp_path / "m.gguf").tensors.items():
        if t.tensor_type.name in ("Q4_0", "Q4_1", "Q8_0"):
            prefix = name.removesuffix(".weight")
            for part, mine in to_mlx_layout(t).items():
                other = np.array(theirs[name if part == "weight" else f"{prefix}.{part}"])
                assert mine.dtype == other.dtype and np.array_equal(mine, other), (name, part)
                checked += 1
    assert checked == 3 * (3 * 2 + 1)


def weight_types() -> list:
    """Every type the gguf package de-quantizes (F32 is the norms' type in every file here)."""
    def readable(q):
        try:
            gguf.quants.dequantize(np.zeros(gguf.GGML_QUANT_SIZES[q][1], np.uint8), q)
            return q != T.F32
        except NotImplementedError:
            return False
    return [q for q in T if readable(q)]


KEPT_EXACTLY = {"F16", "BF16", "Q4_0", "Q4_1", "Q8_0", "Q5_0", "Q5_1", "Q4_K", "Q5_K"}
MATRICES = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down",
            "token_embd")


@pytest.mark.parametrize("qtype", weight_types(), ids=lambda q: q.name)
def test_each_tensor_type(tmp_path, qtype, capsys):
    """Every matrix in one type (rows of 256: the K and IQ types' block): the types MLX's layout
    holds keep every number; the others are re-quantized (Q6_K to 8-bit, the rest to 4) with
    a re-quantization error, and step 1 says which."""
    from smslora.model import load_model

    reference, _ = write_tiny_gguf(tmp_path / "m.gguf", "llama", dict.fromkeys(MATRICES, qtype),
                                   hidden=256)
    out = convert(tmp_path, tmp_path / "m.gguf")
    printed = capsys.readouterr().out
    model, _ = load_model(out, dequantize=True)
    got, want = dict(tree_flatten(model.parameters())), dict(tree_flatten(reference.parameters()))
    assert got.keys() == want.keys()
    worst = 0.0
    for name, w in want.items():
        w, g = np.array(w), np.array(got[name])
        if qtype.name in KEPT_EXACTLY or w.ndim == 1:
            assert np.array_equal(g, w), name
        else:
            worst = max(worst, np.linalg.norm(g - w) / np.linalg.norm(w))
    line = next(x for x in printed.splitlines() if x.strip().startswith(f"{qtype.name} ("))
    if qtype.name in ("F16", "BF16"):
        assert "kept as" in line
    elif qtype.name in KEPT_EXACTLY:
        assert "the same numbers" in line
    else:
        bits = 8 if qtype.name == "Q6_K" else 4
        assert f"re-quantized to MLX {bits}-bit" in line
        assert 0 < worst < (0.01 if bits == 8 else 0.2), worst
