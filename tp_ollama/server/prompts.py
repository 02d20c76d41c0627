"""Requests to prompts: a request's options layered over the model's and the server's and held to
the limits, the reply format it asks for (thinking, tools) checked against the model's chat
template, and the prompt rendered and encoded to token ids."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

from tp_ollama.checkpoints.tokenizer import Tokenizer
from tp_ollama.engine.options import GenerationOptions
from tp_ollama.errors import RequestError
from tp_ollama.server.admission import Limits
from tp_ollama.server.chat_schemas import Think
from tp_ollama.server.fields import ApiError
from tp_ollama.server.schemas import ChatRequest, GenerateRequest, ResolvedModel
from tp_ollama.store.names import InvalidModelName, normalize_name, parse_name
from tp_ollama.text.reply import ReplyFormat
from tp_ollama.text.thinking import THINK_OPEN

log = logging.getLogger(__name__)

# Every key Ollama accepts in `options` (Modelfile PARAMETERs too), legacy ones included; others are
# ignored with a warning, as upstream does.
KNOWN_OPTIONS = frozenset(
    "num_ctx num_batch num_gpu main_gpu use_mmap num_thread draft_num_predict num_keep seed num_predict top_k "
    "top_p min_p typical_p repeat_last_n temperature repeat_penalty presence_penalty frequency_penalty stop "
    "mirostat mirostat_tau mirostat_eta tfs_z penalize_newline numa low_vram f16_kv logits_all vocab_only "
    "use_mlock embedding_only".split()
)


def merge_options(limits: Limits, params: Mapping[str, Any], request: Mapping[str, Any]) -> GenerationOptions:
    """Server defaults, then the model's PARAMETERs, then the request's options; then the limits."""
    unknown = sorted(set(request) - KNOWN_OPTIONS)
    if unknown:
        log.warning("ignoring unknown options: %s", ", ".join(unknown))
    merged = {"num_ctx": limits.default_num_ctx, **params, **request}
    options = GenerationOptions.from_ollama(merged)
    num_predict = options.num_predict
    if num_predict < 0 or num_predict > limits.max_num_predict:
        num_predict = limits.max_num_predict
    return replace(options, num_ctx=min(options.num_ctx, limits.max_num_ctx), num_predict=num_predict)


def display_name(request_name: str, resolved: ResolvedModel) -> str:
    return resolved.name or normalize_name(request_name)


def _reply_format(
    tokenizer: Tokenizer,
    model: str,
    resolved: ResolvedModel,
    think: Think,
    tools: Sequence[Mapping[str, Any]],
) -> tuple[ReplyFormat, dict[str, Any]]:
    """How to read the reply, and the template variables that ask for it. Tools, or thinking asked
    for, on a model whose chat template cannot render them are refused with upstream's words.
    A thinking model thinks unless `think` is false (upstream's default)."""
    features = tokenizer.chat_features()
    if tools and not features.tools:
        raise ApiError(400, f"{_full_name(model, resolved)} does not support tools")
    if think not in (None, False) and not features.thinking:
        raise ApiError(400, f'"{model}" does not support thinking')
    thinking = features.thinking and think is not False
    variables = {"enable_thinking": thinking} if features.thinking else {}
    names = frozenset(t["function"]["name"] for t in tools) if tools else None
    return ReplyFormat(thinking=thinking, tools=names), variables


def _full_name(model: str, resolved: ResolvedModel) -> str:
    """`registry.ollama.ai/library/smollm2:135m`: how upstream names a model in capability errors."""
    name = display_name(model, resolved)
    try:
        return parse_name(name).full
    except InvalidModelName:
        return name


def generate_prompt(
    tokenizer: Tokenizer, req: GenerateRequest, resolved: ResolvedModel
) -> tuple[list[int], ReplyFormat]:
    """/api/generate's prompt ids and reply format: the prompt raw, or one user turn (after the system
    prompt and, without a `context`, the model's MESSAGEs) rendered with the template; then the
    `context` ids before it."""
    reply, variables = _reply_format(tokenizer, req.model, resolved, req.think, ())
    if req.raw or tokenizer.chat_template is None:
        ids = tokenizer.encode(req.prompt, add_special_tokens=True)
    else:
        system = req.system if req.system is not None else resolved.system
        messages: list[Mapping[str, Any]] = [{"role": "system", "content": system}] if system else []
        if req.context is None:
            messages += resolved.messages
        messages.append({"role": "user", "content": req.prompt})
        ids, reply = _render(tokenizer, messages, reply, variables)
    if req.context:
        bad = [t for t in req.context if not 0 <= t < tokenizer.vocab_size]
        if bad:
            raise RequestError(
                f"context holds token ids outside the vocabulary (0..{tokenizer.vocab_size - 1}): {bad[:5]}"
            )
        if ids[:1] == [tokenizer.bos_id]:
            ids = ids[1:]  # the context already starts with BOS
        ids = list(req.context) + ids
    return ids, reply


def chat_prompt(tokenizer: Tokenizer, req: ChatRequest, resolved: ResolvedModel) -> tuple[list[int], ReplyFormat]:
    """/api/chat's prompt ids and reply format: the model's MESSAGEs and the request's, after the
    model's system prompt unless the conversation starts with its own, rendered with the template."""
    messages: list[Mapping[str, Any]] = [*resolved.messages, *(m.for_template() for m in req.messages)]
    if resolved.system and messages[0].get("role") != "system":
        messages.insert(0, {"role": "system", "content": resolved.system})
    reply, variables = _reply_format(tokenizer, req.model, resolved, req.think, req.tools)
    return _render(tokenizer, messages, reply, variables, req.tools)


def _render(
    tokenizer: Tokenizer,
    messages: list[Mapping[str, Any]],
    reply: ReplyFormat,
    variables: Mapping[str, Any],
    tools: Sequence[Mapping[str, Any]] = (),
) -> tuple[list[int], ReplyFormat]:
    """Prompt ids, and the reply format told whether the prompt opens the reasoning itself."""
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tools=tools or None, **variables)
    if reply.thinking and text.rstrip().endswith(THINK_OPEN):
        reply = replace(reply, thinking_open=True)
    # The template writes BOS itself where the model wants it, as transformers assumes.
    return tokenizer.encode(text, add_special_tokens=False), reply
