"""What every numbered script shares: paths, the prompt, errors, atomic writes, the fast BLAS,
model loading and scoring. Each fact lives here once; the scripts import it.

Importing this module first (before mlx) matters on Linux CPUs: see fastblas.py.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
import sys
import tempfile
import unicodedata
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import fastblas  # noqa: E402  (before mlx: may re-execute this process with MKL preloaded)

fastblas.ensure()

import numpy as np  # noqa: E402

# ---------------------------------------------------------------------------------------------
# Paths and the task's facts.

ROOT = Path(__file__).resolve().parent.parent
DATA_DIR = ROOT / "data"
MODELS_DIR = ROOT / "models"
REPORTS_DIR = ROOT / "reports"
CONFIGS_DIR = ROOT / "configs"
BASELINE_DIR = MODELS_DIR / "baseline"
RETRAINED_DIR = MODELS_DIR / "retrained"
ADAPTERS_DIR = RETRAINED_DIR / "adapters"
FUSED_DIR = RETRAINED_DIR / "fused"
SHIPPED_TSV = DATA_DIR / "SMSSpamCollection.tsv"
FIXED_MESSAGES = DATA_DIR / "fixed_test_messages.jsonl"
STRESS_SUITE = DATA_DIR / "stress_suite.jsonl"
SUPPLEMENTS = (DATA_DIR / "modern_sms.jsonl", DATA_DIR / "modern_sms_2.jsonl")  # written apart

PROMPT = "Classify the following SMS message as spam or not spam.\nMessage: {text}\nClassification:"
COMPLETIONS = {"spam": " spam", "ham": " not spam"}
THRESHOLD_FILE = "threshold.json"
DEFAULT_THRESHOLD = 0.5
MAX_PROMPT_TOKENS = 512  # a longer message is truncated (the message, never the prompt or label)
CHARS_PER_TOKEN = 16  # a cut message is cut here first (no real text averages longer tokens)


def is_blank(text: str) -> bool:
    """Nothing a reader would see: only whitespace, control and format characters."""
    return all(c.isspace() or unicodedata.category(c) in ("Cc", "Cf") for c in text)


def format_prompt(text: str) -> str:
    return PROMPT.format(text=text)


def format_example(text: str, label: str) -> str:
    """The tutorial's training line: prompt followed by the completion."""
    return format_prompt(text) + COMPLETIONS[label]


# ---------------------------------------------------------------------------------------------
# Errors: a user mistake is one line on stderr and exit code 2, never a traceback.


class UserError(Exception):
    """A problem the user can fix; the message says what and which step to run."""


def cli(main):
    """Wrap a script's main(): UserError -> one line + exit 2; Ctrl-C -> exit 130."""

    @functools.wraps(main)
    def wrapper(argv=None):
        try:
            return main(argv)
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
            raise SystemExit(2)
        except OSError as e:  # a read-only folder, a full disk, a vanished file...
            where = f"{e.filename}: " if e.filename else ""
            print(f"error: {where}{e.strerror or e}", file=sys.stderr)
            raise SystemExit(2)
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            raise SystemExit(130)

    return wrapper


def add_model_args(parser, default_model: Path, what: str = "the fused model") -> None:
    """--model and --adapter-path, as every step that loads a model takes them."""
    parser.add_argument("--model", type=Path, default=default_model,
                        help=f"model folder (default: {what})")
    parser.add_argument("--adapter-path", type=Path, default=None,
                        help="LoRA adapters on top of --model (the tutorial's 'purest' mode)")
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="allow a model folder to run its own Python code (off: refused)")


def require_model(model_dir: Path, adapter_path: Path | None = None) -> None:
    """Name the earliest missing step before any slow work (steps 1 and 3 come before the data)."""
    require(Path(model_dir) / "config.json", "the model's config.json",
            "scripts/01_download_model.py")
    if adapter_path is not None:
        require(Path(adapter_path) / "adapter_config.json", "adapter_config.json",
                "scripts/03_train.py")


def require(path: Path, what: str, step: str) -> Path:
    if not Path(path).exists():
        raise UserError(f"{what} not found at {path}: run {step} first")
    return Path(path)


# ---------------------------------------------------------------------------------------------
# Atomic artifacts: write under a temporary name in the same folder, then rename into place.


def atomic_write_text(path: Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o644)  # mkstemp's 0600 would make artifacts private
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_json(path: Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def write_jsonl(path: Path, rows) -> None:
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def read_split(path: Path) -> list[dict]:
    """A split written by step 2, checked against the SHA-256 that split.json (written last)
    recorded for it: a step 2 that stopped half way cannot leave a mix of old and new splits
    that trains on test messages."""
    path = require(path, path.name, "scripts/02_prepare_data.py")
    manifest = path.parent / "split.json"
    if manifest.is_file():
        try:
            want = json.loads(manifest.read_text(encoding="utf-8"))["sha256"].get(path.stem)
        except (ValueError, KeyError, AttributeError):
            raise UserError(f"{manifest} is unreadable: re-run scripts/02_prepare_data.py")
        if want is not None and want != sha256(path):
            raise UserError(f"{path} is not the file split.json describes (step 2 was interrupted "
                            "or the files were mixed): re-run scripts/02_prepare_data.py")
    try:
        return read_jsonl(path)
    except (ValueError, UnicodeDecodeError):
        raise UserError(f"{path} is damaged: re-run scripts/02_prepare_data.py")


def replace_dir(src: Path, dst: Path) -> None:
    """Put folder src in place of dst with renames only: at any moment dst is the old folder,
    nothing, or the new one, never a mix."""
    src, dst = Path(src), Path(dst)
    old = None
    if dst.exists():
        old = dst.parent / f".{dst.name}.old"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(dst, old)
    os.replace(src, dst)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


CHECKSUMS = "checksums.json"


def sha256(path: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def write_checksums(folder: Path, written_by: str) -> None:
    """Record the size and SHA-256 of every weights file in folder (checked when loading)."""
    folder = Path(folder)
    files = {p.name: {"bytes": p.stat().st_size, "sha256": sha256(p)}
             for p in sorted(folder.glob("*.safetensors"))}
    atomic_write_json(folder / CHECKSUMS, {"written_by": written_by, "files": files})


def verify_checksums(folder: Path) -> None:
    """Weights written by this project must be the bytes it wrote: a truncated copy, a disk
    error or a hand edit is caught here, by name, instead of loading wrong numbers."""
    path = Path(folder) / CHECKSUMS
    if not path.is_file():
        return  # a folder from elsewhere (e.g. a Hub model): nothing recorded to check
    try:
        recorded = json.loads(path.read_text(encoding="utf-8"))
        step, files = recorded["written_by"], dict(recorded["files"])
    except (ValueError, OSError, KeyError, TypeError):
        raise UserError(f"{path} is unreadable: re-run the step that wrote {Path(folder).name}")
    bad = []
    for name, want in files.items():
        f = Path(folder) / name
        if not f.is_file():
            bad.append(f"{name} missing")
        elif f.stat().st_size != want["bytes"]:
            bad.append(f"{name} has {f.stat().st_size} bytes, not {want['bytes']}")
        elif sha256(f) != want["sha256"]:
            bad.append(f"{name} does not match its SHA-256")
    if bad:
        raise UserError(f"{folder} is damaged ({'; '.join(bad)}): re-run {step}")


@contextlib.contextmanager
def atomic_dir(path: Path):
    """Yield a fresh temporary folder beside `path`; on success it replaces `path` whole.

    A crash inside the block leaves the previous `path` (or nothing) and no partial folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        tmp.chmod(0o755)  # mkdtemp's 0700 would make the artifact private
        yield tmp
        replace_dir(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# Models: load (strictly, from safetensors only), tokenize the prompt, score P(spam).

import mlx.core as mx  # noqa: E402


def on_cpu() -> bool:
    return mx.default_device().type == mx.cpu


def fast_ops_enabled() -> bool:
    """fastops.py's CPU exp/SiLU/softmax; SMS_LORA_FAST_OPS=0 keeps MLX's own."""
    return os.environ.get("SMS_LORA_FAST_OPS", "1") != "0"


def cross_entropy(logits, targets):
    """Per-position cross-entropy (fastops' on a CPU, MLX's elsewhere)."""
    if on_cpu() and fast_ops_enabled():
        import fastops

        return fastops.cross_entropy(logits, targets)
    import mlx.nn as nn

    return nn.losses.cross_entropy(logits, targets)


def release_memory() -> None:
    """Hand freed memory back to the system: MLX's buffer cache, then glibc's free lists (which
    fastblas tells glibc to keep, for speed, until asked like this)."""
    mx.clear_cache()
    if sys.platform.startswith("linux"):
        import ctypes

        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):  # not glibc
            pass


def output_weight(model):
    """The output layer's (vocabulary, hidden) matrix when it is a plain float matrix (tied to the
    embedding or not), else None (a 4-bit layer, or one with a bias)."""
    tied = getattr(model, "lm_head", None) is None or model.args.tie_word_embeddings
    head = model.model.embed_tokens if tied else model.lm_head
    if hasattr(head, "scales") or "bias" in head:
        return None
    return head.weight


CE_ROWS = 256  # positions per pass over the output layer
CE_COLS = 4096  # vocabulary columns at a time
CE_KEEP = 64  # up to this many positions (a completion-only batch) plain autodiff keeps the logits


@functools.cache
def _ce_kernels(fast_exp: bool):
    """The elementwise part of one vocabulary chunk of the online log-sum-exp, fused."""
    if fast_exp:
        import fastops

        exp = fastops._exp
    else:
        exp = mx.exp

    @mx.compile
    def first_chunk(z):  # running max m, e = exp(z - m), running sum s
        m = z.max(axis=-1, keepdims=True)
        e = exp(z - m)
        return m, e, e.sum(axis=-1, keepdims=True)

    @mx.compile
    def next_chunk(z, m, s):  # the new max, how much the old terms shrink, e, the new sum
        new = mx.maximum(m, z.max(axis=-1, keepdims=True))
        shrink = exp(m - new)
        e = exp(z - new)
        return new, shrink, e, s * shrink + e.sum(axis=-1, keepdims=True)

    return first_chunk, next_chunk


def projected_cross_entropy(model, h: mx.array, targets: mx.array, rows: int = CE_ROWS,
                            cols: int = CE_COLS, keep: int = CE_KEEP, grad: bool = True):
    """cross_entropy(project(model, h), targets), per position, with bounded memory.

    `rows` positions at a time read the output layer (49,152 x 576) `cols` words at a time:
    each chunk's logits update a running log-sum-exp (the running max and sum of exponentials,
    rescaled when the max grows, as flash attention does) and, in the same pass, the running
    gradient with respect to h (softmax times the output layer). So the backward pass only
    scales that gradient by its cotangent: two matrix products with the output layer in all,
    its 113 MB read once per `rows` positions (32 at a time made the loss memory-bound), and
    at most about one span's logits alive (~80 MB for 256 positions, measured). Gradient: h's
    only (the output layer is frozen here). grad=False: the loss alone (validation; not for
    use under a gradient transform). A 4-bit output layer, or at most `keep` positions (whose
    logits are small enough to keep), take the plain path."""
    weight = output_weight(model)
    if weight is None or h.size // h.shape[-1] <= keep:  # 4-bit, or small: plain autodiff
        return cross_entropy(project(model, h).astype(mx.float32), targets)
    x = h.reshape(-1, h.shape[-1])
    t = targets.reshape(-1)
    spans = [(a, min(a + rows, x.shape[0])) for a in range(0, x.shape[0], rows)]
    first_chunk, next_chunk = _ce_kernels(on_cpu() and fast_ops_enabled())

    def loss_and_grad(x, t, with_grad, after=None):
        m = s = dh = None
        for c in range(0, weight.shape[0], cols):  # each chunk waits for the one before
            w = weight[c: c + cols]  # (mx.depends): MLX's CPU scheduler would otherwise
            inputs = x if after is None else mx.depends(x, after)  # compute all the logits
            z = (inputs @ w.T).astype(mx.float32)  # first (measured: 216 MB instead of 82)
            if m is None:
                m, e, s = first_chunk(z)
                dh = e @ w if with_grad else None
            else:
                m, shrink, e, s = next_chunk(z, m, s)
                dh = dh * shrink + e @ w if with_grad else None
            after = dh if with_grad else s
        target = weight[t]
        loss = (m + mx.log(s)).squeeze(-1) - (x * target).sum(axis=-1).astype(mx.float32)
        if not with_grad:
            return loss, None
        return loss, (dh / s - target).astype(x.dtype)  # softmax - onehot, times the layer

    if not grad:
        pieces = [loss_and_grad(x[a:b], t[a:b], False)[0] for a, b in spans]
        for piece in pieces:
            mx.eval(piece)  # one span's temporaries at a time
        return mx.concatenate(pieces).reshape(targets.shape)

    @mx.custom_function
    def ce(x):
        losses, grads = [], []
        for a, b in spans:
            loss, g = loss_and_grad(x[a:b], t[a:b], True, grads[-1] if grads else None)
            losses.append(loss)
            grads.append(g)
        return mx.concatenate(losses), mx.concatenate(grads)

    @ce.vjp
    def ce_vjp(x, cotangents, outputs):  # one input: x is the primal itself
        return (cotangents[0][:, None] * outputs[1],)

    return ce(x)[0].reshape(targets.shape)


def upcast_half(model):
    """float16 parameters (4-bit scales and biases included) to float32, so that de-quantizing
    gives the exact weights instead of weights rounded to float16."""
    from mlx.utils import tree_map

    model.update(tree_map(lambda v: v.astype(mx.float32) if v.dtype == mx.float16 else v,
                          model.parameters()))
    return model


def check_remote_code(model_dir: Path, trust: bool = False) -> None:
    """A model folder that asks to run its own Python (mlx-lm's model_file, transformers'
    auto_map) is refused unless the user said --trust-remote-code."""
    asks = []
    for name in ("config.json", "tokenizer_config.json"):
        path = Path(model_dir) / name
        try:
            cfg = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
        except (ValueError, UnicodeDecodeError):
            raise UserError(f"{path} is not valid JSON")
        if not isinstance(cfg, dict):
            raise UserError(f"{path}: expected a JSON object")
        asks += [f"{name}:{k}" for k in ("model_file", "auto_map") if k in cfg]
    if asks and not trust:
        raise UserError(f"{model_dir} asks to run its own code ({', '.join(asks)}); "
                        "pass --trust-remote-code only if you trust its source")


def load_model(model_dir: Path, adapter_path: Path | None = None, dequantize: bool | None = None,
               trust_remote_code: bool = False):
    """A model folder (+ optional LoRA adapters) ready to score.

    On a CPU the 4-bit weights are de-quantized to float32: MLX's CPU quantized matmul runs at
    ~3 GFLOP/s, its fp32 matmul through MKL at ~200. On Metal/CUDA the 4-bit path is kept."""
    from mlx_lm.utils import dequantize_model, load_model as mlx_load_model, load_tokenizer

    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise UserError(f"no model at {model_dir} (config.json missing): "
                        "run scripts/01_download_model.py first")
    if not list(model_dir.glob("*.safetensors")):
        raise UserError(f"{model_dir} has no .safetensors weights: re-run the step that made it")
    check_remote_code(model_dir, trust_remote_code)
    verify_checksums(model_dir)
    try:
        model, config = mlx_load_model(model_dir, lazy=False, strict=True,
                                       trust_remote_code=trust_remote_code)
        tokenizer = load_tokenizer(model_dir, {"trust_remote_code": trust_remote_code},
                                   eos_token_ids=config.get("eos_token_id"))
    except (ValueError, KeyError, OSError, RuntimeError) as e:
        raise UserError(f"cannot load the model in {model_dir}: {str(e).splitlines()[0][:200]}")
    if dequantize if dequantize is not None else on_cpu():
        # One block at a time, so the 4-bit and float32 copies of the whole model never coexist
        # (peak memory ~0.55 GB instead of ~0.7).
        blocks = getattr(getattr(model, "model", None), "layers", [])
        for part in [*blocks, model]:
            dequantize_model(upcast_half(part))
            part.set_dtype(mx.float32)
            mx.eval(part.parameters())
        release_memory()
    if on_cpu() and fast_ops_enabled():
        import fastops

        fastops.install()
    if adapter_path is not None:
        adapter_path = Path(adapter_path)
        if not (adapter_path / "adapter_config.json").is_file():
            raise UserError(f"no adapters at {adapter_path}: run scripts/03_train.py first")
        verify_checksums(adapter_path)
        check_adapters_fit(model, adapter_path, model_dir)
    model.eval()
    mx.eval(model.parameters())
    return model, tokenizer


def check_adapters_fit(model, adapter_path: Path, model_dir: Path) -> None:
    """Apply the adapters, listing every way they do not fit the model (not just the first)."""
    from mlx.utils import tree_flatten
    from mlx_lm.tuner.utils import load_adapters

    where = f"adapters in {adapter_path} do not fit the model in {model_dir}"
    try:
        cfg = json.loads((Path(adapter_path) / "adapter_config.json").read_text(encoding="utf-8"))
        n = int(cfg["num_layers"])
        rank = int(cfg["lora_parameters"]["rank"])
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"{adapter_path}/adapter_config.json is not a LoRA config ({e!r})")
    if n < 1 or n > len(model.layers) or rank < 1:
        raise UserError(f"{where}: num_layers={n}, rank={rank} but the model has "
                        f"{len(model.layers)} layers")
    if not (Path(adapter_path) / "adapters.safetensors").is_file():
        raise UserError(f"{adapter_path} has no adapters.safetensors: re-run scripts/03_train.py")
    try:
        load_adapters(model, str(adapter_path))
    except (ValueError, KeyError, OSError, RuntimeError) as e:
        lines = [ln.strip() for ln in str(e).splitlines()[1:]] or [str(e).splitlines()[0]]
        raise UserError(f"{where}: {len(lines)} mismatch(es): {'; '.join(lines)}")
    stored = set(mx.load(str(Path(adapter_path) / "adapters.safetensors")))
    wanted = {k for k, _ in tree_flatten(model.parameters()) if k.endswith(("lora_a", "lora_b"))}
    if wanted - stored:
        missing = sorted(wanted - stored)
        raise UserError(f"{where}: {len(missing)} adapter tensor(s) missing: {'; '.join(missing)}")


def label_token_ids(tokenizer) -> dict[str, list[int]]:
    """The completion tokens of each label, as the tokenizer splits them after the prompt."""
    probe = tokenizer.encode(format_prompt("x"))
    ids = {}
    for label, completion in COMPLETIONS.items():
        full = tokenizer.encode(format_prompt("x") + completion)
        if full[: len(probe)] != probe:
            raise UserError("the tokenizer merges the prompt's end with the label; "
                            "this prompt does not work with this model")
        ids[label] = full[len(probe):]
    if ids["spam"][0] == ids["ham"][0]:
        raise UserError("the two labels start with the same token: cannot score in one pass")
    return ids


def encode_prompt(tokenizer, message: str, max_tokens: int = MAX_PROMPT_TOKENS) -> list[int]:
    """Token ids of the prompt; a too-long message is cut (never the prompt around it)."""
    message = message[:CHARS_PER_TOKEN * max_tokens]  # a megabyte line: tokenize what can stay
    ids = tokenizer.encode(format_prompt(message))
    if len(ids) <= max_tokens:
        return ids
    frame = len(tokenizer.encode(format_prompt("")))
    keep = max(max_tokens - frame - 2, 1)
    cut = tokenizer.decode(tokenizer.encode(message)[:keep])
    return tokenizer.encode(format_prompt(cut))[:max_tokens]


def hidden_states(model, inputs: mx.array) -> mx.array:
    """The final-norm hidden states, without the vocabulary projection (49,152 columns)."""
    return model.model(inputs)


def project(model, h: mx.array) -> mx.array:
    """Vocabulary logits for hidden states h (tied or untied output layer)."""
    if getattr(model, "lm_head", None) is not None and not model.args.tie_word_embeddings:
        return model.lm_head(h)
    return model.model.embed_tokens.as_linear(h)


def label_logits(model, h: mx.array, token_ids: list[int]) -> mx.array:
    """project(model, h)[..., token_ids], computing just those columns of the output layer."""
    weight = output_weight(model)
    if weight is None:
        return project(model, h)[..., token_ids]
    return h @ weight[mx.array(token_ids)].T


def pad_batch(seqs: list[list[int]], pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Right-padded ids and lengths. A causal model never looks right, so no mask is needed."""
    lengths = np.array([len(s) for s in seqs], dtype=np.int32)
    out = np.full((len(seqs), int(lengths.max())), pad_id, dtype=np.int32)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = s
    return out, lengths


def prompt_prefix_ids(tokenizer) -> list[int]:
    """Token ids of the prompt's fixed opening, which every message shares."""
    return tokenizer.encode(PROMPT.split("{text}")[0].rstrip(" "))


class Opening:
    """A layer's keys and values of the prompt's opening, which every message shares (mlx-lm's
    cache interface, differentiable): the first call stores the opening's own (a batch of one);
    later calls put them, broadcast to the batch, in front of the messages' keys and values.
    (mlx-lm's KVCache would instead copy them into a fresh 256-position buffer per batch.)"""

    def __init__(self, keys=None, values=None):
        self.keys, self.values = keys, values
        self.offset = 0 if keys is None else keys.shape[2]

    def update_and_fetch(self, keys, values):
        if self.keys is None:
            self.keys, self.values, self.offset = keys, values, keys.shape[2]
            return keys, values
        batch = keys.shape[0]
        return (mx.concatenate([mx.broadcast_to(self.keys, (batch, *self.keys.shape[1:])), keys], 2),
                mx.concatenate([mx.broadcast_to(self.values, (batch, *self.values.shape[1:])),
                                values], 2))


def _prefix_cache(model, prefix: list[int]) -> list[Opening]:
    """Per-layer keys and values of the shared prompt opening, computed once per model and
    weights: kept on the model with the very weight arrays it came from, and computed again when
    any of them is another array (MLX arrays never change in place). A call of a few messages
    (the server's, the chat's) would otherwise spend a third of its time on the opening."""
    from mlx.utils import tree_flatten

    weights = [w for _, w in tree_flatten(model.parameters())]
    kept = model.__dict__.get("_opening")
    if kept and kept[0] == prefix and len(kept[1]) == len(weights) \
            and all(a is b for a, b in zip(kept[1], weights)):
        return kept[2]
    cache = [Opening() for _ in model.layers]
    model.model(mx.array([prefix]), cache=cache)
    mx.eval([(c.keys, c.values) for c in cache])
    object.__setattr__(model, "_opening", (list(prefix), weights, cache))  # not a parameter
    return cache


SCORE_TOKENS = 1024  # padded positions per forward pass when scoring
# What one more forward pass costs, in padded positions: on a 2-core x86 CPU a pass of SmolLM2
# takes ~40 ms plus ~1.3 ms a position (benchmarks/score.py's machine), so padding a batch by
# more than ~32 positions costs more than a pass of its own.
PASS_TOKENS = 32


def length_batches(lengths: list[int], batch_size: int, budget: int = SCORE_TOKENS,
                   pass_tokens: int | None = None):
    """Indices in batches of similar length: at most batch_size messages and (beyond one
    message) at most `budget` padded positions each, so a few long messages do not make a whole
    batch of short ones pay for their padding.

    pass_tokens=None: greedy, filling each batch in length order (what training uses);
    otherwise the split of the length-sorted messages that costs least, counting each batch's
    padded positions plus pass_tokens for the pass itself (dynamic programming)."""
    if pass_tokens is not None:
        yield from _cheapest_batches(np.asarray(lengths), batch_size, budget, pass_tokens)
        return
    order = np.argsort(lengths, kind="stable")
    batch = []
    for i in order:
        if batch and (len(batch) == batch_size or (len(batch) + 1) * lengths[i] > budget):
            yield np.array(batch)
            batch = []
        batch.append(i)
    if batch:
        yield np.array(batch)


def _cheapest_batches(lengths: np.ndarray, batch_size: int, budget: int, pass_tokens: int):
    order = np.argsort(lengths, kind="stable")
    sorted_lengths = lengths[order].tolist()
    n = len(order)
    cost, start = [0.0] + [float("inf")] * n, [0] * (n + 1)
    for end in range(1, n + 1):  # cost[end]: the cheapest split of the `end` shortest messages
        longest = sorted_lengths[end - 1]
        for size in range(1, min(batch_size, end) + 1):
            if size > 1 and size * longest > budget:
                break
            c = cost[end - size] + pass_tokens + size * longest
            if c < cost[end]:
                cost[end], start[end] = c, end - size
    cuts, end = [], n
    while end:
        cuts.append((start[end], end))
        end = start[end]
    for a, b in reversed(cuts):
        yield order[a:b]


def score_logits(model, tokenizer, messages: list[str], batch_size: int = 32) -> np.ndarray:
    """Last-position logits of the first token of ' spam' and of ' not spam', shape (n, 2).

    One forward pass per message, batched by similar length. The prompt's opening, the same for
    every message, is computed once and its keys/values are reused by every batch."""
    first = label_token_ids(tokenizer)
    pair = [first["spam"][0], first["ham"][0]]
    encoded = [encode_prompt(tokenizer, m) for m in messages]
    prefix = prompt_prefix_ids(tokenizer)
    shared = len(prefix) if all(e[: len(prefix)] == prefix and len(e) > len(prefix)
                                for e in encoded) else 0
    opening = _prefix_cache(model, prefix) if shared else None
    out = np.zeros((len(messages), 2), dtype=np.float32)
    for idx in length_batches([len(e) - shared for e in encoded], batch_size,
                              pass_tokens=PASS_TOKENS):
        ids, lengths = pad_batch([encoded[i][shared:] for i in idx])
        cache = [Opening(c.keys, c.values) for c in opening] if shared else None
        h = model.model(mx.array(ids), cache=cache)
        last = mx.take_along_axis(h, mx.array(lengths - 1)[:, None, None], axis=1)[:, 0]
        logits = label_logits(model, last, pair)
        out[idx] = np.array(logits.astype(mx.float32))
    return out


def p_spam(model, tokenizer, messages: list[str], batch_size: int = 32) -> np.ndarray:
    """P(spam) = softmax over the two label tokens' logits."""
    return p_spam_of(score_logits(model, tokenizer, messages, batch_size))


def p_spam_of(logits: np.ndarray) -> np.ndarray:
    """score_logits' (n, 2) logits (spam, ham) -> P(spam)."""
    return 1.0 / (1.0 + np.exp(logits[:, 1] - logits[:, 0]))


def classifier_metrics(is_spam: np.ndarray, p_spam: np.ndarray, threshold: float) -> dict:
    """Verdict = P(spam) > threshold; the figures every report shows."""
    from sklearn.metrics import roc_auc_score

    pred = p_spam > threshold
    tp = int(np.sum(pred & is_spam))
    fp = int(np.sum(pred & ~is_spam))
    fn = int(np.sum(~pred & is_spam))
    tn = int(np.sum(~pred & ~is_spam))
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    both = len(set(is_spam.tolist())) == 2
    return {
        "messages": int(len(is_spam)), "threshold": threshold,
        "accuracy": (tp + tn) / len(is_spam), "precision": precision, "recall": recall,
        "f1": 2 * precision * recall / (precision + recall) if precision + recall else 0.0,
        "roc_auc": float(roc_auc_score(is_spam, p_spam)) if both else None,
        "ham_false_positive_rate": fp / (fp + tn) if fp + tn else 0.0,
        "confusion": {"tp": tp, "fp": fp, "fn": fn, "tn": tn},
        "wrong": {"ham_flagged": fp, "spam_missed": fn},
    }


def scoring_provenance(model_dir: Path, adapter_path: Path | None, test_path: Path) -> dict:
    """What a set of test-split logits depends on: the weights (by checksum), the messages and
    whether the model ran de-quantized. Two equal records mean the same logits."""
    adapters = Path(adapter_path) / "adapters.safetensors" if adapter_path else None
    return {"model_weights": sorted(sha256(f) for f in Path(model_dir).glob("*.safetensors")),
            "adapters": sha256(adapters) if adapters else None,
            "test": sha256(test_path), "dequantized": on_cpu(),
            "device": str(mx.default_device())}


def check_threshold(value, what: str) -> float:
    """A verdict threshold: a number from 0 to 1 (P(spam) above it is spam)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
        raise UserError(f"{what} must be a number from 0 to 1, not {value!r}")
    return float(value)


def read_threshold(model_or_adapter_dir: Path) -> float:
    """The threshold 03_train chose, stored beside the weights; 0.5 where there is none."""
    path = Path(model_or_adapter_dir) / THRESHOLD_FILE
    if not path.is_file():
        return DEFAULT_THRESHOLD
    try:
        value = json.loads(path.read_text())["threshold"]
    except (ValueError, KeyError, TypeError):  # not JSON, not UTF-8, not an object with one
        raise UserError(f"{path} is damaged (no threshold in it): run scripts/03_train.py "
                        "(and scripts/06_fuse.py for a fused model) again") from None
    return check_threshold(value, f"the threshold in {path}")


def add_threshold_arg(parser) -> None:
    """--threshold, for the steps that give verdicts to users (chat, serve)."""
    parser.add_argument("--threshold", type=float, default=None,
                        help="call a message spam when P(spam) is above this (default: the "
                        "threshold chosen on the held-out sets, stored with the model)")


def verdict_threshold(args) -> float:
    """--threshold if given, else the one stored with the adapters or the model."""
    if args.threshold is not None:
        return check_threshold(args.threshold, "--threshold")
    return read_threshold(args.adapter_path or args.model)
