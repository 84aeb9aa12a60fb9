"""Checks of a request's fields that need no model: its model name and version.

The service and the router call these; the transports pass the fields on unchecked.
"""

from __future__ import annotations

from appliance.errors import InvalidArgument


def model_name(value: object) -> str:
    if not isinstance(value, str) or not value:
        raise InvalidArgument("'model' must be a non-empty string naming a model")
    return value


def version_number(value: object) -> int | None:
    """A version asked for: a positive integer, or None for the one the server picks."""
    if value is not None and (type(value) is not int or value < 1):
        raise InvalidArgument(f"'version' {value!r} must be a positive integer")
    return value
