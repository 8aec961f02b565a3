"""What an API request may say: the request models, OpenAI's error shape, and parsing a body.

Validation is strict, the way OpenAI's is: unknown fields, wrong types and out-of-range values
are 400s in the shape `{"error": {"message", "type", "param", "code"}}`, naming the field. Every
sampling option OpenAI defines is applied: temperature, top_p, n, stop, seed, max_tokens,
presence_penalty, frequency_penalty, logit_bias, logprobs (+ top_logprobs for chat). `user` is
accepted and changes nothing; what this server cannot honour (tools, suffix, ...) is refused by
name rather than silently ignored. Two extensions as vLLM names them: `top_k` and
`repetition_penalty`.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal, TypeVar

from fastapi import Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

# -- errors --------------------------------------------------------------------------------------


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if self.status == 401 else {}
        return JSONResponse(self.body(), status_code=self.status, headers={**headers, **self.headers})


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


# -- request models ------------------------------------------------------------------------------

Temperature = Annotated[float, Field(ge=0.0, le=2.0)]
TopP = Annotated[float, Field(ge=0.0, le=1.0)]
Penalty = Annotated[float, Field(ge=-2.0, le=2.0)]
Bias = Annotated[float, Field(ge=-100.0, le=100.0)]
TopLogprobs = Annotated[int, Field(ge=0, le=20)]


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
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    user: str | None = None
    logit_bias: dict[str, Bias] | None = None  # token id (as a string) -> added to its logit
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

    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def token_logprobs(self) -> int | None:
        """None: no log-probabilities; k >= 0: the chosen token's and the k most likely."""
        raise NotImplementedError

    def refuse_unsupported(self) -> None:
        for key in self.logit_bias or {}:
            if not key.strip().lstrip("-").isdigit():
                raise APIError(400, f"Invalid value for 'logit_bias': keys must be token ids (got {key!r})",
                               param="logit_bias", code="invalid_value")
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
    logprobs: bool | None = None
    top_logprobs: TopLogprobs | None = None

    def token_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    def refuse_unsupported(self) -> None:
        super().refuse_unsupported()
        if self.top_logprobs is not None and not self.logprobs:
            raise APIError(400, "logprobs must be set to true if top_logprobs is used", param="top_logprobs",
                           code="invalid_value")
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
    logprobs: TopLogprobs | None = None

    def token_logprobs(self) -> int | None:
        return self.logprobs

    def refuse_unsupported(self) -> None:
        super().refuse_unsupported()
        if self.suffix:
            raise APIError(400, "suffix is not supported by this server", param="suffix", code="unsupported")
        if self.best_of not in (None, self.n):
            raise APIError(400, "best_of other than n is not supported", param="best_of", code="unsupported")


# -- parsing -------------------------------------------------------------------------------------

R = TypeVar("R", bound=_Sampling)


async def parse_request(request: Request, cls: type[R], model_name: str) -> R:
    """The body of `request` as a `cls`, for a server serving `model_name`; any fault is an APIError.
    (The body is read by hand rather than by FastAPI so that every fault gets OpenAI's error shape.)"""
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
    if req.model is not None and req.model != model_name:
        raise APIError(404, f"The model '{req.model}' does not exist; this server serves '{model_name}'.",
                       param="model", code="model_not_found")
    req.refuse_unsupported()
    return req
