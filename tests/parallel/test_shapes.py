"""Model shapes: the presets' parameter counts, lookup by name, the shape of the project's own model
configs, and refusal of shapes no model can have."""

from __future__ import annotations

import pytest

from tp_ollama.errors import ConfigError
from tp_ollama.parallel.shapes import MODEL_TYPES, SHAPES, ModelShape, shape_named, shape_of

TINY = ModelShape("llama", 64, 256, 3, 4, 2, 16, 320, True)


def test_preset_parameter_counts():
    assert SHAPES["llama3.2-1b"].parameters() == pytest.approx(1.24e9, rel=0.01)
    assert SHAPES["llama3-8b"].parameters() == pytest.approx(8.03e9, rel=0.001)
    # torch's count of the loaded gemma3:270m (bench/results/tp.json, params_per_rank at TP=1)
    assert SHAPES["gemma3-270m"].parameters() == 268098176


def test_shape_named_lists_the_known_names():
    assert shape_named("llama3-8b") is SHAPES["llama3-8b"]
    with pytest.raises(ConfigError) as e:
        shape_named("llama4")
    assert "'llama4'" in str(e.value)
    for name in SHAPES:
        assert name in str(e.value)


def test_shape_of_our_configs():
    from tp_ollama.models import REGISTRY, config_from_hf

    assert set(MODEL_TYPES) == set(REGISTRY)
    llama = config_from_hf({
        "model_type": "llama", "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
        "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256, "tie_word_embeddings": True,
    })  # fmt: skip
    assert shape_of(llama) == SHAPES["llama3.2-1b"]  # head_dim derived: 2048 / 32
    with pytest.raises(ConfigError, match="not a model config"):
        shape_of(object())


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"model_type": "gpt2"}, "model_type 'gpt2' is not supported"),
        ({"hidden_size": 0}, "hidden_size=0 is invalid"),
        ({"num_key_value_heads": 3}, "4 query heads, not a multiple of 3 KV heads"),
    ],
)
def test_bad_shapes_are_refused(change, words):
    with pytest.raises(ConfigError, match=words):
        ModelShape(**{**TINY.__dict__, **change})
