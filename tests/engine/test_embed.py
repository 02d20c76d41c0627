"""Embeddings: one padded batch gives each input the vector it gets alone."""

from __future__ import annotations

import pytest
import torch

from tests.tiny import write_chat_gguf
from tp_ollama.checkpoints.loader import load_model, open_checkpoint
from tp_ollama.engine.embed import embed_batch
from tp_ollama.engine.kv_cache import KVCache
from tp_ollama.errors import RequestError


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    ckpt = open_checkpoint(write_chat_gguf(tmp_path_factory.mktemp("tiny") / "tiny.gguf", kind="gemma3_text"))
    yield load_model(ckpt, torch.float32, torch.device("cpu"))
    ckpt.close()


def _mean_alone(model, ids):
    cache = KVCache.for_model(model, batch=1, max_len=len(ids))
    hidden = model.hidden_states(torch.tensor([ids]), torch.arange(len(ids))[None], cache)
    return hidden[0].mean(dim=0)


def test_a_padded_batch_equals_each_input_alone(model):
    # Lengths past the sliding window (8) included; small token budget forces several groups.
    inputs = [[5, 6, 7], list(range(10, 30)), [9], list(range(40, 52)), [3, 3, 3, 3]]
    with torch.inference_mode():
        batched = embed_batch(model, inputs, token_budget=40)
        for row, ids in zip(batched, inputs, strict=True):
            torch.testing.assert_close(row, _mean_alone(model, ids), atol=1e-5, rtol=1e-5)
    assert batched.shape == (5, model.config.hidden_size)


def test_an_empty_input_is_refused_by_index(model):
    with pytest.raises(RequestError, match="input 1 has no tokens"):
        embed_batch(model, [[1, 2], []])
