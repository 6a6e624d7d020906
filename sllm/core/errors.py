"""Errors shared by every component, classified by origin as OpenWhisk classifies results.

    SllmError                       code, message, HTTP status
    ├── ClientError                 the caller's fault: 4xx
    │   ├── InvalidRequest          400 malformed body, bad field values
    │   │   └── ContextLengthExceeded   400 prompt (+ max_tokens) longer than the model's context
    │   ├── Unauthorized            401 missing or wrong token / API key
    │   ├── Forbidden               403 authenticated but not allowed
    │   ├── NotFound                404 unknown model, function, activation
    │   ├── Conflict                409 state does not allow it
    │   └── PayloadTooLarge         413 body over the limit
    ├── Overloaded                  429 too many requests; carries Retry-After
    │   └── Draining                503 an invoker that drains takes no new work: go elsewhere
    ├── FunctionError               502 the model itself failed (bad weights, OOM in forward)
    └── PlatformError               500 our fault or a dependency's
        ├── StoreError              503 the object store is unreachable or refused
        │   └── CorruptObject       502 an object in the store fails its checksums
        ├── InsufficientCapacity    507 the model does not fit the tier budgets
        └── Unavailable             503 shutting down / not ready; carries Retry-After

Every service maps these to `{"error": {"code", "message"}}` in one handler; an error
about one request field also names it, as `param` (OpenAI's name for it).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar


class SllmError(Exception):
    """Base of all sllm errors: a stable machine code, a message and an HTTP status."""

    status: ClassVar[int] = 500
    code: ClassVar[str] = "internal"

    def __init__(
        self, message: str, *, retry_after: float | None = None, param: str | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after = retry_after
        self.param = param  # the request field at fault, when it is one field

    def to_json(self) -> dict[str, Any]:
        """The error body every HTTP surface returns (`param` only when one field is at fault)."""
        error: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.param is not None:
            error["param"] = self.param
        return {"error": error}

    @classmethod
    def from_json(cls, error: Any, default: str) -> SllmError:
        """The error an `{"code", "message", "param"?}` object stands for (found by its code).

        A code no class has is a `cls`; `default` is the message when none is given.
        """
        detail = error if isinstance(error, Mapping) else {}
        message = detail.get("message")
        param = detail.get("param")
        kind = error_class(detail.get("code")) or cls
        return kind(
            message if isinstance(message, str) and message else default,
            param=param if isinstance(param, str) else None,
        )


def error_class(code: object) -> type[SllmError] | None:
    """The SllmError subclass whose `code` is `code` (None when no class has it).

    Subclasses defined elsewhere (a controller's timeout, say) count once their
    module is imported. Breadth first, so a base class wins over a subclass
    reusing its code.
    """
    classes = SllmError.__subclasses__()
    for cls in classes:
        if cls.code == code:
            return cls
        classes.extend(cls.__subclasses__())
    return None


class ClientError(SllmError):
    """The request is at fault."""

    status = 400
    code = "bad_request"


class InvalidRequest(ClientError):
    """Malformed body or a field outside its allowed range."""

    status = 400
    code = "invalid_request"


class ContextLengthExceeded(InvalidRequest):
    """The prompt, with the completion asked for, does not fit the model's context."""

    status = 400
    code = "context_length_exceeded"


class Unauthorized(ClientError):
    """Missing or wrong credentials."""

    status = 401
    code = "unauthorized"


class Forbidden(ClientError):
    """Authenticated, but not allowed to do this."""

    status = 403
    code = "forbidden"


class NotFound(ClientError):
    """The named model, function or record does not exist."""

    status = 404
    code = "not_found"


class Conflict(ClientError):
    """The current state does not allow the operation."""

    status = 409
    code = "conflict"


class PayloadTooLarge(ClientError):
    """The request body exceeds the limit."""

    status = 413
    code = "payload_too_large"


class Overloaded(SllmError):
    """Too many requests right now; retry after `retry_after` seconds."""

    status = 429
    code = "overloaded"


class Draining(Overloaded):
    """An invoker that is draining (shutting down) refuses new work; retry elsewhere.

    An Overloaded (the controller then takes another instance, as for a full
    one) answered 503: this invoker is not busy, it is leaving.
    """

    status = 503
    code = "draining"


class FunctionError(SllmError):
    """The model failed while running the request."""

    status = 502
    code = "function_error"


class PlatformError(SllmError):
    """The platform (or a dependency) failed."""

    status = 500
    code = "platform_error"


class StoreError(PlatformError):
    """The object store is unreachable or refused the operation."""

    status = 503
    code = "store_unavailable"


class CorruptObject(StoreError):
    """An object in the store does not match its checksums; it is never served."""

    status = 502
    code = "corrupt_object"


class InsufficientCapacity(PlatformError):
    """The model does not fit this host's tier budgets."""

    status = 507
    code = "insufficient_capacity"


class Unavailable(PlatformError):
    """Not ready or shutting down; retry later."""

    status = 503
    code = "unavailable"
