"""Work around vLLM's CPU LoRA bug: rows without a LoRA get the last slot's adapter (docs/VLLM_CPU.md, pitfall 1).

vLLM's pure-torch LoRA ops (``vllm/lora/ops/torch_ops/lora_ops.py``, used by ``PunicaWrapperCPU``) index
the stacked weights with the per-row adapter index; "no LoRA" is -1, which Python indexing turns into the
last slot. The GPU kernels skip -1. Zeroing the shrink output (``x A^T``) of those rows makes the expand
step add exactly nothing, so base-model rows get the base output again. Upstream: vllm-project/vllm
PRs #48421 and #49656.

Two ways to apply it in vLLM's worker processes: the ``vllm.general_plugins`` entry point
(:func:`loramerge.serving.resolver.register` calls :func:`apply`), or
``--worker-extension-cls loramerge.serving.vllm_cpu_fix.BaseRowFix`` (importing this module in the
worker applies it). The engine wrappers in :mod:`loramerge.serving.engine` do not need it: they send
base-model rows through a zero adapter instead.
"""

from __future__ import annotations

from typing import Any

_PATCHED_FLAG = "_loramerge_base_row_fix"


def _fixed(original: Any) -> Any:
    def bgmv_shrink(inputs: Any, lora_weights: Any, output_tensor: Any, lora_indices_tensor: Any,
                    scaling: float = 1.0) -> None:
        original(inputs, lora_weights, output_tensor, lora_indices_tensor, scaling)
        no_lora = lora_indices_tensor < 0
        if no_lora.shape[0] == output_tensor.shape[0] and bool(no_lora.any()):
            output_tensor[no_lora] = 0

    setattr(bgmv_shrink, _PATCHED_FLAG, True)
    return bgmv_shrink


def apply() -> bool:
    """Patch ``bgmv_shrink`` where the CPU path looks it up. Idempotent; False when vLLM is absent."""
    try:
        from vllm.lora.ops import torch_ops
        from vllm.lora.ops.torch_ops import lora_ops
        from vllm.lora.punica_wrapper import punica_cpu
    except ImportError:
        return False
    original = lora_ops.bgmv_shrink
    if getattr(original, _PATCHED_FLAG, False):
        return True
    fixed = _fixed(original)
    lora_ops.bgmv_shrink = fixed  # sgmv_shrink (prefill) calls it through this module's globals
    torch_ops.bgmv_shrink = fixed
    punica_cpu.bgmv_shrink = fixed
    return True


def applied() -> bool:
    try:
        from vllm.lora.punica_wrapper import punica_cpu
    except ImportError:
        return False
    return bool(getattr(punica_cpu.bgmv_shrink, _PATCHED_FLAG, False))


class BaseRowFix:
    """A vLLM worker extension (``worker_extension_cls``): importing this module in the worker applies the fix."""

    def loramerge_base_row_fix_applied(self) -> bool:
        return applied()


# Imported by vLLM's worker through ``worker_extension_cls``: that import is the only hook it offers.
apply()
