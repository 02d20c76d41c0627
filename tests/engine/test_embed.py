"""Embeddings: each input gets the vector it gets alone, whatever else the request holds."""

from __future__ import annotations

import pytest
import torch

from tests.tiny import write_chat_gguf
from tp_ollama.checkpoints.loader import load_model, open_checkpoint
from tp_ollama.engine.embed import embed_batch
from tp_ollama.engine.kv_cache import KVCache
from tp_ollama.errors import RequestError
from tp_ollama.kernels.quant import prefill_numerics


@pytest.fixture(scope="module", params=["none", "int8"])
def model(request, tmp_path_factory):
    ckpt = open_checkpoint(write_chat_gguf(tmp_path_factory.mktemp("tiny") / "tiny.gguf", kind="gemma3_text"))
    yield load_model(ckpt, torch.float32, torch.device("cpu"), quant=request.param)
    ckpt.close()


def _mean_alone(model, ids):
    cache = KVCache.for_model(model, batch=1, max_len=len(ids))
    with prefill_numerics():  # an embedding is a prompt's prefill
        hidden = model.hidden_states(torch.tensor([ids]), torch.arange(len(ids))[None], cache)
    return hidden[0].mean(dim=0)


def test_each_input_gets_exactly_the_vector_it_gets_alone(model):
    # Lengths past the sliding window (8) and past the rows where quantized matmuls change kernel (16).
    inputs = [[5, 6, 7], list(range(10, 30)), [9], list(range(40, 52)), [3, 3, 3, 3]]
    with torch.inference_mode():
        batched = embed_batch(model, inputs)
        for row, ids in zip(batched, inputs, strict=True):
            assert torch.equal(row, _mean_alone(model, ids).float())
            assert torch.equal(row, embed_batch(model, [ids])[0])
    assert batched.shape == (5, model.config.hidden_size)


def test_an_empty_input_is_refused_by_index(model):
    with pytest.raises(RequestError, match="input 1 has no tokens"):
        embed_batch(model, [[1, 2], []])
