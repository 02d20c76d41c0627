"""The llama family (llama, llama 3 rope scaling, mistral's sliding window, qwen2's biases and tied head,
qwen3's q/k norms) against transformers on tiny random checkpoints, position by position
(tests/models/parity.py)."""

from __future__ import annotations

import pytest

from tests.models.parity import (
    Pair,
    assert_greedy_tokens_identical_for_32_steps,
    assert_logits_match_over_prefill_and_16_decode_steps,
    load_pair,
)
from tests.tiny import MODEL_TYPES


@pytest.fixture(scope="module", params=[kind for kind in MODEL_TYPES if kind != "gemma3_text"])
def pair(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Pair:
    return load_pair(request.param, tmp_path_factory)


def test_logits_match_transformers_over_prefill_and_16_decode_steps(pair: Pair) -> None:
    assert_logits_match_over_prefill_and_16_decode_steps(pair)


def test_greedy_tokens_identical_for_32_steps(pair: Pair) -> None:
    assert_greedy_tokens_identical_for_32_steps(pair)
