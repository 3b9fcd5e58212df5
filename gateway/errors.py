"""Why a call is refused, and how each front says it: one table for gRPC and HTTP.

Every refusal in the gateway is a ``Refused`` with a gRPC status code; the gRPC front aborts the
call with that code, the OpenAI HTTP front answers with the HTTP status and error ``type`` the
table gives for it (``{"error": {"message", "type", "param", "code"}}``, ``code`` being the gRPC
status name, so both fronts' users see the same word). Errors that other processes report
(``ipc_pb2.ErrorCode``) and the wire layer's typed errors map onto the same codes here.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass

import grpc

from protos.errors import InvalidRequestError, QueueFullError
from protos.pagedserve.internal.v1 import ipc_pb2

Code = grpc.StatusCode


class Refused(Exception):
    """A call the gateway refuses or fails, with the status code both fronts map. ``reason``
    is the label ``pagedserve_requests_refused_total`` counts an auth or overload refusal
    under (``REFUSAL_REASONS``); other refusals leave it empty."""

    def __init__(
        self, code: grpc.StatusCode, message: str, param: str | None = None, reason: str = ""
    ) -> None:
        super().__init__(message)
        self.code, self.message, self.param, self.reason = code, message, param, reason


# Why a call was turned away before any work: the reason label of the refusal counter.
MISSING_API_KEY = "missing_api_key"
INVALID_API_KEY = "invalid_api_key"
MAX_INFLIGHT = "max_inflight"  # the gateway's --max-inflight bound
QUEUE_FULL = "queue_full"  # every engine's waiting queue was at its bound
BODY_TOO_LARGE = "body_too_large"  # an HTTP body over the receive bound (413)
REFUSAL_REASONS = (MISSING_API_KEY, INVALID_API_KEY, MAX_INFLIGHT, QUEUE_FULL, BODY_TOO_LARGE)


@dataclass(frozen=True, slots=True)
class HttpStatus:
    status: int
    type: str  # OpenAI's error "type"


# The one table: gRPC status code -> what the HTTP front answers.
HTTP: dict[grpc.StatusCode, HttpStatus] = {
    Code.INVALID_ARGUMENT: HttpStatus(400, "invalid_request_error"),
    Code.UNAUTHENTICATED: HttpStatus(401, "authentication_error"),
    Code.PERMISSION_DENIED: HttpStatus(403, "permission_error"),
    Code.NOT_FOUND: HttpStatus(404, "not_found_error"),
    Code.RESOURCE_EXHAUSTED: HttpStatus(429, "rate_limit_error"),
    Code.CANCELLED: HttpStatus(499, "cancelled"),
    Code.UNAVAILABLE: HttpStatus(503, "service_unavailable_error"),
    Code.DEADLINE_EXCEEDED: HttpStatus(504, "timeout_error"),
    Code.UNIMPLEMENTED: HttpStatus(501, "not_implemented_error"),
    Code.INTERNAL: HttpStatus(500, "internal_error"),
}

# What the tokenizer workers and engines report for one request.
FROM_IPC: dict[int, grpc.StatusCode] = {
    ipc_pb2.INVALID_ARGUMENT: Code.INVALID_ARGUMENT,
    ipc_pb2.RESOURCE_EXHAUSTED: Code.RESOURCE_EXHAUSTED,
    ipc_pb2.UNAVAILABLE: Code.UNAVAILABLE,
    ipc_pb2.INTERNAL: Code.INTERNAL,
    ipc_pb2.NOT_FOUND: Code.NOT_FOUND,
}


def from_ipc(code: int, message: str) -> Refused:
    # A worker reports RESOURCE_EXHAUSTED only when every engine's waiting queue refused.
    reason = QUEUE_FULL if code == ipc_pb2.RESOURCE_EXHAUSTED else ""
    return Refused(FROM_IPC.get(code, Code.INTERNAL), message, reason=reason)


def from_exception(e: Exception) -> Refused:
    """The wire layer's typed errors (raised while a request is mapped)."""
    if isinstance(e, QueueFullError):
        return Refused(Code.RESOURCE_EXHAUSTED, str(e), reason=QUEUE_FULL)
    if isinstance(e, InvalidRequestError):
        return Refused(Code.INVALID_ARGUMENT, str(e), e.param)
    return Refused(Code.INTERNAL, f"{type(e).__name__}: {e}")


def http_status(code: grpc.StatusCode) -> HttpStatus:
    return HTTP.get(code, HTTP[Code.INTERNAL])


def presented_key(authorization: str, x_api_key: str) -> str:
    """The API key a call presents: ``authorization: Bearer KEY``, else ``x-api-key: KEY``
    (gRPC metadata and HTTP headers alike); empty when it presents none."""
    if authorization.lower().startswith("bearer "):
        return authorization[7:].strip()
    return x_api_key


def api_key_refusal(authorization: str, x_api_key: str, keys: list[bytes]) -> Refused | None:
    """The UNAUTHENTICATED refusal of a call's credentials, or None when they name one of
    ``keys``."""
    key = presented_key(authorization, x_api_key)
    if key and any(hmac.compare_digest(key.encode(), k) for k in keys):
        return None
    if key:
        return Refused(Code.UNAUTHENTICATED, "invalid API key", reason=INVALID_API_KEY)
    return Refused(Code.UNAUTHENTICATED, "missing API key", reason=MISSING_API_KEY)
