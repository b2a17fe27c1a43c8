"""Training data as the loop sees it: token ids with the completion's start, batches of similar
length, and the batch of each step as a pure function of (seed, step)."""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from .scoring import encode_prompt, label_token_ids, length_batches, pad_batch


def tokenize(tokenizer, rows: list[dict], max_len: int) -> list[tuple[list[int], int]]:
    """(ids of prompt + completion + EOS, index where the completion starts)."""
    labels = label_token_ids(tokenizer)
    out = []
    for r in rows:
        prompt = encode_prompt(tokenizer, r["message"], max_len - 4)
        completion = labels[r["label"]] + [tokenizer.eos_token_id]
        out.append((prompt + completion, len(prompt)))
    return out


def make_batches(examples, batch_size: int) -> list[list[int]]:
    """Batches of similar length (little padding), fixed for the run like mlx-lm's."""
    order = sorted(range(len(examples)), key=lambda i: len(examples[i][0]))
    return [order[i: i + batch_size] for i in range(0, len(order) - batch_size + 1, batch_size)]


def batch_at(step: int, batches: list, seed: int) -> list[int]:
    """The batch of 0-based step `step`: a pure function of (step, seed), so a resumed or
    repeated run sees exactly the same data order."""
    epoch, pos = divmod(step, len(batches))
    return batches[np.random.default_rng([seed, epoch]).permutation(len(batches))[pos]]


def balanced_batch_at(step: int, by_class: list[list[int]], batch_size: int, seed: int) -> list[int]:
    """An equal share of each batch from each group, each group cycled in its own seeded order;
    like batch_at, a pure function of (step, seed)."""
    out = []
    for c, members in enumerate(by_class):
        k = batch_size // len(by_class) + (c < batch_size % len(by_class))
        for j in range(step * k, step * k + k):
            epoch, pos = divmod(j, len(members))
            out.append(members[np.random.default_rng([seed, c, epoch]).permutation(len(members))[pos]])
    return out


VAL_TOKENS = 512  # padded positions per forward pass when measuring validation loss


def token_batches(examples, indices, budget: int) -> list[list[int]]:
    """examples[i] for i in indices, grouped by length with at most `budget` padded positions
    a batch (length_batches): big enough for fast matrix products, small enough to bound
    the logits' memory."""
    lengths = [len(examples[i][0]) for i in indices]
    return [[indices[j] for j in b] for b in length_batches(lengths, len(indices), budget)]


def collate(examples, idx, frozen=None):
    """(ids, lengths, completion starts, frozen states or None) of examples[idx] as arrays."""
    seqs = [examples[i][0] for i in idx]
    ids, lengths = pad_batch(seqs)
    starts = np.array([examples[i][1] for i in idx], dtype=np.int32)
    states = frozen.gather(np.asarray(idx)) if frozen is not None else None
    return mx.array(ids), mx.array(lengths), mx.array(starts), states


STEP_WIDTH = 32  # a compiled step's batches are padded to a multiple of this many positions


def padded(batch, multiple: int):
    """collate()'s batch with its width rounded up to a multiple: more padding at the end of
    every row, which no real position attends to (causal) and no loss counts."""
    ids, lengths, starts, states = batch
    extra = -ids.shape[1] % multiple
    if extra:
        ids = mx.pad(ids, [(0, 0), (0, extra)])
        states = None if states is None else mx.pad(states, [(0, 0), (0, extra), (0, 0)])
    return ids, lengths, starts, states
