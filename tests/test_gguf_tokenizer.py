"""The tokenizer step 1 rebuilds from a GGUF's metadata, on tiny vocabularies whose token ids
can be worked out by hand, and as mlx-lm loads it from a converted folder."""

from __future__ import annotations

import pytest

from smslora.convert.tokenizer import build_tokenizer, recover_merges
from smslora.errors import UserError
from test_gguf_convert import SPACE, convert, gpt2_vocab, spm_vocab, write_tiny_gguf

BYTE = {chr(b): b for b in range(ord("!"), ord("~") + 1)}  # printable ASCII: id = byte
AB, SPACE_AB, TWENTY_THREE, SPACE_ID = 256, 257, 258, 32


def meta_of(v: dict) -> dict:
    """The metadata a GGUF with vocabulary v holds, as step 1 reads it."""
    meta = {"tokenizer.ggml.model": v["model"], "tokenizer.ggml.pre": v["pre"],
            "tokenizer.ggml.tokens": v["tokens"], "tokenizer.ggml.token_type": v["types"],
            "tokenizer.ggml.bos_token_id": v["bos"], "tokenizer.ggml.eos_token_id": v["eos"],
            "tokenizer.ggml.add_bos_token": v["add_bos"]}
    if "merges" in v:
        meta["tokenizer.ggml.merges"] = v["merges"]
    if "scores" in v:
        meta.update({"tokenizer.ggml.scores": v["scores"],
                     "tokenizer.ggml.unknown_token_id": v["unk"],
                     "tokenizer.ggml.add_space_prefix": v["space_prefix"]})
    return meta


def ids(v: dict, text: str, arch: str = "llama") -> list[int]:
    return build_tokenizer(meta_of(v), arch).encode(text).ids


@pytest.mark.parametrize("pre, digits", [("smollm", [BYTE["2"], BYTE["3"]]),
                                         ("qwen2", [BYTE["2"], BYTE["3"]]),
                                         ("llama-bpe", [TWENTY_THREE]), ("gpt-2", [TWENTY_THREE])])
def test_byte_level_splits_as_the_file_says(pre, digits):
    """SmolLM and Qwen split every digit apart; Llama 3 keeps runs of up to three, GPT-2 any
    run: so the merge "2 3" applies or not."""
    v = gpt2_vocab(pre)
    assert ids(v, "ab ab") == [AB, SPACE_AB]
    assert ids(v, "a 23") == [BYTE["a"], SPACE_ID, *digits]
    assert ids(v, "<|endoftext|>ab") == [259, AB]  # a control token is matched whole


def test_qwen2_normalizes_to_nfc():
    """e + combining acute is é (C3 A9 in UTF-8) for Qwen's tokenizer, as its tokenizer.json."""
    alphabet = gpt2_vocab()["tokens"]
    assert ids(gpt2_vocab("qwen2"), "e\u0301") == [alphabet.index(chr(0xC3)), alphabet.index("©")]
    assert len(ids(gpt2_vocab("smollm"), "e\u0301")) == 3


def test_gemma_style_sentencepiece():
    """BOS added, no leading space, merges recovered from the token order, byte fallback,
    the plain-space run token respelled with ▁, the newline run matched whole."""
    v = spm_vocab()
    assert ids(v, "ab abc", "gemma3") == [2, 264, 265, 4 + ord("c")]
    assert ids(v, "a  b", "gemma3") == [2, 261, 266, 262]
    assert ids(v, "a\n\nb", "gemma3") == [2, 261, 267, 262]
    assert ids(v, "é", "gemma3") == [2, 4 + 0xC3, 4 + 0xA9]
    tok = build_tokenizer(meta_of(v), "gemma3")
    assert tok.decode([264, 265, 266, 4 + 0xC3, 4 + 0xA9]) == "ab ab  é"


def test_llama_style_sentencepiece_adds_a_leading_space():
    v = spm_vocab(space_prefix=True)
    assert ids(v, "ab ab") == [2, 265, 265]
    assert build_tokenizer(meta_of(v), "llama").decode([265, 265]) == "ab ab"


def test_recovered_merges_follow_the_rank():
    """Best-ranked token first; for one token, the longer left piece first (the order of
    Hugging Face's converter, which made the reference token ids)."""
    vocab = {t: i for i, t in enumerate([SPACE, "a", "b", SPACE + "a", "ab", SPACE + "ab"])}
    assert recover_merges(vocab, {t: -i for t, i in vocab.items()}) == [
        (SPACE, "a"), ("a", "b"), (SPACE + "a", "b"), (SPACE, "ab")]


@pytest.mark.parametrize("change, message", [
    ({"tokenizer.ggml.model": "bert"}, "'bert' is not supported"),
    ({"tokenizer.ggml.pre": "falcon"}, "pre-tokenizer 'falcon'"),
    ({"tokenizer.ggml.merges": None}, "lacks tokenizer.ggml.merges"),
    ({"tokenizer.ggml.token_type": None}, "lacks tokenizer.ggml.token_type"),
])
def test_unsupported_or_incomplete_tokenizers_are_user_errors(change, message):
    meta = {**meta_of(gpt2_vocab()), **change}
    meta = {k: v for k, v in meta.items() if v is not None}
    with pytest.raises(UserError, match=message):
        build_tokenizer(meta, "llama")


@pytest.mark.parametrize("arch, text, want", [("llama", "ab ab", [AB, SPACE_AB]),
                                              ("gemma3", "ab  abc", [2, 264, 260, 265, 103])])
def test_converted_folder_tokenizes_in_mlx_lm(tmp_path, arch, text, want):
    """Through tokenizer.json + tokenizer_config.json as mlx-lm (transformers) loads them."""
    from mlx_lm import load

    write_tiny_gguf(tmp_path / "m.gguf", arch)
    _, tokenizer = load(str(convert(tmp_path, tmp_path / "m.gguf")))
    assert tokenizer.encode(text) == want
    assert tokenizer.decode(want[1:] if arch == "gemma3" else want) == text
