"""What a request costs the model: its messages' prompt tokens (a message's prompt is cut at
512 tokens), counted before it is queued."""

from __future__ import annotations

import asyncio
import copy
from concurrent.futures import ThreadPoolExecutor

from .. import scoring


class Counter:
    """Prompt tokens per message, on a thread of its own with its own copy of the tokenizer
    (the model thread may be busy for seconds; the event loop must not wait on it)."""

    def __init__(self, tokenizer):
        self.tokenizer = copy.deepcopy(tokenizer)
        self.shared = len(scoring.prompt_prefix_ids(self.tokenizer))  # computed once per model
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="tokenizer")

    def _count(self, messages: list[str]) -> list[int]:
        return [len(scoring.encode_prompt(self.tokenizer, m)) for m in messages]

    async def count(self, messages: list[str]) -> list[int]:
        return await asyncio.get_running_loop().run_in_executor(self.executor, self._count,
                                                                messages)

    def close(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)
