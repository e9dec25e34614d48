"""`zero-chatgpt serve`: an OpenAI-compatible chat API and a web chat page over one trained model.

    zero-chatgpt serve --run-dir runs/demo [--stage grpo] [--host 127.0.0.1] [--port 8000] [--api-key KEY]

Routes: POST /v1/chat/completions (plain or streamed as server-sent events), GET /v1/models,
GET /v1/models/{id}, GET /health, GET /openapi.json (generated from serve/api.py's models, so it
matches what is accepted and returned), and GET / (the chat page, serve/static/index.html: no CDN,
no external font). Requests share the model through serve/engine.py's continuous batching.

Safe by default: 127.0.0.1 unless --host says otherwise, and another address only with an API key
(or --insecure); with --api-key (or $ZC_API_KEY) every /v1 request needs `Authorization: Bearer KEY`;
bounded body (size, and --body-timeout to arrive), max_tokens, prompt and n; a bounded queue (429 with
Retry-After beyond it); every error in OpenAI's shape, a 4xx for any bad input. The KV cache is allocated
before listening; should the engine die later, /health answers 503 and so does every request. SIGTERM
drains (serve/server.py): running requests finish (up to --drain-timeout, then they are cut), new ones
get 503.
"""
from __future__ import annotations

import asyncio
import json
import secrets
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from zero_chatgpt.core.checkpoint import stage_model_path
from zero_chatgpt.core.errors import UserError
from zero_chatgpt.core.settings import ChatSection
from zero_chatgpt.serve import api
from zero_chatgpt.serve.chat import load_chat_model
from zero_chatgpt.serve.engine import CacheTooLarge, Draining, Engine, EngineFailed, QueueFull, Sampling
from zero_chatgpt.serve.engine import Request as EngineRequest
from zero_chatgpt.serve.gate import Gate, error_response
from zero_chatgpt.serve.server import check_api_key, check_exposure, is_loopback, say, serve

if TYPE_CHECKING:
    # engine.py loads torch (seconds): run_command imports it only once the settings have passed their checks,
    # so that a refused setting answers at once
    from zero_chatgpt.serve.engine import Engine

STATIC = Path(__file__).parent / "static"


@dataclass
class Limits:
    max_body_bytes: int = 1 << 20     # 1 MiB of JSON is far more text than any context holds
    max_tokens: int = 512
    drain_timeout: float = 30.0
    body_timeout: float = 10.0        # seconds for a whole request body to arrive


@dataclass
class Defaults:
    """Sampling when a request does not say: the run's [chat] section, and the answer's length."""
    temperature: float
    top_p: float
    top_k: int
    repetition_penalty: float
    max_tokens: int

    @classmethod
    def of(cls, chat: ChatSection, max_tokens: int) -> "Defaults":
        return cls(chat.temperature, chat.top_p, chat.top_k, chat.repetition_penalty, max_tokens)


class Outbox:
    """Engine events on their way to the requests' queues on the event loop. The engine thread emits one event
    per busy row at every decode step; a wake-up of the loop per event (call_soon_threadsafe writes to its
    self-pipe each time) cost more than the step on a small model, so the events gathered until the loop runs
    go in one wake-up."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.lock = threading.Lock()
        self.items: list[tuple[asyncio.Queue, tuple]] = []

    def post(self, queue: asyncio.Queue, ev: tuple) -> None:
        """(the engine thread) Queue `ev` for `queue`; wake the loop unless a wake-up is already on its way."""
        with self.lock:
            self.items.append((queue, ev))
            if len(self.items) > 1:
                return
        try:
            self.loop.call_soon_threadsafe(self.flush)
        except RuntimeError:     # the event loop has closed: nobody is listening any more
            with self.lock:
                self.items.clear()

    def flush(self) -> None:
        with self.lock:
            items, self.items = self.items, []
        for queue, ev in items:
            queue.put_nowait(ev)


def _param(loc) -> str | None:
    parts = [str(p) for p in loc if p != "body"]
    return ".".join(parts) or None


def _error_handlers(app: FastAPI) -> None:
    """Every error in OpenAI's shape: ours, a request that does not validate, an HTTP error, a bug."""

    @app.exception_handler(api.ApiError)
    async def _api_error(_, e: api.ApiError):
        return error_response(e)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_, e: RequestValidationError):
        errs = e.errors()
        first = errs[0] if errs else {"loc": (), "msg": "invalid request", "type": ""}
        if first.get("type") == "json_invalid":
            return error_response(api.ApiError(400, f"the body is not valid JSON: {first.get('msg')}",
                                                code="invalid_json"))
        param = _param(first.get("loc", ()))
        more = f" (and {len(errs) - 1} more)" if len(errs) > 1 else ""
        msg = f"{param or 'body'}: {first.get('msg')}{more}"
        return error_response(api.ApiError(400, msg, param=param, code=first.get("type") or None))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_, e: StarletteHTTPException):
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return error_response(api.ApiError(e.status_code, str(e.detail), type=kind, headers=e.headers))

    @app.exception_handler(Exception)
    async def _bug(_, e: Exception):
        return error_response(api.ApiError(500, f"internal error: {type(e).__name__}: {e}", type="server_error"))


class Completions:
    """POST /v1/chat/completions: a request checked and turned into the engine's, then streamed or collected."""

    def __init__(self, engine: Engine, tok, model_id: str, defaults: Defaults, limits: Limits, state):
        self.engine, self.tok, self.model_id, self.defaults, self.limits, self.state = \
            engine, tok, model_id, defaults, limits, state
        self.fingerprint = f"zc-{model_id}"
        self.outboxes: dict[asyncio.AbstractEventLoop, Outbox] = {}     # one per event loop (uvicorn runs one)

    def engine_request(self, body: api.ChatCompletionRequest, emit) -> EngineRequest:
        engine, limits, defaults, model_id = self.engine, self.limits, self.defaults, self.model_id
        if body.model != model_id:
            raise api.ApiError(404, f"model {body.model!r} is not served here; use {model_id!r} (GET /v1/models)",
                               type="not_found_error", param="model", code="model_not_found")
        if body.n > engine.slots:
            raise api.ApiError(400, f"n = {body.n} is more than this server's {engine.slots} slots", param="n")
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        if len(stop) > api.MAX_STOP or any(not s for s in stop):
            raise api.ApiError(400, f"stop: up to {api.MAX_STOP} non-empty strings", param="stop")
        asked = body.max_completion_tokens or body.max_tokens
        if asked is not None and asked > limits.max_tokens:
            raise api.ApiError(400, f"max_tokens {asked} is above this server's limit of {limits.max_tokens}",
                               param="max_completion_tokens" if body.max_completion_tokens else "max_tokens")
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                    for m in body.messages]
        prompt = self.tok.encode_chat(messages, add_generation_prompt=True)[0]
        if len(prompt) >= engine.max_len:
            raise api.ApiError(400, f"the messages are {len(prompt)} tokens; this model's context is "
                               f"{engine.max_len} (and the answer needs room): shorten them", param="messages",
                               code="context_length_exceeded")
        sampling = Sampling(
            max_tokens=asked or defaults.max_tokens,
            temperature=defaults.temperature if body.temperature is None else body.temperature,
            top_p=defaults.top_p if body.top_p is None else body.top_p,
            top_k=defaults.top_k, repetition_penalty=defaults.repetition_penalty, stop=tuple(stop), seed=body.seed)
        return EngineRequest(prompt=prompt, sampling=sampling, n=body.n, emit=emit)

    def submit(self, req: EngineRequest) -> None:
        if self.state.draining:
            raise api.ApiError(503, "the server is shutting down; retry on another instance", type="server_error",
                               code="shutting_down")
        try:
            self.engine.submit(req)
        except QueueFull as e:
            raise api.ApiError(429, f"too many requests waiting ({e}); retry shortly", type="rate_limit_error",
                               code="queue_full", headers={"Retry-After": "1"}) from None
        except Draining:
            raise api.ApiError(503, "the server is shutting down", type="server_error",
                               code="shutting_down") from None
        except EngineFailed as e:
            raise api.ApiError(503, f"the model engine has stopped ({e}): this server cannot answer until it is "
                               "restarted", type="server_error", code="engine_failed") from None

    async def __call__(self, body: api.ChatCompletionRequest, request: Request):
        engine, model_id = self.engine, self.model_id
        loop = asyncio.get_running_loop()
        outbox = self.outboxes.get(loop) or self.outboxes.setdefault(loop, Outbox(loop))
        events: asyncio.Queue = asyncio.Queue()
        def emit(ev):   # called from the engine thread
            outbox.post(events, ev)
        req = self.engine_request(body, emit)
        self.submit(req)
        cid = f"chatcmpl-{secrets.token_hex(12)}"
        now = int(time.time())
        if body.stream:
            usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(_stream(engine, req, events, cid, now, model_id, self.fingerprint, usage),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        texts, reasons = [""] * body.n, ["length"] * body.n
        try:
            while True:
                try:
                    ev = await asyncio.wait_for(events.get(), timeout=0.5)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        engine.cancel(req)
                        return JSONResponse({}, status_code=499)
                    continue
                if ev[0] == "text":
                    texts[ev[1]] += ev[2]
                elif ev[0] == "finish":
                    reasons[ev[1]] = ev[2]
                elif ev[0] == "error":
                    raise _engine_error(ev)
                else:
                    return api.ChatCompletion(
                        id=cid, created=now, model=model_id, system_fingerprint=self.fingerprint,
                        usage=api.Usage(**ev[1]),
                        choices=[api.Choice(index=i, message=api.AssistantMessage(content=texts[i]),
                                            finish_reason=reasons[i]) for i in range(body.n)])
        finally:
            engine.cancel(req)    # a no-op once it finished; frees its slots if the handler was cancelled


def create_app(engine: Engine, tok, model_id: str, *, defaults: Defaults, limits: Limits = Limits(),
               api_key: str | None = None) -> FastAPI:
    if api_key is not None and not api_key:
        raise ValueError("api_key '' would leave /v1 open: pass None for no key")
    app = FastAPI(title="zero-chatgpt", version="1", summary=f"OpenAI-compatible chat API over {model_id}",
                  docs_url=None, redoc_url=None)
    app.state.draining = False
    app.add_middleware(Gate, api_key=api_key, max_body=limits.max_body_bytes, body_timeout=limits.body_timeout,
                       state=app.state)
    _error_handlers(app)
    completions = Completions(engine, tok, model_id, defaults, limits, app.state)
    card = api.ModelCard(id=model_id, created=int(time.time()), owned_by="zero-chatgpt")

    @app.get("/", include_in_schema=False)
    async def page():
        return HTMLResponse((STATIC / "index.html").read_text(encoding="utf-8"))

    @app.get("/health", response_model=api.Health, response_model_exclude_none=True,
             responses={503: {"model": api.Health, "description": "the engine has failed: restart the server"}})
    async def health():
        if engine.failed:     # non-200, so that a load balancer or supervisor takes this instance out
            body = api.Health(status="failed", model=model_id, error=engine.failed, **engine.load())
            return JSONResponse(body.model_dump(exclude_none=True), status_code=503)
        return api.Health(status="draining" if app.state.draining else "ok", model=model_id, **engine.load())

    @app.get("/v1/models", response_model=api.ModelList, responses=api.ERRORS_V1)
    async def models():
        return api.ModelList(data=[card])

    @app.get("/v1/models/{model}", response_model=api.ModelCard, responses=api.ERRORS_V1)
    async def model(model: str):
        if model != model_id:
            raise api.ApiError(404, f"model {model!r} is not served here; this server serves {model_id!r}",
                               type="not_found_error", param="model", code="model_not_found")
        return card

    @app.post("/v1/chat/completions", response_model=api.ChatCompletion,
              responses={200: {"content": {"text/event-stream": {"schema": {
                  "type": "string", "description": "`data: <ChatCompletionChunk JSON>` events, then `data: [DONE]`"}}}},
                  **api.ERRORS_CHAT})
    async def chat_completions(body: api.ChatCompletionRequest, request: Request):
        return await completions(body, request)

    return app


def _engine_error(ev: tuple) -> api.ApiError:
    """An engine ("error", message, status, code) event in OpenAI's error shape."""
    _, message, status, code = ev
    return api.ApiError(status, message, type="server_error", code=code)


async def _stream(engine, req, events, cid, now, model_id, fingerprint, include_usage):
    def chunk(choices, usage=None) -> str:
        c = api.ChatCompletionChunk(id=cid, created=now, model=model_id, system_fingerprint=fingerprint,
                                    choices=choices, usage=usage)
        return f"data: {c.model_dump_json()}\n\n"
    try:
        for i in range(req.n):
            yield chunk([api.ChunkChoice(index=i, delta=api.Delta(role="assistant", content=""))])
        while True:
            # Every event already queued goes out in one write (still one `data:` event each): under load the
            # loop falls behind the engine, and a send per event would widen the gap.
            out, ev = [], await events.get()
            while True:
                if ev[0] == "text":
                    out.append(chunk([api.ChunkChoice(index=ev[1], delta=api.Delta(content=ev[2]))]))
                elif ev[0] == "finish":
                    out.append(chunk([api.ChunkChoice(index=ev[1], delta=api.Delta(), finish_reason=ev[2])]))
                elif ev[0] == "error":
                    out.append(f"data: {json.dumps(_engine_error(ev).body())}\n\n")
                    break
                else:
                    if include_usage:
                        out.append(chunk([], usage=api.Usage(**ev[1])))
                    out.append("data: [DONE]\n\n")
                    break
                if events.empty():
                    break
                ev = events.get_nowait()
            yield "".join(out)
            if ev[0] in ("error", "done"):
                return
    finally:
        engine.cancel(req)     # the client went away mid-stream: its slots are free at the next step


def run_command(ctx) -> None:
    rd, a = ctx.run_dir, ctx.args
    host, key = a.get("host") or "127.0.0.1", a.get("api_key")
    check_api_key(key)               # before torch and the model load: a refusal answers at once
    check_exposure(host, key, bool(a.get("insecure")))

    stage, model, tok = load_chat_model(ctx)
    limits = Limits(max_tokens=int(a.get("max_tokens") or 512), drain_timeout=float(a.get("drain_timeout") or 30),
                    body_timeout=float(a.get("body_timeout") or 10))
    defaults = Defaults.of(ctx.cfg.chat, max_tokens=min(256, limits.max_tokens))
    slots = int(a.get("slots") or 8)
    try:
        engine = Engine(model, tok, slots=slots, queue=int(a.get("queue") or 64)).start()
    except CacheTooLarge as e:
        raise UserError(f"cannot allocate the KV cache for --slots {slots} ({e}): each slot holds the model's whole "
                        f"context of {model.config.max_position_embeddings} positions "
                        f"({e.per_slot / 2**20:,.1f} MiB); lower --slots (--max-tokens does not change it)") from None
    app = create_app(engine, tok, stage, defaults=defaults, limits=limits, api_key=key)

    def started(port: int) -> None:
        shown = f"[{host}]" if ":" in host else host
        how = (", API key required" if key else
               "" if is_loopback(host) else ", with no API key: open to anyone who reaches it (--insecure)")
        say(f"serving {stage} ({stage_model_path(rd, stage)}) on http://{shown}:{port}: web chat at /, "
            f"API at /v1 (model id {stage!r}){how}; Ctrl-C to stop")
    try:
        serve(app, engine, host, int(a.get("port") if a.get("port") is not None else 8000), limits.drain_timeout,
              on_start=started)
    finally:
        engine.stop()
