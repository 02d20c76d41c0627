"""The engine loop driven in-process (one-shot generate): what it yields, what it counts, and that a
caller who stops early or a refused request leaves the batch and the KV pool empty."""

from __future__ import annotations

import pytest
import torch

from tests.tiny import make_hf_model, save_hf
from tp_ollama.engine.direct import DirectEngine, GenerationStats, generate_ids
from tp_ollama.engine.kv_cache import KVCache
from tp_ollama.engine.options import GenerationOptions, SamplingOptions
from tp_ollama.errors import RequestError

GREEDY = SamplingOptions(temperature=0)


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    path = save_hf(make_hf_model("llama"), tmp_path_factory.mktemp("llama"))
    engine = DirectEngine()
    engine.load(str(path), num_ctx=64)
    return engine


def reference(model, prompt: list[int], n: int) -> list[int]:
    """Greedy tokens from the modules alone, recomputing the whole sequence each step (no cache)."""
    ids = list(prompt)
    with torch.inference_mode():
        for _ in range(n):
            cache = KVCache.for_model(model, batch=1, max_len=len(ids))
            hidden = model.hidden_states(torch.tensor([ids]), torch.arange(len(ids))[None], cache)
            ids.append(int(model.logits(hidden[:, -1]).float()[0].argmax()))
    return ids[len(prompt) :]


def test_greedy_tokens_and_counts(engine):
    stats = GenerationStats()
    prompt = [5, 6, 7, 8, 9]
    got = list(engine.generate(prompt, GenerationOptions(GREEDY, num_predict=10), stats=stats))
    assert got == reference(engine.state.model, prompt, 10)
    assert stats.tokens == got and stats.eval_count == 10 and stats.done_reason == "length"
    assert stats.prompt_eval_count == 5 and stats.prompt_eval_duration > 0 and stats.eval_duration > 0
    assert not engine.state.busy() and engine.state.batch.pool.num_used() == 0


def test_an_end_token_ends_it_unyielded(engine):
    first = list(engine.generate([5, 6, 7], GenerationOptions(GREEDY, num_predict=6)))
    stats = GenerationStats()
    got = list(engine.generate([5, 6, 7], GenerationOptions(GREEDY, num_predict=6), eos={first[2]}, stats=stats))
    assert got == first[:2] and stats.done_reason == "stop"


def test_a_caller_who_stops_early_frees_the_request(engine):
    stats = GenerationStats()
    gen = engine.generate([5, 6, 7], GenerationOptions(GREEDY, num_predict=40), stats=stats)
    got = [next(gen) for _ in range(3)]
    gen.close()
    assert len(got) == 3 and stats.eval_count == 3 and stats.done_reason == "stop"
    assert not engine.state.busy() and engine.state.batch.pool.num_used() == 0
    # and the loop goes on serving
    assert list(engine.generate([5, 6, 7], GenerationOptions(GREEDY, num_predict=3)))[:3] == got


def test_a_prompt_that_does_not_fit_is_refused_before_any_step(engine):
    with pytest.raises(RequestError, match="num_ctx=4"):
        list(engine.generate([1, 2, 3, 4, 5], GenerationOptions(GREEDY, num_ctx=4)))
    with pytest.raises(RequestError, match="empty"):
        list(engine.generate([], GenerationOptions(GREEDY)))
    assert not engine.state.busy()


def test_the_kv_pool_grows_to_what_a_request_needs(engine):
    blocks = engine.state.batch.pool.num_blocks
    got = list(engine.generate(list(range(3, 100)), GenerationOptions(GREEDY, num_predict=40, num_ctx=256)))
    assert len(got) == 40 and engine.state.batch.pool.num_blocks > blocks


def test_generate_ids_runs_a_model_built_here(engine):
    model = engine.state.model
    assert list(generate_ids(model, [5, 6, 7, 8, 9], GenerationOptions(GREEDY, num_predict=4))) == reference(
        model, [5, 6, 7, 8, 9], 4
    )
