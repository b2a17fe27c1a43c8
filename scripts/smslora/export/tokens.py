"""A tokenizer.json's tokens by id and their llama.cpp token types, as both vocabulary kinds
(byte-level BPE and SentencePiece-style) start from them."""

from __future__ import annotations

from ..errors import UserError

NORMAL, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 3, 4, 5, 6  # gguf.TokenType


def tokens_by_id(tok: dict, n_vocab: int) -> tuple[dict[int, str], dict[int, int]]:
    """{id: token} and {id: type}: the model's vocabulary as NORMAL, its added tokens as CONTROL
    (special) or USER_DEFINED; every id must have a row in the embedding (n_vocab)."""
    by_id = {i: t for t, i in tok["model"]["vocab"].items()}
    kinds = {i: NORMAL for i in by_id}
    for added in tok.get("added_tokens", []):
        by_id[added["id"]] = added["content"]
        kinds[added["id"]] = CONTROL if added.get("special") else USER_DEFINED
    if by_id and max(by_id) >= n_vocab:
        raise UserError(f"the tokenizer has token id {max(by_id)} but the model's embedding has "
                        f"{n_vocab} rows: the model folder is inconsistent")
    return by_id, kinds
