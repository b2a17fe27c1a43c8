"""The tokenizer, rebuilt from a GGUF's metadata with the `tokenizers` library."""

from __future__ import annotations

from ..errors import UserError


def build_tokenizer(meta: dict):
    """A `tokenizers` byte-level BPE equal to SmolLM2's tokenizer.json (GGUF model gpt2, pre smollm).

    SmolLM's pre-tokenizer splits every digit apart, then applies GPT-2's byte-level regex; no BOS is
    added. Control tokens (token_type 3) become special tokens so they are never split."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    if meta.get("tokenizer.ggml.model") != "gpt2":
        raise UserError(f"GGUF tokenizer {meta.get('tokenizer.ggml.model')!r} is not byte-level "
                        "BPE (gpt2): this script only converts those")
    tokens = meta["tokenizer.ggml.tokens"]
    merges = [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges,
                               fuse_unk=False, byte_fallback=False))
    steps = [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]
    if meta.get("tokenizer.ggml.pre") == "smollm":
        steps.insert(0, pre_tokenizers.Digits(individual_digits=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence(steps)
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.decoder = decoders.ByteLevel()
    types = meta["tokenizer.ggml.token_type"]
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, kind in zip(tokens, types) if kind == 3])
    return tok


def tokenizer_config(meta: dict, context_length: int) -> dict:
    """tokenizer_config.json: which special tokens play which role, and the chat template."""
    tokens = meta["tokenizer.ggml.tokens"]
    role = {r: tokens[meta[f"tokenizer.ggml.{k}_token_id"]]
            for r, k in [("bos_token", "bos"), ("eos_token", "eos"), ("unk_token", "unknown"),
                         ("pad_token", "padding")] if f"tokenizer.ggml.{k}_token_id" in meta}
    config = {"tokenizer_class": "PreTrainedTokenizerFast", **role,
              "add_bos_token": bool(meta.get("tokenizer.ggml.add_bos_token", False)),
              "add_eos_token": False, "clean_up_tokenization_spaces": False,
              "model_max_length": context_length}
    if "tokenizer.chat_template" in meta:
        config["chat_template"] = meta["tokenizer.chat_template"]
    return config
