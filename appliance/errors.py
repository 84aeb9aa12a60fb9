"""Errors by protocol code. The server raises them; the client raises them too.

Each carries the wire code of DESIGN section 2 and a message that says what was wrong,
with which field, and what to do.
"""

from __future__ import annotations

CODES = (
    "INVALID_ARGUMENT",
    "NOT_FOUND",
    "FAILED_PRECONDITION",
    "RESOURCE_EXHAUSTED",
    "DEADLINE_EXCEEDED",
    "UNAVAILABLE",
    "UNAUTHENTICATED",
    "PERMISSION_DENIED",
    "INTERNAL",
)


class OutpostError(Exception):
    code = "INTERNAL"

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message

    def as_wire(self) -> dict:
        return {"code": self.code, "message": self.message}


class InvalidArgument(OutpostError):
    code = "INVALID_ARGUMENT"


class NotFound(OutpostError):
    code = "NOT_FOUND"


class FailedPrecondition(OutpostError):
    code = "FAILED_PRECONDITION"


class ResourceExhausted(OutpostError):
    code = "RESOURCE_EXHAUSTED"


class DeadlineExceeded(OutpostError):
    code = "DEADLINE_EXCEEDED"


class Unavailable(OutpostError):
    code = "UNAVAILABLE"


class Unauthenticated(OutpostError):
    code = "UNAUTHENTICATED"


class PermissionDenied(OutpostError):
    code = "PERMISSION_DENIED"


class Internal(OutpostError):
    code = "INTERNAL"


_BY_CODE = {cls.code: cls for cls in OutpostError.__subclasses__()}


def error_from_wire(error: object) -> OutpostError:
    """The typed exception for an ``error`` map received from a server."""
    if not isinstance(error, dict):
        return Internal(f"server sent a malformed error: {error!r}")
    cls = _BY_CODE.get(error.get("code"), Internal)
    return cls(str(error.get("message", "")))


class ConfigError(Exception):
    """A config file, flag or model config is wrong; the message names file, key and fix."""
