"""Chat templates: rendering a model's Jinja template exactly as transformers' `apply_chat_template`
does, and the built-in templates for GGUF files that carry none.

The environment below is a copy of `transformers.utils.chat_template_utils._cached_compile_jinja_template`
(5.x) rather than a call into it: that function is private, has changed shape between releases, and
importing transformers costs about a second on the serving path. What must match, and is tested against
transformers, is the rendered string: a sandbox, `trim_blocks` + `lstrip_blocks`, the `loopcontrols`
extension, a `{% generation %}` block that renders its body, `tojson` without HTML escaping,
`raise_exception`, `strftime_now`, a `dict` callable and a `namespace` that refuses dunder names; the
messages, tools, documents and extra variables are rebuilt from plain JSON types first, `None`-valued
message keys are dropped, and reasoning is readable under `reasoning_content` and `thinking`.

`template_features` reads off a template's syntax tree whether it renders tools and thinking: the
`tools` and `thinking` capabilities, and what a request may ask of the model.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
import jinja2.ext
import jinja2.meta
import jinja2.nodes
import jinja2.parser
import jinja2.utils
from jinja2.sandbox import ImmutableSandboxedEnvironment

from tp_ollama.errors import CheckpointError, RequestError

# The official template of the Gemma 3 instruction-tuned models (google/gemma-3-*-it tokenizer_config.json).
# Gemma 3 GGUFs of base models ship without one; the base vocabulary has the same turn tokens.
GEMMA3_CHAT_TEMPLATE = """{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- if messages[0]['content'] is string -%}
        {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}
    {%- else -%}
        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}
    {%- endif -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = "" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif -%}
    {%- if (message['role'] == 'assistant') -%}
        {%- set role = "model" -%}
    {%- else -%}
        {%- set role = message['role'] -%}
    {%- endif -%}
    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else "") }}
    {%- if message['content'] is string -%}
        {{ message['content'] | trim }}
    {%- elif message['content'] is iterable -%}
        {%- for item in message['content'] -%}
            {%- if item['type'] == 'image' -%}
                {{ '<start_of_image>' }}
            {%- elif item['type'] == 'text' -%}
                {{ item['text'] | trim }}
            {%- endif -%}
        {%- endfor -%}
    {%- else -%}
        {{ raise_exception("Invalid content type") }}
    {%- endif -%}
    {{ '<end_of_turn>\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{'<start_of_turn>model\n'}}
{%- endif -%}
"""

# GGUF `general.architecture` -> the template used when the file has no `tokenizer.chat_template`.
BUILTIN_CHAT_TEMPLATES: Mapping[str, str] = {"gemma3": GEMMA3_CHAT_TEMPLATE}

# Names a message's reasoning arrives under; templates read the first, gpt-oss ones read `thinking`.
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


def render_chat_template(
    template: str,
    messages: Sequence[Mapping[str, Any]],
    *,
    add_generation_prompt: bool = True,
    tools: Sequence[Mapping[str, Any]] | None = None,
    documents: Sequence[Mapping[str, Any]] | None = None,
    special_tokens: Mapping[str, str] | None = None,
    **kwargs: Any,
) -> str:
    """The prompt string transformers' `tokenizer.apply_chat_template(..., tokenize=False)` returns.

    `special_tokens` is the tokenizer's `special_tokens_map` (`bos_token`, `eos_token`, ...); `kwargs`
    are extra template variables (`enable_thinking`, ...) and override those, as in transformers.
    A `raise_exception` in the template, or any other template error while rendering, is the request's
    fault (roles out of order, a missing field) and raises RequestError.
    """
    compiled = _compile(template)
    chat = [_plain({key: value for key, value in dict(m).items() if value is not None}) for m in messages]
    for message in chat:
        if not isinstance(message, dict):
            raise RequestError(f"a chat message must be an object with role and content, got {message!r}")
    variables = _plain({**(special_tokens or {}), **kwargs})
    try:
        return compiled.render(
            messages=_alias_reasoning(chat),
            tools=_plain(list(tools)) if tools is not None else None,
            documents=_plain(list(documents)) if documents is not None else None,
            add_generation_prompt=add_generation_prompt,
            **variables,
        )
    except jinja2.TemplateError as e:
        raise RequestError(f"the chat template rejected the messages: {e}") from e


@dataclass(frozen=True)
class TemplateFeatures:
    """What a chat template can render beyond plain messages: a `tools` list (the `tools` capability)
    and reasoning (`thinking`: it reads `enable_thinking` or writes `<think>`, as Qwen3's does)."""

    tools: bool = False
    thinking: bool = False


@lru_cache(maxsize=16)
def template_features(template: str) -> TemplateFeatures:
    """Read off the template's syntax tree: the variables it uses without setting them are the ones
    transformers would pass. A template that does not parse has no features (it fails to render)."""
    try:
        used = jinja2.meta.find_undeclared_variables(_environment().parse(template))
    except jinja2.TemplateSyntaxError:
        return TemplateFeatures()
    return TemplateFeatures(tools="tools" in used, thinking="enable_thinking" in used or "<think>" in template)


@lru_cache(maxsize=16)
def _compile(template: str) -> jinja2.Template:
    try:
        return _environment().from_string(template)
    except jinja2.TemplateSyntaxError as e:
        raise CheckpointError(f"the chat template does not parse: line {e.lineno}, {e.message}") from e


@lru_cache(maxsize=1)
def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationBlock, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = _TemplateDict()
    env.globals["namespace"] = _TemplateNamespace
    return env


class _GenerationBlock(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` marks assistant text for training masks in transformers.
    Serving never needs the mask, so the block renders its body unchanged; without the tag known,
    templates that use it would not parse."""

    tags = {"generation"}  # noqa: RUF012 (jinja reads this class attribute)

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller: Any) -> str:
        return str(caller())


def _raise_exception(message: str) -> None:
    raise jinja2.TemplateError(message)


def _tojson(
    x: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    # Jinja's own tojson escapes <, >, & and ' for HTML, which would corrupt tool schemas in a prompt.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


class _TemplateDict:
    """`dict(...)` for templates without handing them the type itself (no attribute access to its class)."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict[Any, Any]:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict[Any, Any]:
        return dict.fromkeys(*args, **kwargs)


class _TemplateNamespace(jinja2.utils.Namespace):
    """A namespace that refuses underscore names, which are the way out of the sandbox into CPython."""

    def __init__(*args: Any, **kwargs: Any) -> None:
        # Jinja's signature trick: `self` is positional-only so `namespace(self=...)` still works.
        self, rest = args[0], args[1:]
        attrs = dict(*rest, **kwargs)
        for name in attrs:
            _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check_name(name: object) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(
                f"chat templates cannot store underscore-prefixed attributes on a namespace, got {name!r}"
            )


def _plain(value: Any) -> Any:
    """`value` rebuilt from exact JSON types, so the sandbox never sees a caller's rich objects (whose
    methods it does not know are unsafe); anything else becomes an inert `<TypeName>` placeholder."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    return f"<{type(value).__name__}>"


def _alias_reasoning(chat: list[dict[str, Any]]) -> list[dict[str, Any]]:
    aliased = []
    for message in chat:
        reasoning = next((message[k] for k in _REASONING_FIELDS if message.get(k) is not None), None)
        if reasoning is not None:
            message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
        aliased.append(message)
    return aliased
