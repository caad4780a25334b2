"""The serving errors and the one map from an error to an HTTP status (every client error is a 4xx)."""

from __future__ import annotations

from loramerge.errors import (
    AdapterLoadError,
    IncompatibleAdaptersError,
    LoramergeError,
    NumericalError,
    RecipeError,
    UnsupportedAdapterError,
)


class CompositionError(LoramergeError):
    """A request names a composition that is malformed or out of bounds (HTTP 400)."""

    exit_code = 2
    http_status = 400


class UnknownAdapterError(CompositionError):
    """A request names an adapter, bundle or task that is not served (HTTP 404)."""

    http_status = 404


class RequestTooLargeError(CompositionError):
    """A request body larger than the server accepts (HTTP 413), refused before it is parsed."""

    http_status = 413


UNSERVABLE = (AdapterLoadError, UnsupportedAdapterError, IncompatibleAdaptersError, NumericalError)
"""Errors that mean "the adapter (or mix) the request names cannot be served": HTTP 422."""


def http_status(exc: BaseException) -> int:
    """The HTTP status for an error raised while serving a request (5xx only for the server's own faults)."""
    if isinstance(exc, CompositionError):
        return exc.http_status
    if isinstance(exc, UNSERVABLE):
        return 422
    if isinstance(exc, (LoramergeError, RecipeError, ValueError)):
        return 400
    return 500


__all__ = ["UNSERVABLE", "CompositionError", "RequestTooLargeError", "UnknownAdapterError", "http_status"]
