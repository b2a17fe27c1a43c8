"""The tokenizer, rebuilt from a GGUF's metadata with the `tokenizers` library.

A GGUF has no tokenizer.json: it stores the vocabulary, the merges (byte-level BPE) or the scores
(SentencePiece), the token types and the special ids. Two families are rebuilt:
  * byte-level BPE (`tokenizer.ggml.model` gpt2: SmolLM2, Qwen, Llama 3), split as the file's
    `tokenizer.ggml.pre` says;
  * SentencePiece-style BPE (`llama`: Gemma, Llama 2, Mistral) with byte fallback, BOS added,
    merges recovered from the vocabulary when the file has none.
Control tokens (type 3) become special tokens and user-defined ones (type 4) added tokens, so
both are matched whole, as llama.cpp does.
"""

from __future__ import annotations

from ..errors import UserError

CONTROL, USER_DEFINED = 3, 4
SPACE = "\u2581"  # SentencePiece's visible space

QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
               r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
SPLITS = {"qwen2": QWEN2_SPLIT, "deepseek-r1-qwen": QWEN2_SPLIT, "llama-bpe": LLAMA3_SPLIT,
          "llama3": LLAMA3_SPLIT, "llama-v3": LLAMA3_SPLIT}
BYTE_LEVEL_PRE = ("smollm", "gpt-2", "gpt2", *SPLITS)


def build_tokenizer(meta: dict, arch: str):
    """The `tokenizers.Tokenizer` the GGUF describes; a UserError if it lacks what is needed."""
    model = meta.get("tokenizer.ggml.model")
    for key in ("tokenizer.ggml.model", "tokenizer.ggml.tokens", "tokenizer.ggml.token_type"):
        if key not in meta:
            raise UserError(f"the GGUF's tokenizer metadata lacks {key}: pass a complete GGUF")
    if model == "gpt2":
        tok = byte_level(meta)
    elif model == "llama":
        tok = sentencepiece(meta, arch)
    else:
        raise UserError(f"GGUF tokenizer {model!r} is not supported (byte-level BPE 'gpt2' or "
                        "SentencePiece 'llama'): pass another --gguf")
    add_special_tokens(tok, meta)
    return tok


def byte_level(meta: dict):
    from tokenizers import (Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers,
                            processors)

    pre = meta.get("tokenizer.ggml.pre")
    if pre not in BYTE_LEVEL_PRE:
        raise UserError(f"byte-level BPE pre-tokenizer {pre!r} is not supported "
                        f"({', '.join(BYTE_LEVEL_PRE)}): pass another --gguf")
    if "tokenizer.ggml.merges" not in meta:
        raise UserError("the GGUF's tokenizer metadata lacks tokenizer.ggml.merges: "
                        "pass a complete GGUF")
    tokens = meta["tokenizer.ggml.tokens"]
    merges = [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges,
                               fuse_unk=False, byte_fallback=False))
    if pre in SPLITS:  # the file's own split regex, then bytes to the byte-level alphabet
        steps = [pre_tokenizers.Split(Regex(SPLITS[pre]), behavior="isolated"),
                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
        if pre in ("qwen2", "deepseek-r1-qwen"):
            tok.normalizer = normalizers.NFC()
    else:  # GPT-2's own regex; SmolLM's splits every digit apart first
        steps = [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]
        if pre == "smollm":
            steps.insert(0, pre_tokenizers.Digits(individual_digits=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence(steps)
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.decoder = decoders.ByteLevel()
    if adds_bos(meta):
        tok.post_processor = bos_template(meta)
    return tok


def sentencepiece(meta: dict, arch: str):
    """SentencePiece BPE as Hugging Face's converters build it (GemmaTokenizer for gemma3,
    LlamaTokenizer otherwise)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers

    # Gemma files spell the tokens for runs of spaces with real spaces; the vocabulary has "▁".
    tokens = [t.replace(" ", SPACE) if t and not t.strip() else t
              for t in meta["tokenizer.ggml.tokens"]]
    vocab = {t: i for i, t in enumerate(tokens)}
    if "tokenizer.ggml.merges" in meta:
        merges = [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
    elif arch == "gemma3":  # its scores do not follow the merge order; the token order does
        merges = recover_merges(vocab, {t: -i for i, t in enumerate(tokens)})
    elif "tokenizer.ggml.scores" in meta:
        merges = recover_merges(vocab, dict(zip(tokens, meta["tokenizer.ggml.scores"])))
    else:
        raise UserError("the GGUF's tokenizer metadata has neither merges nor scores: "
                        "pass a complete GGUF")
    unk_id = meta.get("tokenizer.ggml.unknown_token_id")
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=True, byte_fallback=True,
                               unk_token=tokens[unk_id] if unk_id is not None else None))
    steps = [decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    if meta.get("tokenizer.ggml.add_space_prefix", True):
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement=SPACE, prepend_scheme="first",
                                                     split=False)
        steps.append(decoders.Strip(content=" ", left=1, right=0))
    else:
        tok.normalizer = normalizers.Replace(" ", SPACE)
        tok.pre_tokenizer = pre_tokenizers.Split(" ", behavior="merged_with_previous")
    tok.decoder = decoders.Sequence(steps)
    if adds_bos(meta):
        tok.post_processor = bos_template(meta)
    return tok


def recover_merges(vocab: dict, rank: dict) -> list[tuple[str, str]]:
    """The merges a SentencePiece BPE vocabulary implies: every split of a token into two
    tokens, best-ranked first (the order Hugging Face's converter gives them)."""
    merges = []
    for token, score in rank.items():
        pairs = [(token[:i], token[i:], score) for i in range(1, len(token))
                 if token[:i] in vocab and token[i:] in vocab]
        merges.extend(sorted(pairs, key=lambda m: (vocab[m[0]], vocab[m[1]])))
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(left, right) for left, right, _ in merges]


def adds_bos(meta: dict) -> bool:
    """llama.cpp adds BOS to a SentencePiece vocabulary unless the file says not to."""
    default = meta.get("tokenizer.ggml.model") == "llama"
    return bool(meta.get("tokenizer.ggml.add_bos_token", default))


def bos_template(meta: dict):
    from tokenizers import processors

    bos_id = meta.get("tokenizer.ggml.bos_token_id")
    if bos_id is None:
        raise UserError("the GGUF's tokenizer adds BOS but names no tokenizer.ggml.bos_token_id")
    bos = meta["tokenizer.ggml.tokens"][bos_id]
    return processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B:1",
                                         special_tokens=[(bos, bos_id)])


def add_special_tokens(tok, meta: dict) -> None:
    from tokenizers import AddedToken

    pairs = list(zip(meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"]))
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, kind in pairs if kind == CONTROL])
    vocab = tok.get_vocab()
    user = [AddedToken(t, special=False, normalized=False)
            for t, kind in pairs if kind == USER_DEFINED and t in vocab]
    if user:
        tok.add_tokens(user)


def tokenizer_config(meta: dict, context_length: int) -> dict:
    """tokenizer_config.json: which special tokens play which role, and the chat template."""
    tokens = meta["tokenizer.ggml.tokens"]
    role = {r: tokens[meta[f"tokenizer.ggml.{k}_token_id"]]
            for r, k in [("bos_token", "bos"), ("eos_token", "eos"), ("unk_token", "unknown"),
                         ("pad_token", "padding")] if f"tokenizer.ggml.{k}_token_id" in meta}
    config = {"tokenizer_class": "PreTrainedTokenizerFast", **role,
              "add_bos_token": adds_bos(meta),
              "add_eos_token": False, "clean_up_tokenization_spaces": False,
              "model_max_length": context_length}
    if "tokenizer.chat_template" in meta:
        config["chat_template"] = meta["tokenizer.chat_template"]
    return config
