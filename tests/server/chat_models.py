"""A tiny random Qwen3 checkpoint whose chat template renders tools and thinking, served for the tool
and thinking tests by the real LocalEngine or by the scripted double. The template is a shortened
Qwen3 template written here; nothing is downloaded."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tokenizers

from tests.local_engine import LocalEngine
from tests.server.conftest import serving
from tests.server.doubles import Details, EmbeddedModel, EmbeddedModels, ScriptedEngine
from tests.tiny import hf_config, make_hf_model, save_hf, save_tiny_tokenizer
from tp_ollama import __version__
from tp_ollama.checkpoints.tokenizer import Tokenizer
from tp_ollama.server.app import create_app
from tp_ollama.server.engine_api import Engine

TINY = "tiny-qwen3"  # served as tiny-qwen3:latest
FULL_NAME = "registry.ollama.ai/library/tiny-qwen3:latest"

# Qwen3's chat template, shortened: tools in the system turn, calls as <tool_call> JSON, tool results
# as <tool_response> user turns (named, to show `tool_name` arrives), reasoning as <think>, and
# `enable_thinking=false` closing an empty reasoning block in the generation prompt.
QWEN3_TEMPLATE = """\
{%- if tools %}
{{- '<|im_start|>system\\n' }}
{%- if messages[0].role == 'system' %}{{- messages[0].content + '\\n\\n' }}{%- endif %}
{{- '# Tools\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>' }}
{%- for tool in tools %}{{- '\\n' + (tool | tojson) }}{%- endfor %}
{{- '\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within '
    '<tool_call></tool_call> XML tags.<|im_end|>\\n' }}
{%- elif messages[0].role == 'system' %}
{{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}
{%- endif %}
{%- for message in messages %}
{%- if message.role == 'user' or (message.role == 'system' and not loop.first) %}
{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}
{%- elif message.role == 'assistant' %}
{{- '<|im_start|>assistant\\n' }}
{%- if message.reasoning_content %}{{- '<think>\\n' + message.reasoning_content + '\\n</think>\\n\\n' }}{%- endif %}
{{- message.content }}
{%- for tool_call in message.tool_calls or [] %}
{%- if tool_call.function is defined %}{%- set tool_call = tool_call.function %}{%- endif %}
{{- '\\n<tool_call>\\n{"name": "' + tool_call.name + '", "arguments": ' }}
{{- (tool_call.arguments | tojson) + '}\\n</tool_call>' }}
{%- endfor %}
{{- '<|im_end|>\\n' }}
{%- elif message.role == 'tool' %}
{{- '<|im_start|>user\\n<tool_response name="' + (message.name or '') + '">\\n' + message.content }}
{{- '\\n</tool_response><|im_end|>\\n' }}
{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
{{- '<|im_start|>assistant\\n' }}
{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}
{%- endif %}
"""

# Qwen's vocabulary has the turn markers as special tokens and <tool_call>, <think> as ordinary added
# ones; Llama's <|python_tag|> and Mistral's [TOOL_CALLS] are special in theirs, so decoding drops them
# unless the server writes them out.
SPECIAL = ["<|im_start|>", "<|im_end|>", "<|python_tag|>", "[TOOL_CALLS]"]
ADDED = ["<tool_call>", "</tool_call>", "<think>", "</think>"]

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "description": "the city"}},
            "required": ["city"],
        },
    },
}


def make_chat_model(directory: Path) -> Path:
    """Write the tiny Qwen3 model with QWEN3_TEMPLATE into `directory` (random weights: it answers
    nonsense, so replies that must say something come from the scripted double)."""
    save_hf(make_hf_model("qwen3"), directory)
    return save_chat_tokenizer(directory)


def save_chat_tokenizer(directory: Path) -> Path:
    """The tiny tokenizer with the tokens above and QWEN3_TEMPLATE as its chat template."""
    save_tiny_tokenizer(directory)
    backend = tokenizers.Tokenizer.from_file(str(directory / "tokenizer.json"))
    backend.add_special_tokens(SPECIAL)
    backend.add_tokens(ADDED)
    backend.save(str(directory / "tokenizer.json"))
    config_file = directory / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config["chat_template"] = QWEN3_TEMPLATE
    config_file.write_text(json.dumps(config))
    assert backend.get_vocab_size() <= hf_config("qwen3").vocab_size, "the added tokens must fit the model"
    return directory


def models(path: Path) -> EmbeddedModels:
    return EmbeddedModels({f"{TINY}:latest": EmbeddedModel(f"{TINY}:latest", path, details=Details("safetensors"))})


@dataclass
class Served:
    url: str
    engine: Any  # the LocalEngine or the ScriptedEngine serving
    tokenizer: Tokenizer

    def script(self, text: str, *special: str) -> list[int]:
        """Token ids the scripted engine will emit: `special` tokens first, then `text`."""
        ids = [self.tokenizer.token_to_id(s) for s in special]
        assert all(i is not None for i in ids)
        return [i for i in ids if i is not None] + self.tokenizer.encode(text, add_special_tokens=False)


@contextmanager
def serve(path: Path, engine: Engine) -> Iterator[Served]:
    """A live server (uvicorn, loopback) with the stock embedded models plus TINY at `path`."""
    with serving(create_app(engine, models(path), version=__version__)) as url:
        yield Served(url, engine, Tokenizer.from_hf_dir(path))


@contextmanager
def serve_scripted(path: Path) -> Iterator[Served]:
    with serve(path, ScriptedEngine([])) as served:
        yield served


@contextmanager
def serve_local(path: Path) -> Iterator[Served]:
    with serve(path, LocalEngine()) as served:
        yield served
