"""The frozen-block speed-up: what the blocks below the first LoRA block output for each
message never changes during training, so it is computed once and the steps start from it."""

from __future__ import annotations

import math
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_map

from .batches import VAL_TOKENS, token_batches
from .checkpoint import save_weights
from .model import on_cpu, release_memory
from .scoring import Opening, attention_mask, label_logits, label_pair, pad_batch


class FrozenStates:
    """What the frozen blocks below the first LoRA block output for each message, computed once.

    Those blocks (14 of SmolLM2's 30 with LoRA on the last 16) never change, so running them at
    every step and every validation is waste: the steps start from these states instead. The
    prompt's opening, the same in every message, goes through them once (a batch of one) and
    each message attends to its keys and values, as scoring does; only the messages' own states
    are kept, packed into one array (a zero row at the end for padding), computed in
    length-sorted batches in a fixed order, so a resumed run gets exactly the same numbers."""

    def __init__(self, model, examples, first: int, indices=None, budget: int = 1024):
        """States of examples[i] for i in indices (default: all of them)."""
        self.first = first
        indices = list(range(len(examples))) if indices is None else sorted(set(indices))
        self.shared = shared = shared_opening([examples[i][0][:-1] for i in indices])
        # each message's own inputs: all its tokens but the last, after the shared opening
        lengths = np.zeros(len(examples), dtype=np.int64)
        lengths[indices] = [len(examples[i][0]) - 1 - shared for i in indices]
        self.lengths = lengths
        self.offsets = np.concatenate([[0], np.cumsum(lengths)])
        self.cached = np.zeros(len(examples), dtype=bool)
        self.cached[indices] = True
        caches = [Opening() for _ in range(first)]
        self.opening = lower_blocks(model, mx.array([examples[indices[0]][0][:shared]]), first,
                                    caches) if shared else None
        parts = {}
        for n, idx in enumerate(token_batches(examples, indices, budget)):
            ids, _ = pad_batch([examples[i][0][shared:-1] for i in idx])
            h = lower_blocks(model, mx.array(ids), first,
                             [Opening(c.keys, c.values) for c in caches] if shared else None)
            mx.eval(h)
            for row, i in enumerate(idx):
                parts[i] = h[row, : lengths[i]]
            if n % 16 == 15:  # batches of every length fragment the heap: hand it back (~150 MB)
                release_memory()
        some = parts[indices[0]]
        pad = mx.zeros((1, some.shape[-1]), dtype=some.dtype)
        self.packed = mx.concatenate([parts[i] for i in indices] + [pad])
        mx.eval(self.packed, self.opening)
        del parts, h, caches
        release_memory()
        self.pad_row = int(self.offsets[-1])
        self.spilled = None

    @property
    def nbytes(self) -> int:
        return self.packed.nbytes

    def spill(self, keep: int, path: Path) -> None:
        """Keep the states of examples [0, keep) in memory and move the others to `path` until
        restore(): the held-out messages are scored only after the last step (~60 MB)."""
        cut = int(self.offsets[keep])
        save_weights({"states": self.packed[cut:]}, path)
        pad = self.packed[-1:]
        self.packed = mx.concatenate([self.packed[:cut], pad])  # a copy: the old buffer goes
        mx.eval(self.packed)
        self.spilled, self.pad_row = (path, cut, self.cached[keep:].copy()), cut
        self.cached[keep:] = False
        release_memory()

    def restore(self) -> None:
        path, cut, cached = self.spilled
        rest = mx.load(str(path))["states"]
        self.packed = mx.concatenate([self.packed[:cut], rest])
        mx.eval(self.packed)
        self.cached[len(self.cached) - len(cached):] = cached
        self.pad_row, self.spilled = int(self.offsets[-1]), None
        path.unlink()

    def gather(self, idx) -> mx.array:
        """(batch, longest, hidden) states of examples idx, right-padded with zeros."""
        assert self.cached[idx].all(), "asked for states that were not computed"
        lens = self.lengths[idx]
        index = np.full((len(idx), int(lens.max())), self.pad_row, dtype=np.int64)
        for row, (i, n) in enumerate(zip(idx, lens)):
            index[row, :n] = np.arange(self.offsets[i], self.offsets[i] + n)
        own = self.packed[mx.array(index.astype(np.int32))]
        if self.opening is None:
            return own
        opening = mx.broadcast_to(self.opening, (len(idx), *self.opening.shape[1:]))
        return mx.concatenate([opening, own], axis=1)


def shared_opening(seqs: list[list[int]]) -> int:
    """How many leading tokens every sequence has in common (the prompt's opening), leaving
    each at least one of its own."""
    shortest = min(len(s) for s in seqs)
    head = np.array([s[:shortest] for s in seqs])
    same = (head == head[0]).all(axis=0)
    return min(int(np.argmin(same)) if not same.all() else shortest, shortest - 1)


def lower_blocks(model, ids: mx.array, first: int, caches=None) -> mx.array:
    h = embed(model, ids)
    for i, layer in enumerate(model.model.layers[:first]):
        cache = caches[i] if caches else None
        h = layer(h, block_mask(model, layer, h.shape[1], cache.offset if cache else 0), cache)
    return h


def embed(model, ids: mx.array) -> mx.array:
    """The first block's input, as the model's own forward pass makes it: the embedding rows,
    times sqrt(hidden) rounded to bfloat16 for gemma3 (its model.model does that itself)."""
    h = model.model.embed_tokens(ids)
    if model.args.model_type == "gemma3_text":
        h = h * mx.array(model.args.hidden_size ** 0.5, mx.bfloat16).astype(h.dtype)
    return h


def block_mask(model, layer, n: int, offset: int = 0):
    """The attention mask of n positions after `offset` cached ones in this block: "causal",
    unless the block is one of gemma3's sliding-window ones and its window binds."""
    sliding = getattr(getattr(layer, "self_attn", None), "is_sliding", False)
    window = getattr(model.model, "window_size", None) if sliding else None
    if window is None or offset + n <= window:
        return "causal"
    return attention_mask(n, offset, window)


HELD_OUT_STATES = ".held_out_states.safetensors"  # FrozenStates.spill's file in the run folder


# Positions of a batch whose activations every block keeps (~1 MB a position for the 16 blocks
# of the seed config): on a CPU, with 192, peak RSS over the whole seed run stays under 1.0 GB;
# a GPU has the memory for any batch of the configs, and recomputing costs it launches.
CHECKPOINT_TOKENS = 192


CHECKPOINT_TOKENS_GPU = 16384


def blocks_to_recompute(positions: int, blocks: int) -> int:
    """How many of `blocks` recompute their activations in the backward pass (mx.checkpoint)
    instead of keeping them, so that what is kept stays what CHECKPOINT_TOKENS positions
    through every block would keep: none for a short batch, all of them only in the limit."""
    keep = CHECKPOINT_TOKENS if on_cpu() else CHECKPOINT_TOKENS_GPU
    if positions <= keep:
        return 0
    return math.ceil(blocks * (1 - keep / positions))


def upper_blocks(model, h: mx.array, first: int, shared: int = 0) -> mx.array:
    """Blocks [first, end) and the final norm.

    shared: the first `shared` positions are the prompt's opening, the same in every row; they
    go through the blocks once (a batch of one) and the messages attend to their keys and
    values, instead of every row recomputing them (a third of a batch's positions).
    For a long batch the lowest blocks recompute their activations in the backward pass
    instead of keeping them (blocks_to_recompute): the few long messages would otherwise set
    the run's peak memory (~2.4 GB for 4 x 200 tokens instead of ~0.9), and recomputing only
    as many blocks as that needs costs a fraction of a forward pass, not a whole one."""
    layers = model.model.layers[first:]
    batch, width, dim = h.shape
    remat = blocks_to_recompute(batch * (width - shared), len(layers))
    if shared:
        opening = h[:1, :shared]
        caches = [Opening() for _ in layers]
        for layer, cache in zip(layers, caches):
            opening = layer(opening, block_mask(model, layer, shared), cache)
        h = h[:, shared:]
    for i, layer in enumerate(layers):
        kv = (caches[i].keys, caches[i].values) if shared else ()
        mask = block_mask(model, layer, h.shape[1], shared)
        if i < remat:
            h = checkpointed(layer, h, kv, mask)
        else:
            h = layer(h, mask, Opening(*kv) if kv else None)
    if shared:
        h = mx.concatenate([mx.broadcast_to(opening, (batch, shared, dim)), h], axis=1)
    return model.model.norm(h)


def checkpointed(layer, h: mx.array, kv=(), mask="causal") -> mx.array:
    def run(params, x, *kv):
        layer.update(params)
        return layer(x, mask, Opening(*kv) if kv else None)

    return mx.checkpoint(run)(layer.trainable_parameters(), h, *kv)


def opening_shared(frozen: FrozenStates) -> int:
    """upper_blocks' `shared` for steps from these states: on a CPU the opening's positions,
    which the LoRA blocks then run once a batch (a third fewer positions, docs/performance.md);
    on a GPU 0, every row carrying its own copy: there a step costs its operations (~5 µs each
    on an H200), and the opening's own pass adds 60% to them (a step: 36 -> 70 ms). The same
    loss either way (tests/test_train.py)."""
    return frozen.shared if on_cpu() else 0


# Architectures whose forward pass the split above reproduces (embed_tokens, with gemma3's
# scale -> blocks called as layer(h, mask, cache), with gemma3's sliding-window masks -> norm).
FROZEN_SPLIT_TYPES = ("llama", "qwen2", "gemma3_text")


def frozen_prefix_supported(model) -> bool:
    """Whether frozen.py can split this model's forward pass (else the trainer runs it whole)."""
    inner = getattr(model, "model", None)
    return (getattr(getattr(model, "args", None), "model_type", None) in FROZEN_SPLIT_TYPES
            and all(hasattr(inner, a) for a in ("embed_tokens", "layers", "norm")))


def release_blocks(model, first: int):
    """Drop the weights of blocks [0, first): their work is in FrozenStates (saves ~200 MB)."""
    for layer in model.model.layers[:first]:
        layer.update(tree_map(lambda a: mx.zeros((0,), a.dtype), layer.parameters()))
    release_memory()


def cached_label_logits(model, tokenizer, examples, frozen: FrozenStates) -> np.ndarray:
    """scoring.score_logits of each example, from its cached states: the last prompt position's
    logits of the two labels' first tokens, shape (n, 2)."""
    pair = label_pair(tokenizer)
    out = np.zeros((len(examples), 2), dtype=np.float32)
    for idx in token_batches(examples, list(range(len(examples))), VAL_TOKENS):
        h = upper_blocks(model, frozen.gather(np.array(idx)), frozen.first, frozen.shared)
        last = mx.array([examples[i][1] - 1 for i in idx])  # the prompt's last position
        h = mx.take_along_axis(h, last[:, None, None], axis=1)[:, 0]
        out[idx] = np.array(label_logits(model, h, pair).astype(mx.float32))
    return out
