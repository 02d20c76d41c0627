"""The servers `tp-ollama bench serve` loads: a target is `[NAME@]KIND=URL`, and KIND names one of three
streamed completion APIs, each read by its `Wire` (the request body it sends, what each streamed line says).

    ollama=http://127.0.0.1:11434      POST /api/generate, NDJSON, `done` on the last line (tp-ollama, Ollama)
    llamacpp=http://127.0.0.1:8080     POST /completion, SSE, `stop: true` on the last event (llama-server)
    openai=http://127.0.0.1:8000       POST /v1/completions, SSE `data:` lines ending in `data: [DONE]`
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Protocol

from tp_ollama.errors import ConfigError

_SPEC = re.compile(r"(?:(?P<name>[^@=]*)@)?(?P<kind>[A-Za-z]+)=(?P<url>.+)")


# ---- the three wire formats ---------------------------------------------------------------------


@dataclass(frozen=True)
class Chunk:
    """What one streamed line says. `tokens` and `stop` may come before the end (OpenAI's usage chunk)."""

    carries_token: bool = False
    final: bool = False
    tokens: int | None = None  # the server's token count for the whole request
    stop: str | None = None  # the server's stop reason ("length", "stop", ...)
    error: str | None = None


class Wire(Protocol):
    route: str

    def body(self, model: str, prompt: str, num_predict: int, seed: int) -> dict[str, Any]: ...

    def parse(self, line: str) -> Chunk | None: ...


class OllamaWire:
    """/api/generate: NDJSON, `done` on the last line with `eval_count`."""

    route = "/api/generate"

    def body(self, model: str, prompt: str, num_predict: int, seed: int) -> dict[str, Any]:
        options = {"temperature": 0, "seed": seed, "num_predict": num_predict}
        # keep_alive -1: an idle gap between levels must not unload the model and bill a reload to TTFT.
        return {"model": model, "prompt": prompt, "raw": True, "stream": True, "keep_alive": -1, "options": options}

    def parse(self, line: str) -> Chunk | None:
        if not line.strip():
            return None
        data = json.loads(line)
        if "error" in data:
            return Chunk(error=str(data["error"]))
        if data.get("done"):
            return Chunk(
                carries_token=bool(data.get("response")),
                final=True,
                tokens=data.get("eval_count"),
                stop=data.get("done_reason"),
            )
        return Chunk(carries_token=bool(data.get("response")))


class LlamaCppWire:
    """llama-server's /completion: SSE, `stop: true` on the last event with `tokens_predicted`."""

    route = "/completion"

    def body(self, model: str, prompt: str, num_predict: int, seed: int) -> dict[str, Any]:
        # cache_prompt false: the other servers get no prefix cache either.
        return {
            "prompt": prompt,
            "n_predict": num_predict,
            "temperature": 0,
            "seed": seed,
            "ignore_eos": True,
            "cache_prompt": False,
            "stream": True,
        }

    def parse(self, line: str) -> Chunk | None:
        if not line.startswith("data:"):
            return None
        data = json.loads(line.removeprefix("data:"))
        if "error" in data:
            return Chunk(error=json.dumps(data["error"]))
        if data.get("stop"):
            # The last event can carry the last token's text as well as the totals.
            return Chunk(
                carries_token=bool(data.get("content")),
                final=True,
                tokens=data.get("tokens_predicted"),
                stop=data.get("stop_type"),
            )
        return Chunk(carries_token=bool(data.get("content")))


class OpenAIWire:
    """/v1/completions streamed: SSE `data:` lines; the finish reason, then a usage chunk, then `[DONE]`."""

    route = "/v1/completions"

    def body(self, model: str, prompt: str, num_predict: int, seed: int) -> dict[str, Any]:
        return {
            "model": model,
            "prompt": prompt,
            "max_tokens": num_predict,
            "temperature": 0,
            "seed": seed,
            "stream": True,
            "stream_options": {"include_usage": True},
        }

    def parse(self, line: str) -> Chunk | None:
        if not line.startswith("data:"):
            return None
        payload = line.removeprefix("data:").strip()
        if payload == "[DONE]":
            return Chunk(final=True)
        data = json.loads(payload)
        if "error" in data:
            return Chunk(error=json.dumps(data["error"]))
        usage = data.get("usage") or {}
        choices = data.get("choices") or [{}]
        return Chunk(
            carries_token=bool(choices[0].get("text")),
            tokens=usage.get("completion_tokens"),
            stop=choices[0].get("finish_reason"),
        )


WIRES: dict[str, Wire] = {"ollama": OllamaWire(), "llamacpp": LlamaCppWire(), "openai": OpenAIWire()}


@dataclass(frozen=True)
class ServeTarget:
    """One server to load: its report label, wire kind, base URL and the model name sent in the body."""

    label: str
    kind: str
    url: str
    model: str

    @property
    def wire(self) -> Wire:
        return WIRES[self.kind]


def parse_target(spec: str, model: str) -> ServeTarget:
    """`[NAME@]KIND=URL` with KIND one of ollama, llamacpp, openai, e.g. `ours@ollama=http://127.0.0.1:11434`."""
    m = _SPEC.fullmatch(spec.strip())
    if m is None:
        raise ConfigError(f"target {spec!r} is invalid: expected [NAME@]KIND=URL, e.g. ollama=http://127.0.0.1:11434")
    kind, url = m["kind"].lower(), m["url"].rstrip("/")
    if kind not in WIRES:
        raise ConfigError(f"target {spec!r} has unknown kind {m['kind']!r}: expected one of {', '.join(WIRES)}")
    if not re.fullmatch(r"https?://[^/\s]+(/\S*)?", url):
        raise ConfigError(f"target {spec!r} has URL {url!r}: expected http://HOST:PORT or https://HOST:PORT")
    if kind != "llamacpp" and not model:
        raise ConfigError(f"target {spec!r} needs a model name (--model): {kind} servers pick the model per request")
    if m["name"] is not None and not m["name"].strip():
        raise ConfigError(f"target {spec!r} has an empty NAME before '@': expected NAME@KIND=URL or KIND=URL")
    label = m["name"].strip() if m["name"] is not None else kind
    return ServeTarget(label=label, kind=kind, url=url, model=model)
