"""Structured outputs: the generated text is held to JSON (format "json") or to a JSON Schema while
decoding, by masking the tokens the grammar does not allow before each sampling step.

The grammar runs in llguidance (chosen by measurement, bench/results/structured.json: about 1 ms to
compile a schema against xgrammar's 80-200 ms and outlines-core's 1 s on a 262k vocabulary, tens of
microseconds per token, and "any JSON object" without a depth limit). Only one process runs the
grammar (engine rank 0); it packs the allowed set into one bit per token, and in a tensor-parallel
group that bitmask is broadcast so that each rank masks its own vocabulary slice — logits are never
gathered. JSON is emitted compactly (", " and ": " separators, no free whitespace), so a model cannot
wander into endless blank space.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from tp_ollama.errors import RequestError

JSON_STYLE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


def grammar_for(kind: str, schema: dict[str, Any] | None) -> str:
    """The llguidance grammar of an output format; RequestError naming the problem when the schema is
    not one that can be enforced."""
    import llguidance

    if kind == "json":
        schema = {"type": "object"}
    elif kind != "schema" or not isinstance(schema, dict):
        raise RequestError(f'invalid format: {json.dumps(schema)}; expected "json" or a JSON Schema object')
    try:
        grammar = llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=JSON_STYLE)  # type: ignore[arg-type]
    except ValueError as e:
        raise RequestError(f"invalid format schema: {e}") from None
    error = llguidance.LLMatcher.validate_grammar(grammar)
    if error:
        raise RequestError(f"invalid format schema: {error}")
    return grammar


class GrammarVocabulary:
    """A tokenizer as the grammar engine sees it; built once per model (a few seconds for a 262k
    vocabulary) and shared by every request on that model."""

    def __init__(self, tokenizer_json: str, tokenizer_size: int, vocab_size: int, eos_ids: list[int]) -> None:
        import llguidance

        # The model's vocabulary may have padding rows past the tokenizer's, or the tokenizer tokens
        # the model has no row for; the grammar sees the larger, the masks cover the model's.
        self.vocab_size = vocab_size
        self.eos_ids = [t for t in eos_ids if t < vocab_size]
        size = max(tokenizer_size, vocab_size)
        self.inner = llguidance.LLTokenizer(tokenizer_json, n_vocab=size, eos_token=self.eos_ids or eos_ids)
        self.words = (size + 31) // 32


def vocabulary_for(path: Path, vocab_size: int) -> GrammarVocabulary:
    """The grammar vocabulary of the model at `path` (a GGUF file or an HF directory)."""
    from tp_ollama.checkpoints.tokenizer import Tokenizer

    tokenizer = Tokenizer.for_model(path)
    return GrammarVocabulary(tokenizer.to_json(), tokenizer.vocab_size, vocab_size, sorted(tokenizer.eos_ids))


class Grammar:
    """One request's grammar state, on the process that runs it."""

    def __init__(self, vocab: GrammarVocabulary, kind: str, schema: dict[str, Any] | None) -> None:
        import llguidance

        self.matcher = llguidance.LLMatcher(vocab.inner, grammar_for(kind, schema), log_level=0)
        if self.matcher.is_error():
            raise RequestError(f"invalid format schema: {self.matcher.get_error()}")
        self._all = torch.zeros(vocab.words, dtype=torch.int32)
        self.words = self._all[: (vocab.vocab_size + 31) // 32]
        self.vocab_size = vocab.vocab_size
        self.eos_ids = vocab.eos_ids

    def fill(self) -> torch.Tensor:
        """The allowed next tokens of the model's vocabulary, one bit per token id (bit i % 32 of word
        i // 32). A grammar with nothing left that the model can say (an error state, or only tokens
        past its vocabulary) allows the end tokens, so the answer ends."""
        self.matcher.unsafe_compute_mask_ptr(self._all.data_ptr(), self._all.numel() * 4)
        tail = self.vocab_size % 32
        if tail:
            self.words[-1] &= _bit(tail) - 1 if tail < 31 else 0x7FFFFFFF  # ids past the model's rows
        if self.matcher.is_error() or not bool(self.words.any()):
            self.words.zero_()
            for t in self.eos_ids:
                self.words[t // 32] |= _bit(t % 32)
        return self.words

    def accept(self, token: int) -> None:
        if not self.matcher.consume_token(token):
            raise RequestError(f"the format grammar refused token {token}: {self.matcher.get_error()}")


def _bit(i: int) -> int:
    """Bit i of an int32 word, as a signed value (bit 31 is the sign)."""
    return int(np.int32(np.uint32(1 << i).view(np.int32)))


def allowed(words: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """Bool (stop - start,): which ids in [start, stop) the bitmask allows."""
    raw = words.numpy().view(np.uint8)  # little-endian words: bit i lives in byte i // 8, bit i % 8
    first, last = start // 8, (stop + 7) // 8
    bits = np.unpackbits(raw[first:last], bitorder="little")[start - 8 * first : stop - 8 * first]
    return torch.from_numpy(bits.astype(np.bool_))


class Constraint(Protocol):
    """What a batch asks of a structured-output constraint: mask this rank's logits (the
    whole vocabulary or one slice), then learn the token every rank chose."""

    def restrict(self, logits: torch.Tensor) -> torch.Tensor: ...

    def accept(self, token: int) -> None: ...


class LocalConstraint:
    """A grammar over the whole vocabulary in this process (TP=1)."""

    def __init__(self, grammar: Grammar) -> None:
        self.grammar = grammar

    def restrict(self, logits: torch.Tensor) -> torch.Tensor:
        ok = allowed(self.grammar.fill(), 0, logits.shape[-1]).to(logits.device)
        return logits.masked_fill(~ok, float("-inf"))

    def accept(self, token: int) -> None:
        self.grammar.accept(token)


class ShardedConstraint:
    """A grammar on rank 0 of a tensor-parallel group: its bitmask (vocab / 8 bytes, 32 KB for a
    262k vocabulary) is broadcast before each step and every rank masks its own slice [start, stop)."""

    def __init__(self, grammar: Grammar | None, span: tuple[int, int], vocab_size: int, comm: Any) -> None:
        self.grammar, self.span, self.comm = grammar, span, comm
        self.words = torch.zeros((vocab_size + 31) // 32, dtype=torch.int32)

    def restrict(self, logits: torch.Tensor) -> torch.Tensor:
        if self.grammar is not None:
            self.words.copy_(self.grammar.fill())
        words = self.comm.broadcast(self.words, src=0)
        ok = allowed(words, *self.span).to(logits.device)
        return logits.masked_fill(~ok, float("-inf"))

    def accept(self, token: int) -> None:
        if self.grammar is not None:
            self.grammar.accept(token)
