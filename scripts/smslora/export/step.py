"""Step 9 as one call: check every input, then build the export folder beside --out and put it
in place whole (artifacts.atomic_dir), so a failure (a full disk included) leaves what was
there before and no partial file."""

from __future__ import annotations

import shutil
from pathlib import Path

from ..artifacts import atomic_dir, atomic_write_json, atomic_write_text, sha256
from ..errors import UserError
from ..task import COMPLETIONS, PROMPT
from ..threshold import read_threshold
from . import gguf, ollama, peft, source

MANIFEST = "export.json"
MODELFILE = "Modelfile"
NAME = "sms-spam"
MARGIN = 16 << 20  # bytes kept free beyond the estimate (metadata, file system slack)


def gguf_file(kind: str) -> str:
    return f"{NAME}-{kind}.gguf"


def check_out(out_dir: Path, force: bool) -> None:
    """--out must be new, or (with --force) an earlier export or an empty folder: --force never
    deletes a folder of something else."""
    out_dir = Path(out_dir)
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise UserError(f"--out {out_dir} is a file: pass a folder")
    if not force:
        raise UserError(f"{out_dir} exists: pass --force to replace it, or another --out")
    if any(out_dir.iterdir()) and not (out_dir / MANIFEST).is_file():
        raise UserError(f"{out_dir} is not an export folder (no {MANIFEST}): --force replaces "
                        "only an earlier export; pass another --out")


def parameter_count(config: dict) -> int:
    """The model's parameters, from its config (for the size of the file to come)."""
    h, i, v = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    heads = config["num_attention_heads"]
    dim = config.get("head_dim") or h // heads
    q, kv = heads * dim, config.get("num_key_value_heads", heads) * dim
    block = 2 * h * q + 2 * h * kv + 3 * h * i + 4 * h + 2 * dim
    head = 0 if config.get("tie_word_embeddings", True) else v * h
    return v * h + config["num_hidden_layers"] * block + h + head


def check_space(out_dir: Path, need: int) -> None:
    """Refuse at once when the disk cannot hold the export (a disk that fills up later anyway
    is caught by the write itself; atomic_dir removes the partial folder)."""
    where = Path(out_dir).resolve()
    while not where.exists():
        where = where.parent
    free = shutil.disk_usage(where).free
    if free < need + MARGIN:
        raise UserError(f"not enough disk space for the export in {where}: about "
                        f"{(need + MARGIN) / 1e6:.0f} MB needed, {free / 1e6:.0f} MB free")


def run(model_dir: Path, out_dir: Path, kind: str | None = None, adapter_dir: Path | None = None,
        base_id: str | None = None, force: bool = False, trust_remote_code: bool = False,
        log=print) -> dict:
    """Export the model (kind: f16 | q8_0 | None) and/or the adapter (adapter_dir) into out_dir;
    returns the manifest written there."""
    model_dir = Path(model_dir)
    if kind is None and adapter_dir is None:
        raise UserError("nothing to export: pass --gguf f16|q8_0 and/or --peft")
    check_out(out_dir, force)
    need = 0
    if kind is not None:
        config = gguf.check(model_dir, kind)
        need += parameter_count(config) * (2 if kind == "f16" else 34 / 32)
    if adapter_dir is not None:
        adapter = peft.read_adapter_config(adapter_dir)
        base_id = base_id or peft.hf_id(adapter.get("model"))
        if not base_id:
            raise UserError(f"the Hugging Face id of the base of {adapter_dir} is not known (its "
                            "source.json names none): pass --base-id, e.g. "
                            "HuggingFaceTB/SmolLM2-135M-Instruct")
        need += sum(p.stat().st_size for p in Path(adapter_dir).glob("*.safetensors"))
    check_space(out_dir, int(need))
    manifest = {"written_by": "scripts/09_export.py", "prompt": PROMPT, "completions": COMPLETIONS}
    with atomic_dir(out_dir) as tmp:
        if kind is not None:
            manifest.update(export_gguf(model_dir, config, tmp, kind, trust_remote_code, log))
        if adapter_dir is not None:
            log(f"writing the adapter in {adapter_dir} in PEFT's format (base {base_id})")
            manifest["peft"] = {"adapter": str(adapter_dir),
                                "config": peft.write_peft(adapter_dir, tmp, base_id)}
        atomic_write_json(tmp / MANIFEST, manifest)
    log(f"export written to {out_dir}: " + ", ".join(sorted(p.name for p in Path(out_dir).iterdir())))
    return manifest


def export_gguf(model_dir: Path, config: dict, tmp: Path, kind: str, trust_remote_code: bool,
                log) -> dict:
    """The GGUF file and its Modelfile in tmp; the manifest's part about them."""
    from ..scoring import label_token_ids

    log(f"loading {model_dir}")
    weights, tokenizer = source.float_weights(model_dir, trust_remote_code)
    labels = label_token_ids(tokenizer)
    threshold = read_threshold(model_dir)
    log(f"writing {gguf_file(kind)} ({kind})")
    info = gguf.write_gguf(weights, config, model_dir, tmp / gguf_file(kind), kind, NAME,
                           tokenizer)
    info["sha256"] = sha256(tmp / gguf_file(kind))
    atomic_write_text(tmp / MODELFILE, ollama.modelfile(
        gguf_file(kind), max(len(ids) for ids in labels.values()), threshold,
        stops=ollama.stop_tokens(tokenizer)))
    return {"model": str(model_dir), "gguf": info, "label_token_ids": labels,
            "threshold": threshold}
