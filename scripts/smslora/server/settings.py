"""What the server allows and how it batches: one dataclass. The command line's options are made
from its fields, so each limit, its default and its help are typed once, here."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import UserError
from ..paths import STRESS_SUITE

API_KEY_ENV = "SMS_API_KEY"


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
    api_key: str | None = None
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
        return self

    def public(self) -> dict:
        """What /v1/model shows: the limits, and whether a key is needed (never the key)."""
        d = {f.name: getattr(self, f.name) for f in options()}
        d["api_key_required"] = bool(self.api_key)
        return d


def options() -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(Settings) if "help" in f.metadata]


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_arguments(parser) -> None:
    """One option per setting (default None: "not given"), and --api-key."""
    for f in options():
        parser.add_argument(flag(f.name), dest=f.name, type=type(f.default), default=None,
                            help=f"{f.metadata['help']} (default {f.default})")
    parser.add_argument("--api-key", default=os.environ.get(API_KEY_ENV) or None,
                        help=f"require this key (default: ${API_KEY_ENV}; unset: no key)")


def from_args(args) -> Settings:
    """The defaults, overridden by the options given; checked."""
    given = {f.name: getattr(args, f.name) for f in options() if getattr(args, f.name) is not None}
    return Settings(**given, api_key=args.api_key or None).check()
