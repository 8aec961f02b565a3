"""The serving engine: one model, one continuous-batching scheduler in front of it.

The HTTP API and the Gradio UI both go through the engine: `start` turns prompts into a
`Generation` (checked against the context), `submit` queues it on the `Scheduler` (refusing
with `ServerBusy` when the queue is full: the API answers 429 before any header of a stream has
gone out), and iterating the returned ticket yields each step's text. Every running request is
decoded in the same batch, one forward per token for all of them. Closing the iteration (a client
that went away, a stop button) cancels the request; its slots are free at the next step.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import AsyncIterator, Sequence

from ..errors import UserError
from ..generate import Completion, Generation, Generator, Loaded, SamplingParams
from .prompting import ChatPrompter, PromptTooLong
from .scheduler import Scheduler, ServerBusy, Ticket

__all__ = ["Engine", "Limits", "ServerBusy"]


@dataclass
class Limits:
    max_prompt_tokens: int | None = None  # None: the context minus one
    max_new_tokens: int = 512
    max_concurrent: int = 64  # sequences decoded together (KV-cache slots)
    max_queue: int = 64  # requests waiting for slots; beyond: 429
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
        self.scheduler = Scheduler(self.generator, max_slots=self.limits.max_concurrent,
                                   max_queue=self.limits.max_queue)
        self.context = self.generator.max_seq_len
        self.prompter = ChatPrompter(loaded.tokenizer, chat_template)
        cap = self.context - 1
        self.max_prompt_tokens = min(self.limits.max_prompt_tokens or cap, cap)

    @property
    def stats(self) -> dict:
        return self.scheduler.stats

    @property
    def max_rows(self) -> int:
        """Rows (n x prompts) one request may have."""
        return min(self.limits.max_batch, self.limits.max_concurrent)

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
        """For interactive chat: drop the oldest turns so the prompt fits, keeping room for a reply.

        The room kept is the requested number of new tokens, but never more than half the
        context: a small model (256 tokens) with the default budget (256) would otherwise have no
        room for any prompt. The reply then gets whatever the kept prompt leaves
        (`reply_budget`)."""
        reserve = min(max_new_tokens, self.limits.max_new_tokens, self.context // 2)
        budget = min(self.max_prompt_tokens, self.context - max(reserve, 1))
        return self.prompter.fit(messages, max(budget, 1))

    def reply_budget(self, prompt_ids: Sequence[int], max_new_tokens: int) -> int:
        """New tokens a reply may have: what was asked, clamped to the server's cap and the room
        the context leaves after the prompt."""
        return max(1, min(int(max_new_tokens), self.limits.max_new_tokens, self.context - len(prompt_ids)))

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

    def submit(self, generation: Generation) -> Ticket:
        """Queue it (call on the event loop); ServerBusy when the queue is full."""
        return self.scheduler.submit(generation, asyncio.get_running_loop())

    async def stream(self, generation: Generation | Ticket) -> AsyncIterator[list[str]]:
        """Each step's pieces of a generation (submitted here unless it is a ticket already)."""
        ticket = generation if isinstance(generation, Ticket) else self.submit(generation)
        try:
            async for pieces in ticket:
                yield pieces
        finally:
            ticket.cancel()  # no-op when it already finished

    async def complete(self, generation: Generation | Ticket) -> list[Completion]:
        async for _ in self.stream(generation):
            pass
        ticket_generation = generation.generation if isinstance(generation, Ticket) else generation
        return ticket_generation.completions

    def close(self) -> None:
        self.scheduler.close()
