"""The HTTP app: routes, the API key, the body limit, and the OpenAI error body for every failure.

Bodies are read and decoded here (not by FastAPI's parameter binding) so that a body too large is a 413,
malformed JSON a 400, and a wrong field a 400 naming it, all with the OpenAI error body. Only a bug in
the server itself becomes a 500 (and is logged).
"""
from __future__ import annotations

import hmac
import json
import logging
import os

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import __version__
from .handlers import create_chat_completion, create_completion
from .protocol import (APIError, ChatCompletionRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest, parse)
from .chat import message_dicts
from .engine_requests import check_ids

log = logging.getLogger("gpt2kit.serve")
STATIC_DIR = os.path.join(os.path.dirname(__file__), "static")


class ServerState:
    """What the routes share. `engine` is None until the model has loaded (GET /health answers 503)."""

    def __init__(self, *, served_names: list[str], root: str, api_key: str | None, max_body_bytes: int):
        self.served_names, self.root = served_names, root
        self.api_key = api_key
        self.max_body_bytes = max_body_bytes
        self.engine = None
        self.tokenizer = None
        self.limits = None
        self.chat_template = None
        self.special_tokens: dict = {}
        self.metrics = None
        self.ready = False
        self.draining = False
        self.load_error: str | None = None
        self.inflight = 0  # HTTP requests being answered (the drain waits for them)

    def model_name(self, asked: str | None) -> str:
        return asked if asked is not None else self.served_names[0]

    def check_model(self, name: str | None) -> None:
        if name is not None and name not in self.served_names:
            raise APIError(f"The model `{name}` does not exist. This server serves: {', '.join(self.served_names)}.",
                           status=404, param="model", code="model_not_found")

    def finished(self, reason: str | None) -> None:
        if self.metrics and reason:
            self.metrics.finished(reason)

    def check_serving(self) -> None:
        if self.draining:
            raise APIError("The server is shutting down and takes no new requests.", status=503, code="shutting_down")
        if not self.ready:
            raise APIError("The model is still loading; retry when GET /health answers 200.", status=503,
                           code="loading", headers={"Retry-After": "1"})

    def authorize(self, request: Request) -> None:
        if self.api_key is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        expected = self.api_key.encode()
        # constant-time: the comparison takes as long whatever prefix of the key a guess gets right
        if not (scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), expected)):
            raise APIError("Missing or wrong API key: send `Authorization: Bearer <key>` with the server's --api-key.",
                           status=401, code="invalid_api_key")


class InFlight:
    """ASGI wrapper that counts the HTTP requests in progress (streams included, until their last byte)."""

    def __init__(self, app, state: ServerState):
        self.app, self.state = app, state

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        self.state.inflight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.state.inflight -= 1


async def read_json(request: Request, limit: int):
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise APIError(f"The request body is {declared} bytes, above this server's limit of {limit} bytes "
                       "(--max-body-bytes).", status=413, code="request_too_large")
    parts, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise APIError(f"The request body is above this server's limit of {limit} bytes (--max-body-bytes).",
                           status=413, code="request_too_large")
        parts.append(chunk)
    raw = b"".join(parts)
    if not raw:
        raise APIError("The request has no body: send a JSON object.")

    def no_constants(name):
        raise ValueError(f"{name} is not valid JSON")

    try:
        return json.loads(raw, parse_constant=no_constants)
    except (ValueError, UnicodeDecodeError) as e:
        raise APIError(f"The body is not valid JSON ({e}). Send a JSON object with Content-Type: application/json.") from None


def error_response(e: APIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


def build_app(state: ServerState, ui: bool = True) -> FastAPI:
    app = FastAPI(title="gpt2kit serve", version=__version__, docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(APIError)
    async def _api_error(request, e: APIError):
        return error_response(e)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, e: StarletteHTTPException):
        message = {404: f"No route {request.url.path}.", 405: f"{request.method} is not allowed on {request.url.path}."}
        return error_response(APIError(message.get(e.status_code, str(e.detail)), status=e.status_code))

    @app.exception_handler(Exception)
    async def _bug(request, e: Exception):
        log.exception("unhandled error on %s", request.url.path)
        return error_response(APIError("The server failed on this request; it has been logged.", status=500))

    async def body_of(request: Request, model_cls, auth: bool = True):
        if auth:  # --api-key guards /v1/* (as vLLM's does)
            state.authorize(request)
        state.check_serving()
        return parse(model_cls, await read_json(request, state.max_body_bytes))

    @app.post("/v1/completions")
    async def completions(request: Request):
        result = await create_completion(state, await body_of(request, CompletionRequest), request)
        return result if isinstance(result, Response) or result is None else JSONResponse(result)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        result = await create_chat_completion(state, await body_of(request, ChatCompletionRequest), request)
        return result if isinstance(result, Response) or result is None else JSONResponse(result)

    def model_card(name: str) -> dict:
        return {"id": name, "object": "model", "created": 0, "owned_by": "gpt2kit", "root": state.root,
                "parent": None, "max_model_len": state.limits.max_model_len, "permission": []}

    @app.get("/v1/models")
    async def models(request: Request):
        state.authorize(request)
        state.check_serving()
        return {"object": "list", "data": [model_card(name) for name in state.served_names]}

    @app.get("/v1/models/{name:path}")  # the openai client's models.retrieve(name); a name may hold slashes
    async def model(name: str, request: Request):
        state.authorize(request)
        state.check_serving()
        state.check_model(name)
        return model_card(name)

    @app.get("/health")
    async def health():
        if state.ready and not state.draining:
            return Response(status_code=200)
        reason = "shutting down" if state.draining else (state.load_error or "loading the model")
        return JSONResponse(APIError(f"Not ready: {reason}.", status=503).body(), status_code=503)

    @app.get("/metrics")
    async def metrics():
        if state.metrics is None:
            return PlainTextResponse("", status_code=503)
        return Response(state.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.api_route("/ping", methods=["GET", "POST"])  # vLLM's (SageMaker's) liveness route: /health's answer
    async def ping():
        return await health()

    @app.get("/version")
    async def version():
        return {"version": __version__}

    @app.post("/tokenize")
    async def tokenize(request: Request):
        req = await body_of(request, TokenizeRequest, auth=False)
        state.check_model(req.model)
        if (req.prompt is None) == (req.messages is None):
            raise APIError("Send exactly one of `prompt` or `messages`.", param="prompt")
        if req.messages is not None:
            text = state.chat_template.render(message_dicts(req.messages), req.add_generation_prompt, state.special_tokens,
                                              continue_final_message=req.continue_final_message)
        else:
            text = req.prompt
        ids = state.tokenizer.encode(text, add_special_tokens=req.add_special_tokens)
        return {"tokens": ids, "count": len(ids), "max_model_len": state.limits.max_model_len}

    @app.post("/detokenize")
    async def detokenize(request: Request):
        req = await body_of(request, DetokenizeRequest, auth=False)
        state.check_model(req.model)
        check_ids(req.tokens, state.limits, "tokens")
        return {"prompt": state.tokenizer.decode(req.tokens)}

    if ui and os.path.isfile(os.path.join(STATIC_DIR, "index.html")):
        from fastapi.staticfiles import StaticFiles

        app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

        @app.get("/")
        async def index():
            return FileResponse(os.path.join(STATIC_DIR, "index.html"))

    return app
