"""Kinds of setting values: each turns a YAML value (or, from env and flags, text) into the stored type.

A settings field names its kind with `opt(default, kind)`; the loader parses every given value with
it, and a value that does not fit raises `InvalidValue` with what the kind expects.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from tp_ollama.config.values import (
    DURATION_EXPECTED,
    SIZE_EXPECTED,
    InvalidValue,
    format_duration,
    format_size,
    parse_duration,
    parse_size,
)


@dataclass(frozen=True)
class Given:
    """A value for one key, as written, and where it was written."""

    value: Any
    origin: str  # "in cfg.yaml", "p2p.port in cfg.yaml", "from OLLAMA_HOST", "from --node-rank"
    text: bool = False  # from the environment or a command line: numbers and lists may be spelled as text
    base: Path | None = None  # relative paths in a file are relative to the file's directory


class Kind(ABC):
    expected = ""

    @abstractmethod
    def parse(self, g: Given) -> Any: ...

    def show(self, value: Any) -> str:
        return repr(value)


def opt(default: Any, kind: Kind) -> Any:
    """A settings field holding a value of `kind` (a section is a field with a default_factory)."""
    return field(default=default, metadata={"kind": kind})


class Int(Kind):
    def __init__(self, lo: int, hi: int | None = None, note: str = "") -> None:
        self.lo, self.hi = lo, hi
        self.expected = f"an integer {lo}..{hi}" if hi is not None else f"an integer >= {lo}"
        self.expected += f" ({note})" if note else ""

    def parse(self, g: Given) -> int:
        v = g.value
        if g.text and isinstance(v, str) and re.fullmatch(r"\s*[+-]?\d+\s*", v):
            v = int(v)
        if isinstance(v, bool) or not isinstance(v, int) or v < self.lo or (self.hi is not None and v > self.hi):
            raise InvalidValue(g.value, self.expected)
        return v


class Bool(Kind):
    expected = "true or false"
    _TEXT: ClassVar[dict[str, bool]] = dict.fromkeys(("1", "true", "yes", "on"), True) | dict.fromkeys(
        ("0", "false", "no", "off"), False
    )

    def show(self, value: Any) -> str:
        return "true" if value else "false"

    def parse(self, g: Given) -> bool:
        if isinstance(g.value, bool):
            return g.value
        if g.text and isinstance(g.value, str) and g.value.strip().lower() in self._TEXT:
            return self._TEXT[g.value.strip().lower()]
        raise InvalidValue(g.value, self.expected)


class Str(Kind):
    def __init__(
        self, choices: tuple[str, ...] = (), planned: Mapping[str, str] | None = None, empty_ok: bool = False
    ) -> None:
        self.choices, self.planned, self.empty_ok = choices, dict(planned or {}), empty_ok
        self.expected = "one of " + ", ".join(f'"{c}"' for c in choices) if choices else "a non-empty string"
        if empty_ok:
            self.expected = "a string"

    def parse(self, g: Given) -> str:
        v = g.value.strip() if isinstance(g.value, str) else g.value
        if v in self.planned:
            raise InvalidValue(g.value, self.expected, f"is not implemented yet: {self.planned[v]}")
        if not isinstance(v, str) or (not v and not self.empty_ok) or (self.choices and v not in self.choices):
            raise InvalidValue(g.value, self.expected)
        return v


class Host(Kind):
    expected = "a host name or IP address (IPv6 with or without brackets)"

    def parse(self, g: Given) -> str:
        v = g.value.strip() if isinstance(g.value, str) else g.value
        if not isinstance(v, str) or not v or re.search(r"[\s/]", v):
            raise InvalidValue(g.value, self.expected)
        return v[1:-1] if v.startswith("[") and v.endswith("]") else v


class Duration(Kind):
    def __init__(self, lo: float | None = None, strict: bool = False, note: str = "") -> None:
        self.lo, self.strict = lo, strict
        bound = "" if lo is None else f" {'>' if strict else '>='} {lo:g}s"
        self.expected = DURATION_EXPECTED + bound + (f" ({note})" if note else "")

    def parse(self, g: Given) -> float:
        try:
            seconds = parse_duration(g.value)
        except InvalidValue:
            raise InvalidValue(g.value, self.expected) from None
        if self.lo is not None and (seconds <= self.lo if self.strict else seconds < self.lo):
            raise InvalidValue(g.value, self.expected)
        return seconds

    def show(self, value: Any) -> str:
        return format_duration(value)


class Size(Kind):
    def __init__(self, lo: int = 0) -> None:
        self.lo = lo
        self.expected = SIZE_EXPECTED + (f" of at least {lo} bytes" if lo else "")

    def parse(self, g: Given) -> int:
        try:
            n = parse_size(g.value)
        except InvalidValue:
            raise InvalidValue(g.value, self.expected) from None
        if n < self.lo:
            raise InvalidValue(g.value, self.expected)
        return n

    def show(self, value: Any) -> str:
        return format_size(value)


class List(Kind):
    """A YAML list, or comma-separated text from the environment or a flag ("2,1,1").

    `item` turns one element into the stored type, raising TypeError or ValueError when it does not fit.
    """

    def __init__(self, item: Callable[[Any], Any], expected: str) -> None:
        self.item, self.expected = item, expected

    def parse(self, g: Given) -> tuple[Any, ...]:
        v = g.value
        if g.text and isinstance(v, str):
            v = [x.strip() for x in v.split(",") if x.strip()]
        if not isinstance(v, list | tuple):
            raise InvalidValue(g.value, self.expected)
        try:
            return tuple(self.item(x) for x in v)
        except (TypeError, ValueError):
            raise InvalidValue(g.value, self.expected) from None


class Directory(Kind):
    expected = "a directory path"

    def parse(self, g: Given) -> Path:
        if not isinstance(g.value, str | Path) or not str(g.value).strip():
            raise InvalidValue(g.value, self.expected)
        path = Path(str(g.value).strip()).expanduser()
        return path if path.is_absolute() else (g.base or Path.cwd()) / path
