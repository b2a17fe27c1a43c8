"""Micro-batching: requests put their messages on a queue; one worker task takes what arrived
within max_wait_ms (at most max_batch messages), scores it in one call on the single model thread
(MLX is not safe for concurrent use), and hands each request its own results."""

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
from .settings import Settings

log = logging.getLogger("sms_serve")


class ScoringError(Exception):
    pass


class Busy(Exception):
    pass


@dataclass
class Piece:
    messages: list[str]
    future: asyncio.Future
    arrived: float


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


class Scorer:
    def __init__(self, model, tokenizer, settings: Settings,
                 loader: Callable[[], tuple] | None = None,
                 on_load_error: Callable[[str], None] | None = None):
        self.model, self.tokenizer = model, tokenizer
        self.settings = settings
        self.loader, self.on_load_error = loader, on_load_error
        self.load_error: str | None = None
        self.stats = Stats()
        self.pending: collections.deque[Piece] = collections.deque()
        self.queued = 0
        self.wakeup: asyncio.Event | None = None
        self.worker: asyncio.Task | None = None
        self.loading: asyncio.Task | None = None
        self.executor: ThreadPoolExecutor | None = None

    # -- life cycle (the app's lifespan) --

    async def start(self):
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="mlx-model")
        self.wakeup = asyncio.Event()
        self.worker = asyncio.create_task(self._work(), name="micro-batcher")
        if self.model is None and self.loader is not None:
            self.loading = asyncio.create_task(self._load(), name="model-loader")

    async def stop(self):
        for task in (self.loading, self.worker):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        for piece in self.pending:
            if not piece.future.done():
                piece.future.cancel()
        self.pending.clear()
        if self.executor is not None:
            # MLX's streams of the model thread must be destroyed on that thread before it ends,
            # else the process may abort at exit ("terminate called without an active
            # exception"). This waits for a model call in progress, if any.
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
        self.model, self.tokenizer = model, tokenizer
        log.info("model loaded in %.1f s", time.perf_counter() - started)

    @property
    def ready(self) -> bool:
        return (self.model is not None and self.worker is not None and not self.worker.done())

    # -- requests --

    async def classify(self, messages: list[str]) -> list[float]:
        """P(spam) of each message, scored together with whatever else arrives meanwhile."""
        if self.queued + len(messages) > self.settings.max_queue:
            self.stats.rejected_busy += 1
            raise Busy(f"{self.queued} messages are waiting for the model")
        loop = asyncio.get_running_loop()
        now = loop.time()
        step = self.settings.max_batch
        pieces = [Piece(messages[i: i + step], loop.create_future(), now)
                  for i in range(0, len(messages), step)]
        for piece in pieces:
            self.pending.append(piece)
            self.queued += len(piece.messages)
        self.wakeup.set()
        try:
            parts = await asyncio.gather(*(p.future for p in pieces))
        except BaseException:
            for p in pieces:  # a client gone (cancelled) or a failed piece: drop the rest
                if not p.future.done():
                    p.future.cancel()
            raise
        return [x for part in parts for x in part]

    async def _collect(self) -> list[Piece]:
        loop = asyncio.get_running_loop()
        while not self.pending:
            self.wakeup.clear()
            await self.wakeup.wait()
        deadline = self.pending[0].arrived + self.settings.max_wait_ms / 1000
        batch, n = [], 0
        while True:
            while self.pending and n + len(self.pending[0].messages) <= self.settings.max_batch:
                piece = self.pending.popleft()
                self.queued -= len(piece.messages)
                if piece.future.done():  # its client went away while it waited
                    self.stats.dropped_messages += len(piece.messages)
                    continue
                batch.append(piece)
                n += len(piece.messages)
            if n >= self.settings.max_batch or self.pending:  # full, or the next does not fit
                return batch
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

    async def _work(self):
        loop = asyncio.get_running_loop()
        while True:
            batch: list[Piece] = []
            try:
                batch = await self._collect()
                live = [p for p in batch if not p.future.done()]
                if not live:
                    continue
                messages = [m for p in live for m in p.messages]
                started = time.perf_counter()
                scores = await loop.run_in_executor(self.executor, self._score, messages)
                s = self.stats
                s.model_seconds += time.perf_counter() - started
                s.batches += 1
                s.messages += len(messages)
                s.max_batch_seen = max(s.max_batch_seen, len(messages))
                s.batch_sizes[len(messages)] = s.batch_sizes.get(len(messages), 0) + 1
                i = 0
                for p in live:
                    part = scores[i: i + len(p.messages)]
                    i += len(p.messages)
                    if p.future.done():  # the client left while its batch was scored
                        continue
                    if any(x is None for x in part):
                        p.future.set_exception(ScoringError("the model could not score a message"))
                    else:
                        p.future.set_result(part)
            except asyncio.CancelledError:
                for p in batch:
                    if not p.future.done():
                        p.future.cancel()
                raise
            except Exception as e:  # never let the worker die
                log.exception("micro-batch worker error")
                for p in batch:
                    if not p.future.done():
                        p.future.set_exception(ScoringError(str(e)))
