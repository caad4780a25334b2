"""Error types. Every error names what failed, where, and what to do about it.

Each class carries an exit code so the CLI can tell failures apart
(documented in the README's troubleshooting section).
"""

from __future__ import annotations


class LoramergeError(Exception):
    """Base class: a user-facing failure with a fix."""

    exit_code = 1

    def __init__(self, message: str, *, path: str | None = None, module: str | None = None, fix: str | None = None):
        self.message = message
        self.path = path
        self.module = module
        self.fix = fix
        super().__init__(self.render())

    def render(self) -> str:
        parts = [self.message]
        if self.path:
            parts.append(f"  file: {self.path}")
        if self.module:
            parts.append(f"  module: {self.module}")
        if self.fix:
            parts.append(f"  fix: {self.fix}")
        return "\n".join(parts)


class AdapterLoadError(LoramergeError):
    """An adapter directory, config or weight file is missing, malformed or corrupt."""

    exit_code = 3


class UnsupportedAdapterError(LoramergeError):
    """The adapter uses a feature that cannot be merged faithfully (DoRA, lora_bias, ...)."""

    exit_code = 4


class IncompatibleAdaptersError(LoramergeError):
    """Adapters that cannot be merged together (different base models, shapes)."""

    exit_code = 5


class RecipeError(LoramergeError):
    """A recipe or method configuration is invalid."""

    exit_code = 2


class OptionError(LoramergeError):
    """A command-line option value is malformed (checked before any work is done)."""

    exit_code = 2


class OutputError(LoramergeError):
    """The output location cannot be written safely."""

    exit_code = 6


class NumericalError(LoramergeError):
    """NaN or Inf in inputs or results."""

    exit_code = 7


class BaseModelError(LoramergeError):
    """A base model (for ``bake``) is missing, malformed, or stored in a form that cannot be baked."""

    exit_code = 8


class HubError(LoramergeError):
    """A Hugging Face Hub call failed (login, permissions, repository id, network)."""

    exit_code = 9


class DataError(RecipeError):
    """A data file (texts, validation examples) or calibration statistics are missing, malformed or stale."""

    exit_code = 2
