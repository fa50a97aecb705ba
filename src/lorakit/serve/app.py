"""The OpenAI-compatible HTTP API over an :class:`~lorakit.serve.engine.Engine`.

Endpoints (all behind ``Authorization: Bearer <key>`` when an API key is set):

- ``GET /v1/models``, ``GET /v1/models/{id}``: the base (``base``) and every loaded adapter.
- ``POST /v1/completions``, ``POST /v1/chat/completions``: ``model`` names an adapter or ``base``;
  ``stream: true`` answers with server-sent events in OpenAI's chunk format ending in ``[DONE]``.
- ``POST /v1/classify`` ``{model, input: str | [str]}``: labels and probabilities (classifier servers).
- ``POST /v1/adapters`` ``{name, path}``: load or hot-swap an adapter from a folder under the
  adapter root; answers ``{id, object, path, replaced, warnings}`` (``warnings``: notes such as
  "trained on a quantised base", also logged). ``DELETE /v1/adapters/{name}`` unloads one and
  answers ``{id, object, deleted: true, running}`` at once: the name is no longer served (404),
  and the ``running`` requests already on it finish before its memory is freed. Neither waits
  for running requests, nor makes others wait (see :mod:`lorakit.serve.adapters`); a name being
  unloaded can be loaded again at once.
- ``GET /metrics``: batching counters (forwards, rows per forward, ...); ``GET /health``.

Errors use OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``.
Request handlers only validate, tokenize and wait; model work runs in the batcher's thread.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from lorakit.mixed import BASE
from lorakit.serve.batcher import Batcher
from lorakit.serve.engine import Engine
from lorakit.serve.jobs import (
    ClassificationJob,
    Classified,
    Delta,
    Failed,
    Finished,
    GenerationJob,
    SamplingParams,
    ServeError,
)

MAX_STOPS = 16


# ---------------------------------------------------------------------------------------------
# request bodies
# ---------------------------------------------------------------------------------------------
class _Body(BaseModel):
    model_config = ConfigDict(extra="allow")  # fields of newer clients that do not change results


class StreamOptions(BaseModel):
    include_usage: bool | None = False


class _Sampling(_Body):
    model: str
    temperature: float | None = Field(1.0, ge=0.0, le=2.0)
    top_p: float | None = Field(1.0, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int | None = Field(1, ge=1)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = 0.0
    frequency_penalty: float | None = 0.0
    logit_bias: dict[str, float] | None = None


class CompletionRequest(_Sampling):
    prompt: str | list[int] | list[str]
    max_tokens: int | None = Field(16, ge=1)
    echo: bool | None = False
    logprobs: int | None = None
    best_of: int | None = None
    suffix: str | None = None


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = False
    top_logprobs: int | None = None
    tools: list[Any] | None = None
    response_format: dict[str, Any] | None = None


class ClassifyRequest(_Body):
    model: str
    input: str | list[str]


class AdapterRequest(_Body):
    name: str
    path: str


# ---------------------------------------------------------------------------------------------
# errors in OpenAI's shape
# ---------------------------------------------------------------------------------------------
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "invalid_request_error", 413: "invalid_request_error", 422: "invalid_request_error",
               500: "internal_error", 503: "service_unavailable"}


def error_body(status: int, message: str, code: str | None = None, param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": ERROR_TYPES.get(status, "invalid_request_error"),
                      "param": param, "code": code}}


def error_response(status: int, message: str, code: str | None = None, param: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, code, param), status_code=status, headers=headers)


def _refuse_unsupported(body: _Sampling) -> None:
    """Parameters that would change the result and that this server does not implement are errors."""
    checks = [("n", body.n not in (None, 1), "n > 1 is not supported; send n=1 (or several requests)"),
              ("presence_penalty", bool(body.presence_penalty), "presence_penalty is not supported"),
              ("frequency_penalty", bool(body.frequency_penalty), "frequency_penalty is not supported"),
              ("logit_bias", bool(body.logit_bias), "logit_bias is not supported")]
    if isinstance(body, CompletionRequest):
        checks += [("echo", bool(body.echo), "echo is not supported"),
                   ("logprobs", body.logprobs is not None, "logprobs is not supported"),
                   ("best_of", body.best_of not in (None, 1), "best_of > 1 is not supported"),
                   ("suffix", bool(body.suffix), "suffix is not supported")]
    if isinstance(body, ChatRequest):
        checks += [("logprobs", bool(body.logprobs) or body.top_logprobs is not None, "logprobs is not supported"),
                   ("tools", bool(body.tools), "tools are not supported"),
                   ("response_format", bool(body.response_format) and body.response_format.get("type") != "text",
                    "response_format other than text is not supported")]
    for param, bad, message in checks:
        if bad:
            raise ServeError(400, message, "unsupported_parameter", param)


def _stops(stop: str | list[str] | None) -> tuple[str, ...]:
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stops) > MAX_STOPS or any(not s for s in stops):
        raise ServeError(400, f"stop takes at most {MAX_STOPS} non-empty strings", param="stop")
    return tuple(stops)


# ---------------------------------------------------------------------------------------------
# middleware: API key and body size, before any route runs
# ---------------------------------------------------------------------------------------------
class GuardMiddleware:
    """Pure ASGI: 401 without the bearer key, 413 for bodies over ``max_body_bytes``."""

    def __init__(self, app, api_key: str | None, max_body_bytes: int) -> None:
        self.app, self.api_key, self.max_body_bytes = app, api_key, max_body_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        if self.api_key is not None:
            scheme, _, token = headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip().encode(), self.api_key.encode()):
                response = error_response(401, "Missing or invalid API key: send 'Authorization: Bearer <key>'",
                                          "invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
                return await response(scope, receive, send)
        too_big = error_response(413, f"request body exceeds this server's limit of {self.max_body_bytes} bytes: "
                                 "send a shorter body", "request_too_large")
        declared = headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
            return await too_big(scope, receive, send)
        if scope.get("method") not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        chunks, size = [], 0
        while True:  # read the whole (bounded) body, then replay it to the app
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                return await too_big(scope, receive, send)
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()  # afterwards: http.disconnect, for streaming responses

        return await self.app(scope, replay, send)


# ---------------------------------------------------------------------------------------------
# the app
# ---------------------------------------------------------------------------------------------
def create_app(engine: Engine, *, api_key: str | None = None, max_batch_size: int = 16,
               batch_window_ms: float = 10.0, max_body_bytes: int = 1_000_000) -> FastAPI:
    batcher = Batcher(engine.run_batch, max_batch_size=max_batch_size, window_s=batch_window_ms / 1000)

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        batcher.start()
        try:
            yield
        finally:
            await asyncio.to_thread(batcher.stop)

    app = FastAPI(title="lorakit serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine, app.state.batcher = engine, batcher
    app.add_middleware(GuardMiddleware, api_key=api_key, max_body_bytes=max_body_bytes)

    @app.exception_handler(ServeError)
    async def _serve_error(_request: Request, exc: ServeError) -> JSONResponse:
        return error_response(exc.status, exc.message, exc.code, exc.param)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = []
        for err in exc.errors()[:5]:
            if err.get("type") == "json_invalid":
                problems.append(f"the body is not valid JSON ({err.get('ctx', {}).get('error', 'decode error')})")
                continue
            where = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
            problems.append(f"{where or 'body'}: {err.get('msg')}")
        return error_response(400, "invalid request: " + "; ".join(problems), "invalid_request")

    @app.exception_handler(Exception)
    async def _unexpected(_request: Request, exc: Exception) -> JSONResponse:
        return error_response(500, f"internal error: {type(exc).__name__}: {exc}", "internal_error")

    @app.exception_handler(404)
    async def _not_found(request: Request, _exc) -> JSONResponse:
        return error_response(404, f"no route {request.method} {request.url.path}", "not_found")

    @app.exception_handler(405)
    async def _not_allowed(request: Request, _exc) -> JSONResponse:
        return error_response(405, f"method {request.method} is not allowed on {request.url.path}",
                              "method_not_allowed")

    def model_card(name: str) -> dict[str, Any]:
        card = {"id": name, "object": "model", "created": engine.created, "owned_by": "lorakit",
                "root": engine.model_spec, "parent": None if name == BASE else BASE}
        if name != BASE and name in engine.sources:
            card["path"] = engine.sources[name]
        return card

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "task": engine.task, "pending": batcher.pending()}

    @app.get("/metrics")
    async def metrics() -> dict[str, Any]:
        return {**engine.metrics.as_dict(), "pending": batcher.pending(), "max_batch_size": max_batch_size,
                "batch_window_ms": batch_window_ms}

    @app.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card(n) for n in [BASE, *engine.adapter_names()]]}

    @app.get("/v1/models/{name}")
    async def get_model(name: str) -> dict[str, Any]:
        if not engine.has(name):
            raise ServeError(404, f"The model `{name}` does not exist.", "model_not_found", "model")
        return model_card(name)

    @app.post("/v1/adapters")
    async def load_adapter(body: AdapterRequest) -> dict[str, Any]:
        return await asyncio.to_thread(engine.load, body.name, body.path)

    @app.delete("/v1/adapters/{name}")
    async def unload_adapter(name: str) -> dict[str, Any]:
        return await asyncio.to_thread(engine.unload, name)

    @app.post("/v1/classify")
    async def classify(body: ClassifyRequest) -> dict[str, Any]:
        texts = [body.input] if isinstance(body.input, str) else list(body.input)
        if not texts:
            raise ServeError(400, "input must hold at least one text", param="input")
        inputs = engine.encode_inputs(texts)
        engine.require(body.model)
        events = _Events()
        job = ClassificationJob(body.model, inputs, events.put)
        batcher.submit(job)
        try:
            event = await events.get()
        finally:
            job.cancel()
        if isinstance(event, Failed):
            raise ServeError(event.status, event.message, event.code)
        assert isinstance(event, Classified)
        return {"object": "list", "model": body.model, "data": event.results,
                "usage": {"prompt_tokens": event.prompt_tokens, "total_tokens": event.prompt_tokens}}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest):
        _refuse_unsupported(body)
        prompt = body.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
            if len(prompt) != 1:
                raise ServeError(400, "several prompts in one request are not supported; send one per request",
                                 "unsupported_parameter", "prompt")
            prompt = prompt[0]
        ids = engine.encode_prompt(prompt)
        return await _generate(body, ids, body.max_tokens or 16, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest):
        _refuse_unsupported(body)
        messages = []
        for i, m in enumerate(body.messages):
            content = m.content
            if isinstance(content, list):
                if any(part.type != "text" for part in content):
                    raise ServeError(400, f"messages[{i}]: only text content parts are supported", param="messages")
                content = "".join(part.text or "" for part in content)
            messages.append({"role": m.role, "content": content or ""})
        try:
            ids = engine.render_chat(messages, body.model)
        except ServeError:
            raise
        except Exception as exc:  # a chat template that rejects these messages
            raise ServeError(400, f"the chat template cannot render these messages: {exc}",
                             param="messages") from exc
        max_tokens = body.max_completion_tokens or body.max_tokens or engine.max_tokens_limit
        if engine.max_length and body.max_completion_tokens is None and body.max_tokens is None:
            max_tokens = max(1, min(max_tokens, engine.max_length - len(ids)))
        return await _generate(body, ids, max_tokens, chat=True)

    async def _generate(body: _Sampling, ids: list[int], max_tokens: int, *, chat: bool):
        engine.check_generation(ids, max_tokens)
        engine.require(body.model)
        temperature = 1.0 if body.temperature is None else body.temperature
        params = SamplingParams(max_tokens=max_tokens, temperature=temperature, stop=_stops(body.stop),
                                top_p=1.0 if body.top_p is None else body.top_p, seed=body.seed)
        events = _Events()
        job = GenerationJob(body.model, ids, params, events.put)
        meta = {"id": ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24], "created": int(time.time()),
                "model": body.model}
        batcher.submit(job)
        if body.stream:
            usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(_stream(job, events, meta, chat, usage), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        pieces: list[str] = []
        try:
            while True:
                event = await events.get()
                if isinstance(event, Delta):
                    pieces.append(event.text)
                elif isinstance(event, Failed):
                    raise ServeError(event.status, event.message, event.code)
                else:
                    break
        finally:
            job.cancel()  # no-op once finished; stops decoding if the client went away
        assert isinstance(event, Finished)
        text = "".join(pieces)
        usage = {"prompt_tokens": event.prompt_tokens, "completion_tokens": event.completion_tokens,
                 "total_tokens": event.prompt_tokens + event.completion_tokens}
        if chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                      "finish_reason": event.reason}
            return {**meta, "object": "chat.completion", "choices": [choice], "usage": usage}
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": event.reason}
        return {**meta, "object": "text_completion", "choices": [choice], "usage": usage}

    return app


class _Events:
    """Events from the worker thread, delivered on the request's event loop."""

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()

    def put(self, event) -> None:  # called from the batcher thread
        self.loop.call_soon_threadsafe(self.queue.put_nowait, event)

    async def get(self):
        return await self.queue.get()


def _sse(data: dict[str, Any] | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"


async def _stream(job: GenerationJob, events: _Events, meta: dict[str, Any], chat: bool,
                  include_usage: bool) -> AsyncIterator[str]:
    kind = "chat.completion.chunk" if chat else "text_completion"

    def chunk(text: str | None, finish: str | None, first: bool = False) -> dict[str, Any]:
        if chat:
            delta: dict[str, Any] = {}
            if first:
                delta["role"] = "assistant"
            if text is not None:
                delta["content"] = text
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
        return {**meta, "object": kind, "choices": [choice]}

    try:
        if chat:
            yield _sse(chunk("", None, first=True))
        while True:
            event = await events.get()
            if isinstance(event, Delta):
                yield _sse(chunk(event.text, None))
            elif isinstance(event, Failed):
                yield _sse(error_body(event.status, event.message, event.code))
                break
            elif isinstance(event, Finished):
                yield _sse(chunk(None if chat else "", event.reason))
                if include_usage:
                    usage = {"prompt_tokens": event.prompt_tokens, "completion_tokens": event.completion_tokens,
                             "total_tokens": event.prompt_tokens + event.completion_tokens}
                    yield _sse({**meta, "object": kind, "choices": [], "usage": usage})
                break
        yield _sse("[DONE]")
    finally:
        job.cancel()  # the client disconnected or the stream ended: stop decoding this row
