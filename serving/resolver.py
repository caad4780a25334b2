"""A vLLM ``LoRAResolver`` so vLLM's own OpenAI server resolves ``mix:...``, bundle tasks and adapter names.

Registered by the ``vllm.general_plugins`` entry point :func:`register` (vLLM runs it in every process)::

    [project.entry-points."vllm.general_plugins"]
    loramerge = "loramerge.serving.resolver:register"

Configured through the environment of the vLLM server (it must run with ``--enable-lora`` and
``VLLM_ALLOW_RUNTIME_LORA_UPDATING=True``, which is when vLLM calls resolvers):

- ``LORAMERGE_ADAPTERS``: ``name=/path,name=/path`` (explicit adapters)
- ``LORAMERGE_ADAPTER_ROOTS``: ``/dir:/dir`` (adapters and bundles served by directory name)
- ``LORAMERGE_MAX_LORA_RANK``: the server's ``--max-lora-rank`` (default 16); larger compositions are truncated
- ``LORAMERGE_CACHE_DIR``: where composed adapters are written (default ``~/.cache/loramerge/compositions``).
  vLLM keeps every resolved name and may reload its path at any time, so this cache never deletes.
- ``LORAMERGE_VLLM_CPU_FIX=0`` turns off the CPU base-row fix (:mod:`loramerge.serving.vllm_cpu_fix`).
"""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path
from typing import Any

from loramerge.core.names import parse_pairs
from loramerge.errors import LoramergeError, RecipeError

from .catalog import AdapterCatalog
from .composer import Composer
from .errors import CompositionError, UnknownAdapterError

log = logging.getLogger("loramerge.serving.resolver")

RESOLVER_NAME = "loramerge"


def composer_from_env(env: dict[str, str] | None = None) -> Composer | None:
    """The resolver's composer, or None when no adapters are configured."""
    env = dict(os.environ if env is None else env)
    pairs = [p for p in env.get("LORAMERGE_ADAPTERS", "").split(",") if p.strip()]
    roots = [Path(r) for r in env.get("LORAMERGE_ADAPTER_ROOTS", "").split(os.pathsep) if r.strip()]
    if not pairs and not roots:
        return None
    try:
        adapters = {n: Path(p) for n, p in parse_pairs(pairs, option="LORAMERGE_ADAPTERS").items()}
    except RecipeError as exc:
        raise CompositionError(exc.message, fix="set LORAMERGE_ADAPTERS=name=/path,name=/path") from None
    cache_dir = Path(env.get("LORAMERGE_CACHE_DIR") or Path.home() / ".cache" / "loramerge" / "compositions")
    return Composer(AdapterCatalog(adapters, roots), max_rank=int(env.get("LORAMERGE_MAX_LORA_RANK", "16")),
                    cache_dir=cache_dir, cache_size=None)


def _resolver_class() -> type:
    from vllm.lora.request import LoRARequest
    from vllm.lora.resolver import LoRAResolver

    class LoramergeResolver(LoRAResolver):
        """Builds the named composition (exact concatenation, truncated only above max_lora_rank) on request."""

        def __init__(self, composer: Composer):
            self.composer = composer

        async def resolve_lora(self, base_model_name: str, lora_name: str) -> Any:
            try:
                spec = self.composer.parse(lora_name)
                if spec.kind in ("base", "auto"):
                    return None
                composition = self.composer.resolve(spec)
                built = await asyncio.to_thread(self.composer.build, composition)
            except UnknownAdapterError:
                return None
            except LoramergeError as exc:
                log.warning("loramerge could not resolve %r: %s", lora_name, exc.render())
                return None
            if built.adapter is None:
                return None
            log.info("loramerge resolved %r -> %s (rank %d%s)", lora_name, built.adapter.path, built.adapter.rank,
                     ", truncated" if built.adapter.truncated else "")
            return LoRARequest(lora_name=lora_name, lora_int_id=built.adapter.lora_int_id,
                               lora_path=str(built.adapter.path))

    return LoramergeResolver


def make_resolver(composer: Composer) -> Any:
    return _resolver_class()(composer)


def register() -> None:
    """The ``vllm.general_plugins`` entry point: the CPU base-row fix, and the resolver when configured."""
    if os.environ.get("LORAMERGE_VLLM_CPU_FIX", "1") != "0":
        from . import vllm_cpu_fix

        vllm_cpu_fix.apply()
    composer = composer_from_env()
    if composer is None:
        return
    from vllm.lora.resolver import LoRAResolverRegistry

    if RESOLVER_NAME not in LoRAResolverRegistry.get_supported_resolvers():
        LoRAResolverRegistry.register_resolver(RESOLVER_NAME, make_resolver(composer))


__all__ = ["RESOLVER_NAME", "composer_from_env", "make_resolver", "register"]
