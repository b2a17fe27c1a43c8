"""The FastAPI app: POST /v1/classify, the health check, the model and batching reports, the page.

Each route reads what it needs from `request.app.state` (scorer, settings, threshold, info,
examples, page), which create_app fills."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from typing import Callable

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException
from starlette.middleware.cors import CORSMiddleware

from ..paths import STATIC_DIR
from ..task import verdict
from .batcher import Busy, Scorer, ScoringError, ShuttingDown
from .info import read_examples
from .middleware import ApiKeyMiddleware, BodyLimitMiddleware, HostOriginMiddleware, \
    SecurityHeadersMiddleware, wait_for_disconnect
from .schema import ERRORS, ClassifyRequest, ClassifyResponse, check_messages, check_tokens, \
    is_json, validation_message
from .settings import Settings

log = logging.getLogger("sms_serve")

router = APIRouter()


@router.post("/v1/classify", response_model=ClassifyResponse, responses=ERRORS,
             summary="Classify SMS messages")
async def classify(body: ClassifyRequest, request: Request):
    """One result per message, in order: `label` is "spam" when `p_spam` > `threshold`."""
    state = request.app.state
    scorer: Scorer = state.scorer
    check_messages(body.messages, state.settings)
    if not scorer.ready:
        raise HTTPException(503, scorer.load_error and f"no model: {scorer.load_error}"
                            or "the model is still loading; retry shortly",
                            headers={"Retry-After": "1"})
    costs = await scorer.count_tokens(body.messages)
    check_tokens(costs, state.settings)
    scorer.stats.requests += 1
    work = asyncio.ensure_future(scorer.classify(body.messages, costs))
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
        raise HTTPException(503, f"server busy: {e}; retry later", headers={"Retry-After": "1"})
    except ScoringError as e:
        raise HTTPException(500, f"internal error while scoring: {e}")
    except (ShuttingDown, asyncio.CancelledError):  # the server stopped under this request
        raise HTTPException(503, "the server is shutting down")
    threshold = state.threshold
    return {"model": state.info.get("model", "model"), "threshold": threshold,
            "results": [{"label": verdict(p, threshold), "p_spam": round(p, 6)} for p in scores]}


@router.get("/healthz", summary="Ready to serve?")
async def healthz(request: Request):
    """200 `{"status": "ok"}` once the model is loaded, 503 before (or if loading failed)."""
    scorer: Scorer = request.app.state.scorer
    if scorer.ready:
        return {"status": "ok"}
    body = {"status": "error", "error": scorer.load_error} if scorer.load_error \
        else {"status": "loading"}
    return JSONResponse(body, status_code=503)


@router.get("/v1/model", summary="The served model")
async def model_endpoint(request: Request):
    """Model folder, base model, adapter config, threshold, test metrics, server limits."""
    state = request.app.state
    return {**state.info, "threshold": state.threshold, "ready": state.scorer.ready,
            "settings": state.settings.public()}


@router.get("/v1/stats", summary="Micro-batching counters")
async def stats(request: Request):
    """Requests, model calls (batches), messages scored, the largest batch, what is waiting."""
    scorer: Scorer = request.app.state.scorer
    return {**scorer.stats.public(), "queued": scorer.queued,
            "queued_tokens": scorer.queued_tokens}


@router.get("/v1/examples", summary="The five 'final boss' messages of the stress suite")
async def examples_endpoint(request: Request):
    return {"examples": request.app.state.examples}


@router.get("/", response_class=HTMLResponse, include_in_schema=False)
async def page(request: Request):
    return HTMLResponse(request.app.state.page)


def add_error_handlers(app: FastAPI) -> None:
    """Every error is JSON `{"error": "..."}`, in one line a user can act on."""

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request: Request, exc: RequestValidationError):
        ctype = request.headers.get("content-type")
        if not ctype or not is_json(ctype):  # e.g. curl -d without -H: say so
            # (a page of another site can send a body without a preflight only as text/plain,
            # a form or no type at all: none of them is read)
            got = f"got '{ctype[:100]}'" if ctype else "none was sent"
            return JSONResponse({"error": f"send the body as JSON with 'Content-Type: "
                                          f"application/json' ({got})"}, status_code=415)
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


def render_page(settings: Settings, threshold: float, examples: list[dict]) -> str:
    config = {"threshold": threshold, "api_key_required": bool(settings.api_key),
              "max_chars": settings.max_chars, "examples": examples}
    text = json.dumps(config, ensure_ascii=False).replace("<", "\\u003c")
    return (STATIC_DIR / "index.html").read_text(encoding="utf-8").replace("__CONFIG__", text)


def secured_openapi(app: FastAPI, settings: Settings) -> Callable[[], dict]:
    """The OpenAPI schema, saying that a key is needed when one is."""
    base = app.openapi

    def openapi():
        schema = base()
        if settings.api_key and "security" not in schema:
            schema.setdefault("components", {})["securitySchemes"] = {
                "bearer": {"type": "http", "scheme": "bearer"},
                "apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"}}
            schema["security"] = [{"bearer": []}, {"apiKey": []}]
        return schema

    return openapi


def create_app(model, tokenizer, threshold: float, info: dict, settings: Settings | None = None,
               loader: Callable[[], tuple] | None = None,
               on_load_error: Callable[[str], None] | None = None) -> FastAPI:
    """The app. With model=None it starts not ready (503) and, given a loader, loads the model on
    the model thread after start-up; `app.state.scorer.stats` holds the batch counts."""
    settings = settings or Settings()
    scorer = Scorer(model, tokenizer, settings, loader, on_load_error)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        await scorer.start()
        try:
            yield
        finally:
            await scorer.stop()

    app = FastAPI(title="SMS spam classifier",
                  description="A LoRA-fine-tuned small language model that tells SMS spam from "
                              "ham (GET /v1/model says which). "
                              "Requests that arrive together are scored in one batch.",
                  version="1.0", lifespan=lifespan)
    examples = read_examples(settings.stress_suite)
    app.state.scorer, app.state.settings, app.state.info = scorer, settings, info
    app.state.threshold, app.state.examples = threshold, examples
    app.state.page = render_page(settings, threshold, examples)
    add_error_handlers(app)
    app.include_router(router)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    app.openapi = secured_openapi(app, settings)
    add_middleware(app, settings)
    return app


def add_middleware(app: FastAPI, settings: Settings) -> None:
    """From the outside in: security headers on every answer; Host and Origin; CORS for the
    origins allowed (answering their preflights before the key is asked for); the API key;
    the body limit."""
    app.add_middleware(BodyLimitMiddleware, limit=settings.max_body_bytes)
    if settings.api_key:
        app.add_middleware(ApiKeyMiddleware, api_key=settings.api_key)
    if settings.allow_origin:
        app.add_middleware(CORSMiddleware, allow_origins=list(settings.allow_origin),
                           allow_methods=["GET", "POST"], max_age=600,
                           allow_headers=["Content-Type", "Authorization", "X-API-Key"])
    app.add_middleware(HostOriginMiddleware, allow_host=settings.allow_host,
                       allow_origin=settings.allow_origin)
    app.add_middleware(SecurityHeadersMiddleware)
