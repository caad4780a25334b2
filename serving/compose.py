"""Compatibility imports (for one release): composition now lives in files that each do one job.

``grammar`` (the ``model`` field), ``bounds`` (request limits), ``errors``, ``catalog`` (served adapters,
validated once), ``bundles`` (basis/Twin seam), ``cache`` (the shared directory store and the LRU) and
``composer`` (resolve and build). ``Router`` is now ``PromptRouter`` (it clashed with the routers' class).
"""

from __future__ import annotations

from .bounds import NAME_PATTERN, Bounds
from .bundles import BundleExtractor, default_bundle_extractors
from .cache import ComposedAdapter, CompositionCache, CompositionStore
from .catalog import AdapterCatalog, BaseModules
from .composer import VALID_MAX_LORA_RANKS, Built, Composer, ComposerStats, PromptRouter, default_device
from .errors import CompositionError, UnknownAdapterError
from .grammar import BUNDLE_PREFIXES, Composition, CompositionSpec, parse_model_field

Router = PromptRouter

__all__ = [
    "BUNDLE_PREFIXES", "NAME_PATTERN", "VALID_MAX_LORA_RANKS", "AdapterCatalog", "BaseModules", "Bounds",
    "BundleExtractor", "Built", "ComposedAdapter", "Composer", "ComposerStats", "Composition", "CompositionCache",
    "CompositionError", "CompositionSpec", "CompositionStore", "PromptRouter", "Router", "UnknownAdapterError",
    "default_bundle_extractors", "default_device", "parse_model_field",
]
