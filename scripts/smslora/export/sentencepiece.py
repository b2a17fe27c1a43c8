"""A SentencePiece-style tokenizer.json (BPE with byte fallback: Gemma's, as step 1 rebuilds it
from the GGUF's metadata in convert/tokenizer.py) as llama.cpp's `llama` vocabulary: tokens in id
order, their scores and types, and whether a space is put before the text.

What step 1 did is undone: Gemma spells its runs of spaces as user-defined tokens with real
spaces ("  "), which the tokenizer.json holds as "▁▁"; control tokens are its special added
tokens, user-defined ones its other added tokens, <0xXX> the byte-fallback tokens.

llama.cpp's SentencePiece tokenizer merges adjacent pieces into the vocabulary token with the
highest score; Hugging Face's BPE applies the tokenizer.json's merges in order. So the score of
each token a merge makes is minus the rank of its first merge, which gives llama.cpp the same
merge order as ours (for Gemma it is also the score in Google's file: minus the token's rank).
Tokens no merge makes (single characters) are never compared by llama.cpp; they follow, in id
order. Control and user-defined tokens score -1000, byte tokens 0, as in Gemma's file.
"""

from __future__ import annotations

import re

from ..errors import UserError
from .tokens import BYTE, CONTROL, NORMAL, UNUSED, USER_DEFINED, tokens_by_id

SPACE = "\u2581"  # SentencePiece's visible space
BYTE_TOKEN = re.compile(r"<0x[0-9A-F]{2}>\Z")
FIXED_SCORES = {CONTROL: -1000.0, USER_DEFINED: -1000.0, UNUSED: -1000.0, BYTE: 0.0}


def is_replace_space(step: dict | None) -> bool:
    return bool(step) and step.get("type") == "Replace" \
        and step.get("pattern") == {"String": " "} and step.get("content") == SPACE


def space_prefix(tok: dict) -> bool:
    """llama.cpp's add_space_prefix for the two shapes Hugging Face's converters and step 1 give
    a SentencePiece tokenizer: spaces replaced by ▁ in the normalizer (Gemma: no prefix), or a
    Metaspace pre-tokenizer (its prepend scheme); anything else is a one-line refusal."""
    norm, pre = tok.get("normalizer"), tok.get("pre_tokenizer")
    split = {"type": "Split", "pattern": {"String": " "}, "behavior": "MergedWithPrevious",
             "invert": False}
    if is_replace_space(norm) and pre in (None, split):
        return False
    if norm is None and pre and pre.get("type") == "Metaspace" \
            and pre.get("replacement") == SPACE and not pre.get("split", False):
        return pre.get("prepend_scheme", "always") in ("first", "always")
    shape = [s.get("type") for s in (norm, pre) if s]
    raise UserError(f"the model's tokenizer is SentencePiece-style (byte fallback) with "
                    f"{shape or 'no normalizer'}: the GGUF export writes those that replace "
                    "spaces with \u2581 (Gemma) or use a Metaspace pre-tokenizer")


def vocabulary(tok: dict, n_vocab: int, space_runs: bool) -> tuple[list[str], list[float],
                                                                    list[int]]:
    """Tokens, scores and types, n_vocab of each (the embedding's rows; ids the tokenizer does
    not use are [PADn] of type UNUSED). space_runs: whitespace runs held with ▁ are Gemma's
    user-defined tokens spelled with spaces."""
    vocab = tok["model"]["vocab"]
    by_id, kinds = tokens_by_id(tok, n_vocab)
    for i, t in by_id.items():
        if kinds[i] != NORMAL:
            continue
        if BYTE_TOKEN.match(t):
            kinds[i] = BYTE
        elif space_runs and len(t) > 1 and not t.replace(SPACE, " ").strip():
            by_id[i], kinds[i] = t.replace(SPACE, " "), USER_DEFINED
    tokens = [by_id.get(i, f"[PAD{i}]") for i in range(n_vocab)]
    types = [kinds.get(i, UNUSED) for i in range(n_vocab)]
    rank = merge_ranks(tok, vocab, types)
    scores = [FIXED_SCORES[k] if k in FIXED_SCORES else -float(rank[i])
              for i, k in enumerate(types)]
    return tokens, scores, types


def merge_ranks(tok: dict, vocab: dict, types: list[int]) -> dict[int, int]:
    """Each normal token's rank: first the tokens merges make, in the order of their first
    merge, then the others in id order."""
    rank: dict[int, int] = {}
    for merge in tok["model"].get("merges", []):
        left, right = merge if isinstance(merge, list) else merge.split(" ", 1)
        i = vocab.get(left + right)
        if i is not None and types[i] == NORMAL and i not in rank:
            rank[i] = len(rank)
    for i, kind in enumerate(types):
        if kind == NORMAL and i not in rank:
            rank[i] = len(rank)
    return rank
