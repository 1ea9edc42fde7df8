"""Checked OpenAI requests -> EngineRequests: prompts to token ids, sampling fields to SamplingParams.

Every check a client can fail lives here and raises APIError (a 4xx with the field's name), before the
engine sees anything: prompt types and token ids, the context limit (prompt + max_tokens, with the
numbers), logprobs' cap, logit_bias keys, min_tokens against max_tokens, the features not offered.
"""
from __future__ import annotations

from ..errors import ContextLengthError, check_context_length
from .protocol import APIError, SamplingFields
from .sampling import SamplingParams

MAX_LOGPROBS = 20  # vLLM's default --max-logprobs


class Limits:
    """What a request is checked against: the model, the tokenizer and the server's settings."""

    def __init__(self, *, vocab_size: int, n_positions: int, max_model_len: int, max_num_seqs: int,
                 eos_id: int | None, defaults: dict, max_logprobs: int = MAX_LOGPROBS):
        self.vocab_size, self.n_positions, self.max_model_len = vocab_size, n_positions, max_model_len
        self.max_num_seqs, self.eos_id, self.defaults, self.max_logprobs = max_num_seqs, eos_id, defaults, max_logprobs


def check_ids(ids: list[int], limits: Limits, param: str) -> None:
    for i in ids:
        if not 0 <= i < limits.vocab_size:
            raise APIError(f"Token id {i} in `{param}` is outside the vocabulary: ids must lie in "
                           f"[0, {limits.vocab_size - 1}].", param=param)


def prompt_ids(prompt, tokenizer, limits: Limits) -> list[list[int]]:
    """`prompt` (str, list of str, list of ids, list of lists of ids) -> one id list per prompt."""
    if isinstance(prompt, str):
        prompts = [prompt]
    else:
        prompts = list(prompt)
        if not prompts:
            raise APIError("`prompt` is an empty list: give at least one prompt.", param="prompt")
        if isinstance(prompts[0], int):
            prompts = [prompts]
    out = []
    for p in prompts:
        ids = tokenizer.encode(p) if isinstance(p, str) else list(p)
        if not ids:
            raise APIError("The prompt is empty: this model needs at least one token to continue from "
                           "(send the text, or a list of token ids).", param="prompt")
        check_ids(ids, limits, "prompt")
        out.append(ids)
    return out


def check_length(prompt_len: int, max_tokens: int, limits: Limits, param: str = "max_tokens",
                 prompt_param: str = "prompt") -> None:
    """A prompt plus max_tokens must fit the model (n_positions) and the server (--max-model-len). The error
    names the field to change: the prompt when it alone is too long, else the token count asked for."""
    blame = prompt_param if prompt_len >= min(limits.n_positions, limits.max_model_len) else param
    try:
        check_context_length(prompt_len, max_tokens, limits.n_positions, what=param)
    except ContextLengthError as e:
        raise APIError(str(e), param=blame, code="context_length_exceeded") from None
    if prompt_len + max_tokens > limits.max_model_len:
        raise APIError(f"This server's context is {limits.max_model_len} tokens (--max-model-len), but the prompt "
                       f"({prompt_len} tokens) plus {param} ({max_tokens}) is {prompt_len + max_tokens}. Shorten the "
                       f"prompt or ask for at most {max(limits.max_model_len - prompt_len, 0)} tokens.",
                       param=blame, code="context_length_exceeded")


def check_logprobs(k: int | None, limits: Limits, param: str) -> None:
    if k is not None and k > limits.max_logprobs:
        raise APIError(f"`{param}` is {k}, above this server's cap of {limits.max_logprobs} (--max-logprobs).",
                       param=param)


def sampling_params(req: SamplingFields, max_tokens: int, limits: Limits) -> SamplingParams:
    """The request's sampling fields, with unset ones from the model's generation_config (as vLLM does)."""
    d = limits.defaults

    def pick(name, fallback):
        value = getattr(req, name)
        return value if value is not None else d.get(name, fallback)

    top_k = pick("top_k", 0)
    bias = {}
    for key, value in (req.logit_bias or {}).items():
        try:
            tok = int(key)
        except ValueError:
            raise APIError(f"`logit_bias` keys must be token ids written as strings (e.g. \"50256\"), got {key!r}.",
                           param="logit_bias") from None
        check_ids([tok], limits, "logit_bias")
        if not -100.0 <= value <= 100.0:
            raise APIError(f"`logit_bias` values must lie in [-100, 100], got {value} for token {tok}.", param="logit_bias")
        bias[tok] = float(value)
    stop_ids = list(req.stop_token_ids or [])
    check_ids(stop_ids, limits, "stop_token_ids")
    if req.min_tokens > max_tokens:
        raise APIError(f"`min_tokens` ({req.min_tokens}) is larger than max_tokens ({max_tokens}).", param="min_tokens")
    banned = tuple(sorted(set(stop_ids) | ({limits.eos_id} if limits.eos_id is not None else set())))
    return SamplingParams(
        temperature=float(pick("temperature", 1.0)), top_k=0 if top_k in (-1, None) else int(top_k),
        top_p=float(pick("top_p", 1.0)), min_p=float(pick("min_p", 0.0)),
        presence_penalty=req.presence_penalty, frequency_penalty=req.frequency_penalty,
        repetition_penalty=float(pick("repetition_penalty", 1.0)), logit_bias=bias,
        min_tokens=req.min_tokens, seed=req.seed, banned_until_min=banned)


def check_common(req: SamplingFields, limits: Limits, choices: int) -> None:
    if req.stream_options is not None and not req.stream:
        raise APIError("`stream_options` is only allowed when `stream` is true.", param="stream_options")
    if choices > limits.max_num_seqs:
        raise APIError(f"`n` is {choices}: the choices of one prompt run together, and the server has "
                       f"{limits.max_num_seqs} slots (--max-num-seqs). Ask for at most {limits.max_num_seqs}.",
                       param="n")
