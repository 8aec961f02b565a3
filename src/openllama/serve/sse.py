"""Streamed answers as server-sent events: `data: {chunk}` ... `data: [DONE]`, in OpenAI's chunk
shapes for chat and for completions. However sending ends (done, or a client that disconnects),
the event generator is closed and the request cancelled: its slots are free at the next step."""

from __future__ import annotations

import json
from typing import AsyncIterator, Callable

from fastapi.responses import StreamingResponse

from ..generate import Generation
from .logprobs import LogprobFormat
from .requests import APIError


class _SSE(StreamingResponse):
    """Server-sent events; closes the body iterator and calls `on_close` (cancelling the request)
    however the response ends, even when it never started sending."""

    media_type = "text/event-stream"

    def __init__(self, content, on_close: Callable[[], None] | None = None, **kwargs):
        super().__init__(content, **kwargs)
        self.on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            if self.on_close is not None:
                self.on_close()

    async def stream_response(self, send) -> None:
        try:
            await super().stream_response(send)
        finally:
            await self.body_iterator.aclose()


def _sse(obj: dict | str) -> str:
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False)}\n\n"


def _usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _chunk(base: dict, choice: dict, include_usage: bool) -> str:
    body = {**base, "choices": [choice]}
    if include_usage:  # OpenAI sends usage: null on every chunk but the last when usage is asked for
        body["usage"] = None
    return _sse(body)


def _usage_event(base: dict, generation: Generation, prompt_tokens: int) -> str:
    used = sum(c.completion_tokens for c in generation.completions)
    return _sse({**base, "choices": [], "usage": _usage(prompt_tokens, used)})


def _step_logprobs(step, i: int) -> list | None:
    lps = getattr(step, "logprobs", None)
    return lps[i] if lps else None


async def chat_events(generation: Generation, pieces: AsyncIterator[list[str]], meta: dict,
                      include_usage: bool, logprobs: LogprobFormat | None = None) -> AsyncIterator[str]:
    """`chat.completion.chunk` events: a role delta per choice, content deltas (with their tokens'
    log-probabilities when asked for), finish reasons."""
    base = {**meta, "object": "chat.completion.chunk"}

    def chunk(i: int, delta: dict, finish: str | None = None, lp: dict | None = None) -> str:
        return _chunk(base, {"index": i, "delta": delta, "finish_reason": finish, "logprobs": lp}, include_usage)

    try:
        for i in range(len(generation.prompts)):
            yield chunk(i, {"role": "assistant", "content": ""})
        async for step in pieces:
            for i, piece in enumerate(step):
                entries = _step_logprobs(step, i) if logprobs is not None else None
                if piece or entries:
                    yield chunk(i, {"content": piece}, lp=logprobs.chat(entries) if entries else None)
        for i, c in enumerate(generation.completions):
            yield chunk(i, {}, c.finish_reason)
        if include_usage:
            yield _usage_event(base, generation, generation.completions[0].prompt_tokens)
    except APIError as exc:  # headers are sent: report inside the stream, as OpenAI does
        yield _sse(exc.body())
    yield _sse("[DONE]")


async def completion_events(generation: Generation, pieces: AsyncIterator[list[str]], meta: dict,
                            echo: list[str], prompt_tokens: int, include_usage: bool,
                            logprobs: LogprobFormat | None = None) -> AsyncIterator[str]:
    """`text_completion` events: the echoed prompts, text pieces (with log-probabilities when
    asked for), finish reasons."""
    base = {**meta, "object": "text_completion"}
    offsets = [len(e) for e in echo]
    top = bool(generation.params.logprobs)

    def chunk(i: int, text: str, finish: str | None = None, lp: dict | None = None) -> str:
        return _chunk(base, {"index": i, "text": text, "finish_reason": finish, "logprobs": lp}, include_usage)

    try:
        for i, e in enumerate(echo):
            if e:
                yield chunk(i, e)
        async for step in pieces:
            for i, piece in enumerate(step):
                entries = _step_logprobs(step, i) if logprobs is not None else None
                if piece or entries:
                    lp = logprobs.completion(entries, offsets[i], top) if entries else None
                    offsets[i] += len(piece)
                    yield chunk(i, piece, lp=lp)
        for i, c in enumerate(generation.completions):
            yield chunk(i, "", c.finish_reason)
        if include_usage:
            yield _usage_event(base, generation, prompt_tokens)
    except APIError as exc:  # headers are sent: report inside the stream, as OpenAI does
        yield _sse(exc.body())
    yield _sse("[DONE]")
