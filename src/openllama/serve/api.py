"""The OpenAI-compatible HTTP API: /v1/chat/completions, /v1/completions, /v1/models, /health.

This module holds the routes: `create_api` wires them, the error handler and the API-key check
onto an app; `Routes` turns a parsed request into a generation on the engine and its answer.
What a request may say is `serve.requests`; how a streamed answer is sent is `serve.sse`.
"""

from __future__ import annotations

import secrets
import time
import uuid
from fastapi import FastAPI, Request

from ..errors import UserError
from ..generate import Completion, Generation, SamplingParams
from .engine import Engine, ServerBusy
from .logprobs import LogprobFormat
from .prompting import PromptTooLong, message_text
from .requests import APIError, ChatRequest, CompletionRequest, _Sampling, parse_request
from .scheduler import Ticket
from .sse import _SSE, _usage, chat_events, completion_events


def create_api(engine: Engine, api_key: str | None = None) -> FastAPI:
    app = FastAPI(title="openllama", description="OpenAI-compatible API", docs_url="/v1/docs",
                  openapi_url="/v1/openapi.json", redoc_url=None)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return exc.response()

    if api_key:
        app.add_middleware(BearerAuth, api_key=api_key, prefix="/v1/")

    routes = Routes(engine)
    app.get("/health")(routes.health)
    app.get("/v1/models")(routes.models)
    app.get("/v1/models/{model_id:path}")(routes.model)
    app.post("/v1/chat/completions")(routes.chat_completions)
    app.post("/v1/completions")(routes.completions)
    return app


class BearerAuth:
    """ASGI middleware: requests under `prefix` need `Authorization: Bearer <api_key>`, else 401.
    (A plain ASGI wrapper, not BaseHTTPMiddleware, so streamed responses pass through untouched.)"""

    def __init__(self, app, api_key: str, prefix: str):
        self.app, self.key, self.prefix = app, api_key.encode(), prefix

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"].startswith(self.prefix):
            header = dict(scope["headers"]).get(b"authorization", b"")
            scheme, _, token = header.partition(b" ")
            if scheme.lower() != b"bearer" or not secrets.compare_digest(token.strip(), self.key):
                response = APIError(401, "Incorrect or missing API key: pass it as 'Authorization: Bearer <key>'.",
                                    code="invalid_api_key").response()
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _meta(prefix: str, model_name: str) -> dict:
    return {"id": f"{prefix}-{uuid.uuid4().hex}", "created": int(time.time()), "model": model_name,
            "system_fingerprint": None}


class Routes:
    """The route bodies, over one engine. Method names are the routes' names (and OpenAPI ids)."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self.created = int(time.time())
        self.logprobs = LogprobFormat(engine.tokenizer)

    # -- routes ----------------------------------------------------------------------------------

    async def health(self):
        return {"status": "ok", "model": self.engine.model_name, **self.engine.stats}

    async def models(self):
        return {"object": "list", "data": [self.model_card()]}

    async def model(self, model_id: str):
        if model_id != self.engine.model_name:
            raise APIError(404, f"The model '{model_id}' does not exist", param="model", code="model_not_found")
        return self.model_card()

    async def chat_completions(self, request: Request):
        engine = self.engine
        req = await parse_request(request, ChatRequest, engine.model_name)
        try:
            messages = [{"role": "system" if m.role == "developer" else m.role, "content": message_text(m.content)}
                        for m in req.messages]
            ids = engine.encode_chat(messages)
        except PromptTooLong as exc:
            raise APIError(400, str(exc), param="messages", code="context_length_exceeded") from None
        except UserError as exc:
            raise APIError(400, str(exc), param="messages") from None
        self.check_batch(req.n)
        prompts = [ids] * req.n
        params = self.sampling(req, req.max_completion_tokens or req.max_tokens, prompts)
        generation = self.start(prompts, params, engine.prompter.reply_prefix(messages))
        ticket = self.submit(generation)
        meta = _meta("chatcmpl", engine.model_name)
        fmt = self.logprobs if params.logprobs is not None else None
        if req.stream:
            return _SSE(chat_events(generation, engine.stream(ticket), meta, req.include_usage(), fmt),
                        on_close=ticket.cancel)
        done = await self.run_to_end(ticket, request)
        choices = [{"index": i, "message": {"role": "assistant", "content": c.text}, "finish_reason": c.finish_reason,
                    "logprobs": self.logprobs.chat(c.logprobs)} for i, c in enumerate(done)]
        return {**meta, "object": "chat.completion", "choices": choices,
                "usage": _usage(len(ids), sum(c.completion_tokens for c in done))}

    async def completions(self, request: Request):
        engine = self.engine
        req = await parse_request(request, CompletionRequest, engine.model_name)
        texts = _prompt_list(req.prompt)
        if not texts:
            raise APIError(400, "prompt must not be empty", param="prompt")
        self.check_batch(len(texts) * req.n)
        try:
            ids = [engine.encode_text(t) if isinstance(t, str) else self.checked_ids(t) for t in texts]
        except PromptTooLong as exc:
            raise APIError(400, str(exc), param="prompt", code="context_length_exceeded") from None
        prompts = [row for row in ids for _ in range(req.n)]
        params = self.sampling(req, req.max_tokens, prompts)
        generation = self.start(prompts, params)
        ticket = self.submit(generation)
        echo = [(t if isinstance(t, str) else engine.tokenizer.decode(t)) if req.echo else "" for t in texts
                for _ in range(req.n)]
        meta = _meta("cmpl", engine.model_name)
        prompt_tokens = sum(len(r) for r in ids)
        fmt = self.logprobs if params.logprobs is not None else None
        if req.stream:
            return _SSE(completion_events(generation, engine.stream(ticket), meta, echo, prompt_tokens,
                                          req.include_usage(), fmt), on_close=ticket.cancel)
        done = await self.run_to_end(ticket, request)
        choices = [{"index": i, "text": echo[i] + c.text, "finish_reason": c.finish_reason,
                    "logprobs": self.logprobs.completion(c.logprobs, len(echo[i]), bool(params.logprobs))}
                   for i, c in enumerate(done)]
        return {**meta, "object": "text_completion", "choices": choices,
                "usage": _usage(prompt_tokens, sum(c.completion_tokens for c in done))}

    # -- from a request to a generation ----------------------------------------------------------

    def model_card(self) -> dict:
        return {"id": self.engine.model_name, "object": "model", "created": self.created, "owned_by": "openllama",
                "context_length": self.engine.context}

    def sampling(self, req: _Sampling, max_tokens: int | None, prompts: list[list[int]]) -> SamplingParams:
        engine = self.engine
        room = engine.room_for(prompts)
        if max_tokens is not None:
            longest = max(len(p) for p in prompts)
            if max_tokens > engine.limits.max_new_tokens:
                raise APIError(400, f"max_tokens is too large: {max_tokens}. This server allows at most "
                                    f"{engine.limits.max_new_tokens} new tokens.", param="max_tokens",
                               code="invalid_value")
            if max_tokens > room:
                raise APIError(400, f"This model's maximum context length is {engine.context} tokens. However, you "
                                    f"requested {longest + max_tokens} tokens "
                                    f"({longest} in the prompt, {max_tokens} for the completion).",
                               param="max_tokens", code="context_length_exceeded")
        limit = max_tokens or min(engine.limits.max_new_tokens, room)
        temperature = 1.0 if req.temperature is None else req.temperature
        top_p = 1.0 if req.top_p is None else req.top_p
        if top_p == 0.0:  # nothing but the most likely token
            temperature, top_p = 0.0, 1.0
        return SamplingParams(max_new_tokens=limit, temperature=temperature, top_p=top_p, top_k=req.top_k or 0,
                              repetition_penalty=req.repetition_penalty or 1.0, stop=req.stops(), seed=req.seed,
                              presence_penalty=req.presence_penalty or 0.0,
                              frequency_penalty=req.frequency_penalty or 0.0,
                              logit_bias=self.logit_bias(req.logit_bias), logprobs=req.token_logprobs())

    def logit_bias(self, bias: dict[str, float] | None) -> dict[int, float] | None:
        """{"token id": value} -> {id: value}, every id in the vocabulary."""
        if not bias:
            return None
        vocab = self.engine.generator.cfg.vocab_size
        out = {int(k): v for k, v in bias.items()}
        bad = [k for k in out if not 0 <= k < vocab]
        if bad:
            raise APIError(400, f"Invalid value for 'logit_bias': token ids must be in [0, {vocab}) (got {bad[:3]})",
                           param="logit_bias", code="invalid_value")
        return out

    def check_batch(self, n_rows: int) -> None:
        if n_rows > self.engine.max_rows:
            raise APIError(400, f"n x prompts = {n_rows} is more than this server's limit of "
                                f"{self.engine.max_rows}", param="n", code="invalid_value")

    def checked_ids(self, row: list[int]) -> list[int]:
        vocab = self.engine.generator.cfg.vocab_size
        bad = [t for t in row if not 0 <= t < vocab]
        if bad or not row:
            raise APIError(400, f"prompt token ids must be in [0, {vocab}) and non-empty (got {bad[:3]})",
                           param="prompt")
        self.engine.check_prompt(row)
        return list(row)

    def start(self, prompts: list[list[int]], params: SamplingParams, strip_prefix: str = "") -> Generation:
        try:
            return self.engine.start(prompts, params, strip_prefix=strip_prefix)
        except UserError as exc:
            raise APIError(400, str(exc)) from None

    def submit(self, generation: Generation) -> Ticket:
        """Queue it now, before any response header: a full queue is a 429 with Retry-After."""
        try:
            return self.engine.submit(generation)
        except ServerBusy as exc:
            raise APIError(429, str(exc), type_="server_busy", code="rate_limit_exceeded",
                           headers={"Retry-After": str(exc.retry_after)}) from None
        except UserError as exc:
            raise APIError(400, str(exc), param="n") from None

    # -- running ---------------------------------------------------------------------------------

    async def run_to_end(self, ticket: Ticket, request: Request) -> list[Completion]:
        stream = self.engine.stream(ticket)
        try:
            async for _ in stream:
                if await request.is_disconnected():  # nobody to answer: stop generating
                    break
        finally:
            await stream.aclose()
            ticket.cancel()  # no-op when it finished
        return ticket.generation.completions


def _prompt_list(p: str | list[str] | list[int] | list[list[int]]) -> list[str | list[int]]:
    """A completion request's `prompt` as a list of prompts, each text or token ids."""
    if isinstance(p, str):
        return [p]
    if p and all(isinstance(x, int) for x in p):
        return [list(p)]
    return list(p)
