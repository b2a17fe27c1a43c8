"""Data-parallel training across processes started by `mlx.launch` (mx.distributed: ring over
TCP, MPI, Thunderbolt RDMA, NCCL on CUDA). Without mlx.launch the group has one process and
nothing here changes a number.

Each rank takes a strided share of every global batch; the gradients are combined weighted by
each rank's token count, so N ranks compute the step that one process computes on the whole
batch (to float rounding). Rank 0 alone writes files and logs."""

from __future__ import annotations

import signal
import threading
import time
from typing import Callable

import mlx.core as mx
from mlx.utils import tree_map

from .errors import UserError


class Ranks:
    """This process's place in the job: rank, size, and the collective operations training
    needs."""

    def __init__(self, group=None):
        self.group = group if group is not None else mx.distributed.init()
        self.rank, self.size = self.group.rank(), self.group.size()

    @property
    def main(self) -> bool:
        """Whether this process writes the run's files and logs."""
        return self.rank == 0

    def shard(self, items: list) -> list:
        """This rank's share of a global list: every size-th item from its rank on."""
        return list(items)[self.rank::self.size]

    def sum(self, x: mx.array) -> mx.array:
        return x if self.size == 1 else mx.distributed.all_sum(x, group=self.group)

    def combine(self, loss: mx.array, ntoks: mx.array, grads):
        """The whole batch's mean loss and gradients from each rank's mean over its tokens."""
        if self.size == 1:
            return loss, ntoks, grads
        weight = ntoks.astype(mx.float32)
        total = self.sum(weight)
        grads = tree_map(lambda g: self.sum(g * weight.astype(g.dtype)) / total.astype(g.dtype),
                         grads)
        return self.sum(loss * weight) / total, self.sum(ntoks), grads


def log_on_main(ranks: Ranks, log):
    """log for rank 0, silence for the others."""
    return log if ranks.main else (lambda *args, **kwargs: None)


TIMEOUT_ENV = "SMS_LORA_DIST_TIMEOUT"  # seconds a process may wait on the others (default 300)


class Watchdog:
    """Ends a distributed process that waits on the others for too long, or that was told to
    stop (SIGTERM, as mlx.launch does when another process dies) while stuck inside a
    collective operation, where Python's own handler would never run: one line on stderr and
    exit code 1, instead of a hang. The last checkpoint on disk is left as it was.

    Use: `with Watchdog(ranks, where) as dog:` then `dog.beat()` after every step."""

    GRACE = 5.0  # seconds for the main thread to handle a SIGTERM itself (saving a checkpoint)

    def __init__(self, ranks: Ranks, where: Callable[[], str]):
        import os

        self.ranks, self.where = ranks, where
        value = os.environ.get(TIMEOUT_ENV, "300")
        try:
            self.timeout = float(value)
        except ValueError:
            self.timeout = -1.0
        if not self.timeout > 0:
            raise UserError(f"{TIMEOUT_ENV}={value!r}: use a number of seconds above 0")
        self.last = time.monotonic()
        self.stop = threading.Event()
        self.read_fd = self.old_fd = None

    def beat(self) -> None:
        self.last = time.monotonic()

    def __enter__(self):
        if self.ranks.size == 1:
            return self
        import os

        self.read_fd, write_fd = os.pipe()
        os.set_blocking(write_fd, False)
        self.old_fd = signal.set_wakeup_fd(write_fd)  # the C handler writes here at once
        self.beat()
        threading.Thread(target=self._watch, name="distributed-watchdog", daemon=True).start()
        return self

    def __exit__(self, *exc):
        if self.read_fd is not None:
            self.stop.set()
            signal.set_wakeup_fd(self.old_fd)

    def _watch(self):
        import os
        import select

        told = None
        while not self.stop.is_set():
            ready, _, _ = select.select([self.read_fd], [], [], 1.0)
            if ready and signal.SIGTERM in os.read(self.read_fd, 64) and told is None:
                told = time.monotonic()
            now = time.monotonic()
            if told is not None and now - told > self.GRACE:
                self._die("stopped (SIGTERM) while waiting on the other processes")
            if now - self.last > self.timeout:
                self._die(f"no step finished for {self.timeout:g} s: another process of the "
                          f"distributed job stopped or hangs ({TIMEOUT_ENV} sets the limit)")

    def _die(self, why: str):
        import os
        import sys

        if not self.stop.is_set():
            print(f"error: rank {self.ranks.rank}: {why}; {self.where()}", file=sys.stderr,
                  flush=True)
            os._exit(1)
