"""What every serving backend shares: requests, tokenization, bounds, composition, leases, streaming.

The engine tokenizes every prompt itself (one tokenizer for every backend, so backends see identical
token ids), resolves the request's composition through the :class:`~loramerge.serving.composer.Composer`,
leases the composed adapter's directory for the request's lifetime and hands the backend an ordinary
adapter path. Backends: :mod:`~loramerge.serving.peft_engine` (transformers + PEFT, the reference) and
:mod:`~loramerge.serving.vllm_engine` (offline ``LLM`` and ``AsyncLLM``); their names stay importable
from here.
"""

from __future__ import annotations

import abc
import asyncio
import itertools
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from .cache import ComposedAdapter
from .catalog import BaseModules
from .composer import Built, Composer
from .errors import CompositionError

BaseRows = Literal["auto", "zero-adapter", "none"]
Step = tuple[int, "str | None"]
"""One decoding step: the new token and, on the last step, the finish reason."""

MAX_SEED = 2**63 - 1


@dataclass(frozen=True)
class SamplingOptions:
    """The sampling knobs both backends honour (greedy when temperature is 0)."""

    max_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False


@dataclass(frozen=True)
class GenerationRequest:
    """One prompt (text or token ids) and what it runs with: a ``model`` field or a structured composition."""

    prompt: str | Sequence[int]
    model: str | Mapping = "base"
    options: SamplingOptions = SamplingOptions()
    route_text: str | None = None
    """What an ``auto`` router sees (chat: the last user message); default: the prompt text."""


@dataclass
class GenerationOutput:
    text: str
    token_ids: list[int]
    prompt_token_ids: list[int]
    finish_reason: str
    composition: dict


@dataclass
class StreamEvent:
    """A streamed piece: new text and token ids; ``finish_reason`` is set on the last event."""

    text: str
    token_ids: list[int]
    finish_reason: str | None = None


@dataclass
class Prepared:
    request: GenerationRequest
    prompt_token_ids: list[int]
    prompt_text: str
    built: Built
    runs_with: ComposedAdapter | None
    """What the backend loads: the composition's adapter, the zero adapter for base rows, or None."""


def _ids_list(prompt: Sequence[int]) -> list[int]:
    ids = [int(t) for t in prompt]
    if not ids:
        raise CompositionError("empty prompt", fix="send at least one token")
    return ids


class ServingEngine(abc.ABC):
    """What every backend shares: tokenization, bounds, composition, leases, streaming.

    Backends implement ``_run`` (a batch) and ``_steps`` (one request, token by token). ``base``: the
    served base model's shapes; the catalog checks every adapter against them.
    """

    name = "engine"

    def __init__(self, composer: Composer, tokenizer: Any, *, max_model_len: int | None = None,
                 base_rows: BaseRows = "none", base: BaseModules | None = None):
        if base is not None:
            composer.catalog.base = base
        self.composer = composer
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len
        self.base_rows = base_rows
        self.bounds = composer.bounds
        self._ids = itertools.count()

    # -- shared preparation

    def tokenize(self, prompt: str | Sequence[int]) -> tuple[list[int], str]:
        if isinstance(prompt, str):
            self.bounds.check_prompt_chars(prompt)
            ids = self.tokenizer(prompt, add_special_tokens=True)["input_ids"]
            text = prompt
        else:
            ids = _ids_list(prompt)
            vocab = len(self.tokenizer)
            if any(t < 0 or t >= vocab for t in ids):
                raise CompositionError(f"prompt token ids must lie in [0, {vocab})")
            text = self.tokenizer.decode(ids, skip_special_tokens=True)
        if not ids:
            raise CompositionError("empty prompt", fix="send a prompt with at least one token")
        self.bounds.check_prompt_tokens(len(ids), self.max_model_len)
        return ids, text

    def check_options(self, options: SamplingOptions, prompt_len: int) -> None:
        if not 1 <= options.max_tokens <= self.bounds.max_new_tokens:
            raise CompositionError(f"max_tokens must be in [1, {self.bounds.max_new_tokens}]")
        if self.max_model_len and prompt_len + options.max_tokens > self.max_model_len:
            raise CompositionError(f"prompt ({prompt_len} tokens) + max_tokens ({options.max_tokens}) exceeds the "
                                   f"model's context of {self.max_model_len}", fix="lower max_tokens")
        if not (0.0 <= options.temperature <= 10.0) or not (0.0 < options.top_p <= 1.0):
            raise CompositionError("temperature must be in [0, 10] and top_p in (0, 1]")
        if len(options.stop) > 8 or any(len(s) > 256 for s in options.stop):
            raise CompositionError("at most 8 stop strings of at most 256 characters")
        if options.seed is not None and not 0 <= options.seed <= MAX_SEED:
            raise CompositionError(f"seed must be in [0, {MAX_SEED}]", fix="use a non-negative 63-bit seed")

    def prepare(self, requests: Sequence[GenerationRequest]) -> list[Prepared]:
        """Tokenize, check bounds, route ``auto``, build (or fetch) every composition. Leases are taken."""
        tokenized = [self.tokenize(r.prompt) for r in requests]
        for r, (ids, _) in zip(requests, tokenized, strict=True):
            self.check_options(r.options, len(ids))
        specs = [self.composer.parse(r.model) for r in requests]
        route_texts = [r.route_text if r.route_text is not None else text
                       for r, (_, text) in zip(requests, tokenized, strict=True)]
        compositions = self.composer.resolve_many(specs, route_texts)
        prepared = []
        try:
            for r, (ids, text), comp in zip(requests, tokenized, compositions, strict=True):
                built = self.composer.build(comp, lease=True)
                runs_with = built.adapter
                if runs_with is None and self._use_zero_adapter():
                    runs_with = self.composer.zero_adapter()
                prepared.append(Prepared(r, ids, text, built, runs_with))
        except BaseException:
            self.release(prepared)
            raise
        return prepared

    def release(self, prepared: Sequence[Prepared]) -> None:
        for p in prepared:
            self.composer.release(p.built)

    def _use_zero_adapter(self) -> bool:
        return self.base_rows == "zero-adapter"

    def _finish(self, p: Prepared, token_ids: list[int], finish_reason: str, text: str | None = None) -> GenerationOutput:
        if text is None:
            text = self.tokenizer.decode(token_ids, skip_special_tokens=True)
        text, finish_reason = _apply_stop(text, p.request.options.stop, finish_reason)
        return GenerationOutput(text=text, token_ids=list(token_ids), prompt_token_ids=p.prompt_token_ids,
                                finish_reason=finish_reason, composition=p.built.describe())

    # -- public API

    def generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationOutput]:
        """Run a batch (compositions may differ per request) and return one output per request, in order."""
        prepared = self.prepare(requests)
        try:
            return self._run(prepared)
        finally:
            self.release(prepared)

    async def agenerate(self, request: GenerationRequest) -> GenerationOutput:
        """One request, awaitable (the server's entry point)."""
        prepared = await asyncio.to_thread(self.prepare, [request])
        try:
            return (await self._arun(prepared))[0]
        finally:
            self.release(prepared)

    async def astream(self, request: GenerationRequest) -> tuple[dict, AsyncIterator[StreamEvent]]:
        """The composition (known before the first token) and an iterator of text pieces."""
        prepared = await asyncio.to_thread(self.prepare, [request])

        async def events() -> AsyncIterator[StreamEvent]:
            try:
                async for event in self._astream(prepared[0]):
                    yield event
            finally:
                self.release(prepared)

        return prepared[0].built.describe(), events()

    def chat_prompt(self, messages: Sequence[Mapping[str, str]]) -> str:
        """The tokenizer's chat template when it has one, else a plain ``role: content`` transcript."""
        if getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=False)
        lines = [f"{m['role']}: {m['content']}" for m in messages]
        return "\n".join(lines) + "\nassistant:"

    def close(self) -> None:
        self.composer.close()

    # -- backend hooks

    @abc.abstractmethod
    def _run(self, prepared: list[Prepared]) -> list[GenerationOutput]:
        """Run a prepared batch to completion."""

    async def _arun(self, prepared: list[Prepared]) -> list[GenerationOutput]:
        return await asyncio.to_thread(self._run, prepared)

    @abc.abstractmethod
    def _steps(self, p: Prepared) -> AsyncIterator[Step]:
        """One request's decoding steps, as they happen."""

    async def _astream(self, p: Prepared) -> AsyncIterator[StreamEvent]:
        async for event in _text_events(self, p, self._steps(p)):
            yield event


async def steps_from_thread(produce: Callable[[], Iterator[Step]]) -> AsyncIterator[Step]:
    """Run a blocking step generator in a worker thread and yield its steps as they come."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    def run() -> None:
        try:
            for step in produce():
                loop.call_soon_threadsafe(queue.put_nowait, step)
        except BaseException as exc:  # surfaced to the consumer
            loop.call_soon_threadsafe(queue.put_nowait, exc)
        loop.call_soon_threadsafe(queue.put_nowait, done)

    task = loop.run_in_executor(None, run)
    try:
        while (item := await queue.get()) is not done:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        await task


def _apply_stop(text: str, stop: Sequence[str], finish_reason: str) -> tuple[str, str]:
    cut = min((i for i in (text.find(s) for s in stop if s) if i >= 0), default=-1)
    return (text[:cut], "stop") if cut >= 0 else (text, finish_reason)


async def _text_events(engine: ServingEngine, p: Prepared,
                       steps: AsyncIterator[tuple[int, str | None]]) -> AsyncIterator[StreamEvent]:
    """Turn (token, finish) steps into text deltas (decoding the whole sequence so far at each step)."""
    tokens: list[int] = []
    sent = ""
    stop = p.request.options.stop
    async for token, finish in steps:
        tokens.append(token)
        text = engine.tokenizer.decode(tokens, skip_special_tokens=True)
        cut_text, reason = _apply_stop(text, stop, finish or "")
        if stop and reason == "stop" and cut_text != text:
            yield StreamEvent(text=cut_text[len(sent):], token_ids=[token], finish_reason="stop")
            async for _ in steps:  # let the producer finish; send nothing more
                pass
            return
        yield StreamEvent(text=text[len(sent):], token_ids=[token], finish_reason=finish)
        sent = text



def load_tokenizer(model: str | Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model))


_BACKENDS = {
    "PeftEngine": "peft_engine", "VLLMEngine": "vllm_engine", "AsyncVLLMEngine": "vllm_engine",
    "VLLMSettings": "vllm_engine", "lora_request_for": "vllm_engine", "sampling_params_for": "vllm_engine",
}


def __getattr__(name: str) -> Any:
    """The backends' names, importable from here as before the split (loaded on first use)."""
    if name in _BACKENDS:
        import importlib

        return getattr(importlib.import_module(f"loramerge.serving.{_BACKENDS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "BaseRows", "GenerationOutput", "GenerationRequest", "Prepared", "SamplingOptions", "ServingEngine",
    "StreamEvent", "load_tokenizer", "steps_from_thread", *_BACKENDS,
]
