"""The errors a client can see, each knowing its HTTP status and OpenAI type/code.

    CodexLBError                      rendered as {"error": {message, type, code, param}}
    ├── InvalidApiKey                 401 invalid_request_error / invalid_api_key
    │   └── KeyExpired                    the same, for a key past its expires_at
    ├── InvalidRequest                400 invalid_request_error / invalid_request (param: field)
    ├── Forbidden                     403 invalid_request_error / (its code): another origin
    │                                     or host, an operator view no key may open
    ├── UnsupportedMediaType          415 invalid_request_error / unsupported_media_type
    ├── PreviousResponseNotFound      400 invalid_request_error / previous_response_not_found
    ├── NotFound                      404 invalid_request_error / not_found
    ├── ModelNotFound                 404 invalid_request_error / model_not_found (the key's
    │                                     models)
    ├── PayloadTooLarge               413 (HTTP) / 400 (WebSocket) ... / payload_too_large
    ├── RequestTimeout                408 invalid_request_error / request_timeout (body stalled)
    ├── UsageLimitReached             429 usage_limit_reached, with Retry-After and resets_at
    │   └── KeyUsageLimitReached          a key's tokens_per_5h/_week, named for Codex CLI
    ├── KeyRateLimited                429 requests / rate_limit_exceeded, Retry-After (a key's
    │                                     requests_per_minute or max_inflight)
    ├── PoolBusy                      429 rate_limit_exceeded, Retry-After: 1 (all at max_inflight)
    ├── UpstreamUnavailable           502 server_error / upstream_error
    ├── ServerBusy                    503 server_error / server_busy, Retry-After: 1 (too many
    │                                 bodies or connections held at once)
    └── SnapshotNotStored             500 server_error / server_error (the database failed)

On Anthropic's ``/v1/messages`` the same errors take Anthropic's shape (``anthropic_error``):
``{"type": "error", "error": {"type", "message"}}``, the type following the status.

Foreign exceptions (aiohttp, SQLAlchemy, json) are translated into this tree at exactly one
boundary each, with ``raise ... from exc``; the HTTP middleware and the WebSocket handler are
the only places that render them.
"""

from __future__ import annotations

import json
import math
import time
from typing import Any

SHOWN_CHARS = 128
"""The longest client-given value an error message repeats, in characters."""


class CodexLBError(Exception):
    status = 500
    type = "server_error"
    code = "internal_error"

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param

    def error_object(self) -> dict[str, Any]:
        return {"message": self.message, "type": self.type, "code": self.code, "param": self.param}

    def body(self) -> bytes:
        return json.dumps({"error": self.error_object()}).encode()

    def headers(self) -> dict[str, str]:
        return {}

    def anthropic_body(self) -> bytes:
        return json.dumps(anthropic_error(self.status, self.message)).encode()


class InvalidApiKey(CodexLBError):
    status = 401
    type = "invalid_request_error"
    code = "invalid_api_key"

    def __init__(self, what: str = "API key") -> None:
        super().__init__(f"Incorrect or missing {what}. Send 'Authorization: Bearer <key>'.")


class KeyExpired(InvalidApiKey):
    def __init__(self, name: str, expired: float) -> None:
        CodexLBError.__init__(
            self,
            f"The API key '{shown(name)}' expired at "
            f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime(expired))}.",
        )


class InvalidRequest(CodexLBError):
    status = 400
    type = "invalid_request_error"
    code = "invalid_request"


class Forbidden(CodexLBError):
    status = 403
    type = "invalid_request_error"

    def __init__(self, message: str, *, code: str) -> None:
        super().__init__(message)
        self.code = code


class UnsupportedMediaType(CodexLBError):
    status = 415
    type = "invalid_request_error"
    code = "unsupported_media_type"


class PreviousResponseNotFound(CodexLBError):
    status = 400
    type = "invalid_request_error"
    code = "previous_response_not_found"

    def __init__(self, response_id: str) -> None:
        super().__init__(
            f"Previous response with id '{shown(response_id)}' not found.",
            param="previous_response_id",
        )
        self.response_id = response_id


class NotFound(CodexLBError):
    status = 404
    type = "invalid_request_error"
    code = "not_found"


class ModelNotFound(CodexLBError):
    status = 404
    type = "invalid_request_error"
    code = "model_not_found"

    def __init__(self, model: str) -> None:
        super().__init__(
            f"The model '{shown(model)}' does not exist or this API key may not use it.",
            param="model",
        )


class MethodNotAllowed(CodexLBError):
    status = 405
    type = "invalid_request_error"
    code = "method_not_allowed"


class PayloadTooLarge(CodexLBError):
    status = 413
    type = "invalid_request_error"
    code = "payload_too_large"

    def __init__(self, limit: int) -> None:
        super().__init__(f"Request body exceeds the limit of {limit} bytes.")


class RequestTimeout(CodexLBError):
    status = 408
    type = "invalid_request_error"
    code = "request_timeout"


class ServerBusy(CodexLBError):
    """codexlb holds as many request bytes (or connections) as it may: a short wait helps, and
    Codex retries a 5xx after ``Retry-After``."""

    status = 503
    type = "server_error"
    code = "server_busy"

    def headers(self) -> dict[str, str]:
        return {"Retry-After": "1"}


class UsageLimitReached(CodexLBError):
    status = 429
    type = "usage_limit_reached"
    code = "usage_limit_reached"

    def __init__(
        self,
        resets_at: float | None,
        message: str = "Every upstream account has reached its usage limit or is cooling down.",
        *,
        now: float | None = None,
    ) -> None:
        super().__init__(message)
        self.resets_at = resets_at
        self._now = now
        """The time ``resets_at`` is counted from (``Retry-After``); default: the clock's."""

    def error_object(self) -> dict[str, Any]:
        obj = super().error_object()
        if self.resets_at is not None:
            obj["resets_at"] = math.ceil(self.resets_at)
        return obj

    def headers(self) -> dict[str, str]:
        if self.resets_at is None:
            return {"Retry-After": "60"}
        now = time.time() if self._now is None else self._now
        return {"Retry-After": str(max(1, math.ceil(self.resets_at - now)))}


class KeyUsageLimitReached(UsageLimitReached):
    """A client key at its ``tokens_per_5h`` or ``tokens_per_week`` (SPEC S9).

    Codex CLI shows its own sentence for ``usage_limit_reached``, not the message; it names
    the limit the ``x-codex-limit-name`` header names ("You've hit your usage limit for
    <name>. ... try again at <time>."), so the header carries the key's limit.
    """

    def __init__(self, resets_at: float, message: str, *, limit_name: str, now: float) -> None:
        super().__init__(resets_at, message, now=now)
        self.limit_name = _header_text(limit_name)

    def headers(self) -> dict[str, str]:
        return {**super().headers(), "x-codex-limit-name": self.limit_name}


class PoolBusy(CodexLBError):
    """Every eligible account is at its ``max_inflight``: a short wait helps (Codex retries a
    ``rate_limit_exceeded`` after ``Retry-After``, while ``usage_limit_reached`` is fatal)."""

    status = 429
    type = "rate_limit_exceeded"
    code = "rate_limit_exceeded"

    def __init__(self) -> None:
        super().__init__("Every upstream account is at its in-flight limit; retry shortly.")

    def headers(self) -> dict[str, str]:
        return {"Retry-After": "1"}


class KeyRateLimited(CodexLBError):
    """A client key over its ``requests_per_minute`` or ``max_inflight`` (SPEC S9): Codex
    retries after ``Retry-After``."""

    status = 429
    type = "requests"
    code = "rate_limit_exceeded"

    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = max(1, math.ceil(retry_after))

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after)}


class UpstreamUnavailable(CodexLBError):
    status = 502
    type = "server_error"
    code = "upstream_error"


class SnapshotNotStored(CodexLBError):
    """A completed response whose snapshot the database did not take: it is not forwarded as
    completed (S2), and the client may send the request again."""

    code = "server_error"

    def __init__(self) -> None:
        super().__init__("codexlb could not store the response; please send the request again.")


def _header_text(value: str) -> str:
    """``value`` as a header may carry it: printable ASCII, others as ``?``, cut short."""
    return "".join(c if " " <= c <= "~" else "?" for c in shown(value))


def shown(value: str) -> str:
    """``value`` as an error message may repeat it: cut to ``SHOWN_CHARS`` with an ellipsis, so
    that a huge id is not sent back whole."""
    return value if len(value) <= SHOWN_CHARS else value[: SHOWN_CHARS - 1] + "…"


ANTHROPIC_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    503: "overloaded_error",
    529: "overloaded_error",
}


def anthropic_error(status: int, message: str) -> dict[str, Any]:
    """An error in Anthropic's shape; its type follows the HTTP status."""
    kind = ANTHROPIC_ERROR_TYPES.get(status)
    if kind is None:
        kind = "invalid_request_error" if 400 <= status < 500 else "api_error"
    return {"type": "error", "error": {"type": kind, "message": message}}
