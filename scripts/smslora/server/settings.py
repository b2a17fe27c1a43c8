"""What the server allows and how it batches: one dataclass. The command line's options are made
from its fields, so each limit, its default and its help are typed once, here."""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import UserError
from ..paths import STRESS_SUITE

API_KEY_ENV = "SMS_API_KEY"
ORIGIN = re.compile(r"https?://[^/?#\s]+")  # what a browser sends as Origin


def option(default, help: str, low=1, high=None):
    """A setting that is also a command-line option, with the range it must lie in."""
    return field(default=default, metadata={"help": help, "low": low, "high": high})


@dataclass
class Settings:
    """The server's limits and batching (each an option: --max-batch and so on)."""

    max_batch: int = option(64, "messages in one model call")
    score_batch: int = option(16, "messages per forward pass inside a model call: the call sorts "
                                  "its messages by length and pads each pass to its longest, so "
                                  "smaller passes waste less on padding (CPU); larger suit a GPU")
    max_wait_ms: float = option(5.0, "how long a batch waits for more requests", 0, 10_000)
    max_messages: int = option(64, "messages per request")
    max_chars: int = option(2000, "characters per message")
    max_body_bytes: int = option(256 * 1024, "request body size limit in bytes")
    max_queue: int = option(4096, "messages waiting for the model before requests get 503")
    max_request_tokens: int = option(8192, "prompt tokens in one request, and in one model "
                                           "call (a message's prompt is cut at 512 tokens)")
    max_queue_tokens: int = option(32768, "prompt tokens waiting for the model before "
                                          "requests get 503")
    max_connections: int = option(512, "open connections; at the limit, a new connection "
                                        "closes the one that has waited longest for a request "
                                        "(lowered to fit the open-file limit)")
    header_timeout: float = option(10.0, "seconds a connection has to send a request's "
                                         "headers (its first, or its next one)", 0.1, 3600)
    body_timeout: float = option(30.0, "seconds a request has to send its body", 0.1, 3600)
    keep_alive: float = option(5.0, "seconds an idle connection is kept open after a response",
                               0.1, 3600)
    shutdown_timeout: float = option(3.0, "seconds a stop waits for requests in progress "
                                          "before cancelling them", 0, 3600)
    api_key: str | None = None
    allow_host: tuple[str, ...] = ()    # Host names accepted besides addresses and localhost
    allow_origin: tuple[str, ...] = ()  # origins whose pages may call the API (CORS)
    stress_suite: Path = STRESS_SUITE

    def check(self) -> "Settings":
        """Each option within its range (a UserError naming the flag otherwise)."""
        for f in options():
            value, low, high = getattr(self, f.name), f.metadata["low"], f.metadata["high"]
            if high is None and value < low:
                raise UserError(f"{flag(f.name)} must be at least {low}")
            if high is not None and not low <= value <= high:
                raise UserError(f"{flag(f.name)} must be between {low} and {high}")
        if self.max_queue < self.max_messages:
            raise UserError("--max-queue must be at least --max-messages")
        if self.max_queue_tokens < self.max_request_tokens:
            raise UserError("--max-queue-tokens must be at least --max-request-tokens")
        for origin in self.allow_origin:
            if origin != "*" and not ORIGIN.fullmatch(origin):
                raise UserError(f"--allow-origin {origin!r}: expected '*' or an origin like "
                                "https://app.example.com (scheme, host, optional port)")
        return self

    def public(self) -> dict:
        """What /v1/model shows: the limits, and whether a key is needed (never the key)."""
        d = {f.name: getattr(self, f.name) for f in options()}
        d["api_key_required"] = bool(self.api_key)
        d["allow_host"], d["allow_origin"] = list(self.allow_host), list(self.allow_origin)
        return d


def options() -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(Settings) if "help" in f.metadata]


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_arguments(parser) -> None:
    """One option per setting (default None: "not given"), --api-key and the cross-origin
    exceptions."""
    for f in options():
        parser.add_argument(flag(f.name), dest=f.name, type=type(f.default), default=None,
                            help=f"{f.metadata['help']} (default {f.default})")
    parser.add_argument("--api-key", default=os.environ.get(API_KEY_ENV) or None,
                        help=f"require this key (default: ${API_KEY_ENV}; unset: no key)")
    parser.add_argument("--allow-host", action="append", default=[], metavar="NAME",
                        help="accept requests whose Host header is NAME (a DNS name of this "
                             "server, a reverse proxy's name; '*': any). IP addresses and "
                             "localhost are always accepted. Repeatable")
    parser.add_argument("--allow-origin", action="append", default=[], metavar="ORIGIN",
                        help="let web pages from ORIGIN (e.g. https://app.example.com; '*': "
                             "any) call the API from a browser (CORS). Repeatable")


def from_args(args) -> Settings:
    """The defaults, overridden by the options given; checked."""
    given = {f.name: getattr(args, f.name) for f in options() if getattr(args, f.name) is not None}
    return Settings(**given, api_key=args.api_key or None,
                    allow_host=tuple(h.strip().lower() for h in args.allow_host),
                    allow_origin=tuple(o.strip().lower().rstrip("/") for o in args.allow_origin)
                    ).check()
