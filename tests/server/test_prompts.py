"""tp_ollama.server.prompts: options layered (server, model, request) and held to the limits; the messages a
generate or chat prompt is rendered from (system prompts, the model's MESSAGEs, `context`); and the reply format
a request asks for, refused with upstream's words where the model's template cannot render it. On the tiny
tokenizers of the tests: a plain chat template, and the shortened Qwen3 one that reads tools and thinking."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest

from tests.server.chat_models import WEATHER, save_chat_tokenizer
from tests.server.doubles import EmbeddedModel
from tests.tiny import save_tiny_tokenizer
from tp_ollama.checkpoints.tokenizer import Tokenizer
from tp_ollama.errors import RequestError
from tp_ollama.server.admission import Limits
from tp_ollama.server.fields import ApiError
from tp_ollama.server.prompts import chat_prompt, display_name, generate_prompt, merge_options
from tp_ollama.server.schemas import parse_chat, parse_generate
from tp_ollama.text.reply import ReplyFormat

HISTORY = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "world"}]


@pytest.fixture(scope="module")
def plain(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    """Turns rendered as `<|role|>content` lines: what the prompt holds can be read back off the ids."""
    directory = tmp_path_factory.mktemp("plain")
    save_tiny_tokenizer(directory)
    return Tokenizer.from_hf_dir(directory)


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    return Tokenizer.from_hf_dir(save_chat_tokenizer(tmp_path_factory.mktemp("qwen3")))


def model(**layers: Any) -> EmbeddedModel:
    return EmbeddedModel("m:latest", Path("/nowhere"), **layers)


def test_options_layer_server_model_request_and_are_held_to_the_limits(caplog: pytest.LogCaptureFixture):
    limits = Limits(default_num_ctx=2048, max_num_ctx=4096, max_num_predict=100)
    options = merge_options(limits, {"temperature": 0.1, "top_k": 7, "num_ctx": 8192}, {"temperature": 0.5})
    assert (options.sampling.temperature, options.sampling.top_k) == (0.5, 7)
    assert options.num_ctx == 4096 and options.num_predict == 100  # -1 (until the end) is capped too
    defaults = merge_options(limits, {}, {"num_predict": 50})
    assert (defaults.num_ctx, defaults.num_predict) == (2048, 50)
    assert merge_options(limits, {}, {"num_predict": 500}).num_predict == 100
    with caplog.at_level(logging.WARNING):
        merge_options(limits, {}, {"flash_attention": True, "mirostat": 0})
    assert "ignoring unknown options: flash_attention" in caplog.text


def test_a_generate_prompt_is_the_system_the_models_messages_and_one_user_turn(plain: Tokenizer):
    resolved = model(system="be brief", messages=HISTORY)
    ids, reply = generate_prompt(plain, parse_generate({"model": "m", "prompt": "hi"}), resolved)
    text = "<|system|>be brief\n<|user|>hello\n<|assistant|>world\n<|user|>hi\n<|assistant|>"
    assert plain.decode(ids) == text and ids == plain.encode(text, add_special_tokens=False)
    assert reply == ReplyFormat()
    ids, _ = generate_prompt(plain, parse_generate({"model": "m", "prompt": "hi", "system": "own"}), resolved)
    assert plain.decode(ids) == "<|system|>own\n<|user|>hello\n<|assistant|>world\n<|user|>hi\n<|assistant|>"
    ids, _ = generate_prompt(plain, parse_generate({"model": "m", "prompt": "hi", "raw": True}), resolved)
    assert ids == plain.encode("hi", add_special_tokens=True)


def test_a_context_goes_first_and_replaces_the_models_messages(plain: Tokenizer):
    resolved = model(messages=HISTORY)
    ids, _ = generate_prompt(plain, parse_generate({"model": "m", "prompt": "hi", "context": [5, 6]}), resolved)
    assert ids == [5, 6, *plain.encode("<|user|>hi\n<|assistant|>", add_special_tokens=False)]
    beyond = parse_generate({"model": "m", "prompt": "hi", "context": [5, 99999]})
    with pytest.raises(RequestError, match=r"context holds token ids outside the vocabulary \(0\.\.\d+\): \[99999\]"):
        generate_prompt(plain, beyond, resolved)


def test_a_chat_prompt_gets_the_models_system_unless_it_brings_its_own(plain: Tokenizer):
    resolved = model(system="be brief", messages=HISTORY[:1])
    ask = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    ids, _ = chat_prompt(plain, parse_chat(ask), resolved)
    assert plain.decode(ids) == "<|system|>be brief\n<|user|>hello\n<|user|>hi\n<|assistant|>"
    own = {"model": "m", "messages": [{"role": "system", "content": "own"}, {"role": "user", "content": "hi"}]}
    ids, _ = chat_prompt(plain, parse_chat(own), model(system="be brief"))
    assert plain.decode(ids) == "<|system|>own\n<|user|>hi\n<|assistant|>"


def test_a_thinking_model_thinks_unless_told_not_to_and_tools_are_read_for_their_names(qwen3: Tokenizer):
    ask = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    _, reply = chat_prompt(qwen3, parse_chat(ask), model())
    assert reply == ReplyFormat(thinking=True)
    ids, reply = chat_prompt(qwen3, parse_chat({**ask, "think": False, "tools": [WEATHER]}), model())
    assert reply == ReplyFormat(thinking=False, tools=frozenset({"get_weather"}))
    text = qwen3.decode(ids, skip_special_tokens=False)
    assert text.endswith("<think>\n\n</think>\n\n") and "get_weather" in text


def test_what_the_template_cannot_render_is_400_in_upstreams_words(plain: Tokenizer):
    ask = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    with pytest.raises(ApiError) as e:
        chat_prompt(plain, parse_chat({**ask, "tools": [WEATHER]}), model())
    assert (e.value.status, e.value.message) == (400, "registry.ollama.ai/library/m:latest does not support tools")
    with pytest.raises(ApiError, match='"m" does not support thinking'):
        generate_prompt(plain, parse_generate({"model": "m", "prompt": "hi", "think": "high"}), model())
    assert chat_prompt(plain, parse_chat({**ask, "think": False}), model())[1] == ReplyFormat()
    assert display_name("other", model()) == "m:latest"  # the name the model resolved to
    assert display_name(" smollm2 ", EmbeddedModel("", Path("/nowhere"))) == "smollm2:latest"
