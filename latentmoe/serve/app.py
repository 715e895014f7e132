"""The OpenAI-compatible HTTP API (FastAPI on uvicorn) in front of a backend (backend.py).

    POST /v1/completions        prompt: text | [text] | [ids] | [[ids]]; n, stream, logprobs, echo, stop, seed, ...
    POST /v1/chat/completions   messages rendered with the checkpoint's chat template (prompts.py)
    GET  /v1/models             the served model
    GET  /health                200 when ready; 503 while loading, draining, or after the engine / a worker died
    GET  /metrics               Prometheus text (metrics.py)

How one request goes: the body is read (at most ``max_request_bytes``: 413 past it), decoded as UTF-8 and
parsed strictly into a protocol.py model — any problem is a 400 in the OpenAI error shape naming the field.
Prompts are tokenized off the event loop (a long prompt does not stall other streams); each prompt × ``n``
becomes one backend request with its own ``SamplingParams`` (choice j of a seeded request is seeded
``seed + j``, so the n choices differ and each is reproducible). Every stream stops at the model's EOS token.
Admission failures map to HTTP: a request that can never fit (prompt past the context, a worst case larger
than the whole cache) 400; the waiting queue full (``max_queued``) 429 with ``Retry-After``; draining or a dead
engine 503. When one choice of a request is refused, the ones already queued are cancelled.

Responses stream as Server-Sent Events (``data: {chunk}`` ... ``data: [DONE]``); chat streams send the
assistant ``role`` first. A client that disconnects mid-stream (or before a non-streamed answer) cancels its
requests at once: their cache blocks are back in the pool before the engine's next step. An error after the
stream started (a worker died) is sent as a ``data: {"error": ...}`` event, then ``[DONE]``.

``--api-key``: every ``/v1`` route needs ``Authorization: Bearer KEY`` (401 otherwise; compared in constant
time with ``hmac.compare_digest``; the key is never logged). ``/health`` and ``/metrics`` stay open.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, replace

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from latentmoe.infer import EngineClosedError, EngineDeadError, QueueFullError, RequestOutput, SamplingParams
from latentmoe.infer.logprobs import TokenLogprob
from latentmoe.infer.output import FINISH_CANCELLED
from latentmoe.io import BYTES_PER_MIB
from latentmoe.serve import protocol as p
from latentmoe.serve.backend import Backend, BackendSnapshot
from latentmoe.serve.metrics import CONTENT_TYPE, ServerMetrics
from latentmoe.serve.prompts import encode_chat, encode_prompt, token_text

log = logging.getLogger(__name__)

DEFAULT_MAX_REQUEST_BYTES = 8 * BYTES_PER_MIB
RETRY_AFTER_S = 1
ENDPOINTS = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics")
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
DONE = "data: [DONE]\n\n"
_FIELD_RE = re.compile(r"^([a-z_]+)(?::| must| is)")


@dataclass
class ServerState:
    """What the routes share: the backend (None while loading), whether the server is draining, metrics."""

    backend: Backend | None
    api_key: str | None = None
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES
    draining: bool = False
    metrics: ServerMetrics = field(init=False)

    def __post_init__(self) -> None:
        self.metrics = ServerMetrics(self.snapshot)

    def snapshot(self) -> BackendSnapshot | None:
        return self.backend.snapshot() if self.backend is not None else None

    def start_draining(self) -> None:
        """Refuse new requests (503) from now on; those accepted carry on."""
        self.draining = True
        if self.backend is not None:
            self.backend.stop_accepting()

    def ready_backend(self) -> Backend:
        """The backend, or the 503 that explains why there is none to use."""
        if self.backend is None:
            raise p.APIError(503, "the model is loading", type="service_unavailable")
        if self.draining:
            raise p.APIError(503, "the server is shutting down", type="service_unavailable")
        snap = self.backend.snapshot()
        if not snap.alive:
            raise p.APIError(503, snap.problem or "the engine stopped", type="service_unavailable")
        return self.backend


# ------------------------------------------------------------------ errors
def error_response(error: p.APIError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)


def validation_error(exc: ValidationError) -> p.APIError:
    """The first problem pydantic found, as a 400 naming the field."""
    first = exc.errors(include_url=False)[0]
    loc = [str(x) for x in first.get("loc", ()) if not str(x).startswith(("function-", "constrained-"))]
    # a union reports the member type it tried ("str", "list[...]"): keep the field path only
    path = [x for x in loc if not (x[:1].islower() and ("[" in x or x in ("str", "int", "float", "bool")))]
    param = ".".join(path) or None
    message = first.get("msg", "invalid value")
    if first.get("type") == "json_invalid":
        return p.APIError(400, f"the request body is not valid JSON ({message})", code="invalid_json")
    if first.get("type") == "extra_forbidden":
        return p.APIError(400, f"{param}: unknown field", param=param, code="unknown_field")
    return p.APIError(400, f"{param}: {message}" if param else message, param=param)


def engine_error(exc: BaseException, *, rename: dict[str, str] | None = None) -> p.APIError:
    """What a backend refusal means over HTTP (see the module docstring)."""
    if isinstance(exc, QueueFullError):
        return p.APIError(429, f"the server is overloaded: {exc}; retry later", type="rate_limit_error",
                          code="rate_limit_exceeded", headers={"Retry-After": str(RETRY_AFTER_S)})
    if isinstance(exc, EngineClosedError):
        return p.APIError(503, "the server is shutting down", type="service_unavailable")
    if isinstance(exc, EngineDeadError):
        return p.APIError(503, str(exc), type="service_unavailable")
    if isinstance(exc, ValueError):
        match = _FIELD_RE.match(str(exc))
        param = match.group(1) if match else None
        if param is not None and rename:
            param = rename.get(param, param)
        return p.APIError(400, str(exc), param=param)
    raise exc


def parse_body(model: type[BaseModel], body: bytes) -> BaseModel:
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise p.APIError(400, f"the request body is not UTF-8 (byte {exc.start})", code="invalid_encoding") from None
    try:
        return model.model_validate_json(text)
    except ValidationError as exc:
        raise validation_error(exc) from None


async def read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise p.APIError(413, f"the request body is larger than {limit} bytes", code="request_too_large")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise p.APIError(413, f"the request body is larger than {limit} bytes", code="request_too_large")
        chunks.append(chunk)
    return b"".join(chunks)


# ------------------------------------------------------------------ one request's engine requests
@dataclass
class Choice:
    """One engine request of an API request: choice ``index`` of prompt ``prompt_index``."""

    index: int
    prompt_index: int
    prompt_ids: list[int]
    prompt_text: str
    handle: object = None
    final: RequestOutput | None = None


class Generation:
    """The engine requests of one API request, their events merged in arrival order, metrics observed."""

    def __init__(self, state: ServerState, choices: list[Choice], started: float):
        self.state = state
        self.choices = choices
        self.started = started
        self._queue: asyncio.Queue = asyncio.Queue()
        self._tasks: list[asyncio.Task] = []

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._consume(c)) for c in self.choices]

    async def _consume(self, choice: Choice) -> None:
        metrics, last = self.state.metrics, None
        try:
            while (event := await choice.handle.anext_output()) is not None:
                now = time.perf_counter()
                if event.new_token_ids:
                    if last is None:
                        metrics.ttft.observe(now - self.started)
                    else:
                        metrics.observe_tokens(gap_s=now - last, num_tokens=len(event.new_token_ids))
                    last = now
                if event.finished:
                    choice.final = event
                    result = event.result
                    metrics.prompt_tokens.inc(len(result.prompt_token_ids))
                    metrics.generation_tokens.inc(len(result.token_ids))
                    metrics.duration.observe(now - self.started)
                await self._queue.put((choice, event))
                if event.finished:
                    return
        except Exception as exc:  # the consumer must hear of every failure, or it would wait forever
            await self._queue.put((choice, exc))

    async def events(self) -> AsyncIterator[tuple[Choice, RequestOutput]]:
        """Every choice's events until each has finished; raises APIError (503) when one fails."""
        remaining = len(self.choices)
        while remaining:
            choice, item = await self._queue.get()
            if isinstance(item, EngineDeadError | EngineClosedError):
                raise engine_error(item)
            if isinstance(item, BaseException):
                log.error("a request failed: %s: %s", type(item).__name__, item)
                raise p.APIError(500, f"internal error: {type(item).__name__}", type="server_error")
            if item.finished and item.finish_reason == FINISH_CANCELLED:
                raise p.APIError(503, "the request was cancelled: the server is shutting down",
                                 type="service_unavailable")
            if item.finished:
                remaining -= 1
            yield choice, item

    def cancel(self) -> None:
        for task in self._tasks:
            task.cancel()
        for choice in self.choices:
            if choice.handle is not None and choice.final is None:
                choice.handle.cancel()


def submit_all(backend: Backend, choices: list[Choice], params_for: Callable[[Choice], SamplingParams], *,
               rename: dict[str, str] | None = None) -> None:
    """Submit every choice; if one is refused, cancel those already queued and raise its HTTP error."""
    for choice in choices:
        try:
            choice.handle = backend.submit(choice.prompt_ids, params_for(choice))
        except (ValueError, QueueFullError, EngineClosedError, EngineDeadError) as exc:
            for done in choices:
                if done.handle is not None:
                    done.handle.cancel()
            raise engine_error(exc, rename=rename) from None


async def until_disconnected(request: Request) -> None:
    """Returns when the client goes away (the body has been read, so the next message is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def sse(payload: BaseModel | dict) -> str:
    data = payload.model_dump_json(exclude_none=True) if isinstance(payload, BaseModel) else json.dumps(payload)
    return f"data: {data}\n\n"


def usage(choices: list[Choice]) -> p.Usage:
    prompts = {c.prompt_index: len(c.prompt_ids) for c in choices}
    completion = sum(len(c.final.result.token_ids) for c in choices if c.final is not None)
    return p.Usage(prompt_tokens=sum(prompts.values()), completion_tokens=completion,
                   total_tokens=sum(prompts.values()) + completion)


# ------------------------------------------------------------------ logprob formats
def completion_logprobs(tokenizer, logprobs: list[TokenLogprob | None], *, offset: int) -> p.CompletionLogprobs:
    """The legacy format; ``text_offset`` counts characters from ``offset`` token text by token text; the
    sampled token is always in its ``top_logprobs`` entry (as vLLM does). The entries are keyed by token text,
    as OpenAI's are, so tokens that read alike (half characters read as U+FFFD) share one key."""
    out = p.CompletionLogprobs()
    for lp in logprobs:
        if lp is None:  # the first prompt token: nothing precedes it
            out.tokens.append("")
            out.token_logprobs.append(None)
            out.top_logprobs.append(None)
            out.text_offset.append(offset)
            continue
        text = token_text(tokenizer, lp.token_id)
        out.tokens.append(text)
        out.token_logprobs.append(lp.logprob)
        top: dict[str, float] = {}
        for t, v in (*lp.top, (lp.token_id, lp.logprob)):  # most likely first: a text shared by two keeps the higher
            top.setdefault(token_text(tokenizer, t), v)
        out.top_logprobs.append(top)
        out.text_offset.append(offset)
        offset += len(text)
    return out


def chat_logprobs(tokenizer, logprobs: list[TokenLogprob]) -> p.ChatLogprobs:
    def entry(token_id: int, value: float) -> dict:
        text = token_text(tokenizer, token_id)
        return {"token": text, "logprob": value, "bytes": list(text.encode("utf-8"))}

    return p.ChatLogprobs(content=[
        p.ChatTokenLogprob(**entry(lp.token_id, lp.logprob),
                           top_logprobs=[p.TopLogprob(**entry(t, v)) for t, v in lp.top])
        for lp in logprobs
    ])


# ------------------------------------------------------------------ the app
def create_app(backend: Backend | None, *, api_key: str | None = None,
               max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES) -> FastAPI:
    """The ASGI app serving ``backend`` (None: not loaded yet — set ``app.state.server.backend`` later)."""
    state = ServerState(backend, api_key=api_key, max_request_bytes=max_request_bytes)
    app = FastAPI(title="latentmoe", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = state
    app.add_middleware(CountAndAuthorize, state=state)

    @app.exception_handler(p.APIError)
    async def _api_error(request: Request, exc: p.APIError):
        return error_response(exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        kind = "not_found" if exc.status_code == 404 else "invalid_request_error"
        return error_response(p.APIError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}",
                                         type=kind))

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception):
        log.exception("internal error on %s", request.url.path)
        return error_response(p.APIError(500, f"internal error: {type(exc).__name__}", type="server_error"))

    @app.get("/health")
    async def health():
        if state.backend is None:
            return JSONResponse({"status": "loading"}, status_code=503)
        if state.draining:
            return JSONResponse({"status": "draining"}, status_code=503)
        snap = state.backend.snapshot()
        if not snap.alive:
            return JSONResponse({"status": "unavailable", "problem": snap.problem}, status_code=503)
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        return Response(state.metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/v1/models")
    async def models():
        backend = state.ready_backend()
        card = p.ModelCard(id=backend.info.name, created=int(time.time()), max_model_len=backend.info.max_model_len)
        return p.ModelList(data=[card]).model_dump()

    @app.post("/v1/completions")
    async def completions(request: Request):
        started = time.perf_counter()
        body = await read_body(request, state.max_request_bytes)
        req: p.CompletionRequest = parse_body(p.CompletionRequest, body)
        backend = checked_backend(state, req)
        info = backend.info
        prompts = req.prompt if isinstance(req.prompt, list) and not isinstance(req.prompt[0], int) else [req.prompt]
        tokenizer = info.tokenizer

        def encode_all() -> list[tuple[list[int], str]]:
            out = []
            for prompt in prompts:
                if isinstance(prompt, str):
                    if tokenizer is None:
                        raise p.APIError(400, "prompt: this model has no tokenizer; send token ids", param="prompt")
                    out.append((encode_prompt(tokenizer, prompt, info.bos_token_id), prompt))
                else:
                    text = tokenizer.decode(prompt) if tokenizer is not None else ""
                    out.append((list(prompt), text))
            return out

        encoded = await run_in_threadpool(encode_all)
        for ids, _ in encoded:
            check_context(info, len(ids), param="prompt")
        base = sampling_params(
            max_tokens=req.max_tokens if req.max_tokens is not None else p.DEFAULT_COMPLETION_MAX_TOKENS,
            **sampling_fields(req, info),
            logprobs=req.logprobs,
            prompt_logprobs=req.logprobs if req.echo and req.logprobs is not None else None,
        )
        choices = [Choice(index=i * req.n + j, prompt_index=i, prompt_ids=ids, prompt_text=text)
                   for i, (ids, text) in enumerate(encoded) for j in range(req.n)]
        submit_all(backend, choices, lambda c: seeded(base, c.index % req.n))
        gen = Generation(state, choices, started)
        gen.start()
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())

        def chunk(choice: Choice, text: str, logprobs=None, finish=None) -> p.CompletionResponse:
            return p.CompletionResponse(id=rid, created=created, model=info.name, choices=[
                p.CompletionChoice(index=choice.index, text=text, logprobs=logprobs, finish_reason=finish)])

        if req.stream:
            async def stream() -> AsyncIterator[str]:
                echoed: set[int] = set()
                offsets = {c.index: 0 for c in choices}
                try:
                    async for choice, event in gen.events():
                        if req.echo and choice.index not in echoed:
                            echoed.add(choice.index)
                            lp = (completion_logprobs(tokenizer, event.prompt_logprobs or [], offset=0)
                                  if req.logprobs is not None else None)
                            offsets[choice.index] = len(choice.prompt_text)
                            yield sse(chunk(choice, choice.prompt_text, lp))
                        lp = None
                        if event.new_logprobs is not None:
                            lp = completion_logprobs(tokenizer, event.new_logprobs, offset=offsets[choice.index])
                        offsets[choice.index] += len(event.new_text)
                        if event.new_text or event.finished or lp is not None:
                            yield sse(chunk(choice, event.new_text, lp, event.finish_reason if event.finished
                                            else None))
                    if req.stream_options is not None and req.stream_options.include_usage:
                        yield sse(p.CompletionResponse(id=rid, created=created, model=info.name, choices=[],
                                                       usage=usage(choices)))
                except p.APIError as exc:
                    state.metrics.stream_errors.inc()
                    yield sse(exc.body())
                except asyncio.CancelledError:
                    state.metrics.disconnects.inc()
                    raise
                finally:
                    gen.cancel()
                yield DONE

            return StreamingResponse(stream(), media_type="text/event-stream", headers=SSE_HEADERS)

        await collect(request, gen)
        out = []
        for c in choices:
            result = c.final.result
            text, lp = result.text or "", None
            if req.logprobs is not None:
                tokens = (list(result.prompt_logprobs or []) if req.echo else []) + list(result.logprobs)
                lp = completion_logprobs(tokenizer, tokens, offset=0)
            if req.echo:
                text = c.prompt_text + text
            out.append(p.CompletionChoice(index=c.index, text=text, logprobs=lp, finish_reason=result.finish_reason))
        return p.CompletionResponse(id=rid, created=created, model=info.name, choices=out,
                                    usage=usage(choices)).model_dump()

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        started = time.perf_counter()
        body = await read_body(request, state.max_request_bytes)
        req: p.ChatCompletionRequest = parse_body(p.ChatCompletionRequest, body)
        backend = checked_backend(state, req)
        info = backend.info
        tokenizer = info.tokenizer
        if tokenizer is None:
            raise p.APIError(400, "messages: this model has no tokenizer to render a chat with", param="messages")
        messages = [{"role": m.role, "content": m.text(), **({"name": m.name} if m.name else {})}
                    for m in req.messages]

        def encode() -> list[int]:
            try:  # the chat template decides about BOS (prompts.py)
                return encode_chat(tokenizer, messages, bos_token_id=info.bos_token_id,
                                   eos_token_id=info.eos_token_id)
            except ValueError as exc:
                raise p.APIError(400, f"messages: {exc}", param="messages") from None

        ids = await run_in_threadpool(encode)
        check_context(info, len(ids), param="messages")
        limit = req.token_limit if req.token_limit is not None else info.max_model_len - len(ids)
        param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
        base = sampling_params(max_tokens=limit, **sampling_fields(req, info),
                               logprobs=(req.top_logprobs or 0) if req.logprobs else None,
                               rename={"max_tokens": param})
        choices = [Choice(index=j, prompt_index=0, prompt_ids=ids, prompt_text="") for j in range(req.n)]
        submit_all(backend, choices, lambda c: seeded(base, c.index), rename={"prompt": "messages",
                                                                              "max_tokens": param})
        gen = Generation(state, choices, started)
        gen.start()
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

        if req.stream:
            def chunk(choices_: list[p.ChatChunkChoice], **extra) -> p.ChatCompletionChunk:
                return p.ChatCompletionChunk(id=rid, created=created, model=info.name, choices=choices_, **extra)

            async def stream() -> AsyncIterator[str]:
                try:
                    for c in choices:
                        yield sse(chunk([p.ChatChunkChoice(index=c.index, delta=p.Delta(role="assistant",
                                                                                             content=""))]))
                    async for choice, event in gen.events():
                        lp = chat_logprobs(tokenizer, event.new_logprobs) if event.new_logprobs else None
                        if event.new_text or event.finished or lp is not None:
                            yield sse(chunk([p.ChatChunkChoice(
                                index=choice.index, delta=p.Delta(content=event.new_text), logprobs=lp,
                                finish_reason=event.finish_reason if event.finished else None)]))
                    if req.stream_options is not None and req.stream_options.include_usage:
                        yield sse(chunk([], usage=usage(choices)))
                except p.APIError as exc:
                    state.metrics.stream_errors.inc()
                    yield sse(exc.body())
                except asyncio.CancelledError:
                    state.metrics.disconnects.inc()
                    raise
                finally:
                    gen.cancel()
                yield DONE

            return StreamingResponse(stream(), media_type="text/event-stream", headers=SSE_HEADERS)

        await collect(request, gen)
        out = []
        for c in choices:
            result = c.final.result
            lp = chat_logprobs(tokenizer, result.logprobs) if req.logprobs else None
            out.append(p.ChatChoice(index=c.index, message=p.AssistantMessage(content=result.text or ""),
                                    logprobs=lp, finish_reason=result.finish_reason))
        return p.ChatCompletionResponse(id=rid, created=created, model=info.name, choices=out,
                                        usage=usage(choices)).model_dump()

    return app


def checked_backend(state: ServerState, req: p._Sampling) -> Backend:
    backend = state.ready_backend()
    if req.model != backend.info.name:
        raise p.APIError(404, f"model: {req.model!r} is not served here (this server serves {backend.info.name!r})",
                         type="not_found", param="model", code="model_not_found")
    if bad := req.unsupported():
        raise p.APIError(400, f"{bad[0]}: not supported by this server", param=bad[0], code="unsupported")
    return backend


def check_context(info, num_prompt_tokens: int, *, param: str) -> None:
    if num_prompt_tokens >= info.max_model_len:
        raise p.APIError(400, f"{param}: the prompt has {num_prompt_tokens} tokens; the model's context is "
                         f"max_model_len={info.max_model_len} tokens, prompt and completion together",
                         param=param, code="context_length_exceeded")


def sampling_fields(req: p._Sampling, info) -> dict:
    """SamplingParams fields from the fields both endpoints share (OpenAI defaults: temperature 1, top_p 1)."""
    return dict(
        temperature=1.0 if req.temperature is None else req.temperature,
        top_p=1.0 if req.top_p is None else req.top_p,
        top_k=0 if req.top_k in (None, -1) else req.top_k,
        seed=req.seed,
        stop=req.stop_strings(),
        stop_token_ids=() if info.eos_token_id is None else (info.eos_token_id,),
    )


def sampling_params(*, rename: dict[str, str] | None = None, **fields) -> SamplingParams:
    """SamplingParams, its own range checks (e.g. max_tokens below 2**31) reported as a 400 naming the field."""
    try:
        return SamplingParams(**fields)
    except ValueError as exc:
        raise engine_error(exc, rename=rename) from None


def seeded(params: SamplingParams, j: int) -> SamplingParams:
    return params if params.seed is None or j == 0 else replace(params, seed=params.seed + j)


async def collect(request: Request, gen: Generation) -> None:
    """Wait for every choice of a non-streamed request; a client that leaves first cancels them."""

    async def drain() -> None:
        async for _ in gen.events():
            pass

    waiter = asyncio.ensure_future(drain())
    gone = asyncio.ensure_future(until_disconnected(request))
    try:
        await asyncio.wait({waiter, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
    if not waiter.done():
        waiter.cancel()
        gen.cancel()
        gen.state.metrics.disconnects.inc()
        raise p.APIError(499, "the client closed the request", type="client_closed_request")
    try:
        waiter.result()
    except p.APIError:
        gen.cancel()
        raise


class CountAndAuthorize:
    """Pure ASGI middleware (it must not buffer streams): the API key on /v1 routes, and requests by status."""

    def __init__(self, app, *, state: ServerState):
        self.app = app
        self.state = state

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        endpoint = path if path in ENDPOINTS else "other"
        counter = self.state.metrics.requests

        if self.state.api_key is not None and path.startswith("/v1") and not self._authorized(scope):
            counter.labels(endpoint, "401").inc()
            error = p.APIError(401, "a valid API key is required (Authorization: Bearer KEY)",
                               type="authentication_error", code="invalid_api_key")
            return await error_response(error)(scope, receive, send)

        async def counting_send(message):
            if message["type"] == "http.response.start":
                counter.labels(endpoint, str(message["status"])).inc()
            await send(message)

        await self.app(scope, receive, counting_send)

    def _authorized(self, scope) -> bool:
        header = dict(scope.get("headers") or []).get(b"authorization", b"")
        scheme, _, token = header.partition(b" ")
        return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.state.api_key.encode())
