#!/usr/bin/env python
"""Step 8: serve the classifier over HTTP (FastAPI + uvicorn), with a web page.

POST /v1/classify {"messages": ["...", ...]} answers a verdict (spam/ham) and P(spam) for each
message, in order. Requests that arrive within --max-wait-ms of each other are scored together in
one forward pass (micro-batching, at most --max-batch messages). GET / is a page to try it,
GET /docs the OpenAPI docs, GET /healthz says whether the model is loaded.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import hmac
import json
import logging
import math
import os
import socket
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (first: sets up the fast BLAS before anything imports mlx)
from common import UserError  # noqa: E402

import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402
import uvicorn  # noqa: E402
from fastapi import FastAPI, Request  # noqa: E402
from fastapi.exceptions import RequestValidationError  # noqa: E402
from fastapi.responses import HTMLResponse, JSONResponse, Response  # noqa: E402
from fastapi.staticfiles import StaticFiles  # noqa: E402
from pydantic import BaseModel, Field, StrictStr  # noqa: E402
from starlette.exceptions import HTTPException  # noqa: E402

STATIC_DIR = Path(__file__).resolve().parent / "static"
EVAL_REPORT = "eval_retrained.json"
API_KEY_ENV = "SMS_API_KEY"
# Paths anyone may fetch when an API key is set: the health check, the page and its files, the
# API docs (the schema is no secret; the docs' "Authorize" button sends the key to the API).
PUBLIC_PATHS = {"/", "/healthz", "/favicon.ico", "/docs", "/docs/oauth2-redirect", "/openapi.json"}
PUBLIC_PREFIXES = ("/static/",)
DRAIN_BYTES = 1 << 20  # read at most this much of a too-large body, so the client sees the 413

log = logging.getLogger("sms_serve")


@dataclass
class Settings:
    """What the server allows and how it batches (the command line's options)."""

    max_batch: int = 64          # messages in one model call
    score_batch: int = 16        # messages per forward pass within a call (sorted by length)
    max_wait_ms: float = 5.0     # how long a batch waits for more requests
    max_messages: int = 64       # messages in one request
    max_chars: int = 2000        # characters in one message
    max_body_bytes: int = 256 * 1024
    max_queue: int = 4096        # messages waiting for the model; more -> 503
    api_key: str | None = None
    stress_suite: Path = common.STRESS_SUITE

    def public(self) -> dict:
        d = asdict(self)
        d.pop("api_key")
        d.pop("stress_suite")
        d["api_key_required"] = bool(self.api_key)
        return d


# ---------------------------------------------------------------------------------------------
# What /v1/model reports.


def read_json(path: Path):
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def model_info(model_dir: Path, adapter_path: Path | None, threshold: float,
               reports_dir: Path | None = common.REPORTS_DIR) -> dict:
    """The served model: its folder, the base model, the adapter config (in the adapter folder,
    or carried into a fused folder), the threshold and the test metrics of step 4 if present."""
    model_dir = Path(model_dir)
    config_dir = Path(adapter_path) if adapter_path is not None else model_dir
    adapter_config = read_json(config_dir / "adapter_config.json")
    if not isinstance(adapter_config, dict):
        adapter_config = None
    base = (adapter_config or {}).get("model") if adapter_path is None else None
    test_metrics = None
    if reports_dir is not None:
        report = read_json(Path(reports_dir) / EVAL_REPORT)
        if isinstance(report, dict) and isinstance(report.get("test"), dict):
            test_metrics = {"report": str(Path(reports_dir) / EVAL_REPORT), **report["test"]}
    return {
        "model": str(model_dir),
        "base_model": str(base or model_dir),
        "adapter_path": None if adapter_path is None else str(adapter_path),
        "fused": adapter_path is None and adapter_config is not None,
        "adapter_config": adapter_config,
        "threshold": threshold,
        "test_metrics": test_metrics,
    }


def read_examples(path: Path) -> list[dict]:
    """The stress suite's "final boss" messages, for the page's one-click examples."""
    try:
        rows = common.read_jsonl(path)
    except (OSError, ValueError):
        log.warning("no examples: cannot read %s", path)
        return []
    return [{"id": r.get("id"), "text": r["text"], "label": r.get("label")}
            for r in rows if r.get("category") == "final-boss" and isinstance(r.get("text"), str)]


# ---------------------------------------------------------------------------------------------
# Micro-batching: requests put their messages on a queue; one worker task takes what arrived
# within max_wait_ms (at most max_batch messages), scores it in one call on the single model
# thread (MLX is not safe for concurrent use), and hands each request its own results.


class ScoringError(Exception):
    pass


class Busy(Exception):
    pass


@dataclass
class Piece:
    messages: list[str]
    future: asyncio.Future
    arrived: float


@dataclass
class Stats:
    requests: int = 0
    batches: int = 0
    messages: int = 0
    max_batch_seen: int = 0
    dropped_messages: int = 0     # queued for a client that went away: never scored
    disconnects: int = 0
    rejected_busy: int = 0
    model_seconds: float = 0.0
    batch_sizes: dict = field(default_factory=dict)

    def public(self) -> dict:
        d = asdict(self)
        d["model_seconds"] = round(self.model_seconds, 4)
        d["mean_batch"] = round(self.messages / self.batches, 3) if self.batches else 0.0
        d["batch_sizes"] = {str(k): v for k, v in sorted(self.batch_sizes.items())}
        return d


class Scorer:
    def __init__(self, model, tokenizer, settings: Settings,
                 loader: Callable[[], tuple] | None = None,
                 on_load_error: Callable[[str], None] | None = None):
        self.model, self.tokenizer = model, tokenizer
        self.settings = settings
        self.loader, self.on_load_error = loader, on_load_error
        self.load_error: str | None = None
        self.stats = Stats()
        self.pending: collections.deque[Piece] = collections.deque()
        self.queued = 0
        self.wakeup: asyncio.Event | None = None
        self.worker: asyncio.Task | None = None
        self.loading: asyncio.Task | None = None
        self.executor: ThreadPoolExecutor | None = None

    # -- life cycle (the app's lifespan) --

    async def start(self):
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="mlx-model")
        self.wakeup = asyncio.Event()
        self.worker = asyncio.create_task(self._work(), name="micro-batcher")
        if self.model is None and self.loader is not None:
            self.loading = asyncio.create_task(self._load(), name="model-loader")

    async def stop(self):
        for task in (self.loading, self.worker):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        for piece in self.pending:
            if not piece.future.done():
                piece.future.cancel()
        self.pending.clear()
        if self.executor is not None:
            # MLX's streams of the model thread must be destroyed on that thread before it ends,
            # else the process may abort at exit ("terminate called without an active
            # exception"). This waits for a model call in progress, if any.
            with contextlib.suppress(Exception):
                await asyncio.get_running_loop().run_in_executor(self.executor, mx.clear_streams)
            self.executor.shutdown(wait=True)

    async def _load(self):
        started = time.perf_counter()
        try:
            model, tokenizer = await asyncio.get_running_loop().run_in_executor(
                self.executor, self.loader)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # UserError included: the server cannot serve without a model
            self.load_error = str(e) or type(e).__name__
            log.error("cannot load the model: %s", self.load_error)
            if self.on_load_error is not None:
                self.on_load_error(self.load_error)
            return
        self.model, self.tokenizer = model, tokenizer
        log.info("model loaded in %.1f s", time.perf_counter() - started)

    @property
    def ready(self) -> bool:
        return (self.model is not None and self.worker is not None and not self.worker.done())

    # -- requests --

    async def classify(self, messages: list[str]) -> list[float]:
        """P(spam) of each message, scored together with whatever else arrives meanwhile."""
        if self.queued + len(messages) > self.settings.max_queue:
            self.stats.rejected_busy += 1
            raise Busy(f"{self.queued} messages are waiting for the model")
        loop = asyncio.get_running_loop()
        now = loop.time()
        step = self.settings.max_batch
        pieces = [Piece(messages[i: i + step], loop.create_future(), now)
                  for i in range(0, len(messages), step)]
        for piece in pieces:
            self.pending.append(piece)
            self.queued += len(piece.messages)
        self.wakeup.set()
        try:
            parts = await asyncio.gather(*(p.future for p in pieces))
        except BaseException:
            for p in pieces:  # a client gone (cancelled) or a failed piece: drop the rest
                if not p.future.done():
                    p.future.cancel()
            raise
        return [x for part in parts for x in part]

    async def _collect(self) -> list[Piece]:
        loop = asyncio.get_running_loop()
        while not self.pending:
            self.wakeup.clear()
            await self.wakeup.wait()
        deadline = self.pending[0].arrived + self.settings.max_wait_ms / 1000
        batch, n = [], 0
        while True:
            while self.pending and n + len(self.pending[0].messages) <= self.settings.max_batch:
                piece = self.pending.popleft()
                self.queued -= len(piece.messages)
                if piece.future.done():  # its client went away while it waited
                    self.stats.dropped_messages += len(piece.messages)
                    continue
                batch.append(piece)
                n += len(piece.messages)
            if n >= self.settings.max_batch or self.pending:  # full, or the next does not fit
                return batch
            remaining = deadline - loop.time()
            if remaining <= 0:
                return batch
            self.wakeup.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.wakeup.wait(), remaining)

    def _score(self, messages: list[str]) -> list[float | None]:
        """On the model thread: one batched pass; if it fails, each message alone, so that one
        bad message cannot fail the other requests of its batch."""
        try:
            p = np.asarray(common.p_spam(self.model, self.tokenizer, messages,
                                         batch_size=self.settings.score_batch), dtype=np.float64)
            if p.shape == (len(messages),) and np.isfinite(p).all():
                return [float(x) for x in p]
            log.error("the batch gave non-finite scores; scoring its messages one by one")
        except Exception:
            log.exception("scoring a batch of %d messages failed; retrying one by one",
                          len(messages))
        out: list[float | None] = []
        for m in messages:
            try:
                x = float(common.p_spam(self.model, self.tokenizer, [m], batch_size=1)[0])
                out.append(x if math.isfinite(x) else None)
            except Exception:
                log.exception("cannot score a message of %d characters", len(m))
                out.append(None)
        return out

    async def _work(self):
        loop = asyncio.get_running_loop()
        while True:
            batch: list[Piece] = []
            try:
                batch = await self._collect()
                live = [p for p in batch if not p.future.done()]
                if not live:
                    continue
                messages = [m for p in live for m in p.messages]
                started = time.perf_counter()
                scores = await loop.run_in_executor(self.executor, self._score, messages)
                s = self.stats
                s.model_seconds += time.perf_counter() - started
                s.batches += 1
                s.messages += len(messages)
                s.max_batch_seen = max(s.max_batch_seen, len(messages))
                s.batch_sizes[len(messages)] = s.batch_sizes.get(len(messages), 0) + 1
                i = 0
                for p in live:
                    part = scores[i: i + len(p.messages)]
                    i += len(p.messages)
                    if p.future.done():  # the client left while its batch was scored
                        continue
                    if any(x is None for x in part):
                        p.future.set_exception(ScoringError("the model could not score a message"))
                    else:
                        p.future.set_result(part)
            except asyncio.CancelledError:
                for p in batch:
                    if not p.future.done():
                        p.future.cancel()
                raise
            except Exception as e:  # never let the worker die
                log.exception("micro-batch worker error")
                for p in batch:
                    if not p.future.done():
                        p.future.set_exception(ScoringError(str(e)))


# ---------------------------------------------------------------------------------------------
# ASGI middleware: the API key, and the body size limit (declared AND actually read).


async def send_json(scope, receive, send, status: int, body: dict, headers: dict | None = None):
    await JSONResponse(body, status_code=status, headers=headers)(scope, receive, send)


class ApiKeyMiddleware:
    def __init__(self, app, api_key: str):
        self.app, self.key = app, api_key.encode()

    def allowed(self, scope) -> bool:
        headers = dict(scope.get("headers") or [])
        auth = headers.get(b"authorization", b"")
        given = auth[7:].strip() if auth[:7].lower() == b"bearer " else headers.get(b"x-api-key")
        return given is not None and hmac.compare_digest(given, self.key)

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            path = scope.get("path", "")
            public = path in PUBLIC_PATHS or path.startswith(PUBLIC_PREFIXES)
            if not public and not self.allowed(scope):
                await send_json(scope, receive, send, 401,
                                {"error": "missing or wrong API key: send 'Authorization: Bearer "
                                          "KEY' or 'X-API-Key: KEY'"},
                                {"WWW-Authenticate": "Bearer"})
                return
        await self.app(scope, receive, send)


class BodyLimitMiddleware:
    """Reject a body over `limit` bytes with 413: by its Content-Length before reading it, and by
    what was actually read (a chunked body has no Content-Length). The app gets the body replayed,
    then the client's own receive channel (which tells when the client disconnects)."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        too_big = {"error": f"request body over the limit of {self.limit} bytes"}
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None:
            try:
                size = int(declared)
            except ValueError:
                size = -1
            if size < 0:
                await send_json(scope, receive, send, 400, {"error": "bad Content-Length header"})
                return
            if size > self.limit:
                await send_json(scope, receive, send, 413, too_big, {"Connection": "close"})
                return
        body, more = bytearray(), True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return  # the client left before sending its body: nothing to do
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.limit:
                drained = 0  # read a bounded rest, so the client is not reset before the 413
                while more and drained < DRAIN_BYTES:
                    message = await receive()
                    if message["type"] == "http.disconnect":
                        return
                    drained += len(message.get("body", b""))
                    more = message.get("more_body", False)
                await send_json(scope, receive, send, 413, too_big, {"Connection": "close"})
                return
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


async def wait_for_disconnect(receive):
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


# ---------------------------------------------------------------------------------------------
# The app.


class ClassifyRequest(BaseModel):
    messages: list[StrictStr] = Field(
        description="SMS messages to classify (1 to --max-messages, each 1 to --max-chars "
                    "characters, not blank)",
        examples=[["Royal Mail: your parcel is held, pay £1.45 at royalmail-fee.com",
                   "See you at 6 by the station?"]])


class Result(BaseModel):
    label: str = Field(description='"spam" or "ham"', examples=["spam"])
    p_spam: float = Field(description="P(spam) from the model; label is spam when over the "
                                      "threshold", examples=[0.97])


class ClassifyResponse(BaseModel):
    model: str
    threshold: float
    results: list[Result]


class ErrorBody(BaseModel):
    error: str


ERRORS = {code: {"model": ErrorBody, "description": what} for code, what in [
    (400, "malformed JSON"), (401, "missing or wrong API key (when one is set)"),
    (413, "request body too large"), (415, "a body that is not sent as JSON"),
    (422, "invalid request (fields, counts, lengths)"),
    (503, "model still loading, or too many messages waiting")]}


def validation_message(errors) -> tuple[int, str]:
    """FastAPI's validation errors as one line, and 400 for malformed JSON, 422 otherwise."""
    if not errors:
        return 422, "invalid request"
    e = errors[0]
    if e.get("type") == "json_invalid":
        ctx = e.get("ctx") or {}
        return 400, f"malformed JSON: {ctx.get('error', e.get('msg', ''))}".rstrip(": ")
    loc = [str(x) for x in e.get("loc", ()) if x != "body"]
    where = loc[0] if loc else "body"
    for x in loc[1:]:
        where += f"[{x}]" if x.isdigit() else f".{x}"
    msg = e.get("msg", "invalid")
    if e.get("type") == "missing":
        msg = ("expected a JSON object like {\"messages\": [\"...\"]}" if where == "body"
               else "field required")
    if where == "body":  # the body itself is not an object
        msg = "expected a JSON object like {\"messages\": [\"...\"]}"
    if where == "messages" and e.get("type") == "list_type":
        msg = "expected a list of strings"
    return 422, f"{where}: {msg}"


def is_json(content_type: str) -> bool:
    mime = content_type.split(";", 1)[0].strip().lower()
    return mime == "application/json" or (mime.startswith("application/")
                                          and mime.endswith("+json"))


def check_messages(messages: list[str], s: Settings) -> None:
    if not messages:
        raise HTTPException(422, "messages is empty: send at least one message")
    if len(messages) > s.max_messages:
        raise HTTPException(422, f"{len(messages)} messages, more than the limit of "
                                 f"{s.max_messages} per request")
    for i, m in enumerate(messages):
        if common.is_blank(m):
            raise HTTPException(422, f"messages[{i}] is blank")
        if len(m) > s.max_chars:
            raise HTTPException(422, f"messages[{i}] has {len(m)} characters, more than the "
                                     f"limit of {s.max_chars}")
        try:
            m.encode("utf-8")
        except UnicodeEncodeError:
            raise HTTPException(422, f"messages[{i}] is not valid Unicode text "
                                     "(an unpaired surrogate)")


def render_page(settings: Settings, threshold: float, examples: list[dict]) -> str:
    config = {"threshold": threshold, "api_key_required": bool(settings.api_key),
              "max_chars": settings.max_chars, "examples": examples}
    text = json.dumps(config, ensure_ascii=False).replace("<", "\\u003c")
    return (STATIC_DIR / "index.html").read_text(encoding="utf-8").replace("__CONFIG__", text)


def create_app(model, tokenizer, threshold: float, info: dict, settings: Settings | None = None,
               loader: Callable[[], tuple] | None = None,
               on_load_error: Callable[[str], None] | None = None) -> FastAPI:
    """The app. With model=None it starts not ready (503) and, given a loader, loads the model on
    the model thread after start-up; `app.state.scorer.stats` holds the batch counts."""
    settings = settings or Settings()
    scorer = Scorer(model, tokenizer, settings, loader, on_load_error)
    examples = read_examples(settings.stress_suite)
    name = info.get("model", "model")

    @contextlib.asynccontextmanager
    async def lifespan(app):
        await scorer.start()
        try:
            yield
        finally:
            await scorer.stop()

    app = FastAPI(title="SMS spam classifier",
                  description="A LoRA-fine-tuned SmolLM2-135M that tells SMS spam from ham. "
                              "Requests that arrive together are scored in one batch.",
                  version="1.0", lifespan=lifespan,
                  strict_content_type=False)  # no Content-Type: the body is read as JSON
    app.state.scorer = scorer
    app.state.settings = settings

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request: Request, exc: RequestValidationError):
        ctype = request.headers.get("content-type")
        if ctype and not is_json(ctype):  # e.g. curl -d without -H: say so, not "not an object"
            return JSONResponse({"error": f"send the body as JSON with 'Content-Type: "
                                          f"application/json' (got '{ctype[:100]}')"},
                                status_code=415)
        status, msg = validation_message(exc.errors())
        return JSONResponse({"error": msg}, status_code=status)

    @app.exception_handler(HTTPException)
    async def on_http_error(request: Request, exc: HTTPException):
        return JSONResponse({"error": str(exc.detail)}, status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def on_error(request: Request, exc: Exception):  # a bug: still JSON, never a page
        log.exception("unhandled error on %s", request.url.path)
        return JSONResponse({"error": "internal error"}, status_code=500)

    @app.post("/v1/classify", response_model=ClassifyResponse, responses=ERRORS,
              summary="Classify SMS messages")
    async def classify(body: ClassifyRequest, request: Request):
        """One result per message, in order: `label` is "spam" when `p_spam` > `threshold`."""
        check_messages(body.messages, settings)
        if not scorer.ready:
            raise HTTPException(503, scorer.load_error and f"no model: {scorer.load_error}"
                                or "the model is still loading; retry shortly",
                                headers={"Retry-After": "1"})
        scorer.stats.requests += 1
        work = asyncio.ensure_future(scorer.classify(body.messages))
        gone = asyncio.ensure_future(wait_for_disconnect(request.receive))
        try:
            await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
        if not work.done():  # the client went away: drop its messages (or results)
            work.cancel()
            scorer.stats.disconnects += 1
            with contextlib.suppress(BaseException):
                await work
            return Response(status_code=499)
        try:
            scores = work.result()
        except Busy as e:
            raise HTTPException(503, f"server busy: {e}; retry later",
                                headers={"Retry-After": "1"})
        except ScoringError as e:
            raise HTTPException(500, f"internal error while scoring: {e}")
        except asyncio.CancelledError:  # the server stopped under this request
            raise HTTPException(503, "the server is shutting down")
        return {"model": name, "threshold": threshold,
                "results": [{"label": "spam" if p > threshold else "ham", "p_spam": round(p, 6)}
                            for p in scores]}

    @app.get("/healthz", summary="Ready to serve?")
    async def healthz():
        """200 `{"status": "ok"}` once the model is loaded, 503 before (or if loading failed)."""
        if scorer.ready:
            return {"status": "ok"}
        body = {"status": "error", "error": scorer.load_error} if scorer.load_error \
            else {"status": "loading"}
        return JSONResponse(body, status_code=503)

    @app.get("/v1/model", summary="The served model")
    async def model_endpoint():
        """Model folder, base model, adapter config, threshold, test metrics, server limits."""
        return {**info, "threshold": threshold, "ready": scorer.ready,
                "settings": settings.public()}

    @app.get("/v1/stats", summary="Micro-batching counters")
    async def stats():
        """Requests, model calls (batches), messages scored, the largest batch, and more."""
        return {**scorer.stats.public(), "queued": scorer.queued}

    @app.get("/v1/examples", summary="The five 'final boss' messages of the stress suite")
    async def examples_endpoint():
        return {"examples": examples}

    page_html = render_page(settings, threshold, examples)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page():
        return HTMLResponse(page_html)

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    base_openapi = app.openapi

    def openapi():
        schema = base_openapi()
        if settings.api_key and "security" not in schema:
            schema.setdefault("components", {})["securitySchemes"] = {
                "bearer": {"type": "http", "scheme": "bearer"},
                "apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"}}
            schema["security"] = [{"bearer": []}, {"apiKey": []}]
        return schema

    app.openapi = openapi
    app.add_middleware(BodyLimitMiddleware, limit=settings.max_body_bytes)
    if settings.api_key:
        app.add_middleware(ApiKeyMiddleware, api_key=settings.api_key)  # outermost
    return app


# ---------------------------------------------------------------------------------------------
# Running it: a bound socket (port 0 picks a free one), uvicorn in this thread or another.


def bind_socket(host: str, port: int) -> socket.socket:
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError as e:
        raise UserError(f"cannot listen on {host}:{port}: {e.strerror or e}")
    sock.set_inheritable(True)
    return sock


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


class BackgroundServer:
    """uvicorn serving `app` in a thread, on a port of its own (tests, the load test):

        with BackgroundServer(app) as srv: ... srv.url ...
    """

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning"):
        self.sock = bind_socket(host, port)
        self.url = url_of(self.sock)
        self.server = uvicorn.Server(uvicorn.Config(app, log_level=log_level, access_log=False,
                                                    lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]},
                                       daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(timeout=15)
        self.sock.close()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common.add_model_args(p, common.FUSED_DIR)
    common.add_threshold_arg(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback)")
    p.add_argument("--port", type=int, default=8000, help="port (0: any free one; default 8000)")
    p.add_argument("--max-wait-ms", type=float, default=5.0,
                   help="how long a batch waits for more requests (default 5)")
    p.add_argument("--max-batch", type=int, default=64, help="messages per model call (64)")
    p.add_argument("--score-batch", type=int, default=16,
                   help="messages per forward pass inside a model call: the call sorts its "
                        "messages by length and pads each pass to its longest, so smaller "
                        "passes waste less on padding (CPU); larger suit a GPU (default 16)")
    p.add_argument("--max-messages", type=int, default=64, help="messages per request (64)")
    p.add_argument("--max-chars", type=int, default=2000, help="characters per message (2000)")
    p.add_argument("--max-body-bytes", type=int, default=256 * 1024,
                   help="request body size limit (256 KiB)")
    p.add_argument("--max-queue", type=int, default=4096,
                   help="messages waiting for the model before requests get 503 (4096)")
    p.add_argument("--api-key", default=os.environ.get(API_KEY_ENV) or None,
                   help=f"require this key (default: ${API_KEY_ENV}; unset: no key)")
    p.add_argument("--reports", type=Path, default=common.REPORTS_DIR,
                   help=f"where {EVAL_REPORT} (test metrics for /v1/model) is (default reports/)")
    p.add_argument("--log-level", default="info",
                   choices=["critical", "error", "warning", "info", "debug"])
    p.add_argument("--access-log", action=argparse.BooleanOptionalAction, default=True,
                   help="log each request (default on)")
    return p


def settings_from(args) -> Settings:
    for name in ("max_batch", "score_batch", "max_messages", "max_chars", "max_body_bytes", "max_queue"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1")
    if not (0 <= args.max_wait_ms <= 10_000):
        raise UserError("--max-wait-ms must be between 0 and 10000")
    if not (0 <= args.port <= 65535):
        raise UserError("--port must be between 0 and 65535")
    if args.max_queue < args.max_messages:
        raise UserError("--max-queue must be at least --max-messages")
    return Settings(max_batch=args.max_batch, score_batch=args.score_batch,
                    max_wait_ms=args.max_wait_ms,
                    max_messages=args.max_messages, max_chars=args.max_chars,
                    max_body_bytes=args.max_body_bytes, max_queue=args.max_queue,
                    api_key=args.api_key or None)


@common.cli
def main(argv=None):
    args = build_parser().parse_args(argv)
    settings = settings_from(args)
    if not (args.model / "config.json").is_file():  # fail before listening; loading comes later
        step = "scripts/06_fuse.py" if args.model == common.FUSED_DIR else "the step that makes it"
        raise UserError(f"no model at {args.model} (config.json missing): run {step} first")
    if args.adapter_path is not None and not (args.adapter_path / "adapter_config.json").is_file():
        raise UserError(f"no adapters at {args.adapter_path}: run scripts/03_train.py first")
    threshold = common.verdict_threshold(args)
    info = model_info(args.model, args.adapter_path, threshold, args.reports)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s: %(message)s")

    sock = bind_socket(args.host, args.port)
    failed: list[str] = []
    server: uvicorn.Server | None = None

    def on_load_error(msg: str):
        failed.append(msg)
        if server is not None:
            server.should_exit = True

    app = create_app(None, None, threshold, info, settings,
                     loader=lambda: common.load_model(
                         args.model, args.adapter_path, trust_remote_code=args.trust_remote_code),
                     on_load_error=on_load_error)
    server = uvicorn.Server(uvicorn.Config(app, log_level=args.log_level,
                                           access_log=args.access_log, lifespan="on"))
    url = url_of(sock)
    print(f"Serving {args.model}{' + ' + str(args.adapter_path) if args.adapter_path else ''} "
          f"(threshold {threshold:.3f}) on {url}  (page {url}/, docs {url}/docs"
          f"{', API key required' if settings.api_key else ''})", flush=True)
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
    if failed:
        raise UserError(failed[0])


if __name__ == "__main__":
    main()
