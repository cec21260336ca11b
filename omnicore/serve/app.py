"""The HTTP application: OpenAI-compatible endpoints, health, metrics and the page, over one scheduler (in an engine
process, engine.py, or in a thread of this one).

The model loads (and warms up) in a background thread after the server starts listening: ``GET /health`` says
``loading`` (503) until it is ``ready``. Every refusal is a JSON error ``{"error": {"message", "type", "param",
"code"}}``; nothing reaches the client from a traceback.
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import io
import json
import logging
import threading
import time
import uuid
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator

import torch
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..inputs import first_line
from .jobs import ImageJob, Job, TextJob
from .metrics import Metrics
from .page import PAGE
from .protocol import Limits, RequestError, model_size, parse_chat, parse_images
from .scheduler import QueueFull, Scheduler
from .text import AnswerText

log = logging.getLogger("omnicore.serve")
MiB = 1 << 20
DISCONNECT_POLL_S = 0.5
ENDPOINTS = {"/v1/chat/completions", "/v1/images/generations", "/v1/models", "/health", "/metrics", "/"}


@dataclass
class ServeOptions:
    model_dir: Path
    device: torch.device
    max_batch: int = 32
    max_queue: int = 256
    api_key: str | None = None
    max_body_bytes: int = 20 * MiB
    limits: Limits = field(default_factory=Limits)
    name: str | None = None  # the model name clients give; default: the directory's name
    use_graphs: bool | None = None  # None: CUDA graphs on CUDA
    engine: str = "process"  # "process": the model steps in a process of its own (engine.py); "thread": in this one
    threads: int | None = None  # torch's CPU threads where the model steps; None: torch's default
    replicas: int = 1  # engine processes, each with the whole model (CPU only); requests go to the least busy
    dtype: str | None = None  # "bfloat16", ...: the type the model runs in; None: the type it was saved in

    @property
    def served_name(self) -> str:
        return self.name or Path(self.model_dir).resolve().name


class Service:
    """The model, its scheduler and the server's state, shared by the handlers."""

    def __init__(self, options: ServeOptions) -> None:
        self.options = options
        self.name = options.served_name
        self.status = "loading"
        self.error: str | None = None
        self.model = None
        self.scheduler: Scheduler | None = None
        self.metrics = Metrics()
        self.started = int(time.time())
        self.on_failure = None  # called (from the loading thread) when loading fails: the CLI stops the server

    def load(self) -> None:
        try:
            t = time.perf_counter()
            model, scheduler = self._start_engine() if self.options.engine == "process" else self._start_thread()
            self.model, self.scheduler = model, scheduler
            self.metrics.watch(scheduler)
            self.status = "ready"
            log.info("model %s ready in %.1f s (%s, engine: %s)", self.name, time.perf_counter() - t,
                     self.options.device, self.options.engine)
        except Exception as exc:
            self._fail(f"{type(exc).__name__}: {first_line(exc)}", "loading the model failed")

    def _start_thread(self):
        import omnicore

        if self.options.threads is not None:
            torch.set_num_threads(self.options.threads)
        from .engine import load_dtype

        model = omnicore.load(self.options.model_dir, device=self.options.device,
                              dtype=load_dtype(self.options.dtype))
        scheduler = Scheduler(model, self.options.max_batch, self.options.max_queue, self.options.use_graphs)
        scheduler.warm_up()
        scheduler.start()
        return model, scheduler

    def _start_engine(self):
        from ..model.unified import load_structure
        from .engine import EngineConfig, EngineGroup

        o = self.options
        torch.set_num_threads(1)  # this process's own torch work is image transforms; the cores go to the engine
        model = load_structure(o.model_dir)  # tokenizers, layout and sizes to read requests with; no weights
        config = EngineConfig(str(o.model_dir), str(o.device), o.max_batch, o.use_graphs, o.threads, o.dtype)
        engine = EngineGroup([config] * o.replicas, o.max_queue)
        engine.on_exit = lambda error: self._fail(error, "the engine stopped")
        engine.start()
        return model, engine

    def _fail(self, error: str, what: str) -> None:
        self.status, self.error = "failed", error
        log.error("%s: %s", what, error)
        if self.on_failure is not None:
            self.on_failure(error)

    def stop(self) -> None:
        if self.scheduler is not None:
            self.scheduler.stop()

    def ready(self) -> Scheduler:
        if self.status != "ready":
            detail = f": {self.error}" if self.error else ""
            raise RequestError(f"the model is {self.status}{detail}; GET /health says when it is ready", None, 503,
                               "server_error", "model_not_ready")
        return self.scheduler


def _error(exc: RequestError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
    return JSONResponse(exc.body(), status_code=exc.status, headers=headers)


def _reject_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


async def read_json(request: Request, limit: int) -> Any:
    """The body as JSON, refused past ``limit`` bytes (before reading it when Content-Length says so)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise RequestError(f"the request body has {int(declared):,} bytes; the limit is {limit:,} "
                           "(omni serve --max-body-mb)", None, 413)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise RequestError(f"the request body is larger than the limit of {limit:,} bytes "
                               "(omni serve --max-body-mb)", None, 413)
        chunks.append(chunk)
    raw = b"".join(chunks)
    if not raw:
        raise RequestError("the request body is empty; send a JSON object")
    try:
        return json.loads(raw.decode("utf-8"), parse_constant=_reject_constant)
    except UnicodeDecodeError:
        raise RequestError("the request body is not UTF-8 text") from None
    except RecursionError:
        raise RequestError("the request body is nested too deeply") from None
    except ValueError as exc:
        raise RequestError(f"the request body is not valid JSON: {first_line(exc)}") from None


def _authorize(request: Request, key: str | None) -> None:
    if key is None:
        return
    header = request.headers.get("authorization", "")
    scheme, _, given = header.partition(" ")
    if not header:
        raise RequestError("missing API key: send the header 'Authorization: Bearer <key>'", None, 401,
                           code="invalid_api_key")
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), key.encode()):
        raise RequestError("wrong API key", None, 401, code="invalid_api_key")


class _Mailbox:
    """Events from the scheduler thread to one event loop, delivered in batches: the loop is woken once for all the
    events posted while it was busy (a step's tokens for every stream), not once per event; each wake-up is a
    write to the loop's self-pipe and a turn of the loop, which on a small CPU compete with the decoding thread."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.lock = threading.Lock()
        self.items: list[tuple[asyncio.Queue, tuple]] = []

    def post(self, queue: asyncio.Queue, event: tuple) -> None:  # the scheduler thread
        with self.lock:
            wake = not self.items
            self.items.append((queue, event))
        if wake:
            try:
                self.loop.call_soon_threadsafe(self._deliver)
            except RuntimeError:  # the loop is gone (shutting down): nobody is listening
                pass

    def _deliver(self) -> None:
        with self.lock:
            items, self.items = self.items, []
        for queue, event in items:
            queue.put_nowait(event)


_mailboxes: "weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Mailbox]" = weakref.WeakKeyDictionary()


class _Events:
    """A job's events, handed from the scheduler thread to the event loop."""

    def __init__(self) -> None:
        loop = asyncio.get_running_loop()
        self.mailbox = _mailboxes.get(loop)
        if self.mailbox is None:
            self.mailbox = _mailboxes[loop] = _Mailbox(loop)
        self.queue: asyncio.Queue = asyncio.Queue()

    def emit(self, event: tuple) -> None:  # the scheduler thread
        self.mailbox.post(self.queue, event)

    async def next(self, request: Request | None = None) -> tuple:
        """The next event; a client that went away (polled while waiting) cancels with CancelledError."""
        if not self.queue.empty():
            return self.queue.get_nowait()
        if request is None:  # a stream: starlette notices the client going away itself
            return await self.queue.get()
        while True:
            try:
                return await asyncio.wait_for(self.queue.get(), DISCONNECT_POLL_S)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    raise asyncio.CancelledError("the client disconnected")


def create_app(options: ServeOptions, service: Service | None = None) -> FastAPI:
    service = service or Service(options)
    app = FastAPI(title="omnicore", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.service = service
    metrics = service.metrics
    limit = options.max_body_bytes

    @app.exception_handler(RequestError)
    async def _request_error(request: Request, exc: RequestError):
        return _error(exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
        message = f"{request.method} {request.url.path}: {exc.detail}"
        return JSONResponse({"error": {"message": message, "type": kind, "param": None, "code": None}},
                            status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        log.exception("unexpected error in %s %s", request.method, request.url.path)
        return JSONResponse({"error": {"message": "internal server error", "type": "server_error", "param": None,
                                       "code": None}}, status_code=500)

    app.add_middleware(_CountRequests, metrics=metrics)

    @app.get("/", response_class=HTMLResponse)
    async def page() -> HTMLResponse:
        return HTMLResponse(PAGE, headers={"Cache-Control": "no-store"})

    @app.get("/health")
    async def health() -> JSONResponse:
        body = {"status": service.status, "model": service.name}
        if service.error:
            body["error"] = service.error
        if service.status == "ready":
            body.update(info(service))
        return JSONResponse(body, status_code=200 if service.status == "ready" else 503)

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models")
    async def models(request: Request) -> JSONResponse:
        _authorize(request, options.api_key)
        return JSONResponse({"object": "list", "data": [model_card(service)]})

    @app.get("/v1/models/{name}")
    async def model_info(name: str, request: Request) -> JSONResponse:
        _authorize(request, options.api_key)
        if name != service.name:
            raise RequestError(f"model {name!r} does not exist here; this server serves {service.name!r}", "model",
                               404, code="model_not_found")
        return JSONResponse(model_card(service))

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        _authorize(request, options.api_key)
        t0 = time.perf_counter()
        body = await read_json(request, limit)
        scheduler = service.ready()
        model = service.model
        req = await run_in_threadpool(parse_chat, body, service.name, model, options.limits)
        pixels = None
        if req.image is not None:
            pixels = await run_in_threadpool(model.encoder.image_transform(), req.image)
        events = _Events()
        job = TextJob(n=req.n, sampling=req.sampling, emit=events.emit, question_ids=req.question_ids, pixels=pixels)
        _submit(scheduler, job)
        answers = [AnswerText(model.text_tokenizer, req.stops) for _ in range(req.n)]
        ident, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if req.stream:
            return StreamingResponse(_stream_chat(service, req, job, events, answers, ident, created, t0),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        try:
            first = None
            while not all(a.done for a in answers):
                event = await events.next(request)
                first = first or time.perf_counter()
                _apply(event, answers)
                if all(a.done for a in answers):
                    job.cancel()  # ended by stop sequences: free the rows now
        except asyncio.CancelledError:
            job.cancel()
            raise
        tokens = sum(a.tokens for a in answers)
        metrics.tokens.inc(tokens)
        metrics.first_token.observe((first or time.perf_counter()) - t0)
        metrics.latency.labels("/v1/chat/completions").observe(time.perf_counter() - t0)
        choices = [{"index": i, "message": {"role": "assistant", "content": a.shown, "refusal": None},
                    "logprobs": None, "finish_reason": a.finish_reason} for i, a in enumerate(answers)]
        return JSONResponse({"id": ident, "object": "chat.completion", "created": created, "model": service.name,
                             "system_fingerprint": None, "choices": choices,
                             "usage": _usage(req.prompt_tokens, tokens)})

    @app.post("/v1/images/generations")
    async def images(request: Request) -> JSONResponse:
        _authorize(request, options.api_key)
        t0 = time.perf_counter()
        body = await read_json(request, limit)
        scheduler = service.ready()
        if "t2i" not in scheduler.pools:
            raise RequestError("this model does not generate images (it has no image tokenizer or image head)")
        req = await run_in_threadpool(parse_images, body, service.name, service.model, options.limits)
        events = _Events()
        job = ImageJob(n=req.n, sampling=req.sampling, emit=events.emit, prompt=req.prompt,
                       guidance_scale=req.guidance_scale, negative_prompt=req.negative_prompt)
        _submit(scheduler, job)
        try:
            event = await events.next(request)
        except asyncio.CancelledError:
            job.cancel()
            raise
        if event[0] == "error":
            raise RequestError(event[1], None, 500, "server_error")
        pngs = await run_in_threadpool(_pngs, event[1])
        metrics.images.inc(len(pngs))
        metrics.latency.labels("/v1/images/generations").observe(time.perf_counter() - t0)
        return JSONResponse({"created": int(time.time()), "data": [{"b64_json": p, "revised_prompt": None}
                                                                   for p in pngs]})

    return app


class _CountRequests:
    """ASGI middleware counting responses by endpoint and status (a plain ASGI wrapper: it leaves streaming and
    the client-disconnect signal as they are)."""

    def __init__(self, app, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = [500]

        async def tap(message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, tap)
        finally:
            path = scope.get("path", "")
            self.metrics.requests.labels(path if path in ENDPOINTS else "other", str(status[0])).inc()


def _submit(scheduler: Scheduler, job: Job) -> None:
    try:
        scheduler.submit(job)
    except QueueFull as exc:
        raise RequestError(f"the server is busy ({exc}); retry later", None, 429, "rate_limit_error",
                           "queue_full") from None


def _apply(event: tuple, answers: list[AnswerText]) -> list[str]:
    """One scheduler event applied to the answers: the new text of each."""
    kind = event[0]
    if kind == "error":
        raise RequestError(event[1], None, 500, "server_error")
    if kind == "tokens":
        return [a.finish("stop") if tok is None else a.add(tok) for a, tok in zip(answers, event[1])]
    if kind == "end":
        return [a.finish(reason) for a, reason in zip(answers, event[1])]
    return [""] * len(answers)


async def _stream_chat(service: Service, req, job: TextJob, events: _Events, answers: list[AnswerText], ident: str,
                       created: int, t0: float) -> AsyncIterator[str]:
    metrics = service.metrics

    def chunk(choices: list[dict], usage: dict | None = None) -> str:
        body = {"id": ident, "object": "chat.completion.chunk", "created": created, "model": service.name,
                "system_fingerprint": None, "choices": choices}
        if req.include_usage:
            body["usage"] = usage
        return f"data: {json.dumps(body)}\n\n"

    finished = False
    reported: set[int] = set()  # answers whose finish_reason was sent
    try:
        yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                      "finish_reason": None} for i in range(req.n)])
        first = None
        while not all(a.done for a in answers):
            event = await events.next()
            batch = [event]
            # a stream behind the decoder (a busy host) sends what is waiting as one chunk per answer, not one a token
            while event[0] == "tokens" and not events.queue.empty():
                event = events.queue.get_nowait()
                batch.append(event)
            deltas = [""] * len(answers)
            try:
                for queued in batch:
                    deltas = [d + new for d, new in zip(deltas, _apply(queued, answers))]
            except RequestError as exc:
                yield f"data: {json.dumps(exc.body())}\n\n"
                return
            if batch[0][0] == "tokens" and first is None:
                first = time.perf_counter()
                metrics.first_token.observe(first - t0)
            parts = []
            for i, (a, text) in enumerate(zip(answers, deltas)):
                if text:
                    parts.append({"index": i, "delta": {"content": text}, "logprobs": None, "finish_reason": None})
                if a.done and i not in reported:
                    reported.add(i)
                    parts.append({"index": i, "delta": {}, "logprobs": None, "finish_reason": a.finish_reason})
            for part in parts:  # one choice a chunk, as the OpenAI API streams
                yield chunk([part])
            if all(a.done for a in answers):
                job.cancel()  # ended by stop sequences: free the rows now (a no-op when the scheduler ended it)
        tokens = sum(a.tokens for a in answers)
        metrics.tokens.inc(tokens)
        if req.include_usage:
            yield chunk([], _usage(req.prompt_tokens, tokens))
        yield "data: [DONE]\n\n"
        finished = True
        metrics.latency.labels("/v1/chat/completions").observe(time.perf_counter() - t0)
    finally:
        if not finished:  # the client went away (the stream was cancelled): its rows are freed at the next step
            job.cancel()


def _usage(prompt: int, completion: int) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _pngs(images: list) -> list[str]:
    out = []
    for im in images:
        buf = io.BytesIO()
        im.save(buf, format="PNG")
        out.append(base64.b64encode(buf.getvalue()).decode("ascii"))
    return out


def model_card(service: Service) -> dict:
    return {"id": service.name, "object": "model", "created": service.started, "owned_by": "omnicore"}


def info(service: Service) -> dict:
    """What the page needs to know: tasks, image size, limits."""
    model, scheduler, limits = service.model, service.scheduler, service.options.limits
    return {"tasks": sorted(scheduler.pools), "image_size": model_size(model) if "t2i" in scheduler.pools else None,
            "has_encoder": model.encoder is not None, "max_n": limits.max_n,
            "max_caption_tokens": model.layout.max_caption_tokens, "auth": service.options.api_key is not None}
