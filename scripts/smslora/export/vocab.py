"""A model folder's tokenizer as llama.cpp's GGUF metadata (the keys convert_hf_to_gguf.py writes),
for the two BPE families:

  * SentencePiece-style BPE with byte fallback (`tokenizer.ggml.model` = llama), Gemma's:
    tokens, scores and types from sentencepiece.py, no merges, pre-tokenizer `default`, and
    `add_space_prefix`;
  * byte-level BPE (`tokenizer.ggml.model` = gpt2), SmolLM2's: the vocabulary in id order, each
    token's type (added special tokens are CONTROL, other added tokens USER_DEFINED), the merges
    and the pre-tokenizer by llama.cpp's name (below).

For both, the special token ids come from gguf.SpecialVocab (llama.cpp's own reader of
tokenizer.json / tokenizer_config.json), and whether BOS and EOS are added from what the model's
tokenizer does (Gemma's adds BOS, SmolLM2's nothing): llama.cpp then tokenizes a prompt into
the ids MLX scores.

llama.cpp names byte-level pre-tokenizers by a hash of what a tokenizer makes of a test text;
here the tokenizer.json's own pre-tokenizer is matched instead, for the two shapes llama.cpp
splits the same way:
  * `smollm`: digits split one by one, then GPT-2's regex (SmolLM, SmolLM2);
  * `gpt-2`: GPT-2's regex alone.
Any other tokenizer is refused with one line: a GGUF whose tokenizer splits text differently
from ours would score other tokens, silently.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from ..errors import UserError
from . import sentencepiece

from .tokens import UNUSED, tokens_by_id


def read_tokenizer(model_dir: Path) -> dict:
    path = Path(model_dir) / "tokenizer.json"
    try:
        tok = json.loads(path.read_text(encoding="utf-8"))
        tok["model"]["type"]
    except (ValueError, UnicodeDecodeError, KeyError, TypeError):
        raise UserError(f"{path} is not a tokenizer.json (no model type in it): re-run the step "
                        "that wrote the model") from None
    return tok


def tokenizer_kind(tok: dict) -> tuple[str, str]:
    """(tokenizer.ggml.model, tokenizer.ggml.pre) for the tokenizer, or a one-line UserError."""
    if tok["model"]["type"] != "BPE":
        raise UserError(f"the model's tokenizer is {tok['model']['type']}: the GGUF export "
                        "writes BPE tokenizers (byte-level, or SentencePiece-style with byte "
                        "fallback)")
    if tok["model"].get("byte_fallback"):
        sentencepiece.space_prefix(tok)
        return "llama", "default"
    return "gpt2", pre_tokenizer_name(tok)


def pre_tokenizer_name(tok: dict) -> str:
    """llama.cpp's name for a byte-level tokenizer's pre-tokenizer, or a UserError saying what
    it is."""
    if tok.get("normalizer"):
        raise UserError(f"the model's tokenizer normalizes text "
                        f"({tok['normalizer'].get('type')}): the GGUF export does not support it")
    pre = tok.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    kinds = [s.get("type") for s in steps]
    byte_level = steps[-1] if kinds and kinds[-1] == "ByteLevel" else None
    if byte_level is None or not byte_level.get("use_regex", True) \
            or byte_level.get("add_prefix_space"):
        raise UserError(f"the model's tokenizer pre-tokenizes with {kinds or 'nothing'}: the GGUF "
                        "export supports GPT-2's byte-level regex (with or without SmolLM's "
                        "digit split)")
    if kinds == ["ByteLevel"]:
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits"):
        return "smollm"
    raise UserError(f"the model's tokenizer pre-tokenizes with {kinds}: the GGUF export supports "
                    "GPT-2's byte-level regex (with or without SmolLM's digit split)")


def vocabulary(tok: dict, n_vocab: int) -> tuple[list[str], list[int]]:
    """Tokens in id order and their types, n_vocab of them (the embedding's rows); ids the
    tokenizer does not use are [PADn] placeholders of type UNUSED, as convert_hf_to_gguf.py
    writes them."""
    by_id, kinds = tokens_by_id(tok, n_vocab)
    tokens = [by_id.get(i, f"[PAD{i}]") for i in range(n_vocab)]
    types = [kinds.get(i, UNUSED) for i in range(n_vocab)]
    return tokens, types


def add_tokenizer(writer, model_dir: Path, n_vocab: int, tokenizer,
                  space_runs: bool = False) -> dict:
    """Write the tokenizer.ggml.* keys (tokenizer: the model's, loaded; space_runs: see
    sentencepiece.vocabulary); returns the tokenizer's model and pre-tokenizer names."""
    import gguf

    tok = read_tokenizer(model_dir)
    path = Path(model_dir) / "tokenizer_config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError):
        config = None
    if not isinstance(config, dict):
        raise UserError(f"{path} is not a JSON object: re-run the step that wrote the model")
    model, pre = tokenizer_kind(tok)
    writer.add_tokenizer_model(model)
    writer.add_tokenizer_pre(pre)
    if model == "llama":
        tokens, scores, types = sentencepiece.vocabulary(tok, n_vocab, space_runs)
        writer.add_token_list(tokens)
        writer.add_token_scores(scores)
    else:
        tokens, types = vocabulary(tok, n_vocab)
        writer.add_token_list(tokens)
    writer.add_token_types(types)
    quiet = logging.getLogger("gguf")  # it warns of what it does not need (a pair template)
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        special = gguf.SpecialVocab(model_dir, load_merges=model == "gpt2", n_vocab=n_vocab)
    finally:
        quiet.setLevel(level)
    if model == "gpt2" and not special.merges:
        raise UserError(f"{model_dir}/tokenizer.json has no merges: not a byte-level BPE "
                        "tokenizer llama.cpp can rebuild")
    added_like(tokenizer, special)
    special.add_to_gguf(writer, quiet=True)
    if model == "llama":
        writer.add_add_space_prefix(sentencepiece.space_prefix(tok))
    return {"tokenizer": model, "pre_tokenizer": pre}


def added_like(tokenizer, special) -> None:
    """add_bos_token / add_eos_token as the model's tokenizer does (llama.cpp would otherwise
    add BOS to a SentencePiece vocabulary, and read the flags from tokenizer_config.json, which
    a re-saved tokenizer may not carry), with the ids it uses."""
    ids = tokenizer.encode("a")
    for role, at, token_id in (("bos", 0, tokenizer.bos_token_id),
                               ("eos", -1, tokenizer.eos_token_id)):
        adds = token_id is not None and len(ids) > 1 and ids[at] == token_id
        if adds and special.special_token_ids.setdefault(role, token_id) != token_id:
            raise UserError(f"the tokenizer adds {role} token {token_id}, but its files name "
                            f"{special.special_token_ids[role]}: the model folder is "
                            "inconsistent")
        special.add_special_token[role] = adds
