"""The error every wire-format module raises for a bad request, and the JSON field checks they share
(schemas.py, chat_schemas.py, store_schemas.py)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


class ApiError(Exception):
    """A request the server refuses, with its HTTP status and the message clients show."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def json_kind(value: object) -> str:
    """The JSON name of a value's type, for messages."""
    if value is None:
        return "null"
    return {bool: "boolean", int: "number", float: "number", str: "string", list: "array", dict: "object"}.get(
        type(value), type(value).__name__
    )


def json_field(body: Mapping[str, Any], name: str, kind: type | tuple[type, ...], default: Any = None) -> Any:
    """body[name] checked against a JSON kind; absent or null gives `default`."""
    value = body.get(name)
    if value is None:
        return default
    kinds = kind if isinstance(kind, tuple) else (kind,)
    bad_bool = isinstance(value, bool) and bool not in kinds
    if bad_bool or not isinstance(value, kinds):
        wanted = " or ".join(dict.fromkeys(json_kind(k()) for k in kinds))
        raise ApiError(400, f"field {name!r} must be {wanted}, got {json_kind(value)}")
    return value
