"""The rank policy: how a merged module's rank is chosen (plain data, no torch: recipes and the CLI parse it)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

RankKind = Literal["auto", "exact", "fixed", "energy", "max"]


@dataclass(frozen=True)
class RankPolicy:
    """How a merged module's rank is chosen.

    - ``auto``: ``exact`` for factored results, the sum of input ranks for dense (element-wise) results.
    - ``exact``: lossless. Factored results keep the concatenation; dense results are stored at full rank.
    - ``fixed``: at most ``k``.
    - ``energy``: the smallest rank keeping ``energy`` of the squared Frobenius norm.
    - ``max``: the largest input rank (PEFT's ``svd`` default).
    """

    kind: RankKind = "auto"
    k: int | None = None
    energy: float | None = None

    def __post_init__(self) -> None:
        if self.kind == "fixed" and (self.k is None or self.k < 1):
            raise ValueError("a fixed rank must be a positive integer")
        if self.kind == "energy" and (self.energy is None or not 0.0 < self.energy <= 1.0):
            raise ValueError("an energy fraction must be in (0, 1]")

    @classmethod
    def parse(cls, value: RankPolicy | str | int | dict | None) -> RankPolicy:
        """Accept the recipe forms: ``exact``, ``auto``, ``max``, an integer, ``{energy: 0.99}``."""
        if value is None:
            return cls()
        if isinstance(value, RankPolicy):
            return value
        if isinstance(value, bool):
            raise ValueError(f"rank must be 'exact', 'auto', 'max', an integer or {{energy: F}}, got {value!r}")
        if isinstance(value, int):
            return cls(kind="fixed", k=value)
        if isinstance(value, str):
            if value.isdigit():
                return cls(kind="fixed", k=int(value))
            if value in ("auto", "exact", "max"):
                return cls(kind=value)  # type: ignore[arg-type]
        if isinstance(value, dict) and set(value) == {"energy"}:
            return cls(kind="energy", energy=float(value["energy"]))
        raise ValueError(f"rank must be 'exact', 'auto', 'max', an integer or {{energy: F}}, got {value!r}")

    def describe(self) -> str:
        if self.kind == "fixed":
            return f"fixed {self.k}"
        if self.kind == "energy":
            return f"energy {self.energy}"
        return self.kind


__all__ = ["RankKind", "RankPolicy"]
