"""What a chat template can render (tools, thinking), read off its syntax tree, and tools and
`enable_thinking` rendered exactly as transformers renders them."""

from __future__ import annotations

from pathlib import Path

import pytest
import tokenizers

from tests.server.chat_models import QWEN3_TEMPLATE, WEATHER, save_chat_tokenizer
from tp_ollama.checkpoints.chat_template import GEMMA3_CHAT_TEMPLATE, TemplateFeatures, template_features
from tp_ollama.checkpoints.tokenizer import Tokenizer
from tp_ollama.store.inspect import capabilities

CHATML = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
TOOLS_ONLY = "{% if tools %}{{ tools | tojson }}{% endif %}" + CHATML
GO_TEMPLATE = "{{ if .Tools }}{{ .Tools }}{{ end }}{{ if .Think }}<think>{{ end }}{{ .Prompt }}"  # Ollama's own
R1_STYLE = CHATML + "{% if add_generation_prompt %}<|im_start|>assistant\n<think>\n{% endif %}"


@pytest.mark.parametrize(
    ("template", "features"),
    [
        (QWEN3_TEMPLATE, TemplateFeatures(tools=True, thinking=True)),
        (TOOLS_ONLY, TemplateFeatures(tools=True)),
        (R1_STYLE, TemplateFeatures(thinking=True)),  # writes <think> for the model
        ("{% if enable_thinking %}x{% endif %}", TemplateFeatures(thinking=True)),
        (CHATML, TemplateFeatures()),
        (GEMMA3_CHAT_TEMPLATE, TemplateFeatures()),
        ("{# tools #}{{ 'tools' }}" + CHATML, TemplateFeatures()),  # a comment or a string is not the variable
        ("{% set tools = [] %}{{ tools }}", TemplateFeatures()),  # set by the template, not passed in
        ("{% for m in messages %}", TemplateFeatures()),  # does not parse (and will not render)
    ],
)
def test_template_features_come_from_the_variables_it_reads(template, features):
    assert template_features(template) == features


def test_tools_count_when_the_tool_use_template_reads_them():
    def tokenizer(**templates: str) -> Tokenizer:
        backend = tokenizers.Tokenizer(tokenizers.models.BPE())
        return Tokenizer(backend, source="t", special_tokens={}, chat_template=CHATML, chat_templates=templates)

    assert tokenizer(default=CHATML).chat_features() == TemplateFeatures()
    assert tokenizer(default=CHATML, tool_use=TOOLS_ONLY).chat_features() == TemplateFeatures(tools=True)


@pytest.mark.parametrize(
    ("template", "caps"),
    [
        (QWEN3_TEMPLATE, ["completion", "tools", "thinking"]),
        (CHATML, ["completion"]),
        (GO_TEMPLATE, ["completion", "tools", "thinking"]),
        (None, ["completion"]),
    ],
)  # fmt: skip
def test_show_capabilities_name_tools_and_thinking(template, caps):
    assert capabilities(template) == caps


@pytest.fixture(scope="module")
def chat_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_chat_tokenizer(tmp_path_factory.mktemp("chat-tokenizer"))


HISTORY = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Weather in Paris?"},
    {
        "role": "assistant",
        "content": "",
        "reasoning_content": "They want the weather.",
        "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}],
    },
    {"role": "tool", "content": "sunny", "name": "get_weather"},
]


@pytest.mark.parametrize("tools", [None, [WEATHER]])
@pytest.mark.parametrize("enable_thinking", [None, True, False])
def test_tools_and_enable_thinking_render_as_transformers(chat_tokenizer_dir, tools, enable_thinking):
    from transformers import AutoTokenizer

    reference = AutoTokenizer.from_pretrained(chat_tokenizer_dir)
    ours = Tokenizer.from_hf_dir(chat_tokenizer_dir)
    extra = {} if enable_thinking is None else {"enable_thinking": enable_thinking}
    expected = reference.apply_chat_template(HISTORY, tools=tools, add_generation_prompt=True, tokenize=False, **extra)
    assert ours.apply_chat_template(HISTORY, tools=tools, **extra) == expected
    assert ("<tools>" in expected) == (tools is not None)
    assert expected.endswith("<think>\n\n</think>\n\n") == (enable_thinking is False)
