"""The OpenAI API as vLLM implements it: request models, their checks, and the OpenAI error body.

Requests are validated strictly (a string where a number belongs is an error, not a coercion) and
unknown fields are rejected, as OpenAI does, so nothing a client sent is silently ignored. Every
problem becomes an `APIError` carrying its HTTP status and the field it concerns; app.py renders it as
`{"error": {"message", "type", "param", "code"}}`.
"""
from __future__ import annotations

from typing import Literal, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError

MAX_N = 128  # OpenAI's cap on `n`
MAX_TEMPERATURE = 2.0  # OpenAI's range for temperature is [0, 2]
MAX_LOGIT_BIAS = 100.0


class APIError(Exception):
    """A request the server answers with an error body; `status` is the HTTP status."""

    TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "invalid_request_error",
             413: "invalid_request_error", 422: "invalid_request_error", 429: "rate_limit_error",
             500: "server_error", 503: "server_error"}

    def __init__(self, message: str, status: int = 400, param: str | None = None, code: str | None = None,
                 headers: dict | None = None):
        super().__init__(message)
        self.message, self.status, self.param, self.code, self.headers = message, status, param, code, headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.TYPES.get(self.status, "invalid_request_error"),
                          "param": self.param, "code": self.code}}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Strict):
    include_usage: bool = False


TokenIds = list[int]


class SamplingFields(_Strict):
    """The fields completions and chat completions share (OpenAI's plus vLLM's sampling extensions)."""

    model: str | None = None  # vLLM: optional, the served model when omitted
    temperature: float | None = Field(None, ge=0.0, le=MAX_TEMPERATURE)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=-1)  # -1 or 0: no top-k
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    n: int = Field(1, ge=1, le=MAX_N)
    seed: int | None = Field(None, ge=-(2 ** 63), lt=2 ** 64)
    stop: Union[str, list[str], None] = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    min_tokens: int = Field(0, ge=0)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    repetition_penalty: float | None = Field(None, gt=0.0, le=10.0)
    logit_bias: dict[str, float] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None  # accepted, as OpenAI does; it only labels the request
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False

    def stop_list(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if any(s == "" for s in stops):
            raise APIError("`stop` holds an empty string, which would end every completion at once; remove it.",
                           param="stop")
        return stops


class CompletionRequest(SamplingFields):
    prompt: Union[str, list[str], TokenIds, list[TokenIds]]
    max_tokens: int | None = Field(16, ge=0)
    echo: bool = False
    logprobs: int | None = Field(None, ge=0)
    best_of: int | None = Field(None, ge=1)
    suffix: str | None = None


class ChatMessage(BaseModel):
    # content may be a string or OpenAI's list of parts ({"type": "text", "text": ...}); other keys
    # (name, tool_calls ...) are passed to the chat template untouched
    model_config = ConfigDict(extra="allow", strict=True)
    role: str
    content: Union[str, list[dict], None] = None


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=0)
    max_completion_tokens: int | None = Field(None, ge=0)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0)
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template_kwargs: dict | None = None
    # OpenAI fields that clients send with their default values: accepted where the value asks for what this
    # server does anyway (plain text, no tools, nothing stored), a 400 naming the field otherwise (check_fields)
    tools: list[dict] | None = None
    tool_choice: Union[str, dict, None] = None
    parallel_tool_calls: bool | None = None  # only says how tools may be called: there are none
    response_format: dict | None = None
    store: bool | None = None
    metadata: dict[str, str] | None = None  # labels, as `user` (OpenAI keeps them only with store)
    service_tier: str | None = None
    modalities: list[str] | None = None

    def check_fields(self) -> None:
        """Refuse, naming the field, what GPT-2 or this server cannot do: tools, structured output, storing,
        a processing tier, output other than text."""
        if self.tools:
            raise APIError("`tools` (function calling) is not supported: GPT-2 has no tool-calling format. Send the "
                           "request without tools.", param="tools")
        if self.tool_choice not in (None, "none", "auto"):
            raise APIError(f"`tool_choice` {_short(self.tool_choice)} needs tools, which are not supported; send "
                           "\"none\" or leave it out.", param="tool_choice")
        kind = (self.response_format or {}).get("type", "text")
        if kind != "text" or set(self.response_format or {}) - {"type"}:
            raise APIError(f"`response_format` {_short(self.response_format)} is not supported: this server "
                           "generates plain text only (type \"text\").", param="response_format")
        if self.store:
            raise APIError("`store: true` is not supported: this server keeps no completions.", param="store")
        if self.service_tier not in (None, "auto", "default"):
            raise APIError(f"`service_tier` {self.service_tier!r} is not offered: this server has one tier "
                           "(\"auto\" or \"default\").", param="service_tier")
        if self.modalities is not None and self.modalities != ["text"]:
            raise APIError(f"`modalities` {self.modalities!r} is not supported: GPT-2 outputs text only ([\"text\"]).",
                           param="modalities")


class TokenizeRequest(_Strict):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True
    continue_final_message: bool = False


class DetokenizeRequest(_Strict):
    model: str | None = None
    tokens: list[int]


def parse(model_cls, data) -> BaseModel:
    """Validate a decoded JSON body; the first problem becomes a 400 that names the field."""
    if not isinstance(data, dict):
        raise APIError(f"The request body must be a JSON object, got {type(data).__name__}.")
    try:
        return model_cls.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        loc = [str(p) for p in err.get("loc", ())]
        # a union reports each alternative; name the field, not the alternative's type
        field = ".".join(p for p in loc if not _is_type_tag(p)) or None
        kind = err.get("type", "")
        if kind == "missing":
            message = f"Missing required field `{field}`."
        elif kind == "extra_forbidden":
            message = f"Unrecognized request argument supplied: {field}. Remove it (see the README for the fields supported)."
        else:
            got = err.get("input")
            message = f"Invalid value for `{field}`: {err.get('msg', 'invalid')} (got {_short(got)})."
        raise APIError(message, param=field) from None


def _is_type_tag(part: str) -> bool:  # pydantic union branches: 'str', 'list[int]', 'function-after[...]' ...
    return part in ("str", "int", "float", "bool", "dict", "list") or "[" in part


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


FinishReason = Literal["stop", "length"]
