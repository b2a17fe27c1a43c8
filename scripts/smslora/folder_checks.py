"""A model or adapter folder checked before anything is built from it.

mlx-lm and transformers trust a folder: they read a file whole (a link to /dev/zero never ends),
wait on a FIFO forever, and build as many layers as config.json asks before comparing a weight.
So a folder is first checked, cheaply and in bounded memory: regular files only (links only
inside the folder, or `root`), sane sizes and JSON nesting, sound safetensors headers, and a
config.json that asks for an architecture mlx-lm has and no more than its weights hold (layers,
dimensions, vocabulary: read from the headers, not from the tensors)."""

from __future__ import annotations

import json
import os
import re
import stat
from pathlib import Path

from .errors import UserError

MAX_CONFIG_BYTES = 4 << 20  # config.json, adapter_config.json, checksums.json...
MAX_READ_BYTES = 64 << 20  # any other file a loader reads (Gemma 3's tokenizer.json: 33 MB)
MAX_HEADER_BYTES = 16 << 20  # a safetensors header (SmolLM2-135M's: 31 KB)
MAX_JSON_DEPTH = 32  # the deepest real file here nests 5 levels
MAX_INT = 2 ** 31 - 1
CONFIGS = ("config.json", "generation_config.json", "adapter_config.json", "checksums.json",
           "source.json", "threshold.json", "metrics.json", "hf_quant_config.json",
           "tokenizer_config.json", "special_tokens_map.json")
READ = ("*.json", "*.jsonl", "*.txt", "*.py", "*.jinja", "*.model", "*.tiktoken")  # by the loaders
KINDS = {stat.S_ISFIFO: "a FIFO", stat.S_ISCHR: "a character device",
         stat.S_ISBLK: "a block device", stat.S_ISSOCK: "a socket", stat.S_ISDIR: "a folder"}
# Files only this project writes (names no Hub model uses), and the step that writes them.
MARKERS = (("source.json", "scripts/01_download_model.py"),
           ("history.json", "scripts/03_train.py"),
           ("optimizer.safetensors", "scripts/03_train.py"))  # a training checkpoint


def short(value) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def regular_file(path: Path, root: Path | None = None) -> os.stat_result:
    """path's stat, if it is a regular file that stays inside root (default: its own folder)."""
    path = Path(path)
    try:
        st = path.stat()
    except FileNotFoundError:
        raise UserError(f"{path} is a link to nothing") from None
    if not stat.S_ISREG(st.st_mode):
        kind = next((k for test, k in KINDS.items() if test(st.st_mode)), "not a file")
        target = f", a link to {os.path.realpath(path)}" if path.is_symlink() else ""
        raise UserError(f"{path} is not a regular file ({kind}{target}): a model folder "
                        "holds files only")
    inside = Path(os.path.realpath(root or path.parent))
    if not Path(os.path.realpath(path)).is_relative_to(inside):
        raise UserError(f"{path} points outside {inside} (to {os.path.realpath(path)}): copy "
                        "the file into the folder instead of linking it")
    return st


def check_entries(folder: Path, root: Path | None = None) -> None:
    """Every entry of folder is a regular file inside root (or a folder, which no loader
    reads); the files the loaders read are no larger than they can be, the small JSON files
    (some read before the rest is checked) of bounded nesting."""
    for entry in sorted(Path(folder).iterdir()):
        if entry.is_dir():
            continue
        size = regular_file(entry, root or folder).st_size
        if entry.name in CONFIGS:
            limit = MAX_CONFIG_BYTES
        elif any(entry.match(p) for p in READ):
            limit = MAX_READ_BYTES
        else:
            continue
        if size > limit:
            raise UserError(f"{entry} is larger than {limit >> 20} MB ({size:,} bytes): "
                            "not a file of a model folder")
        if limit == MAX_CONFIG_BYTES and entry.suffix == ".json":  # read before the model
            check_nesting(entry, read_bytes(entry, limit))


STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
NOT_BRACKETS = bytes(sorted(set(range(256)) - set(b"[]{}")))


def json_depth(data: bytes) -> int:
    """How deep JSON text nests, without parsing it (brackets inside strings do not count)."""
    import numpy as np

    brackets = np.frombuffer(STRING.sub(b"", data).translate(None, NOT_BRACKETS), np.uint8)
    steps = np.where((brackets == ord("[")) | (brackets == ord("{")), 1, -1).astype(np.int32)
    return int(np.cumsum(steps).max(initial=0))


def open_regular(path: Path, limit: int = 1 << 62):
    """path opened for reading if it is a regular file of at most limit bytes (opened so, a FIFO
    does not wait for a writer)."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_size > limit:
        os.close(fd)
        raise UserError(f"{path} is not a regular file of at most {limit:,} bytes")
    return os.fdopen(fd, "rb")


def read_bytes(path: Path, limit: int) -> bytes:
    with open_regular(path, limit) as f:
        return f.read(limit + 1)


def check_nesting(path: Path, data: bytes) -> None:
    if json_depth(data) > MAX_JSON_DEPTH:
        raise UserError(f"{path} is nested deeper than {MAX_JSON_DEPTH} levels: not a file "
                        "of a model folder")


def read_json(path: Path, limit: int = MAX_CONFIG_BYTES):
    """A small JSON file, read in bounded memory and nesting."""
    data = read_bytes(path, limit)
    check_nesting(path, data)
    try:
        return json.loads(data.decode("utf-8"))
    except (ValueError, UnicodeDecodeError):
        raise UserError(f"{path} is not valid JSON") from None


def read_json_object(path: Path) -> dict:
    value = read_json(path)
    if not isinstance(value, dict):
        raise UserError(f"{path}: expected a JSON object")
    return value


def project_step(folder: Path) -> str | None:
    """The step of this project that wrote folder (known by a file only it writes there), or
    None for a folder from elsewhere (a Hub model, a test's tiny model)."""
    folder = Path(folder)
    step = next((s for name, s in MARKERS if (folder / name).exists()), None)
    if step is None and (folder / "threshold.json").exists():  # a fused model or adapters
        step = "scripts/06_fuse.py" if (folder / "config.json").exists() else "scripts/03_train.py"
    return step


def tensor_shapes(path: Path) -> dict[str, list[int]]:
    """Each tensor's shape, from a safetensors header alone (nothing else is read)."""
    with open_regular(path) as f:
        size = os.fstat(f.fileno()).st_size
        n = int.from_bytes(f.read(8), "little")
        if size < 8 or n > min(MAX_HEADER_BYTES, size - 8):
            raise UserError(f"{path.name} has a header of {n:,} bytes in a file of {size:,}: "
                            "not a safetensors file")
        data = f.read(n)
    check_nesting(path, data)
    try:
        header = json.loads(data)
        shapes, ends = {}, [0]
        for name, t in header.items():
            if name != "__metadata__":
                shape, (begin, end) = t["shape"], t["data_offsets"]
                if not all(type(d) is int and 0 <= d <= MAX_INT for d in [*shape, begin]) or (
                        type(end) is not int or end < begin):
                    raise ValueError(name)
                shapes[name] = shape
                ends.append(end)
    except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError):
        raise UserError(f"{path.name} has a damaged header") from None
    if 8 + n + max(ends) > size:
        raise UserError(f"{path.name} is cut short ({size:,} bytes; its header describes "
                        f"{8 + n + max(ends):,})")
    return shapes


def weights_shapes(folder: Path, pattern: str, what: str) -> dict[str, list[int]]:
    shapes = {}
    for path in sorted(Path(folder).glob(pattern)):
        try:
            shapes.update(tensor_shapes(path))
        except UserError as e:
            raise UserError(f"cannot load {what} in {folder}: {e}") from None
    return shapes


def positive_int(cfg: dict, key: str, name: str, limit: int = MAX_INT) -> int | None:
    value = cfg.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= MAX_INT:
        raise UserError(f"{name}: {key} must be a positive integer, not {short(value)}")
    if value > limit:
        raise UserError(f"{name}: {key}={value} but the weights hold at most {limit}")
    return value


def check_token_ids(cfg: dict, name: str) -> None:
    value = cfg.get("eos_token_id")
    ids = value if isinstance(value, list) else [value]
    if value is not None and not (ids and len(ids) <= 1024 and all(
            type(i) is int and 0 <= i <= MAX_INT for i in ids)):
        raise UserError(f"{name}: eos_token_id must be a token id or a list of them, "
                        f"not {short(value)}")


def check_model_type(cfg: dict, name: str) -> None:
    """model_type names a model module of mlx-lm (not one of its helpers: base, cache...)."""
    from mlx import nn
    from mlx_lm.utils import _get_classes

    kind, archs = cfg.get("model_type"), cfg.get("architectures")
    if not isinstance(kind, str) or not re.fullmatch(r"[A-Za-z0-9][\w-]{0,63}", kind):
        raise UserError(f"{name}: model_type must name an architecture, not {short(kind)}")
    if archs is not None and not isinstance(archs, str) and not (
            isinstance(archs, list) and all(isinstance(a, str) for a in archs)):
        raise UserError(f"{name}: architectures must be a list of names, not {short(archs)}")
    try:
        model, args = _get_classes({"model_type": kind, "architectures": archs})
        ok = isinstance(model, type) and issubclass(model, nn.Module) and hasattr(args, "from_dict")
    except (ImportError, ValueError, AttributeError, TypeError):
        ok = False
    if not ok:
        raise UserError(f"{name}: model_type {kind!r} is not a model mlx-lm can build")


def check_config(cfg: dict, shapes: dict[str, list[int]], name: str,
                 model_type: bool = True) -> None:
    """config.json's sizes are positive integers no larger than the tensors in `shapes` can
    hold, its heads divide evenly, its eos_token_id is a token id, its model_type a model."""
    dims = [d for s in shapes.values() for d in s] or [MAX_INT]
    rows = [s[0] for s in shapes.values() if s] or [MAX_INT]
    numbered = [int(p) for n in shapes for p in n.split(".") if p.isdigit()]
    layers = 1 + max(numbered, default=-1) if shapes else MAX_INT
    positive_int(cfg, "num_hidden_layers", name, layers)
    positive_int(cfg, "vocab_size", name, max(rows))
    hidden = positive_int(cfg, "hidden_size", name, max(dims))
    positive_int(cfg, "intermediate_size", name, max(dims))
    head_dim = positive_int(cfg, "head_dim", name, max(dims))
    heads = positive_int(cfg, "num_attention_heads", name, max(dims))
    kv = positive_int(cfg, "num_key_value_heads", name, max(dims))
    if hidden and heads and head_dim is None and hidden % heads:
        raise UserError(f"{name}: num_attention_heads={heads} does not divide "
                        f"hidden_size={hidden}")
    if heads and kv and heads % kv:
        raise UserError(f"{name}: num_key_value_heads={kv} does not divide "
                        f"num_attention_heads={heads}")
    quantization = cfg.get("quantization") or {}
    if not isinstance(quantization, dict):
        raise UserError(f"{name}: quantization must be an object, not {short(quantization)}")
    positive_int(quantization, "group_size", f"{name} quantization", max(dims))
    positive_int(quantization, "bits", f"{name} quantization", 32)
    check_token_ids(cfg, name)
    if isinstance(cfg.get("text_config"), dict):
        check_config(cfg["text_config"], shapes, f"{name} text_config", model_type=False)
    if model_type:
        check_model_type(cfg, name)


def check_model_files(folder: Path, root: Path | None = None) -> None:
    """What can be checked before any file is read: that the folder is a model's, and that its
    entries are files of sane sizes."""
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise UserError(f"no model at {folder} (config.json missing): "
                        "run scripts/01_download_model.py first")
    check_entries(folder, root)
    if not list(folder.glob("*.safetensors")):
        raise UserError(f"{folder} has no .safetensors weights: re-run the step that made it")


def check_model_contents(folder: Path, trust_remote_code: bool = False) -> None:
    """config.json (and generation_config.json) against the weights' headers; every other JSON
    file the tokenizer reads is of bounded nesting."""
    folder = Path(folder)
    for path in sorted(folder.glob("*.json")):
        if path.name not in ("config.json", "generation_config.json"):
            check_nesting(path, read_bytes(path, MAX_READ_BYTES))
    cfg = read_json_object(folder / "config.json")
    shapes = weights_shapes(folder, "model*.safetensors", "the model")
    custom = trust_remote_code and "model_file" in cfg
    check_config(cfg, shapes, str(folder / "config.json"), model_type=not custom)
    if (folder / "generation_config.json").exists():
        check_token_ids(read_json_object(folder / "generation_config.json"),
                        str(folder / "generation_config.json"))


def check_adapter_contents(folder: Path) -> None:
    """adapter_config.json asks for LoRA layers its adapters.safetensors can hold."""
    folder = Path(folder)
    for path in sorted(folder.glob("*.json")):
        check_nesting(path, read_bytes(path, MAX_READ_BYTES))
    cfg = read_json_object(folder / "adapter_config.json")
    shapes = weights_shapes(folder, "adapters.safetensors", "the adapters")
    largest = max((d for s in shapes.values() for d in s), default=MAX_INT)
    name = str(folder / "adapter_config.json")
    positive_int(cfg, "num_layers", name)
    lora = cfg.get("lora_parameters")
    if lora is not None:
        if not isinstance(lora, dict):
            raise UserError(f"{name}: lora_parameters must be an object, not {short(lora)}")
        positive_int(lora, "rank", f"{name} lora_parameters", largest)
        for key in ("scale", "dropout"):
            value = lora.get(key, 0.0)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
                    abs(value) < 1e6):
                raise UserError(f"{name} lora_parameters: {key} must be a number, "
                                f"not {short(value)}")
