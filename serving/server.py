"""An OpenAI-compatible server over a serving engine: ``model`` is an adapter, ``mix:...``, a bundle task or ``auto``.

Routes: ``POST /v1/completions``, ``POST /v1/chat/completions`` (both stream with ``stream: true``),
``GET /v1/models``, ``GET /health``, ``GET /metrics`` (Prometheus). Every response says which composition
ran (a ``composition`` object in the body, and the ``x-loramerge-composition`` header); a structured mix can
be sent as ``composition: {adapters: {name: weight}, method}`` next to ``model``. Malformed or out-of-bounds
requests get a 4xx with the reason, in OpenAI's error shape.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from loramerge.errors import LoramergeError

from .compose import CompositionError
from .engine import GenerationOutput, GenerationRequest, SamplingOptions, ServingEngine

log = logging.getLogger("loramerge.serving")

MAX_PROMPTS_PER_REQUEST = 16
MAX_MESSAGES = 64


def _require_server_deps() -> None:
    try:
        import fastapi  # noqa: F401
        import prometheus_client  # noqa: F401
    except ImportError as exc:
        raise ImportError("the server needs FastAPI, uvicorn and prometheus-client: "
                          "pip install 'loramerge[serve]'") from exc


class Metrics:
    """Prometheus metrics in a registry of their own (several apps may live in one process, e.g. tests)."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        self.requests = Counter("loramerge_requests", "HTTP requests by endpoint and status",
                                ["endpoint", "status"], registry=self.registry)
        self.compositions = Counter("loramerge_compositions", "Compositions resolved, by kind and cache result",
                                    ["kind", "cache"], registry=self.registry)
        self.cache_hits = Counter("loramerge_composition_cache_hits", "Composition cache hits", registry=self.registry)
        self.cache_misses = Counter("loramerge_composition_cache_misses", "Composition cache misses (built)",
                                    registry=self.registry)
        self.truncations = Counter("loramerge_composition_truncations", "Compositions truncated to max_lora_rank",
                                   registry=self.registry)
        self.latency = Histogram(
            "loramerge_composition_seconds", "Time to resolve and build (or fetch) a composition", ["cache"],
            buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0),
            registry=self.registry)
        self.tokens = Counter("loramerge_generated_tokens", "Generated tokens", registry=self.registry)
        self.inflight = Gauge("loramerge_inflight_requests", "Requests being served", registry=self.registry)
        self.cache_entries = Gauge("loramerge_composition_cache_entries", "Composed adapters on disk",
                                   registry=self.registry)

    def observe(self, composition: Mapping) -> None:
        kind = composition.get("kind", "?")
        cache = "none" if kind == "base" else ("hit" if composition.get("cache_hit") else "miss")
        self.compositions.labels(kind=kind, cache=cache).inc()
        if cache == "hit":
            self.cache_hits.inc()
        elif cache == "miss":
            self.cache_misses.inc()
        if composition.get("truncated") and cache == "miss":
            self.truncations.inc()
        self.latency.labels(cache=cache).observe(composition.get("compose_ms", 0.0) / 1000)


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str = Field(..., max_length=4096)
    composition: dict[str, Any] | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=10.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    ignore_eos: bool = False
    n: int = Field(1, ge=1, le=1)
    user: str | None = None


class CompletionBody(_Body):
    prompt: str | list[int] | list[str] = Field(..., min_length=1)


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: str = Field(..., max_length=32)
    content: str


class ChatBody(_Body):
    messages: list[Message] = Field(..., min_length=1, max_length=MAX_MESSAGES)
    max_completion_tokens: int | None = Field(None, ge=1)


def _options(body: Any, default_max: int = 16) -> SamplingOptions:
    stop = body.stop if isinstance(body.stop, list) else ([body.stop] if body.stop else [])
    max_tokens = getattr(body, "max_completion_tokens", None) or body.max_tokens or default_max
    return SamplingOptions(max_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p, seed=body.seed,
                           stop=tuple(stop), ignore_eos=body.ignore_eos)


def _error(status: int, message: str, kind: str = "invalid_request_error") -> Any:
    from fastapi.responses import JSONResponse

    return JSONResponse(status_code=status, content={"error": {"message": message, "type": kind, "code": status}})


def _status_for(exc: BaseException) -> int:
    if isinstance(exc, CompositionError):
        return exc.http_status
    if isinstance(exc, (LoramergeError, ValueError)):
        return 400
    return 500


def create_app(engine: ServingEngine, *, served_name: str | None = None, max_inflight: int = 512) -> Any:
    """The FastAPI app. ``served_name``: the base model's name in ``/v1/models`` (also accepted as ``model``)."""
    _require_server_deps()
    from contextlib import asynccontextmanager

    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, Response, StreamingResponse
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    served = served_name or engine.composer.base_names[0]
    if served not in engine.composer.base_names:
        engine.composer.base_names = (*engine.composer.base_names, served)
    metrics = Metrics()
    created = int(time.time())
    load = {"inflight": 0}

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        start = getattr(engine, "start", None)
        if start is not None:
            await start()
        yield

    app = FastAPI(title="loramerge", lifespan=lifespan)
    app.state.engine = engine
    app.state.metrics = metrics

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> Any:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(x) for x in first.get("loc", ()) if x != "body")
        metrics.requests.labels(endpoint=request.url.path, status="400").inc()
        return _error(400, f"invalid request: {where}: {first.get('msg', 'malformed body')}")

    def fail(endpoint: str, exc: BaseException) -> Any:
        status = _status_for(exc)
        metrics.requests.labels(endpoint=endpoint, status=str(status)).inc()
        if status >= 500:
            log.exception("request failed", exc_info=exc)
            return _error(status, "internal error", "server_error")
        message = exc.message if isinstance(exc, LoramergeError) else str(exc)
        if isinstance(exc, LoramergeError) and exc.fix:
            message += f" (fix: {exc.fix})"
        kind = "not_found_error" if status == 404 else "invalid_request_error"
        return _error(status, message, kind)

    def model_field(body: Any) -> Any:
        return body.composition if body.composition is not None else body.model

    async def run(endpoint: str, requests: list[GenerationRequest], body: Any, render: Any) -> Any:
        if load["inflight"] >= max_inflight:
            metrics.requests.labels(endpoint=endpoint, status="503").inc()
            return _error(503, "server busy, retry later", "server_busy")
        load["inflight"] += 1
        metrics.inflight.inc()
        try:
            outputs = await asyncio.gather(*(engine.agenerate(r) for r in requests))
        except Exception as exc:  # noqa: BLE001 - mapped to a status code
            return fail(endpoint, exc)
        finally:
            load["inflight"] -= 1
            metrics.inflight.dec()
        for out in outputs:
            metrics.observe(out.composition)
            metrics.tokens.inc(len(out.token_ids))
        metrics.requests.labels(endpoint=endpoint, status="200").inc()
        headers = {"x-loramerge-composition": outputs[0].composition["label"]}
        return JSONResponse(render(outputs), headers=headers)

    async def stream(endpoint: str, request: GenerationRequest, body: Any, chunk: Any) -> Any:
        try:
            composition, events = await engine.astream(request)
        except Exception as exc:  # noqa: BLE001
            return fail(endpoint, exc)
        metrics.observe(composition)
        metrics.requests.labels(endpoint=endpoint, status="200").inc()
        rid = f"cmpl-{uuid.uuid4().hex[:24]}"

        async def sse() -> AsyncIterator[bytes]:
            metrics.inflight.inc()
            first = True
            try:
                async for event in events:
                    metrics.tokens.inc(len(event.token_ids))
                    payload = chunk(rid, event, first)
                    if first:
                        payload["composition"] = composition
                        first = False
                    yield f"data: {json.dumps(payload)}\n\n".encode()
            except Exception as exc:  # noqa: BLE001 - the stream has started: report in-band
                log.exception("stream failed", exc_info=exc)
                yield f"data: {json.dumps({'error': {'message': str(exc), 'type': 'server_error'}})}\n\n".encode()
            finally:
                metrics.inflight.dec()
            yield b"data: [DONE]\n\n"

        return StreamingResponse(sse(), media_type="text/event-stream",
                                 headers={"x-loramerge-composition": composition["label"]})

    @app.post("/v1/completions")
    async def completions(body: CompletionBody) -> Any:
        endpoint = "/v1/completions"
        prompt = body.prompt
        prompts: list[Any]
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
            prompts = list(prompt)
        else:
            prompts = [prompt]
        if len(prompts) > MAX_PROMPTS_PER_REQUEST:
            return fail(endpoint, CompositionError(f"at most {MAX_PROMPTS_PER_REQUEST} prompts per request"))
        options = _options(body)
        requests = [GenerationRequest(prompt=p, model=model_field(body), options=options) for p in prompts]
        if body.stream:
            if len(requests) != 1:
                return fail(endpoint, CompositionError("streaming takes one prompt per request"))

            def chunk(rid: str, event: Any, first: bool) -> dict:
                return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": body.model,
                        "choices": [{"index": 0, "text": event.text, "token_ids": event.token_ids,
                                     "finish_reason": event.finish_reason, "logprobs": None}]}

            return await stream(endpoint, requests[0], body, chunk)

        def render(outputs: list[GenerationOutput]) -> dict:
            return {
                "id": f"cmpl-{uuid.uuid4().hex[:24]}", "object": "text_completion", "created": int(time.time()),
                "model": body.model,
                "choices": [{"index": i, "text": o.text, "token_ids": o.token_ids,
                             "prompt_token_ids": o.prompt_token_ids, "finish_reason": o.finish_reason,
                             "logprobs": None, "composition": o.composition} for i, o in enumerate(outputs)],
                "usage": _usage(outputs), "composition": outputs[0].composition,
            }

        return await run(endpoint, requests, body, render)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatBody) -> Any:
        endpoint = "/v1/chat/completions"
        try:
            prompt = engine.chat_prompt([{"role": m.role, "content": m.content} for m in body.messages])
        except Exception as exc:  # noqa: BLE001 - a template that rejects the messages
            return fail(endpoint, CompositionError(f"could not apply the chat template: {exc}"))
        users = [m.content for m in body.messages if m.role == "user"]
        request = GenerationRequest(prompt=prompt, model=model_field(body), options=_options(body),
                                    route_text=users[-1] if users else None)
        if body.stream:
            def chunk(rid: str, event: Any, first: bool) -> dict:
                delta = {"role": "assistant", "content": event.text} if first else {"content": event.text}
                return {"id": rid, "object": "chat.completion.chunk", "created": int(time.time()),
                        "model": body.model,
                        "choices": [{"index": 0, "delta": delta, "token_ids": event.token_ids,
                                     "finish_reason": event.finish_reason}]}

            return await stream(endpoint, request, body, chunk)

        def render(outputs: list[GenerationOutput]) -> dict:
            o = outputs[0]
            return {
                "id": f"chatcmpl-{uuid.uuid4().hex[:24]}", "object": "chat.completion", "created": int(time.time()),
                "model": body.model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": o.text},
                             "token_ids": o.token_ids, "finish_reason": o.finish_reason}],
                "usage": _usage(outputs), "composition": o.composition,
            }

        return await run(endpoint, [request], body, render)

    @app.get("/v1/models")
    async def models() -> Any:
        names = engine.composer.catalog.names()
        data = [{"id": served, "object": "model", "created": created, "owned_by": "loramerge", "root": served}]
        data += [{"id": n, "object": "model", "created": created, "owned_by": "loramerge", "parent": served}
                 for n in names]
        if engine.composer.router is not None:
            data.append({"id": "auto", "object": "model", "created": created, "owned_by": "loramerge",
                         "parent": served})
        metrics.requests.labels(endpoint="/v1/models", status="200").inc()
        return {"object": "list", "data": data}

    @app.get("/health")
    async def health() -> Any:
        return {"status": "ok", "backend": engine.name, "cached_compositions": len(engine.composer.cache)}

    @app.get("/metrics")
    async def prometheus() -> Any:
        metrics.cache_entries.set(len(engine.composer.cache))
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app


def _usage(outputs: list[GenerationOutput]) -> dict:
    prompt = sum(len(o.prompt_token_ids) for o in outputs)
    completion = sum(len(o.token_ids) for o in outputs)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


__all__ = ["Metrics", "create_app"]
