"""Ollama model names: `[host/][namespace/]model[:tag]`, with the defaults registry.ollama.ai, library
and latest. Parts are matched case-insensitively; the display form drops the default host and namespace.

    >>> parse_name("Gemma3").display
    'Gemma3:latest'
    >>> parse_name("registry.ollama.ai/library/gemma3:270m") == parse_name("gemma3:270m")
    True
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import PurePosixPath

from tp_ollama.errors import TpOllamaError

DEFAULT_HOST = "registry.ollama.ai"
DEFAULT_NAMESPACE = "library"
DEFAULT_TAG = "latest"

# types/model/name.go: the first character of every part is [A-Za-z0-9_].
_HOST = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.:-]{0,349}")
_NAMESPACE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_-]{0,79}")
_MODEL_OR_TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,79}")


class InvalidModelName(TpOllamaError):
    """A name outside Ollama's grammar (400 `invalid model name` on the API)."""

    def __init__(self, name: str) -> None:
        super().__init__("invalid model name")
        self.name = name


@dataclass(frozen=True)
class ModelName:
    """A fully qualified name. Equality and hashing ignore case, like Ollama's lookups; the
    parts keep the casing they were written with."""

    host: str = field(compare=False)
    namespace: str = field(compare=False)
    model: str = field(compare=False)
    tag: str = field(compare=False)
    key: tuple[str, str, str, str] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        parts = (self.host, self.namespace, self.model, self.tag)
        object.__setattr__(self, "key", tuple(p.casefold() for p in parts))

    @property
    def display(self) -> str:
        """Ollama's DisplayShortest: `model:tag`, `ns/model:tag` or `host/ns/model:tag`."""
        if self.host.casefold() != DEFAULT_HOST:
            return f"{self.host}/{self.namespace}/{self.model}:{self.tag}"
        if self.namespace.casefold() != DEFAULT_NAMESPACE:
            return f"{self.namespace}/{self.model}:{self.tag}"
        return f"{self.model}:{self.tag}"

    @property
    def full(self) -> str:
        return f"{self.host}/{self.namespace}/{self.model}:{self.tag}"

    @property
    def parts(self) -> tuple[str, str, str, str]:
        return (self.host, self.namespace, self.model, self.tag)

    @property
    def manifest_path(self) -> PurePosixPath:
        """Relative to the store root: `manifests/<host>/<namespace>/<model>/<tag>`."""
        return PurePosixPath("manifests", *self.parts)

    def __str__(self) -> str:
        return self.display


def parse_name(text: str) -> ModelName:
    """The name `text` denotes, defaults filled in; InvalidModelName when it breaks the grammar.

    The tag is what follows the last `:` when that comes after the last `/` (so `host:port/ns/m`
    has no tag); a `scheme://` prefix on the host is dropped, as upstream does."""
    rest = text
    if "://" in rest:
        rest = rest.split("://", 1)[1]
    tag = DEFAULT_TAG
    if rest.rfind(":") > rest.rfind("/"):
        rest, tag = rest.rsplit(":", 1)
    pieces = rest.split("/")
    if len(pieces) > 3:
        raise InvalidModelName(text)
    model = pieces[-1]
    namespace = pieces[-2] if len(pieces) >= 2 else DEFAULT_NAMESPACE
    host = pieces[-3] if len(pieces) == 3 else DEFAULT_HOST
    for pattern, part in ((_HOST, host), (_NAMESPACE, namespace), (_MODEL_OR_TAG, model), (_MODEL_OR_TAG, tag)):
        if not pattern.fullmatch(part):
            raise InvalidModelName(text)
    return ModelName(host, namespace, model, tag)


def is_valid_name(text: str) -> bool:
    try:
        parse_name(text)
    except InvalidModelName:
        return False
    return True


def normalize_name(name: str) -> str:
    """The display form of a name (`gemma3` -> `gemma3:latest`). Lenient on purpose: a string that is
    not a valid name (a file path, say) comes back stripped but otherwise unchanged, so that a lookup
    with it simply misses; code that must reject bad names calls `parse_name`."""
    name = name.strip()
    try:
        return parse_name(name).display
    except InvalidModelName:
        return name
