"""Wire formats of the model-store routes (/api/tags, show, create, copy, delete, blobs, pull, push): request
bodies parsed and checked into plain dataclasses, and the response bodies. Split from schemas.py,
which holds the generation formats; nothing here touches the disk."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tp_ollama.server.schemas import ApiError, _field, _kind, model_field
from tp_ollama.store.manifests import digest_hex
from tp_ollama.store.model_store import ModelEntry
from tp_ollama.store.modelfile import parse_modelfile
from tp_ollama.store.names import is_valid_name, parse_name

# A `from` that starts like this names a file or directory on the server (node 0), not a model.
_PATH_PREFIXES = ("/", "~", "./", "../")


@dataclass(frozen=True)
class CreateRequest:
    """/api/create, structured fields and the legacy `modelfile` merged (explicit fields win).
    `from_` is a model name, `@sha256:<hex>` (an uploaded GGUF blob) or a Path on the server."""

    model: str
    from_: str | Path | None = None
    files: dict[str, str] = field(default_factory=dict)
    template: str | None = None
    system: str | None = None
    parameters: dict[str, Any] = field(default_factory=dict)
    messages: list[dict[str, Any]] = field(default_factory=list)
    license: list[str] = field(default_factory=list)
    stream: bool = True


def display_name(name: str) -> str:
    """`m` -> `m:latest`, the form the loaded model is known by; `name` was checked already."""
    return parse_name(name).display


def create_source(text: str) -> str | Path:
    """`from`: a blob digest (`sha256:<hex>`, `@sha256:<hex>`) -> `@sha256:<hex>`; an absolute, `~`
    or `./` path -> a Path on the server; anything else is a model name."""
    if text.startswith(("@sha256", "sha256")):
        return "@" + blob_digest(text.removeprefix("@"))
    if text.startswith(_PATH_PREFIXES):
        return Path(text).expanduser()
    if not is_valid_name(text):
        raise ApiError(400, f"invalid model name in 'from': {text!r}")
    return text


def _strings(body: Mapping[str, Any], name: str) -> list[str]:
    """A string or an array of strings (`license`)."""
    value = body.get(name)
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return list(value)
    raise ApiError(400, f"field {name!r} must be a string or an array of strings, got {_kind(value)}")


def _files(body: Mapping[str, Any]) -> dict[str, str]:
    files = _field(body, "files", dict, {})
    bad = [k for k, v in files.items() if not isinstance(v, str)]
    if bad:
        raise ApiError(400, f"field 'files' must map file names to blob digests; {bad[0]!r} does not")
    return dict(files)


def parse_create(body: Mapping[str, Any]) -> CreateRequest:
    model = model_field(body)
    if _field(body, "quantize", str) or _field(body, "quantization", str):
        raise ApiError(400, "quantize is not supported by tp-ollama: create from an already quantized GGUF")
    if _field(body, "adapters", dict):
        raise ApiError(400, "LoRA adapters are not supported by tp-ollama")
    base: dict[str, Any] = {}
    modelfile = _field(body, "modelfile", str)
    if modelfile:
        mf = parse_modelfile(modelfile)  # ModelfileError: 400 with the line number
        base = {**mf.create_request(), "from": mf.from_}
    messages = _field(body, "messages", list)
    if messages is not None and not all(isinstance(m, dict) for m in messages):
        raise ApiError(400, "field 'messages' must be an array of objects with role and content")
    source = _field(body, "from", str) or base.get("from")
    files = _files(body)
    if not source and not files:
        raise ApiError(400, "neither 'from' or 'files' was specified")
    return CreateRequest(
        model=model,
        from_=create_source(source) if source and not files else None,
        files=files,
        template=_field(body, "template", str, base.get("template")),
        system=_field(body, "system", str, base.get("system")),
        parameters=_field(body, "parameters", dict, base.get("parameters", {})),
        messages=messages if messages is not None else base.get("messages", []),
        license=_strings(body, "license") or base.get("license", []),
        stream=_field(body, "stream", bool, True),
    )


@dataclass(frozen=True)
class ShowRequest:
    model: str
    verbose: bool = False


def parse_show(body: Mapping[str, Any]) -> ShowRequest:
    return ShowRequest(model_field(body), _field(body, "verbose", bool, False))


def parse_copy(body: Mapping[str, Any]) -> tuple[str, str]:
    """(source, destination), with upstream's messages for a bad name."""
    names = []
    for key in ("source", "destination"):
        value = _field(body, key, str, "")
        if not is_valid_name(value):
            raise ApiError(400, f'{key} "{value}" is invalid')
        names.append(value)
    return names[0], names[1]


def blob_digest(text: str) -> str:
    """`sha256:<hex>` or `sha256-<hex>` -> `sha256:<hex>`; 400 `invalid digest format` otherwise."""
    return f"sha256:{digest_hex(text)}"


def tags_body(entries: Sequence[ModelEntry]) -> dict[str, Any]:
    """/api/tags: entries as the store lists them (newest first); `[]`, never null, when none."""
    return {"models": [entry.to_dict() for entry in entries]}


def status_line(status: str) -> dict[str, Any]:
    return {"status": status}


@dataclass(frozen=True)
class TransferRequest:
    """/api/pull and /api/push. `insecure` allows a plain-http registry; the legacy `username` and
    `password` are ignored."""

    model: str
    insecure: bool = False
    stream: bool = True


def parse_transfer(body: Mapping[str, Any]) -> TransferRequest:
    model = model_field(body)
    if not is_valid_name(model):
        raise ApiError(400, "invalid model name")
    return TransferRequest(model, _field(body, "insecure", bool, False), _field(body, "stream", bool, True))


def layer_line(verb: str, digest: str, size: int, completed: int | None = None) -> dict[str, Any]:
    """`{"status":"pulling <hex12>","digest","total","completed"}` for one layer (config included)."""
    done = size if completed is None else completed
    return {"status": f"{verb} {digest_hex(digest)[:12]}", "digest": digest, "total": size, "completed": done}
