"""Typed errors of the engine. The gateway maps each class to one gRPC status code."""

from __future__ import annotations


class PagedServeError(Exception):
    """Base of every error pagedserve raises on purpose."""


class InvalidRequestError(PagedServeError, ValueError):
    """A request or parameter is malformed or out of range (gRPC INVALID_ARGUMENT).
    ``param`` names the request field at fault where one is (OpenAI's error ``param``)."""

    def __init__(self, message: str = "", param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class ContextLengthError(InvalidRequestError):
    """Prompt plus requested output does not fit the model's context (INVALID_ARGUMENT)."""


class QueueFullError(PagedServeError):
    """The waiting queue is at its bound (gRPC RESOURCE_EXHAUSTED)."""


class ModelLoadError(PagedServeError):
    """A model directory or file cannot be read or is not a supported architecture."""


class ModelFetchError(ModelLoadError):
    """The default model could not be downloaded (network): worth another try, unlike the
    rest of ModelLoadError."""
