"""Modelfiles: parsing one into the fields of an /api/create request, typing PARAMETER values by Ollama's
options table, and rendering a stored model back as text (`ollama show --modelfile`).

Syntax (upstream parser/parser.go): one `INSTRUCTION args` per line, instruction names in any case,
`#` lines are comments. A value is the rest of the line, or `"..."` / `\"\"\"...\"\"\"` which may span
lines; a quoted value ends on the first line that ends with its closing quote, and keeps its
content verbatim (newlines and spaces included).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tp_ollama.errors import RequestError

log = logging.getLogger(__name__)

INSTRUCTIONS = (
    "from",
    "license",
    "template",
    "system",
    "adapter",
    "draft",
    "renderer",
    "parser",
    "parameter",
    "message",
    "requires",
)
UNSUPPORTED = {
    "adapter": "LoRA adapters are not supported by tp-ollama",
    "draft": "draft models (speculative decoding) are not supported by tp-ollama",
    "renderer": "RENDERER (built-in prompt renderers) is not supported by tp-ollama",
    "parser": "PARSER (built-in output parsers) is not supported by tp-ollama",
}
MESSAGE_ROLES = ("system", "user", "assistant")

# The options table (spec section 2.7): every key a PARAMETER line or /api/create `parameters` may set.
PARAMETER_TYPES: dict[str, type] = {
    "num_ctx": int,
    "num_batch": int,
    "num_gpu": int,
    "main_gpu": int,
    "use_mmap": bool,
    "num_thread": int,
    "num_keep": int,
    "seed": int,
    "num_predict": int,
    "top_k": int,
    "top_p": float,
    "min_p": float,
    "typical_p": float,
    "repeat_last_n": int,
    "temperature": float,
    "repeat_penalty": float,
    "presence_penalty": float,
    "frequency_penalty": float,
    "stop": list,
}
# Accepted for old Modelfiles but dropped with a warning, as upstream does with deprecated keys.
LEGACY_PARAMETERS = frozenset(
    {
        "mirostat",
        "mirostat_tau",
        "mirostat_eta",
        "tfs_z",
        "penalize_newline",
        "numa",
        "low_vram",
        "f16_kv",
        "logits_all",
        "vocab_only",
        "use_mlock",
        "embedding_only",
    }
)
_TRUE = ("1", "t", "true")  # Go strconv.ParseBool, case-insensitive here
_FALSE = ("0", "f", "false")


class ModelfileError(RequestError):
    """A Modelfile that cannot be used; the message starts with `(line N):` when a line is at fault."""

    def __init__(self, message: str, line: int | None = None) -> None:
        super().__init__(f"(line {line}): {message}" if line is not None else message)
        self.line = line


@dataclass
class Modelfile:
    """A parsed Modelfile. `from_` is FROM's text as written: a model name, a file or directory
    path, or `@sha256:<hex>` (a blob, as pre-0.5.5 clients sent after uploading a file)."""

    from_: str
    parameters: dict[str, Any] = field(default_factory=dict)
    template: str | None = None
    system: str | None = None
    license: list[str] = field(default_factory=list)
    messages: list[dict[str, str]] = field(default_factory=list)
    requires: str | None = None

    def resolve_from(self, base_dir: Path | None) -> str | Path:
        """FROM as a path when it names an existing file or directory (relative to `base_dir`, the
        Modelfile's directory; `~` expanded), otherwise as written: a model name or blob digest.
        This is upstream's rule; with `base_dir` None only absolute or `~` paths count."""
        if self.from_.startswith("@"):
            return self.from_
        path = Path(self.from_).expanduser()
        if not path.is_absolute():
            if base_dir is None:
                return self.from_
            path = base_dir / path
        return path if path.exists() else self.from_

    def create_request(self) -> dict[str, Any]:
        """The /api/create fields this Modelfile stands for (empty ones left out)."""
        request: dict[str, Any] = {"from": self.from_}
        for key in ("template", "system"):
            value = getattr(self, key)
            if value is not None:
                request[key] = value
        if self.parameters:
            request["parameters"] = dict(self.parameters)
        if self.license:
            request["license"] = list(self.license)
        if self.messages:
            request["messages"] = [dict(m) for m in self.messages]
        return request


def parse_modelfile(text: str) -> Modelfile:
    """Parse Modelfile text; ModelfileError with the line number on the first problem."""
    lines = text.removeprefix("\ufeff").replace("\r\n", "\n").split("\n")
    from_: tuple[str, int] | None = None
    parameters: dict[str, Any] = {}
    fields: dict[str, str] = {}
    licenses: list[str] = []
    messages: list[dict[str, str]] = []
    i = 0
    while i < len(lines):
        lineno = i + 1
        stripped = lines[i].strip()
        if not stripped or stripped.startswith("#"):
            i += 1
            continue
        word, rest = _split_word(stripped)
        instruction = word.lower()
        if instruction not in INSTRUCTIONS:
            names = ", ".join(f'"{n}"' for n in INSTRUCTIONS[:-1])
            raise ModelfileError(f'command must be one of {names}, or "{INSTRUCTIONS[-1]}"', lineno)
        if instruction in UNSUPPORTED:
            raise ModelfileError(f"{word.upper()}: {UNSUPPORTED[instruction]}", lineno)
        head = ""
        if instruction in ("parameter", "message"):
            head, rest = _split_word(rest)
            if not head:
                raise ModelfileError(f"missing {'key' if instruction == 'parameter' else 'role'} for {word}", lineno)
        value, i = _read_value(rest, lines, i)
        if instruction == "from":
            if not value.strip():
                raise ModelfileError("missing value for FROM", lineno)
            if from_ is not None:
                raise ModelfileError(f"second FROM (the first is on line {from_[1]})", lineno)
            from_ = (value.strip(), lineno)
        elif instruction == "parameter":
            _add_parameter(parameters, head, value, lineno)
        elif instruction == "message":
            role = head.lower()
            if role not in MESSAGE_ROLES:
                raise ModelfileError('message role must be one of "system", "user", or "assistant"', lineno)
            messages.append({"role": role, "content": value})
        elif instruction == "license":
            licenses.append(value)
        elif instruction == "requires":
            fields["requires"] = value.strip()
        else:  # template, system
            fields[instruction] = value
    if from_ is None:
        raise ModelfileError("no FROM line")
    return Modelfile(
        from_=from_[0],
        parameters=parameters,
        template=fields.get("template"),
        system=fields.get("system"),
        license=licenses,
        messages=messages,
        requires=fields.get("requires"),
    )


def _split_word(text: str) -> tuple[str, str]:
    parts = text.split(None, 1)
    if not parts:
        return "", ""
    return parts[0], parts[1] if len(parts) > 1 else ""


def _read_value(rest: str, lines: list[str], i: int) -> tuple[str, int]:
    """The value starting with `rest` on line i, and the index of the line after it."""
    opened = i + 1
    rest = rest.lstrip()
    quote = '"""' if rest.startswith('"""') else '"' if rest.startswith('"') else ""
    if not quote:
        return rest.strip(), i + 1
    body = [rest[len(quote) :]]
    while True:
        current = body[-1].rstrip()
        if current.endswith(quote):
            body[-1] = current[: -len(quote)]
            return "\n".join(body), i + 1
        i += 1
        if i >= len(lines):
            raise ModelfileError(f"unterminated {quote} (the value opened here never closes)", opened)
        body.append(lines[i])


def _add_parameter(parameters: dict[str, Any], key: str, raw: str, lineno: int) -> None:
    try:
        typed = coerce_parameters({key: raw})
    except RequestError as e:
        raise ModelfileError(str(e), lineno) from e
    if key == "stop" and "stop" in parameters:
        parameters["stop"] = [*parameters["stop"], *typed["stop"]]
    else:
        parameters.update(typed)


def coerce_parameters(parameters: Mapping[str, Any]) -> dict[str, Any]:
    """Parameters typed by the options table: ints, floats, bools and `stop` as a list of strings.
    Values may be JSON values or strings (Modelfile text). An unknown key is an error naming it;
    legacy keys are dropped with a warning."""
    out: dict[str, Any] = {}
    for key, value in parameters.items():
        if key in LEGACY_PARAMETERS:
            log.warning("parameter %r is deprecated and ignored", key)
            continue
        kind = PARAMETER_TYPES.get(key)
        if kind is None:
            raise RequestError(f"unknown parameter '{key}'")
        if value is None:
            continue
        out[key] = _coerce(key, kind, value)
    return out


def _coerce(key: str, kind: type, value: Any) -> Any:
    def bad(expected: str) -> RequestError:
        return RequestError(f"parameter {key}={value!r} is invalid: expected {expected}")

    if kind is list:
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, list | tuple) or not all(isinstance(s, str) for s in items):
            raise bad("a string or a list of strings")
        return list(items)
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
            return value.strip().lower() in _TRUE
        raise bad("true or false")
    expected = "an integer" if kind is int else "a finite number"
    if isinstance(value, str):
        try:
            value = float(value.strip()) if kind is float else int(value.strip())
        except ValueError:
            raise bad(expected) from None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise bad(expected)
    # JSON numbers become ints for int options by truncation, as upstream's options decoding does.
    return int(value) if kind is int else float(value)


# --- rendering -------------------------------------------------------------------------------------


def quote_value(value: str) -> str:
    """Upstream's quoting for `ollama show --modelfile`, widened so that parse(render(x)) == x: a value
    with a newline, surrounding whitespace or a leading quote is wrapped in `\"\"\"` (or `"` when it
    has no quote character)."""
    if "\n" in value or value != value.strip() or value.startswith('"') or not value:
        return f'"""{value}"""' if '"' in value or not value else f'"{value}"'
    return value


def _scalar_text(value: Any) -> str:
    """A parameter value as Go's `%v` prints the JSON-decoded value: 1.0 as `1`, True as `true`."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e21:
        return str(int(value))
    return str(value)


def parameter_items(parameters: Mapping[str, Any]) -> list[tuple[str, Any]]:
    """(key, value) pairs with list values (`stop`) spread over several pairs, in stored order."""
    items: list[tuple[str, Any]] = []
    for key, value in parameters.items():
        for v in value if isinstance(value, list) else [value]:
            items.append((key, v))
    return items


def format_parameters(parameters: Mapping[str, Any]) -> str:
    """/api/show `parameters`: the key padded to 30 columns, then the value (strings quoted)."""
    lines = []
    for key, value in parameter_items(parameters):
        text = json.dumps(value, ensure_ascii=False) if isinstance(value, str) else _scalar_text(value)
        lines.append(f"{key:<30} {text}")
    return "\n".join(lines)


def render_modelfile(
    *,
    name: str,
    from_: str,
    template: str | None = None,
    system: str | None = None,
    parameters: Mapping[str, Any] | None = None,
    license: Sequence[str] = (),
    messages: Sequence[Mapping[str, str]] = (),
) -> str:
    """The text `ollama show --modelfile` prints: a header naming the model, then FROM (the weights'
    path), TEMPLATE, SYSTEM, PARAMETER, LICENSE and MESSAGE lines."""
    out = [
        '# Modelfile generated by "ollama show"',
        "# To build a new Modelfile based on this, replace FROM with:",
        f"# FROM {name}",
        "",
        f"FROM {from_}",
    ]
    if template:
        out.append(f"TEMPLATE {quote_value(template)}")
    if system:
        out.append(f"SYSTEM {quote_value(system)}")
    for key, value in parameter_items(parameters or {}):
        out.append(f"PARAMETER {key} {quote_value(value if isinstance(value, str) else _scalar_text(value))}")
    for text in license:
        out.append(f"LICENSE {quote_value(text)}")
    for m in messages:
        out.append(f"MESSAGE {m['role']} {quote_value(m['content'])}")
    return "\n".join(out) + "\n"
