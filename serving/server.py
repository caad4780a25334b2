"""An OpenAI-compatible server over a serving engine: ``model`` is an adapter, ``mix:...``, a bundle task or ``auto``.

Routes: ``POST /v1/completions``, ``POST /v1/chat/completions`` (both stream with ``stream: true``),
``GET /v1/models``, ``GET /health``, ``GET /metrics`` (Prometheus). Every response says which composition
ran (a ``composition`` object in the body, and the ``x-loramerge-composition`` header); a structured mix can
be sent as ``composition: {adapters: {name: weight}, method}`` next to ``model``. Bodies over the limit are
refused (413) before they are parsed; malformed, out-of-bounds or unservable requests get a 4xx with the
reason, in OpenAI's error shape (5xx only for the server's own faults).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from loramerge.errors import LoramergeError

from .engine import GenerationOutput, GenerationRequest, ServingEngine, StreamEvent
from .errors import CompositionError, http_status
from .http import BodyLimit, error_response
from .metrics import Metrics
from .schemas import MAX_PROMPTS_PER_REQUEST, ChatBody, CompletionBody, usage

log = logging.getLogger("loramerge.serving")

Chunk = Callable[[str, StreamEvent, bool], dict]
Render = Callable[[list[GenerationOutput]], dict]


def _require_server_deps() -> None:
    try:
        import fastapi  # noqa: F401
        import prometheus_client  # noqa: F401
    except ImportError as exc:
        raise ImportError("the server needs FastAPI, uvicorn and prometheus-client: "
                          "pip install 'loramerge[serve]'") from exc


@dataclass
class ServerState:
    """What every route handler needs: the engine, the metrics, the served name and the load limit."""

    engine: ServingEngine
    served: str
    max_inflight: int
    metrics: Metrics = field(default_factory=Metrics)
    created: int = field(default_factory=lambda: int(time.time()))
    inflight: int = 0

    def fail(self, endpoint: str, exc: BaseException) -> Any:
        """The error response for ``exc``: its 4xx and message (with the fix), or a logged 500."""
        status = http_status(exc)
        self.metrics.count(endpoint, status)
        if status >= 500:
            log.exception("request failed", exc_info=exc)
            return error_response(status, "internal error", "server_error")
        message = exc.message if isinstance(exc, LoramergeError) else str(exc)
        if isinstance(exc, LoramergeError) and exc.module:  # the module, never the server's file paths
            message += f" (module: {exc.module})"
        if isinstance(exc, LoramergeError) and exc.fix:
            message += f" (fix: {exc.fix})"
        return error_response(status, message, "not_found_error" if status == 404 else "invalid_request_error")

    async def run(self, endpoint: str, requests: list[GenerationRequest], render: Render) -> Any:
        """Generate every request (concurrently) and render one JSON response."""
        from fastapi.responses import JSONResponse

        if self.inflight >= self.max_inflight:
            self.metrics.count(endpoint, 503)
            return error_response(503, "server busy, retry later", "server_busy")
        self.inflight += 1
        self.metrics.inflight.inc()
        try:
            outputs = await asyncio.gather(*(self.engine.agenerate(r) for r in requests))
        except Exception as exc:  # noqa: BLE001 - mapped to a status code
            return self.fail(endpoint, exc)
        finally:
            self.inflight -= 1
            self.metrics.inflight.dec()
        for out in outputs:
            self.metrics.observe(out.composition)
            self.metrics.tokens.inc(len(out.token_ids))
        self.metrics.count(endpoint, 200)
        return JSONResponse(render(outputs), headers={"x-loramerge-composition": outputs[0].composition["label"]})

    async def stream(self, endpoint: str, request: GenerationRequest, chunk: Chunk) -> Any:
        """Server-sent events, one per decoded token; errors after the first byte are reported in-band."""
        from fastapi.responses import StreamingResponse

        try:
            composition, events = await self.engine.astream(request)
        except Exception as exc:  # noqa: BLE001
            return self.fail(endpoint, exc)
        self.metrics.observe(composition)
        self.metrics.count(endpoint, 200)
        rid = f"cmpl-{uuid.uuid4().hex[:24]}"
        return StreamingResponse(self._sse(rid, composition, events, chunk), media_type="text/event-stream",
                                 headers={"x-loramerge-composition": composition["label"]})

    async def _sse(self, rid: str, composition: dict, events: AsyncIterator[StreamEvent],
                   chunk: Chunk) -> AsyncIterator[bytes]:
        self.metrics.inflight.inc()
        first = True
        try:
            async for event in events:
                self.metrics.tokens.inc(len(event.token_ids))
                payload = chunk(rid, event, first)
                if first:
                    payload["composition"] = composition
                    first = False
                yield f"data: {json.dumps(payload)}\n\n".encode()
        except Exception as exc:  # noqa: BLE001 - the stream has started: report in-band
            log.exception("stream failed", exc_info=exc)
            yield f"data: {json.dumps({'error': {'message': str(exc), 'type': 'server_error'}})}\n\n".encode()
        finally:
            self.metrics.inflight.dec()
        yield b"data: [DONE]\n\n"


# --------------------------------------------------------------------------- route handlers


async def completions(state: ServerState, body: CompletionBody) -> Any:
    endpoint = "/v1/completions"
    prompts = body.prompts()
    if len(prompts) > MAX_PROMPTS_PER_REQUEST:
        return state.fail(endpoint, CompositionError(f"at most {MAX_PROMPTS_PER_REQUEST} prompts per request"))
    options = body.options()
    requests = [GenerationRequest(prompt=p, model=body.model_field(), options=options) for p in prompts]
    if body.stream:
        if len(requests) != 1:
            return state.fail(endpoint, CompositionError("streaming takes one prompt per request"))

        def chunk(rid: str, event: StreamEvent, first: bool) -> dict:
            return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": body.model,
                    "choices": [{"index": 0, "text": event.text, "token_ids": event.token_ids,
                                 "finish_reason": event.finish_reason, "logprobs": None}]}

        return await state.stream(endpoint, requests[0], chunk)

    def render(outputs: list[GenerationOutput]) -> dict:
        return {
            "id": f"cmpl-{uuid.uuid4().hex[:24]}", "object": "text_completion", "created": int(time.time()),
            "model": body.model,
            "choices": [{"index": i, "text": o.text, "token_ids": o.token_ids,
                         "prompt_token_ids": o.prompt_token_ids, "finish_reason": o.finish_reason,
                         "logprobs": None, "composition": o.composition} for i, o in enumerate(outputs)],
            "usage": usage(outputs), "composition": outputs[0].composition,
        }

    return await state.run(endpoint, requests, render)


async def chat(state: ServerState, body: ChatBody) -> Any:
    endpoint = "/v1/chat/completions"
    try:
        prompt = state.engine.chat_prompt([{"role": m.role, "content": m.content} for m in body.messages])
    except Exception as exc:  # noqa: BLE001 - a template that rejects the messages
        return state.fail(endpoint, CompositionError(f"could not apply the chat template: {exc}"))
    users = [m.content for m in body.messages if m.role == "user"]
    request = GenerationRequest(prompt=prompt, model=body.model_field(), options=body.options(),
                                route_text=users[-1] if users else None)
    if body.stream:
        def chunk(rid: str, event: StreamEvent, first: bool) -> dict:
            delta = {"role": "assistant", "content": event.text} if first else {"content": event.text}
            return {"id": rid, "object": "chat.completion.chunk", "created": int(time.time()), "model": body.model,
                    "choices": [{"index": 0, "delta": delta, "token_ids": event.token_ids,
                                 "finish_reason": event.finish_reason}]}

        return await state.stream(endpoint, request, chunk)

    def render(outputs: list[GenerationOutput]) -> dict:
        o = outputs[0]
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex[:24]}", "object": "chat.completion", "created": int(time.time()),
            "model": body.model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": o.text},
                         "token_ids": o.token_ids, "finish_reason": o.finish_reason}],
            "usage": usage(outputs), "composition": o.composition,
        }

    return await state.run(endpoint, [request], render)


def models(state: ServerState) -> dict:
    composer, served, created = state.engine.composer, state.served, state.created
    data = [{"id": served, "object": "model", "created": created, "owned_by": "loramerge", "root": served}]
    data += [{"id": n, "object": "model", "created": created, "owned_by": "loramerge", "parent": served}
             for n in composer.catalog.names()]
    if composer.router is not None:
        data.append({"id": "auto", "object": "model", "created": created, "owned_by": "loramerge", "parent": served})
    state.metrics.count("/v1/models", 200)
    return {"object": "list", "data": data}


def health(state: ServerState) -> dict:
    return {"status": "ok", "backend": state.engine.name, "cached_compositions": len(state.engine.composer.cache)}


def prometheus(state: ServerState) -> Any:
    from fastapi.responses import Response

    state.metrics.cache_entries.set(len(state.engine.composer.cache))
    content, media_type = state.metrics.render()
    return Response(content, media_type=media_type)


def invalid_request(state: ServerState, path: str, exc: Any) -> Any:
    """A body that fails validation (or is not JSON): 400 naming the field."""
    errors = exc.errors()
    first = errors[0] if errors else {}
    where = ".".join(str(x) for x in first.get("loc", ()) if x != "body")
    state.metrics.count(path, 400)
    return error_response(400, f"invalid request: {where}: {first.get('msg', 'malformed body')}")


# --------------------------------------------------------------------------- the app


def create_app(engine: ServingEngine, *, served_name: str | None = None, max_inflight: int = 512,
               max_body_bytes: int | None = None) -> Any:
    """The FastAPI app. ``served_name``: the base model's name in ``/v1/models`` (also accepted as ``model``).

    ``max_body_bytes``: request bodies above it get 413 before parsing (default: the composer's bounds).
    """
    _require_server_deps()
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError

    served = served_name or engine.composer.base_names[0]
    if served not in engine.composer.base_names:
        engine.composer.base_names = (*engine.composer.base_names, served)
    state = ServerState(engine=engine, served=served, max_inflight=max_inflight)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        start = getattr(engine, "start", None)
        if start is not None:
            await start()
        yield

    app = FastAPI(title="loramerge", lifespan=lifespan)
    app.state.engine, app.state.metrics, app.state.server = engine, state.metrics, state
    app.add_middleware(BodyLimit, max_bytes=max_body_bytes or engine.composer.bounds.max_body_bytes,
                       on_refuse=state.metrics.count)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> Any:
        return invalid_request(state, request.url.path, exc)

    @app.post("/v1/completions")
    async def _completions(body: CompletionBody) -> Any:
        return await completions(state, body)

    @app.post("/v1/chat/completions")
    async def _chat(body: ChatBody) -> Any:
        return await chat(state, body)

    app.get("/v1/models")(lambda: models(state))
    app.get("/health")(lambda: health(state))
    app.get("/metrics")(lambda: prometheus(state))
    return app


__all__ = ["Metrics", "ServerState", "create_app"]
