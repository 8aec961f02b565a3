"""The serving engine: one model, a queue in front of it, generation in worker threads.

The HTTP API and the Gradio UI both go through `Engine.stream`: a request waits for one of
`max_concurrent` slots (an asyncio semaphore; beyond `max_queue` waiting requests it is refused
with `ServerBusy`), then its `Generation` runs in a worker thread and hands each step's text to
the event loop. Closing the async iterator (a client that went away, a stop button) cancels the
generation before its next token; the slot is freed by the worker when it really stops.
"""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import AsyncIterator, Sequence

from ..errors import UserError
from ..generate import Completion, Generation, Generator, Loaded, SamplingParams
from .prompting import ChatPrompter, PromptTooLong


class ServerBusy(Exception):
    """Too many requests waiting."""


@dataclass
class Limits:
    max_prompt_tokens: int | None = None  # None: the context minus one
    max_new_tokens: int = 512
    max_concurrent: int = 1
    max_queue: int = 64
    max_batch: int = 16  # n x prompts of one request


class Engine:
    def __init__(self, loaded: Loaded, limits: Limits | None = None, *, compile: bool = False,
                 chat_template: str | None = None, name: str | None = None):
        self.limits = limits or Limits()
        if self.limits.max_concurrent < 1 or self.limits.max_new_tokens < 1 or self.limits.max_queue < 0:
            raise UserError("serve: --max-concurrent and --max-new-tokens must be >= 1, --max-queue >= 0")
        self.model_name = name or loaded.name
        self.tokenizer = loaded.tokenizer
        self.generator = Generator(loaded.model, loaded.tokenizer, compile=compile)
        self.context = self.generator.max_seq_len
        self.prompter = ChatPrompter(loaded.tokenizer, chat_template)
        cap = self.context - 1
        self.max_prompt_tokens = min(self.limits.max_prompt_tokens or cap, cap)
        self._slots = asyncio.Semaphore(self.limits.max_concurrent)
        self._pool = ThreadPoolExecutor(self.limits.max_concurrent, thread_name_prefix="generate")
        self._lock = threading.Lock()
        self.stats = {"running": 0, "waiting": 0, "completed": 0, "cancelled": 0, "failed": 0}

    # -- prompts ---------------------------------------------------------------------------------

    def check_prompt(self, ids: Sequence[int]) -> None:
        if len(ids) > self.max_prompt_tokens:
            raise PromptTooLong(f"the prompt has {len(ids)} tokens; this server accepts at most "
                                f"{self.max_prompt_tokens} (context {self.context})")

    def encode_chat(self, messages: Sequence[dict]) -> list[int]:
        ids = self.prompter.encode(messages)
        self.check_prompt(ids)
        return ids

    def fit_chat(self, messages: Sequence[dict], max_new_tokens: int) -> tuple[list[dict], list[int], int]:
        """For interactive chat: drop the oldest turns so the prompt and the reply fit."""
        budget = min(self.max_prompt_tokens, self.context - min(max_new_tokens, self.limits.max_new_tokens))
        return self.prompter.fit(messages, max(budget, 1))

    def encode_text(self, text: str) -> list[int]:
        ids = list(self.tokenizer.encode(text, bos=True))
        self.check_prompt(ids)
        return ids

    def room_for(self, prompts: Sequence[Sequence[int]]) -> int:
        """How many new tokens the longest prompt leaves in the context."""
        return self.context - max(len(p) for p in prompts)

    # -- running ---------------------------------------------------------------------------------

    def start(self, prompts: Sequence[Sequence[int]], params: SamplingParams,
              seeds: Sequence[int | None] | None = None, strip_prefix: str = "") -> Generation:
        return self.generator.start([list(p) for p in prompts], params, seeds, strip_prefix)

    def check_capacity(self) -> None:
        """Refuse up front (before a stream's headers go out) when the queue is full."""
        if self.stats["waiting"] >= self.limits.max_queue and self._slots.locked():
            raise ServerBusy(f"{self.stats['waiting']} requests are already waiting; try again later")

    async def stream(self, generation: Generation) -> AsyncIterator[list[str]]:
        """Wait for a slot, run `generation` in a worker thread, yield each step's pieces."""
        with self._lock:
            self.check_capacity()
            self.stats["waiting"] += 1
        try:
            await self._slots.acquire()
        finally:
            with self._lock:
                self.stats["waiting"] -= 1
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()

        def work() -> None:
            outcome = "completed"
            try:
                with self._lock:
                    self.stats["running"] += 1
                for pieces in generation:
                    loop.call_soon_threadsafe(queue.put_nowait, ("step", pieces))
                if generation.cancelled:
                    outcome = "cancelled"
                loop.call_soon_threadsafe(queue.put_nowait, ("done", None))
            except BaseException as exc:  # surfaced to the awaiting request
                outcome = "failed"
                loop.call_soon_threadsafe(queue.put_nowait, ("error", exc))
            finally:
                with self._lock:
                    self.stats["running"] -= 1
                    self.stats[outcome] += 1
                loop.call_soon_threadsafe(self._slots.release)

        try:
            self._pool.submit(work)
        except BaseException:
            self._slots.release()
            raise
        try:
            while True:
                kind, value = await queue.get()
                if kind == "step":
                    yield value
                elif kind == "error":
                    raise value
                else:
                    return
        finally:
            generation.cancel()  # no-op when it already finished

    async def complete(self, generation: Generation) -> list[Completion]:
        async for _ in self.stream(generation):
            pass
        return generation.completions

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
