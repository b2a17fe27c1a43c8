"""P(spam) of messages: the one implementation that training, evaluation, chat, serving and the
benchmarks all call. One forward pass per message, batched by similar length, the prompt's
shared opening computed once per model (prefix cache), and only the two label tokens' columns
of the output layer."""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from .errors import UserError
from .task import CHARS_PER_TOKEN, COMPLETIONS, MAX_PROMPT_TOKENS, PROMPT, format_prompt


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


def label_pair(tokenizer) -> list[int]:
    """[first token of ' spam', first token of ' not spam']: the two logits P(spam) is made of."""
    first = label_token_ids(tokenizer)
    return [first["spam"][0], first["ham"][0]]


def encode_prompt(tokenizer, message: str, max_tokens: int = MAX_PROMPT_TOKENS) -> list[int]:
    """Token ids of the prompt; a too-long message is cut (never the prompt around it)."""
    message = message[:CHARS_PER_TOKEN * max_tokens]  # a megabyte line: tokenize what can stay
    ids = tokenizer.encode(format_prompt(message))
    if len(ids) <= max_tokens:
        return ids
    frame = len(tokenizer.encode(format_prompt("")))
    keep = max(max_tokens - frame - 2, 1)
    own = tokenizer.encode(message)
    lead = tokenizer.encode("")  # what the tokenizer puts before any text: Gemma's BOS, or none
    if lead and own[: len(lead)] == lead:
        own = own[len(lead):]  # decoded, it would put a BOS inside the prompt
    cut = tokenizer.decode(own[:keep])
    return tokenizer.encode(format_prompt(cut))[:max_tokens]


def hidden_states(model, inputs: mx.array) -> mx.array:
    """The final-norm hidden states, without the vocabulary projection (49,152 columns)."""
    return model.model(inputs)


def project(model, h: mx.array) -> mx.array:
    """Vocabulary logits for hidden states h (tied or untied output layer)."""
    if not tied_output(model):
        return model.lm_head(h)
    return model.model.embed_tokens.as_linear(h)


def tied_output(model) -> bool:
    """Whether the output layer is the embedding: no lm_head, or a config that says so (gemma3's
    has no such field: its lm_head is dropped when tied)."""
    return (getattr(model, "lm_head", None) is None
            or bool(getattr(model.args, "tie_word_embeddings", False)))


def output_weight(model):
    """The output layer's (vocabulary, hidden) matrix when it is a plain float matrix (tied to the
    embedding or not), else None (a 4-bit layer, or one with a bias)."""
    head = model.model.embed_tokens if tied_output(model) else model.lm_head
    if hasattr(head, "scales") or "bias" in head:
        return None
    return head.weight


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


def attention_mask(n: int, offset: int = 0, window: int | None = None, return_array: bool = False):
    """The causal mask of n queries after `offset` cached positions: the string "causal" (what
    mlx-lm passes without a cache, the fast kernel's own) unless a window of `window` positions
    binds, then the boolean (n, offset + n) array."""
    from mlx_lm.models.base import create_causal_mask

    if return_array or (window is not None and offset + n > window):
        return create_causal_mask(n, offset, window_size=window)
    return "causal" if n > 1 else None


class Opening:
    """A layer's keys and values of the prompt's opening, which every message shares (mlx-lm's
    cache interface, differentiable): the first call stores the opening's own (a batch of one);
    later calls put them, broadcast to the batch, in front of the messages' keys and values.
    (mlx-lm's KVCache would instead copy them into a fresh 256-position buffer per batch.)"""

    def __init__(self, keys=None, values=None):
        self.keys, self.values = keys, values
        self.offset = 0 if keys is None else keys.shape[2]

    def make_mask(self, n: int, return_array: bool = False, window_size: int | None = None):
        """mlx-lm's attention mask for n new positions after the opening: "causal" as without
        a cache, unless a sliding window (gemma3's local layers) binds within them."""
        return attention_mask(n, self.offset, window_size, return_array)

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


def last_positions(model, tokenizer, messages: list[str], batch_size: int = 32,
                   share: tuple[int, int] = (0, 1)):
    """(indices, final-norm hidden states at each prompt's last position) per forward pass.

    One forward pass per message, batched by similar length. The prompt's opening, the same for
    every message, is computed once and its keys/values are reused by every batch.
    share=(rank, size): only every size-th batch from the rank-th is computed, so that `size`
    processes get exactly one process's batches between them: the same batches, of the same
    messages, whoever computes them."""
    rank, size = share
    encoded = [encode_prompt(tokenizer, m) for m in messages]
    prefix = prompt_prefix_ids(tokenizer)
    shared = len(prefix) if all(e[: len(prefix)] == prefix and len(e) > len(prefix)
                                for e in encoded) else 0
    opening = _prefix_cache(model, prefix) if shared else None
    for k, idx in enumerate(length_batches([len(e) - shared for e in encoded], batch_size,
                                            pass_tokens=PASS_TOKENS)):
        if k % size != rank:
            continue
        ids, lengths = pad_batch([encoded[i][shared:] for i in idx])
        cache = [Opening(c.keys, c.values) for c in opening] if shared else None
        h = model.model(mx.array(ids), cache=cache)
        yield idx, mx.take_along_axis(h, mx.array(lengths - 1)[:, None, None], axis=1)[:, 0]


def score_logits(model, tokenizer, messages: list[str], batch_size: int = 32,
                 share: tuple[int, int] = (0, 1)) -> np.ndarray:
    """Last-position logits of the first token of ' spam' and of ' not spam', shape (n, 2).
    share: as in last_positions (the rows of the batches another rank computes stay 0, so that
    summing every rank's result gives one process's numbers)."""
    pair = label_pair(tokenizer)
    out = np.zeros((len(messages), 2), dtype=np.float32)
    for idx, last in last_positions(model, tokenizer, messages, batch_size, share):
        out[idx] = np.array(label_logits(model, last, pair).astype(mx.float32))
    return out


def features(model, tokenizer, messages: list[str], batch_size: int = 32) -> np.ndarray:
    """The final-norm hidden state at each prompt's last position, shape (n, hidden): what the
    output layer turns into the label logits, and what a frozen-feature probe learns from."""
    out = None
    for idx, last in last_positions(model, tokenizer, messages, batch_size):
        last = np.array(last.astype(mx.float32))
        if out is None:
            out = np.zeros((len(messages), last.shape[-1]), dtype=np.float32)
        out[idx] = last
    return out if out is not None else np.zeros((0, 0), dtype=np.float32)


def p_spam(model, tokenizer, messages: list[str], batch_size: int = 32) -> np.ndarray:
    """P(spam) = softmax over the two label tokens' logits."""
    return p_spam_of(score_logits(model, tokenizer, messages, batch_size))


def p_spam_of(logits: np.ndarray) -> np.ndarray:
    """score_logits' (n, 2) logits (spam, ham) -> P(spam)."""
    return 1.0 / (1.0 + np.exp(logits[:, 1] - logits[:, 0]))
