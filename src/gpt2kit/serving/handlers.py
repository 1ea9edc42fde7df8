"""The two generating endpoints: /v1/completions and /v1/chat/completions, whole or streamed.

A handler checks the request (engine_requests.py), submits one EngineRequest per prompt, then reads
the engine's news from an asyncio queue that the engine thread fills through call_soon_threadsafe.
A client that goes away is noticed (the stream is cancelled, or a poll while waiting) and its
sequences are aborted, which frees their slots at the next engine step.
"""
from __future__ import annotations

import asyncio

from .chat import message_dicts
from .engine_requests import (check_common, check_length, check_logprobs, prompt_ids, sampling_params)
from .protocol import APIError, ChatCompletionRequest, CompletionRequest, usage
from .responses import (ChoiceState, TokenText, chat_logprobs, completion_logprobs, new_id, now, prompt_offsets)
from .scheduler import ChoiceUpdate, EngineRequest, Failed, PromptDone
from .sse import sse_response

DISCONNECT_POLL_S = 0.5


class ClientGone(Exception):
    pass


class Submission:
    """The engine requests of one HTTP request, and the queue their news arrives on."""

    def __init__(self, state):
        self.state = state
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()
        self.reqs: list[EngineRequest] = []
        self.finished = False

    def sink(self, prompt_index: int):
        def push(event, _loop=self.loop, _q=self.queue):
            try:
                _loop.call_soon_threadsafe(_q.put_nowait, (prompt_index, event))
            except RuntimeError:  # the event loop is gone (shutdown): nobody is listening
                pass
        return push

    def submit(self, reqs: list[EngineRequest]) -> None:
        self.reqs = reqs
        if not self.state.engine.try_submit(reqs):
            raise APIError(f"The server is at capacity ({self.state.engine.max_waiting} sequences waiting); retry "
                           "shortly.", status=503, code="overloaded", headers={"Retry-After": "1"})

    def abort(self) -> None:
        if not self.finished:
            self.finished = True
            for r in self.reqs:
                self.state.engine.abort(r.request_id)

    async def events(self, request=None):
        """(prompt index, event) as they come; polls for a vanished client when `request` is given."""
        get = None
        try:
            while True:
                get = get or asyncio.ensure_future(self.queue.get())
                done, _ = await asyncio.wait([get], timeout=DISCONNECT_POLL_S)
                if not done:
                    if request is not None and await request.is_disconnected():
                        raise ClientGone()
                    continue
                item, get = get.result(), None
                if isinstance(item[1], Failed):
                    self.finished = True
                    raise APIError(item[1].message, status=item[1].status, code="internal_error")
                yield item
        finally:
            if get is not None:
                get.cancel()


async def collect(sub: Submission, request, n_choices: int):
    """Wait for every choice to finish: (choices, {prompt index: PromptDone}), or None if the client left."""
    choices = [ChoiceState(i) for i in range(n_choices)]
    done: dict[int, PromptDone] = {}
    left = n_choices
    try:
        async for p, ev in sub.events(request):
            if isinstance(ev, PromptDone):
                done[p] = ev
            elif isinstance(ev, ChoiceUpdate):
                c = choices[ev.index]
                c.text.append(ev.text)
                c.tokens.extend(ev.tokens)
                if ev.finish_reason is not None:
                    c.finish_reason, c.stop_reason, c.completion_tokens = ev.finish_reason, ev.stop_reason, ev.completion_tokens
                    left -= 1
                    if left == 0:
                        break
    except ClientGone:
        return None
    finally:
        if left:
            sub.abort()
    sub.finished = True
    return choices, done


def _engine_request(state, sub: Submission, p: int, ids: list[int], n: int, max_tokens: int, params, req, *,
                    logprobs, prompt_logprobs, request_id: str) -> EngineRequest:
    return EngineRequest(
        request_id=f"{request_id}-{p}", prompt_ids=ids, max_tokens=max_tokens, params=params, sink=sub.sink(p), n=n,
        choice_offset=p * n, stops=req.stop_list(), include_stop=req.include_stop_str_in_output,
        stop_token_ids=frozenset(req.stop_token_ids or ()), eos_id=state.limits.eos_id, ignore_eos=req.ignore_eos,
        logprobs=logprobs, prompt_logprobs=prompt_logprobs, skip_special_tokens=req.skip_special_tokens)


# -- /v1/completions ----------------------------------------------------------------------------------
async def create_completion(state, req: CompletionRequest, request):
    state.check_model(req.model)
    limits = state.limits
    if req.suffix is not None:
        raise APIError("`suffix` (insertion) is not supported: GPT-2 only continues text.", param="suffix")
    if req.best_of is not None and req.best_of != req.n:
        raise APIError("`best_of` other than `n` is not supported (as in vLLM's V1 engine); send n only.", param="best_of")
    check_common(req, limits, req.n)
    check_logprobs(req.logprobs, limits, "logprobs")
    prompts = prompt_ids(req.prompt, state.tokenizer, limits)
    lengths = []
    for ids in prompts:
        max_tokens = req.max_tokens if req.max_tokens is not None else limits.max_model_len - len(ids)
        check_length(len(ids), max_tokens, limits)
        lengths.append(max_tokens)
    params = [sampling_params(req, m, limits) for m in lengths]
    score_prompt = req.echo and req.logprobs is not None
    request_id = new_id("cmpl")
    if isinstance(req.prompt, str):
        prompt_texts = [req.prompt]
    elif isinstance(req.prompt[0], str):
        prompt_texts = list(req.prompt)
    else:  # token ids: echo shows them decoded
        prompt_texts = [state.tokenizer.decode(ids) for ids in prompts]
    sub = Submission(state)
    reqs = [_engine_request(state, sub, p, ids, req.n, lengths[p], params[p], req, logprobs=req.logprobs,
                            prompt_logprobs=req.logprobs if score_prompt else None, request_id=request_id)
            for p, ids in enumerate(prompts)]
    ctx = CompletionContext(state, req, request_id, prompts, prompt_texts)
    if all(m == 0 for m in lengths) and not score_prompt:  # nothing to compute
        return ctx.whole_without_engine()
    sub.submit(reqs)
    if req.stream:
        return sse_response(ctx.stream(sub), sub)
    return await ctx.whole(sub, request)


class CompletionContext:
    def __init__(self, state, req: CompletionRequest, request_id: str, prompts, prompt_texts):
        self.state, self.req, self.id, self.prompts, self.prompt_texts = state, req, request_id, prompts, prompt_texts
        self.token_text = TokenText(state.tokenizer)
        self.n_choices = len(prompts) * req.n
        self.created = now()

    def _prompt_of(self, index: int) -> int:
        return index // self.req.n

    def _echo_logprobs(self, p: int, done: PromptDone) -> dict:
        infos = done.prompt_tokens or []
        for info, off in zip(infos, prompt_offsets(self.state.tokenizer, self.prompts[p])):
            info.text_offset = off
        return completion_logprobs(infos, self.token_text)

    def _usage(self, done: dict, choices) -> dict:
        return usage(sum(len(p) for p in self.prompts), sum(c.completion_tokens for c in choices),
                     sum(d.cached_tokens for d in done.values()))

    def _body(self, choices: list[dict], usage_=None, chunk=False) -> dict:
        body = {"id": self.id, "object": "text_completion", "created": self.created, "model": self.state.model_name(self.req.model),
                "choices": choices}
        if not chunk or usage_ is not None or (self.req.stream_options and self.req.stream_options.include_usage):
            body["usage"] = usage_
        return body

    def whole_without_engine(self) -> dict:
        choices = []
        for p, text in enumerate(self.prompt_texts):
            for j in range(self.req.n):
                lp = None if self.req.logprobs is None else completion_logprobs([], self.token_text)
                choices.append({"index": p * self.req.n + j, "text": text if self.req.echo else "", "logprobs": lp,
                                "finish_reason": "length", "stop_reason": None})
        return self._body(choices, usage(sum(len(p) for p in self.prompts), 0, 0))

    async def whole(self, sub: Submission, request) -> dict:
        collected = await collect(sub, request, self.n_choices)
        if collected is None:
            return None
        choices, done = collected
        out = []
        for c in choices:
            p = self._prompt_of(c.index)
            text = "".join(c.text)
            lp = None
            if self.req.logprobs is not None:
                base = len(self.prompt_texts[p]) if self.req.echo else 0
                lp = completion_logprobs(c.tokens, self.token_text, base)
                if self.req.echo:
                    echo = self._echo_logprobs(p, done[p])
                    lp = {k: echo[k] + lp[k] for k in lp}
            if self.req.echo:
                text = self.prompt_texts[p] + text
            out.append({"index": c.index, "text": text, "logprobs": lp, "finish_reason": c.finish_reason,
                        "stop_reason": c.stop_reason})
            self.state.finished(c.finish_reason)
        return self._body(out, self._usage(done, choices))

    async def stream(self, sub: Submission):
        include_usage = bool(self.req.stream_options and self.req.stream_options.include_usage)
        choices = [ChoiceState(i) for i in range(self.n_choices)]
        sent_text = [0] * self.n_choices  # characters sent per choice (for text_offset)
        done: dict[int, PromptDone] = {}
        left = self.n_choices
        try:
            async for p, ev in sub.events():
                if isinstance(ev, PromptDone):
                    done[p] = ev
                    if self.req.echo:
                        for j in range(self.req.n):
                            i = p * self.req.n + j
                            lp = self._echo_logprobs(p, ev) if self.req.logprobs is not None else None
                            sent_text[i] = len(self.prompt_texts[p])
                            yield self._body([{"index": i, "text": self.prompt_texts[p], "logprobs": lp,
                                               "finish_reason": None, "stop_reason": None}], chunk=True)
                    continue
                c = choices[ev.index]
                if not ev.text and not ev.finish_reason and (self.req.logprobs is None or not ev.tokens):
                    continue
                lp = None
                if self.req.logprobs is not None:
                    base = len(self.prompt_texts[p]) if self.req.echo else 0
                    lp = completion_logprobs(ev.tokens, self.token_text, base)
                sent_text[ev.index] += len(ev.text)
                if ev.finish_reason is not None:
                    c.finish_reason, c.completion_tokens = ev.finish_reason, ev.completion_tokens
                    left -= 1
                    self.state.finished(ev.finish_reason)
                yield self._body([{"index": ev.index, "text": ev.text, "logprobs": lp, "finish_reason": ev.finish_reason,
                                   "stop_reason": ev.stop_reason}], chunk=True)
                if left == 0:
                    break
        finally:
            if left:
                sub.abort()
        sub.finished = True
        if include_usage:
            yield self._body([], self._usage(done, choices), chunk=True)


# -- /v1/chat/completions -----------------------------------------------------------------------------
async def create_chat_completion(state, req: ChatCompletionRequest, request):
    state.check_model(req.model)
    req.check_fields()
    limits = state.limits
    if req.top_logprobs is not None and not req.logprobs:
        raise APIError("`top_logprobs` needs `logprobs: true`.", param="top_logprobs")
    check_logprobs(req.top_logprobs, limits, "top_logprobs")
    check_common(req, limits, req.n)
    if req.max_tokens is not None and req.max_completion_tokens is not None and req.max_tokens != req.max_completion_tokens:
        raise APIError("`max_tokens` and `max_completion_tokens` disagree; send one of them.", param="max_completion_tokens")
    messages = message_dicts(req.messages)
    text = state.chat_template.render(messages, req.add_generation_prompt, state.special_tokens, req.chat_template_kwargs,
                                      req.continue_final_message)
    ids = state.tokenizer.encode(text)
    if not ids:
        raise APIError("The chat template rendered these messages to an empty prompt.", param="messages")
    asked = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
    max_tokens = asked if asked is not None else limits.max_model_len - len(ids)
    check_length(len(ids), max_tokens, limits, param, prompt_param="messages")
    params = sampling_params(req, max_tokens, limits)
    logprobs = (req.top_logprobs or 0) if req.logprobs else None
    request_id = new_id("chatcmpl")
    sub = Submission(state)
    ereq = _engine_request(state, sub, 0, ids, req.n, max_tokens, params, req, logprobs=logprobs, prompt_logprobs=None,
                           request_id=request_id)
    ctx = ChatContext(state, req, request_id, len(ids))
    if max_tokens == 0:
        raise APIError("`max_tokens` is 0: a chat completion needs at least one token.", param=param)
    sub.submit([ereq])
    if req.stream:
        return sse_response(ctx.stream(sub), sub)
    return await ctx.whole(sub, request)


class ChatContext:
    def __init__(self, state, req: ChatCompletionRequest, request_id: str, prompt_len: int):
        self.state, self.req, self.id, self.prompt_len = state, req, request_id, prompt_len
        self.token_text = TokenText(state.tokenizer)
        self.created = now()

    def _body(self, obj: str, choices, usage_=None, chunk=False) -> dict:
        body = {"id": self.id, "object": obj, "created": self.created, "model": self.state.model_name(self.req.model),
                "choices": choices}
        if not chunk or usage_ is not None or (self.req.stream_options and self.req.stream_options.include_usage):
            body["usage"] = usage_
        return body

    def _logprobs(self, tokens):
        return chat_logprobs(tokens, self.token_text, self.req.top_logprobs or 0) if self.req.logprobs else None

    async def whole(self, sub: Submission, request) -> dict:
        collected = await collect(sub, request, self.req.n)
        if collected is None:
            return None
        choices, done = collected
        cached = sum(d.cached_tokens for d in done.values())
        out = []
        for c in choices:
            out.append({"index": c.index, "message": {"role": "assistant", "content": "".join(c.text)},
                        "logprobs": self._logprobs(c.tokens), "finish_reason": c.finish_reason, "stop_reason": c.stop_reason})
            self.state.finished(c.finish_reason)
        return self._body("chat.completion", out, usage(self.prompt_len, sum(c.completion_tokens for c in choices), cached))

    async def stream(self, sub: Submission):
        include_usage = bool(self.req.stream_options and self.req.stream_options.include_usage)
        obj = "chat.completion.chunk"
        for i in range(self.req.n):  # the first delta of each choice carries the role
            yield self._body(obj, [{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                    "finish_reason": None}], chunk=True)
        cached, left, completion = 0, self.req.n, 0
        try:
            async for _, ev in sub.events():
                if isinstance(ev, PromptDone):
                    cached = ev.cached_tokens
                    continue
                if not ev.text and not ev.finish_reason and not (self.req.logprobs and ev.tokens):
                    continue
                delta = {"content": ev.text} if ev.text or not ev.finish_reason else {}
                if ev.finish_reason is not None:
                    left -= 1
                    completion += ev.completion_tokens
                    self.state.finished(ev.finish_reason)
                yield self._body(obj, [{"index": ev.index, "delta": delta, "logprobs": self._logprobs(ev.tokens),
                                        "finish_reason": ev.finish_reason, "stop_reason": ev.stop_reason}], chunk=True)
                if left == 0:
                    break
        finally:
            if left:
                sub.abort()
        sub.finished = True
        if include_usage:
            yield self._body(obj, [], usage(self.prompt_len, completion, cached), chunk=True)
