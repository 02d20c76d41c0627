"""Head, MLP and vocabulary splits for any TP degree, and layouts that cannot work."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from tp_ollama.errors import ConfigError
from tp_ollama.parallel.layout import TPLayout, aligned_spans, split_units

GEMMA_270M = SimpleNamespace(
    num_attention_heads=4, num_key_value_heads=1, head_dim=256, intermediate_size=2048, vocab_size=262144
)
SMOLLM2_135M = SimpleNamespace(
    num_attention_heads=9, num_key_value_heads=3, head_dim=64, intermediate_size=1536, vocab_size=49152
)


def sizes(spans):
    return [b - a for a, b in spans]


def test_heads_spread_as_evenly_as_possible():
    assert sizes(split_units(4, [1, 1, 1], "heads")) == [2, 1, 1]
    assert sizes(split_units(32, [1, 1, 1], "heads")) == [11, 11, 10]
    assert sizes(split_units(9, [1, 1], "heads")) == [5, 4]


def test_weighted_split_gives_faster_ranks_more():
    assert sizes(split_units(32, [2, 1, 1], "heads")) == [16, 8, 8]
    assert sizes(split_units(4, [3, 1], "heads")) == [3, 1]
    # Every rank keeps at least one head even when its weight is tiny.
    assert sizes(split_units(4, [100, 1, 1], "heads")) == [2, 1, 1]


def test_spans_are_contiguous_and_cover_everything():
    for total, weights in [(262144, [1, 1, 1]), (1536, [2, 1]), (2048, [1, 1, 1, 1, 1])]:
        spans = aligned_spans(total, weights, 256, "rows")
        assert spans[0][0] == 0 and spans[-1][1] == total
        assert all(spans[i][1] == spans[i + 1][0] for i in range(len(spans) - 1))
        assert all(a % 64 == 0 for a, _ in spans)


def test_smollm2_tp2_cuts_across_a_kv_group():
    layout = TPLayout.build(SMOLLM2_135M, 2)
    assert layout.q_heads == ((0, 5), (5, 9))
    # Query heads 3..5 read KV head 1: both ranks keep it.
    assert layout.kv_heads == ((0, 2), (1, 3))


def test_gemma3_tp3_replicates_its_single_kv_head():
    layout = TPLayout.build(GEMMA_270M, 3)
    assert layout.q_heads == ((0, 2), (2, 3), (3, 4))
    assert layout.kv_heads == ((0, 1), (0, 1), (0, 1))
    assert all((b - a) % 256 == 0 for a, b in layout.mlp)


@pytest.mark.parametrize(
    ("world", "weights", "message"),
    [
        (5, None, "tensor-parallel degree 5 exceeds the model's 4 attention heads"),
        (2, (1.0, 2.0, 3.0), "--tp-weights has 3 values (1,2,3) but the world size is 2"),
        (2, (1.0, 0.0), "--tp-weights must all be > 0"),
        (0, None, "tensor-parallel degree 0 is invalid"),
    ],
)
def test_impossible_layouts_fail_with_the_numbers(world, weights, message):
    with pytest.raises(ConfigError) as err:
        TPLayout.build(GEMMA_270M, world, weights)
    assert message in str(err.value)
