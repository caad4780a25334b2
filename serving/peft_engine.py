"""The transformers + PEFT reference backend: one request at a time, greedy or seeded sampling.

The oracle in tests, and a server backend where vLLM is not installed. Streaming yields token by token.
"""

from __future__ import annotations

import contextlib
import threading
from collections import OrderedDict
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import torch

from .cache import ComposedAdapter
from .catalog import BaseModules
from .composer import Composer
from .engine import GenerationOutput, Prepared, SamplingOptions, ServingEngine, Step, load_tokenizer, steps_from_thread


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
        super().__init__(composer, tokenizer, max_model_len=limit, base_rows="none",
                         base=BaseModules.from_model(model))
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

    def _steps(self, p: Prepared) -> AsyncIterator[Step]:
        return steps_from_thread(lambda: self._decode_steps(p))


GREEDY_BELOW = 1e-5
"""Temperatures below this sample greedily (as vLLM does): dividing by them overflows the logits."""


def _pick(logits: torch.Tensor, opts: SamplingOptions, generator: torch.Generator | None) -> int:
    """Greedy, or temperature + nucleus sampling in float64 (the top token always stays in the nucleus,
    so a ``top_p`` below float32's smallest value cannot empty it)."""
    if opts.temperature < GREEDY_BELOW:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits.double() / opts.temperature, dim=-1)
    if opts.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        keep = torch.cumsum(sorted_probs, 0) - sorted_probs < opts.top_p
        keep[0] = True
        probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_probs[keep])
        probs = probs / probs.sum()
    return int(torch.multinomial(probs, 1, generator=generator))


__all__ = ["GREEDY_BELOW", "PeftEngine"]
