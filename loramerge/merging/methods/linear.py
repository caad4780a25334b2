"""Linear merges, exact in factored form: task arithmetic, average, cat."""

from __future__ import annotations

from pydantic import Field

from loramerge.core.factored import concat_factors
from loramerge.merging.methods.base import Factored, MethodConfig, ModuleInputs


class TaskArithmeticConfig(MethodConfig):
    lambda_: float = Field(1.0, alias="lambda", description="global scale on the weighted sum")
    normalize: bool = Field(False, description="divide the weights by their sum")


def _normalised(weights: tuple[float, ...], normalize: bool) -> list[float]:
    if not normalize:
        return list(weights)
    total = sum(weights)
    if total == 0:
        raise ValueError("normalize needs weights that do not sum to zero")
    return [w / total for w in weights]


def task_arithmetic(cfg: TaskArithmeticConfig, inputs: ModuleInputs) -> Factored:
    """lambda * sum_t w_t B_t A_t, as the concatenated LoRA."""
    weights = [cfg.lambda_ * w for w in _normalised(inputs.weights, cfg.normalize)]
    B, A = concat_factors(inputs.factors, weights)
    return Factored(B=B, A=A)


class AverageConfig(MethodConfig):
    pass


def average(cfg: AverageConfig, inputs: ModuleInputs) -> Factored:
    """The weighted mean sum_t w_t dW_t / sum_t w_t (equal weights: the plain mean)."""
    B, A = concat_factors(inputs.factors, _normalised(inputs.weights, True))
    return Factored(B=B, A=A)


class CatConfig(MethodConfig):
    pass


def cat(cfg: CatConfig, inputs: ModuleInputs) -> Factored:
    """The weighted sum stored as the concatenation itself (rank = sum of ranks)."""
    B, A = concat_factors(inputs.factors, list(inputs.weights))
    return Factored(B=B, A=A)
