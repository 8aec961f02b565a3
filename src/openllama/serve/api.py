"""The OpenAI-compatible HTTP API: /v1/chat/completions, /v1/completions, /v1/models, /health.

Requests are validated strictly, the way OpenAI does: unknown fields, wrong types and
out-of-range values are 400s in OpenAI's error shape
`{"error": {"message", "type", "param", "code"}}`, naming the field. Fields OpenAI defines that
change nothing for this server (user, presence/frequency penalty, ...) are accepted; ones it
cannot honour (logprobs, tools, ...) are refused by name rather than silently ignored. Two
extensions as vLLM names them: `top_k` and `repetition_penalty`.

Streaming answers are server-sent events (`data: {chunk}` ... `data: [DONE]`); a client that
disconnects mid-stream cancels its generation.
"""

from __future__ import annotations

import json
import secrets
import time
import uuid
from typing import Annotated, Any, AsyncIterator, Literal

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from ..errors import UserError
from ..generate import Generation, SamplingParams
from .engine import Engine, ServerBusy
from .prompting import PromptTooLong, message_text

# -- errors --------------------------------------------------------------------------------------


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
        headers = {"WWW-Authenticate": "Bearer"} if self.status == 401 else None
        return JSONResponse(body, status_code=self.status, headers=headers)


def _validation_error(exc: ValidationError) -> APIError:
    err = exc.errors()[0]
    # pydantic names union branches ("str", "list[str]") in the location: keep the field path only
    branch = {"str", "int", "float", "bool", "dict", "list"}
    param = ".".join(str(p) for p in err["loc"] if not (isinstance(p, str) and ("[" in p or p in branch)))
    if err["type"] == "extra_forbidden":
        return APIError(400, f"Unrecognized request argument supplied: {param}", param=param,
                        code="unrecognized_argument")
    if err["type"] == "missing":
        return APIError(400, f"Missing required parameter: '{param}'.", param=param, code="missing_required_parameter")
    got = err.get("input")
    shown = f" (got {json.dumps(got)[:80]})" if not isinstance(got, dict) and _jsonable(got) else ""
    msg = err["msg"].removeprefix("Value error, ")
    return APIError(400, f"Invalid value for '{param}': {msg}{shown}", param=param, code="invalid_value")


def _jsonable(x: Any) -> bool:
    try:
        json.dumps(x)
        return True
    except (TypeError, ValueError):
        return False


# -- requests ------------------------------------------------------------------------------------

Temperature = Annotated[float, Field(ge=0.0, le=2.0)]
TopP = Annotated[float, Field(ge=0.0, le=1.0)]
Penalty = Annotated[float, Field(ge=-2.0, le=2.0)]


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")
    include_usage: bool = False


class _Sampling(BaseModel):
    """Fields shared by both endpoints."""

    model_config = ConfigDict(strict=True, extra="forbid")

    model: str | None = None
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    n: Annotated[int, Field(ge=1, le=128)] = 1
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    seed: int | None = None
    presence_penalty: Penalty | None = None  # accepted, not applied
    frequency_penalty: Penalty | None = None  # accepted, not applied
    user: str | None = None
    logprobs: Any = None
    logit_bias: dict[str, float] | None = None
    # extensions (vLLM's names)
    top_k: Annotated[int, Field(ge=0)] | None = None
    repetition_penalty: Annotated[float, Field(gt=0.0)] | None = None

    @field_validator("stop")
    @classmethod
    def _stop(cls, v):
        if isinstance(v, list) and len(v) > 4:
            raise ValueError("at most 4 stop sequences")
        return v

    def stops(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    def refuse_unsupported(self) -> None:
        if self.logprobs not in (None, False):
            raise APIError(400, "logprobs are not supported by this server", param="logprobs", code="unsupported")
        if self.logit_bias:
            raise APIError(400, "logit_bias is not supported by this server", param="logit_bias", code="unsupported")
        if self.stream_options is not None and not self.stream:
            raise APIError(400, "stream_options is only allowed when stream is true", param="stream_options")


class ChatMessage(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[dict[str, Any]] | None
    name: str | None = None


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    response_format: dict[str, Any] | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    top_logprobs: int | None = None

    def refuse_unsupported(self) -> None:
        super().refuse_unsupported()
        if self.tools:
            raise APIError(400, "tools are not supported by this server", param="tools", code="unsupported")
        if self.response_format not in (None, {"type": "text"}):
            raise APIError(400, "only response_format {'type': 'text'} is supported", param="response_format",
                           code="unsupported")


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool = False
    suffix: str | None = None
    best_of: Annotated[int, Field(ge=1)] | None = None

    def refuse_unsupported(self) -> None:
        super().refuse_unsupported()
        if self.suffix:
            raise APIError(400, "suffix is not supported by this server", param="suffix", code="unsupported")
        if self.best_of not in (None, self.n):
            raise APIError(400, "best_of other than n is not supported", param="best_of", code="unsupported")


# -- the app -------------------------------------------------------------------------------------


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


class _SSE(StreamingResponse):
    """Server-sent events; closes the body iterator (cancelling the generation) however sending ends."""

    media_type = "text/event-stream"

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


def create_api(engine: Engine, api_key: str | None = None) -> FastAPI:
    app = FastAPI(title="openllama", description="OpenAI-compatible API", docs_url="/v1/docs",
                  openapi_url="/v1/openapi.json", redoc_url=None)
    created = int(time.time())

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return exc.response()

    if api_key:
        app.add_middleware(BearerAuth, api_key=api_key, prefix="/v1/")

    async def parse(request: Request, cls):
        if "json" not in request.headers.get("content-type", ""):
            raise APIError(400, "the request body must be JSON (Content-Type: application/json)")
        raw = await request.body()
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise APIError(400, f"We could not parse the JSON body of your request: {exc}") from None
        if not isinstance(body, dict):
            raise APIError(400, "the JSON body must be an object")
        try:
            req = cls.model_validate(body)
        except ValidationError as exc:
            raise _validation_error(exc) from None
        if req.model is not None and req.model != engine.model_name:
            raise APIError(404, f"The model '{req.model}' does not exist; this server serves '{engine.model_name}'.",
                           param="model", code="model_not_found")
        req.refuse_unsupported()
        return req

    def sampling(req: _Sampling, max_tokens: int | None, prompts: list[list[int]]) -> SamplingParams:
        room = engine.room_for(prompts)
        if max_tokens is not None:
            if max_tokens > engine.limits.max_new_tokens:
                raise APIError(400, f"max_tokens is too large: {max_tokens}. This server allows at most "
                                    f"{engine.limits.max_new_tokens} new tokens.", param="max_tokens", code="invalid_value")
            if max_tokens > room:
                raise APIError(400, f"This model's maximum context length is {engine.context} tokens. However, you "
                                    f"requested {max(len(p) for p in prompts) + max_tokens} tokens "
                                    f"({max(len(p) for p in prompts)} in the prompt, {max_tokens} for the completion).",
                               param="max_tokens", code="context_length_exceeded")
        limit = max_tokens or min(engine.limits.max_new_tokens, room)
        temperature = 1.0 if req.temperature is None else req.temperature
        top_p = 1.0 if req.top_p is None else req.top_p
        if top_p == 0.0:  # nothing but the most likely token
            temperature, top_p = 0.0, 1.0
        return SamplingParams(max_new_tokens=limit, temperature=temperature, top_p=top_p, top_k=req.top_k or 0,
                              repetition_penalty=req.repetition_penalty or 1.0, stop=req.stops(), seed=req.seed)

    def check_batch(n_rows: int) -> None:
        if n_rows > engine.limits.max_batch:
            raise APIError(400, f"n x prompts = {n_rows} is more than this server's limit of {engine.limits.max_batch}",
                           param="n", code="invalid_value")

    def start(prompts: list[list[int]], params: SamplingParams, strip_prefix: str = "") -> Generation:
        try:
            engine.check_capacity()
            return engine.start(prompts, params, strip_prefix=strip_prefix)
        except ServerBusy as exc:
            raise APIError(429, str(exc), type_="server_busy", code="rate_limit_exceeded") from None
        except UserError as exc:
            raise APIError(400, str(exc)) from None

    # -- routes ----------------------------------------------------------------------------------

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": engine.model_name, **engine.stats}

    def model_card() -> dict:
        return {"id": engine.model_name, "object": "model", "created": created, "owned_by": "openllama",
                "context_length": engine.context}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        if model_id != engine.model_name:
            raise APIError(404, f"The model '{model_id}' does not exist", param="model", code="model_not_found")
        return model_card()

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        req: ChatRequest = await parse(request, ChatRequest)
        try:
            messages = [{"role": "system" if m.role == "developer" else m.role, "content": message_text(m.content)}
                        for m in req.messages]
            ids = engine.encode_chat(messages)
        except PromptTooLong as exc:
            raise APIError(400, str(exc), param="messages", code="context_length_exceeded") from None
        except UserError as exc:
            raise APIError(400, str(exc), param="messages") from None
        check_batch(req.n)
        prompts = [ids] * req.n
        params = sampling(req, req.max_completion_tokens or req.max_tokens, prompts)
        generation = start(prompts, params, engine.prompter.reply_prefix(messages))
        meta = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": engine.model_name,
                "system_fingerprint": None}
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return _SSE(chat_events(generation, meta, include_usage))
        completions = await run_to_end(generation, request)
        choices = [{"index": i, "message": {"role": "assistant", "content": c.text}, "finish_reason": c.finish_reason,
                    "logprobs": None} for i, c in enumerate(completions)]
        return {**meta, "object": "chat.completion", "choices": choices,
                "usage": _usage(len(ids), sum(c.completion_tokens for c in completions))}

    @app.post("/v1/completions")
    async def completions(request: Request):
        req: CompletionRequest = await parse(request, CompletionRequest)
        p = req.prompt
        if isinstance(p, str):
            texts: list[str | list[int]] = [p]
        elif p and all(isinstance(x, int) for x in p):
            texts = [list(p)]
        else:
            texts = list(p)
        if not texts:
            raise APIError(400, "prompt must not be empty", param="prompt")
        check_batch(len(texts) * req.n)
        try:
            ids = [engine.encode_text(t) if isinstance(t, str) else _checked_ids(t) for t in texts]
        except PromptTooLong as exc:
            raise APIError(400, str(exc), param="prompt", code="context_length_exceeded") from None
        prompts = [row for row in ids for _ in range(req.n)]
        params = sampling(req, req.max_tokens, prompts)
        generation = start(prompts, params)
        echo = [(t if isinstance(t, str) else engine.tokenizer.decode(t)) if req.echo else "" for t in texts
                for _ in range(req.n)]
        meta = {"id": f"cmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": engine.model_name,
                "system_fingerprint": None}
        prompt_tokens = sum(len(r) for r in ids)
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return _SSE(completion_events(generation, meta, echo, prompt_tokens, include_usage))
        done = await run_to_end(generation, request)
        choices = [{"index": i, "text": echo[i] + c.text, "finish_reason": c.finish_reason, "logprobs": None}
                   for i, c in enumerate(done)]
        return {**meta, "object": "text_completion", "choices": choices,
                "usage": _usage(prompt_tokens, sum(c.completion_tokens for c in done))}

    def _checked_ids(row: list[int]) -> list[int]:
        vocab = engine.generator.cfg.vocab_size
        bad = [t for t in row if not 0 <= t < vocab]
        if bad or not row:
            raise APIError(400, f"prompt token ids must be in [0, {vocab}) and non-empty (got {bad[:3]})", param="prompt")
        engine.check_prompt(row)
        return list(row)

    # -- running ---------------------------------------------------------------------------------

    async def steps(generation: Generation) -> AsyncIterator[list[str]]:
        try:
            async for pieces in engine.stream(generation):
                yield pieces
        except ServerBusy as exc:
            raise APIError(429, str(exc), type_="server_busy", code="rate_limit_exceeded") from None

    async def run_to_end(generation: Generation, request: Request):
        stream = steps(generation)
        try:
            async for _ in stream:
                if await request.is_disconnected():
                    break
        finally:
            await stream.aclose()
        return generation.completions

    async def chat_events(generation: Generation, meta: dict, include_usage: bool) -> AsyncIterator[str]:
        base = {**meta, "object": "chat.completion.chunk"}

        def chunk(i: int, delta: dict, finish: str | None = None) -> str:
            body = {**base, "choices": [{"index": i, "delta": delta, "finish_reason": finish, "logprobs": None}]}
            if include_usage:
                body["usage"] = None
            return _sse(body)

        try:
            n = len(generation.prompts)
            for i in range(n):
                yield chunk(i, {"role": "assistant", "content": ""})
            async for pieces in steps(generation):
                for i, piece in enumerate(pieces):
                    if piece:
                        yield chunk(i, {"content": piece})
            for i, c in enumerate(generation.completions):
                yield chunk(i, {}, c.finish_reason)
            if include_usage:
                used = sum(c.completion_tokens for c in generation.completions)
                yield _sse({**base, "choices": [], "usage": _usage(generation.completions[0].prompt_tokens, used)})
        except APIError as exc:  # headers are sent: report inside the stream, as OpenAI does
            yield _sse({"error": {"message": exc.message, "type": exc.type, "param": exc.param, "code": exc.code}})
        yield _sse("[DONE]")

    async def completion_events(generation: Generation, meta: dict, echo: list[str], prompt_tokens: int,
                                include_usage: bool) -> AsyncIterator[str]:
        base = {**meta, "object": "text_completion"}

        def chunk(i: int, text: str, finish: str | None = None) -> str:
            body = {**base, "choices": [{"index": i, "text": text, "finish_reason": finish, "logprobs": None}]}
            if include_usage:
                body["usage"] = None
            return _sse(body)

        try:
            for i, e in enumerate(echo):
                if e:
                    yield chunk(i, e)
            async for pieces in steps(generation):
                for i, piece in enumerate(pieces):
                    if piece:
                        yield chunk(i, piece)
            for i, c in enumerate(generation.completions):
                yield chunk(i, "", c.finish_reason)
            if include_usage:
                used = sum(c.completion_tokens for c in generation.completions)
                yield _sse({**base, "choices": [], "usage": _usage(prompt_tokens, used)})
        except APIError as exc:
            yield _sse({"error": {"message": exc.message, "type": exc.type, "param": exc.param, "code": exc.code}})
        yield _sse("[DONE]")

    return app
