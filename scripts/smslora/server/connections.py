"""Connections that cost nothing to open must not be able to take the server down.

uvicorn's HTTP/1.1 protocol keeps a connection that never sends a request open for ever (its
keep-alive timeout starts only after a first response, and `limit_concurrency` answers 503 to
requests but closes nothing), so idle sockets pile up until the process is out of file
descriptors and cannot accept anyone. Here:

- `GuardedProtocol`: deadlines for a request's headers and for its body, and a cap on open
  connections; at the cap a new connection closes the one that has waited longest for a request
  (never one whose request is being read or answered);
- `connection_cap`: that cap, lowered to fit the open-file limit;
- `AcceptErrors`: asyncio logs a traceback for every failed accept() (out of file descriptors),
  many times a second while it lasts; one line instead, then a count at most once a minute;
- `keep_open_file_limit`: importing mlx_lm.utils sets the open-file limit to (2048, 4096), which
  lowers the hard limit for good (or fails where it is below 4096); the import is done here with
  that call left out, so the process keeps the limits it was given.
"""

from __future__ import annotations

import logging
import resource
import sys
import time

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger("sms_serve")

BACKLOG = 128       # connections the kernel queues before the server accepts them
FD_RESERVE = 64     # descriptors kept for everything else (model files, logs, the loop)


class GuardedProtocol(H11Protocol):
    """uvicorn's HTTP/1.1 protocol with a deadline for each phase of reading a request and a cap
    on open connections; made for one server by `guarded_protocol`."""

    max_connections: int
    header_timeout: float
    body_timeout: float
    waiting: dict  # this server's connections waiting for a request, oldest first
    phase: str | None = None
    timer = None

    def connection_made(self, transport):
        super().connection_made(transport)
        if len(self.connections) > self.max_connections:
            oldest = next(iter(self.waiting), None)
            if oldest is None:  # every connection is busy with a request: refuse this one
                transport.abort()
                return
            oldest.close("closed to make room for a new connection")
        self.track()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self.track()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self.track()

    def connection_lost(self, exc):
        self.set_phase(None)
        super().connection_lost(exc)

    def track(self) -> None:
        """Follow the request being read: its headers, its body, or neither."""
        if self.transport.is_closing():
            return self.set_phase(None)
        state = self.conn.their_state
        self.set_phase("headers" if state is h11.IDLE else
                       "body" if state is h11.SEND_BODY else None)

    def set_phase(self, phase: str | None) -> None:
        if phase == self.phase:
            return
        if self.timer is not None:
            self.timer.cancel()
        self.waiting.pop(self, None)
        self.phase, self.timer = phase, None
        if phase == "headers":
            self.waiting[self] = None
            self.timer = self.loop.call_later(self.header_timeout, self.close,
                                              f"no request within {self.header_timeout:g} s")
        elif phase == "body":
            self.timer = self.loop.call_later(self.body_timeout, self.close,
                                              f"no full body within {self.body_timeout:g} s")

    def close(self, why: str) -> None:
        log.debug("closing a connection from %s: %s", self.client, why)
        self.set_phase(None)
        self.transport.abort()


def guarded_protocol(max_connections: int, header_timeout: float, body_timeout: float) -> type:
    """The protocol class for one server (its instances share the waiting connections)."""
    return type("GuardedProtocol", (GuardedProtocol,), {
        "max_connections": max_connections, "header_timeout": header_timeout,
        "body_timeout": body_timeout, "waiting": {}})


def connection_cap(wanted: int) -> int:
    """At most `wanted` connections, and no more than the open-file limit leaves room for."""
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if soft == resource.RLIM_INFINITY:
        return wanted
    room = max(soft - BACKLOG - FD_RESERVE, 1)
    if room < wanted:
        log.warning("the open-file limit (%d) leaves room for %d connections, not %d "
                    "(raise it with ulimit -n)", soft, room, wanted)
    return min(wanted, room)


class AcceptErrors:
    """The event loop's exception handler: failed accepts as one line a minute at most, with
    how many there were; anything else as asyncio would log it."""

    def __init__(self, interval: float = 60.0, clock=time.monotonic):
        self.interval, self.clock = interval, clock
        self.last: float | None = None
        self.unreported = 0

    def __call__(self, loop, context: dict) -> None:
        if "accept" not in str(context.get("message", "")):
            loop.default_exception_handler(context)
            return
        self.unreported += 1
        now = self.clock()
        if self.last is not None and now - self.last < self.interval:
            return
        exc = context.get("exception")
        reason = getattr(exc, "strerror", None) or str(exc or context.get("message"))
        log.error("cannot accept connections: %s (%d time%s%s)", reason, self.unreported,
                  "s" if self.unreported > 1 else "",
                  "" if self.last is None else f" in {now - self.last:.0f} s")
        self.last, self.unreported = now, 0


def keep_open_file_limit() -> None:
    """Import mlx_lm.utils without letting it change RLIMIT_NOFILE. If it was imported already
    (and has lowered the limits), the soft limit is raised to the hard one instead."""
    if "mlx_lm.utils" in sys.modules:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft != hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        return
    real = resource.setrlimit

    def setrlimit(which, limits):
        if which != resource.RLIMIT_NOFILE:
            real(which, limits)

    resource.setrlimit = setrlimit
    try:
        import mlx_lm.utils  # noqa: F401
    finally:
        resource.setrlimit = real
