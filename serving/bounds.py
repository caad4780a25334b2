"""Limits on what one request may ask for, so a hostile request cannot exhaust the server."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from loramerge.core.names import MAX_NAME_LENGTH, NAME_PATTERN

from .errors import CompositionError


@dataclass(frozen=True)
class Bounds:
    """Limits on what one request may ask for, so a hostile request cannot exhaust the server."""

    max_adapters_per_mix: int = 8
    max_abs_weight: float = 8.0
    max_name_length: int = MAX_NAME_LENGTH
    max_model_field_chars: int = 1024
    max_prompt_chars: int = 32_768
    max_prompt_tokens: int = 4096
    max_new_tokens: int = 2048
    max_body_bytes: int = 1 << 20
    """Request bodies above this are refused (413) before they are read in full or parsed."""
    weight_quantum: float = 1e-4
    """Weights are rounded to multiples of this before keying and composing (what runs is what is keyed)."""
    route_quantum: float = 0.01
    """Router weights are rounded more coarsely, so near-identical routings share one cached adapter."""

    def check_name(self, name: str, what: str = "adapter") -> str:
        if not isinstance(name, str) or not name:
            raise CompositionError(f"empty {what} name", fix="name an adapter listed by GET /v1/models")
        if len(name) > self.max_name_length:
            raise CompositionError(f"{what} name longer than {self.max_name_length} characters",
                                   fix="use a shorter name")
        if not NAME_PATTERN.match(name):  # the project's one name rule (loramerge.core.names): 'c++' is a name
            raise CompositionError(
                f"{what} name {name[:80]!r} has characters outside [A-Za-z0-9._+-] or does not start with a letter/digit",
                fix="adapter names are plain identifiers such as 'code' or 'math-v2', never paths",
            )
        return name

    def check_weight(self, name: str, weight: Any) -> float:
        if isinstance(weight, bool) or not isinstance(weight, (int, float)):
            raise CompositionError(f"weight of '{name}' must be a number, got {weight!r}")
        w = float(weight)
        if not math.isfinite(w) or abs(w) > self.max_abs_weight:
            raise CompositionError(f"weight of '{name}' is {weight!r}; it must be finite with |w| <= {self.max_abs_weight}",
                                   fix="use weights such as 0.7 and 0.3")
        return w

    def check_prompt_chars(self, text: str) -> None:
        if len(text) > self.max_prompt_chars:
            raise CompositionError(f"prompt has {len(text)} characters; the limit is {self.max_prompt_chars}",
                                   fix="send a shorter prompt")

    def check_prompt_tokens(self, n: int, limit: int | None = None) -> None:
        cap = min(self.max_prompt_tokens, limit) if limit else self.max_prompt_tokens
        if n > cap:
            raise CompositionError(f"prompt has {n} tokens; the limit is {cap}", fix="send a shorter prompt")

    def quantise(self, weight: float, quantum: float | None = None) -> float:
        q = quantum or self.weight_quantum
        return round(round(weight / q) * q, 12)


__all__ = ["NAME_PATTERN", "Bounds"]
