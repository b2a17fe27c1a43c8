"""Tiny random mlx-lm llama models, built from a config in a second, for fast tests."""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models import llama
from mlx_lm.utils import save_config, save_model
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from smslora import task

# The real SmolLM2-135M shape, for exact parameter counts without its weights.
SMOLLM2_135M = dict(model_type="llama", hidden_size=576, num_hidden_layers=30,
                    intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3,
                    rms_norm_eps=1e-5, vocab_size=49152, rope_theta=100000.0,
                    tie_word_embeddings=True, max_position_embeddings=8192)

TINY = dict(model_type="llama", hidden_size=64, num_hidden_layers=2, intermediate_size=128,
            num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, vocab_size=512,
            rope_theta=10000.0, tie_word_embeddings=True, max_position_embeddings=1024)

CORPUS = [
    task.format_example("WINNER!! Claim your free prize now, call 09061701461", "spam"),
    task.format_example("Ok lar, I'll be there by 6. Want anything from the shop?", "ham"),
    "Your parcel is held, pay the fee at bit.ly/xyz. Hi mum, new phone. "
    "Code 123456. Are you coming to poker tonight? 0123456789 £$€ !?.,:;'\"()-_/@#&<>",
]


def make_tokenizer(vocab_size: int) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>",
                                  "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS * 20, trainer)
    return tok


def make_tiny_model(path: Path, quantize: bool = False, seed: int = 0, **overrides) -> Path:
    """Write a random llama + byte-level BPE tokenizer that mlx_lm.load() reads."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = {**TINY, **overrides, "bos_token_id": 1, "eos_token_id": 2}
    tok = make_tokenizer(config["vocab_size"])
    config["vocab_size"] = max(config["vocab_size"], tok.get_vocab_size())
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|im_start|>",
        "eos_token": "<|im_end|>", "unk_token": "<|endoftext|>", "pad_token": "<|im_end|>",
        "add_bos_token": False, "model_max_length": 1024}))
    mx.random.seed(seed)
    model = llama.Model(llama.ModelArgs.from_dict(config))
    if quantize:
        nn.quantize(model, group_size=32, bits=4)
        config["quantization"] = {"group_size": 32, "bits": 4, "mode": "affine"}
    mx.eval(model.parameters())
    save_model(path, model)
    save_config(config, config_path=path / "config.json")
    return path


def strengthen_adapters(ad: Path) -> Path:
    """Random LoRA B matrices in a trained run folder, so the adapter visibly changes the
    logits (a tiny run's near-zero B would make parity checks vacuous); checksums re-recorded."""
    from smslora import artifacts

    weights = mx.load(str(ad / "adapters.safetensors"))
    mx.random.seed(3)
    weights = {k: (mx.random.normal(v.shape) * 0.05 if k.endswith("lora_b") else v)
               for k, v in weights.items()}
    mx.save_safetensors(str(ad / "adapters.safetensors"), weights)
    artifacts.write_checksums(ad, "scripts/03_train.py")  # a deliberate edit: record it
    return ad
