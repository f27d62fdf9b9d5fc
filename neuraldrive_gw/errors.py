"""One exception hierarchy for every refusal, and one renderer per client dialect.

Handlers raise a GatewayError subclass; the error middleware renders it in the dialect of
the route (Ollama `{"error": "..."}`, the OpenAI envelope, or the Anthropic envelope).
Messages are fixed, client-safe strings: never upstream text, hosts, allowlists or keys.
"""

from __future__ import annotations

import enum
import json
import math
from collections.abc import Mapping

from aiohttp import web


class Dialect(enum.Enum):
    OLLAMA = "ollama"
    OPENAI = "openai"
    ANTHROPIC = "anthropic"


def dialect_for_path(path: str) -> Dialect:
    """`/v1/messages…` speaks Anthropic, other `/v1/…` OpenAI, everything else Ollama."""
    if path == "/v1/messages" or path.startswith("/v1/messages/"):
        return Dialect.ANTHROPIC
    if path == "/v1" or path.startswith("/v1/"):
        return Dialect.OPENAI
    return Dialect.OLLAMA


class GatewayError(Exception):
    """A refusal the client may see. Subclasses fix status, message and error codes."""

    status = 500
    message = "internal gateway error"
    openai_type = "api_error"
    openai_code: str | None = None
    anthropic_type = "api_error"

    def __init__(self, message: str | None = None, *, headers: Mapping[str, str] | None = None):
        super().__init__(message or self.message)
        if message is not None:
            self.message = message
        self.headers: dict[str, str] = dict(headers or {})

    @property
    def reason(self) -> str:
        """The outcome recorded in the audit and access logs."""
        return type(self).__name__


class BadRequest(GatewayError):
    status = 400
    message = "bad request"
    openai_type = "invalid_request_error"
    anthropic_type = "invalid_request_error"


class NotCanonical(BadRequest):
    message = "request target is not in canonical form"


class TooManyCredentials(BadRequest):
    message = "more than one credential supplied; send exactly one"


class Unauthorized(GatewayError):
    status = 401
    message = "invalid or missing API key"
    openai_type = "invalid_request_error"
    openai_code = "invalid_api_key"
    anthropic_type = "authentication_error"

    def __init__(self, message: str | None = None):
        super().__init__(message, headers={"WWW-Authenticate": "Bearer"})


class EndpointBlocked(GatewayError):
    status = 403
    message = "this endpoint is not available through the gateway"
    openai_type = "permission_error"
    openai_code = "endpoint_blocked"
    anthropic_type = "permission_error"


class ModelNotAllowed(GatewayError):
    """One answer for "not allowed", "not installed" and "cloud": existence never leaks."""

    status = 403
    message = "model not available for this key"
    openai_type = "permission_error"
    openai_code = "model_not_allowed"
    anthropic_type = "permission_error"


class RouteNotFound(GatewayError):
    status = 404
    message = "not found"
    openai_type = "invalid_request_error"
    openai_code = "unknown_url"
    anthropic_type = "not_found_error"


class MethodNotAllowed(GatewayError):
    status = 405
    message = "method not allowed"
    openai_type = "invalid_request_error"
    openai_code = "method_not_allowed"
    anthropic_type = "invalid_request_error"

    def __init__(self, allowed: tuple[str, ...]):
        super().__init__(headers={"Allow": ", ".join(allowed)})


class BodyTimeout(GatewayError):
    status = 408
    message = "request body not received in time"
    openai_type = "invalid_request_error"
    openai_code = "request_timeout"
    anthropic_type = "timeout_error"


class ClientDisconnected(GatewayError):
    """The client went away before its request was read; nobody will see this answer,
    but the audit log and the access log will (nginx's 499)."""

    status = 499
    message = "client closed the connection"
    openai_type = "invalid_request_error"
    openai_code = "client_closed_request"
    anthropic_type = "invalid_request_error"

    @property
    def reason(self) -> str:
        return "client disconnected"      # as when a hang-up cancels the handler


class BodyTooLarge(GatewayError):
    status = 413
    message = "request body too large"
    openai_type = "invalid_request_error"
    openai_code = "request_too_large"
    anthropic_type = "request_too_large"


class UnsupportedEncoding(GatewayError):
    status = 415
    message = "Content-Encoding is not supported; send the body uncompressed"
    openai_type = "invalid_request_error"
    openai_code = "unsupported_encoding"
    anthropic_type = "invalid_request_error"


class UpstreamFailed(GatewayError):
    status = 502
    message = "the model server returned an error"
    openai_type = "api_error"
    openai_code = "upstream_error"
    anthropic_type = "api_error"


class UpstreamRejected(GatewayError):
    """Ollama refused the request itself (a 4xx other than "not found")."""

    status = 400
    message = "the model server rejected the request"
    openai_type = "invalid_request_error"
    anthropic_type = "invalid_request_error"


class Unavailable(GatewayError):
    status = 503
    message = "service temporarily unavailable"
    openai_type = "api_error"
    openai_code = "service_unavailable"
    anthropic_type = "overloaded_error"

    def __init__(self, message: str | None = None, *, retry_after_s: int = 5):
        super().__init__(message, headers={"Retry-After": str(retry_after_s)})


class UpstreamTimeout(GatewayError):
    status = 504
    message = "the model server did not answer in time"
    openai_type = "api_error"
    openai_code = "upstream_timeout"
    anthropic_type = "timeout_error"



def retry_headers(seconds: float) -> dict[str, str]:
    """`retry-after` (whole seconds, at least 1) and `retry-after-ms` for a wait of `seconds`."""
    # Rounded to the microsecond first, so float noise (0.1 s → 100.0000001 ms) is not a ms.
    millis = max(1, math.ceil(round(max(seconds, 0.0) * 1000, 3)))
    return {"retry-after": str(max(1, math.ceil(millis / 1000))), "retry-after-ms": str(millis)}


class RateLimited(GatewayError):
    """A per-minute bucket or a concurrency cap said no; trying again later will work."""

    status = 429
    message = "rate limit reached; retry after the time in the Retry-After header"
    openai_type = "rate_limit_error"
    openai_code = "rate_limit_exceeded"
    anthropic_type = "rate_limit_error"

    def __init__(self, message: str | None = None, *, retry_after_s: float = 1.0,
                 headers: Mapping[str, str] | None = None):
        super().__init__(message, headers={**(headers or {}), **retry_headers(retry_after_s)})


class TooManyConcurrent(RateLimited):
    message = "too many concurrent requests for this key"
    openai_code = "concurrency_limit_exceeded"


class BudgetExhausted(GatewayError):
    """The token budget for the period is spent: retrying before the reset cannot succeed."""

    status = 429
    message = "token budget exhausted for this period"
    openai_type = "insufficient_quota"
    openai_code = "insufficient_quota"
    anthropic_type = "rate_limit_error"

    def __init__(self, message: str | None = None, *, retry_after_s: float = 1.0,
                 headers: Mapping[str, str] | None = None):
        super().__init__(message, headers={**(headers or {}), **retry_headers(retry_after_s),
                                           "x-should-retry": "false"})


class QueueTimeout(Unavailable):
    """Waited `limits.queue_timeout_s` for a model slot without getting one."""

    message = "the model server is busy; the request waited too long in the queue"
    openai_code = "queue_timeout"


def error_body(error: GatewayError, dialect: Dialect, request_id: str) -> bytes:
    """The JSON body for `error` in `dialect`; the request id is part of the message."""
    message = f"{error.message} (request id: {request_id})"
    payload: object
    if dialect is Dialect.OPENAI:
        payload = {"error": {"message": message, "type": error.openai_type,
                             "param": None, "code": error.openai_code}}
    elif dialect is Dialect.ANTHROPIC:
        payload = {"type": "error", "error": {"type": error.anthropic_type, "message": message},
                   "request_id": request_id}
    else:
        payload = {"error": message}
    return json.dumps(payload, separators=(",", ":")).encode()


def error_response(error: GatewayError, dialect: Dialect, request_id: str) -> web.Response:
    """Render `error` as a complete response (headers included, X-Request-ID set by the caller)."""
    response = web.Response(status=error.status, body=error_body(error, dialect, request_id),
                            content_type="application/json")
    response.headers.update(error.headers)
    return response
