"""Micro-batching: requests put their messages on a queue; one worker task takes what arrived
within max_wait_ms (at most max_batch messages and max_request_tokens prompt tokens), scores it on
the single model thread (MLX is not safe for concurrent use), and hands each request its own
results. The queue is bounded in messages and in tokens: what a request costs the model."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import math
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Callable

import mlx.core as mx
import numpy as np

from .. import scoring
from .costs import Counter
from .settings import Settings

log = logging.getLogger("sms_serve")


class ScoringError(Exception):
    pass


class Busy(Exception):
    pass


class ShuttingDown(Exception):
    pass


@dataclass
class Piece:
    messages: list[str]
    costs: list[int]  # prompt tokens of each message
    future: asyncio.Future
    arrived: float

    @property
    def tokens(self) -> int:
        return sum(self.costs)


@dataclass
class Stats:
    requests: int = 0
    batches: int = 0
    messages: int = 0
    max_batch_seen: int = 0
    dropped_messages: int = 0     # queued for a client that went away: never scored
    disconnects: int = 0
    rejected_busy: int = 0
    model_seconds: float = 0.0
    batch_sizes: dict = field(default_factory=dict)

    def public(self) -> dict:
        d = asdict(self)
        d["model_seconds"] = round(self.model_seconds, 4)
        d["mean_batch"] = round(self.messages / self.batches, 3) if self.batches else 0.0
        d["batch_sizes"] = {str(k): v for k, v in sorted(self.batch_sizes.items())}
        return d

    def add_batch(self, size: int, scored: int, seconds: float) -> None:
        self.batches += 1
        self.messages += scored
        self.model_seconds += seconds
        self.max_batch_seen = max(self.max_batch_seen, size)
        self.batch_sizes[size] = self.batch_sizes.get(size, 0) + 1


class Scorer:
    """The queue, the worker task and the model thread; `classify` is what a request awaits.

    A batch is scored one forward pass at a time (messages of similar length, as
    scoring.length_batches groups them): between passes the worker skips the messages of clients
    that left, and a stop waits for one pass at most."""

    def __init__(self, model, tokenizer, settings: Settings,
                 loader: Callable[[], tuple] | None = None,
                 on_load_error: Callable[[str], None] | None = None):
        self.model, self.tokenizer = model, tokenizer
        self.settings = settings
        self.loader, self.on_load_error = loader, on_load_error
        self.load_error: str | None = None
        self.stats = Stats()
        self.pending: collections.deque[Piece] = collections.deque()
        self.queued = 0          # messages waiting (not yet in a batch)
        self.queued_tokens = 0   # and their prompt tokens
        self.current: list[Piece] = []
        self.stopping = False
        self.wakeup: asyncio.Event | None = None
        self.worker: asyncio.Task | None = None
        self.loading: asyncio.Task | None = None
        self.executor: ThreadPoolExecutor | None = None
        self.counter: Counter | None = None

    # -- life cycle (the app's lifespan) --

    async def start(self):
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="mlx-model")
        self.wakeup = asyncio.Event()
        self.worker = asyncio.create_task(self._work(), name="micro-batcher")
        if self.model is not None:
            self.counter = Counter(self.tokenizer)
        elif self.loader is not None:
            self.loading = asyncio.create_task(self._load(), name="model-loader")

    def refuse_waiting(self) -> None:
        """The server is stopping: every request still waiting is answered 503 now, and the
        batch in progress stops after its current forward pass."""
        self.stopping = True
        for piece in [*self.pending, *self.current]:
            if not piece.future.done():
                piece.future.set_exception(ShuttingDown("the server is shutting down"))

    async def stop(self):
        self.refuse_waiting()
        for task in (self.loading, self.worker):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        self.pending.clear()
        if self.counter is not None:
            self.counter.close()
        if self.executor is not None:
            # MLX's streams of the model thread must be destroyed on that thread before it ends,
            # else the process may abort at exit ("terminate called without an active
            # exception"). This waits for the forward pass in progress, if any.
            with contextlib.suppress(Exception):
                await asyncio.get_running_loop().run_in_executor(self.executor, mx.clear_streams)
            self.executor.shutdown(wait=True)

    async def _load(self):
        started = time.perf_counter()
        try:
            model, tokenizer = await asyncio.get_running_loop().run_in_executor(
                self.executor, self.loader)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # UserError included: the server cannot serve without a model
            self.load_error = str(e) or type(e).__name__
            log.error("cannot load the model: %s", self.load_error)
            if self.on_load_error is not None:
                self.on_load_error(self.load_error)
            return
        self.counter = Counter(tokenizer)
        self.model, self.tokenizer = model, tokenizer
        log.info("model loaded in %.1f s", time.perf_counter() - started)

    @property
    def ready(self) -> bool:
        return (self.model is not None and self.worker is not None and not self.worker.done())

    # -- requests --

    async def count_tokens(self, messages: list[str]) -> list[int]:
        """Each message's prompt tokens: what it costs the model."""
        return await self.counter.count(messages)

    async def classify(self, messages: list[str], costs: list[int]) -> list[float]:
        """P(spam) of each message, scored together with whatever else arrives meanwhile."""
        s = self.settings
        if (self.stopping or self.queued + len(messages) > s.max_queue
                or self.queued_tokens + sum(costs) > s.max_queue_tokens):
            self.stats.rejected_busy += 1
            raise Busy(f"{self.queued} messages ({self.queued_tokens} tokens) are waiting for "
                       "the model")
        loop = asyncio.get_running_loop()
        now = loop.time()
        step = s.max_batch
        pieces = [Piece(messages[i: i + step], costs[i: i + step], loop.create_future(), now)
                  for i in range(0, len(messages), step)]
        for piece in pieces:
            self.pending.append(piece)
            self.queued += len(piece.messages)
            self.queued_tokens += piece.tokens
        self.wakeup.set()
        try:
            parts = await asyncio.gather(*(p.future for p in pieces))
        except BaseException:
            for p in pieces:  # a client gone (cancelled) or a failed piece: drop the rest
                if not p.future.done():
                    p.future.cancel()
            raise
        return [x for part in parts for x in part]

    def _fits(self, batch: list[Piece], piece: Piece) -> bool:
        """At most max_batch messages and max_request_tokens tokens in one model call."""
        return not batch or (sum(len(p.messages) for p in batch) + len(piece.messages)
                             <= self.settings.max_batch and
                             sum(p.tokens for p in batch) + piece.tokens
                             <= self.settings.max_request_tokens)

    async def _collect(self) -> list[Piece]:
        loop = asyncio.get_running_loop()
        while not self.pending:
            self.wakeup.clear()
            await self.wakeup.wait()
        deadline = self.pending[0].arrived + self.settings.max_wait_ms / 1000
        batch: list[Piece] = []
        while True:
            while self.pending and self._fits(batch, self.pending[0]):
                piece = self.pending.popleft()
                self.queued -= len(piece.messages)
                self.queued_tokens -= piece.tokens
                if piece.future.done():  # its client went away while it waited
                    self.stats.dropped_messages += len(piece.messages)
                    continue
                batch.append(piece)
            if self.pending or sum(len(p.messages) for p in batch) >= self.settings.max_batch:
                return batch  # full, or the next does not fit
            remaining = deadline - loop.time()
            if remaining <= 0:
                return batch
            self.wakeup.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.wakeup.wait(), remaining)

    def _score(self, messages: list[str]) -> list[float | None]:
        """On the model thread: one batched pass; if it fails, each message alone, so that one
        bad message cannot fail the other requests of its batch."""
        try:
            p = np.asarray(scoring.p_spam(self.model, self.tokenizer, messages,
                                          batch_size=self.settings.score_batch), dtype=np.float64)
            if p.shape == (len(messages),) and np.isfinite(p).all():
                return [float(x) for x in p]
            log.error("the batch gave non-finite scores; scoring its messages one by one")
        except Exception:
            log.exception("scoring a batch of %d messages failed; retrying one by one",
                          len(messages))
        out: list[float | None] = []
        for m in messages:
            try:
                x = float(scoring.p_spam(self.model, self.tokenizer, [m], batch_size=1)[0])
                out.append(x if math.isfinite(x) else None)
            except Exception:
                log.exception("cannot score a message of %d characters", len(m))
                out.append(None)
        return out

    async def _run(self, live: list[Piece]) -> None:
        """Score a batch pass by pass, each pass only for the clients still waiting."""
        loop = asyncio.get_running_loop()
        items = [(p, i) for p in live for i in range(len(p.messages))]
        scores = {id(p): [None] * len(p.messages) for p in live}
        lengths = [p.costs[i] - self.counter.shared for p, i in items]
        started, scored = time.perf_counter(), 0
        for idx in scoring.length_batches(lengths, self.settings.score_batch,
                                          pass_tokens=scoring.PASS_TOKENS):
            step = [items[j] for j in idx if not items[j][0].future.done()]
            self.stats.dropped_messages += len(idx) - len(step)
            if step:
                out = await loop.run_in_executor(self.executor, self._score,
                                                 [p.messages[i] for p, i in step])
                for (p, i), x in zip(step, out):
                    scores[id(p)][i] = x
                scored += len(step)
        self.stats.add_batch(len(items), scored, time.perf_counter() - started)
        for p in live:
            if p.future.done():  # the client left while its batch was scored
                continue
            if any(x is None for x in scores[id(p)]):
                p.future.set_exception(ScoringError("the model could not score a message"))
            else:
                p.future.set_result(scores[id(p)])

    async def _work(self):
        while True:
            self.current = []
            try:
                self.current = await self._collect()
                live = [p for p in self.current if not p.future.done()]
                if live:
                    await self._run(live)
            except asyncio.CancelledError:
                for p in self.current:
                    if not p.future.done():
                        p.future.cancel()
                raise
            except Exception as e:  # never let the worker die
                log.exception("micro-batch worker error")
                for p in self.current:
                    if not p.future.done():
                        p.future.set_exception(ScoringError(str(e)))
