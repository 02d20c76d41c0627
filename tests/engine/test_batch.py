"""Continuous batching on one rank: sequences that share steps give the tokens they give alone, a
prompt's cached prefix is reused and changes nothing, long prompts are prefilled in chunks while the
others keep decoding, and after any mix of requests every KV block is free again."""

from __future__ import annotations

import json
import random
from collections import defaultdict

import jsonschema
import pytest
import torch

from tests.engine.test_constraint import BOUNDED_SCHEMA
from tests.tiny import write_chat_gguf
from tp_ollama.checkpoints.loader import load_model, open_checkpoint
from tp_ollama.checkpoints.tokenizer import Tokenizer
from tp_ollama.engine.batch import Batch, Planner, Request
from tp_ollama.engine.constraint import Grammar, LocalConstraint, vocabulary_for
from tp_ollama.engine.direct import generate_ids
from tp_ollama.engine.kv_cache import KVCache
from tp_ollama.engine.options import GenerationOptions
from tp_ollama.engine.paged_kv import BlockPool
from tp_ollama.engine.sampler import Sampler
from tp_ollama.kernels import quant as quant_module
from tp_ollama.kernels.quant import prefill_numerics

OPTIONS = [
    {"temperature": 0},
    {"temperature": 0.8, "seed": 5, "top_k": 20},
    {"temperature": 1.0, "seed": 9, "top_k": 0, "top_p": 0.9},
    {"temperature": 0, "repeat_penalty": 1.3},
]


@pytest.fixture(scope="module", params=["llama", "gemma3_text"])
def tiny(request, tmp_path_factory):
    path = write_chat_gguf(tmp_path_factory.mktemp("tiny") / "tiny.gguf", kind=request.param)
    ckpt = open_checkpoint(path)
    torch.set_num_threads(1)
    yield path, load_model(ckpt, torch.float32, torch.device("cpu"))
    ckpt.close()


def options(i: int, num_predict: int) -> GenerationOptions:
    return GenerationOptions.from_ollama({**OPTIONS[i % len(OPTIONS)], "num_predict": num_predict, "num_ctx": 256})


def run(batch: Batch, planner: Planner, requests: list[Request], cancel_at: dict[str, int] | None = None):
    """Drive the batch until every request ends; tokens per request, and the plans taken."""
    planner.waiting.extend(requests)
    out: dict[str, list[int]] = defaultdict(list)
    plans = []
    step = 0
    with torch.inference_mode():
        while batch.running or planner.waiting:
            cancelled = {rid for rid, at in (cancel_at or {}).items() if at == step}
            plan = planner.plan(batch, cancelled)
            plans.append(plan)
            for event in batch.step(plan):
                if event.token is not None:
                    out[event.id].append(event.token)
                if event.done:
                    planner.finished(event.id)
            for rid in cancelled:
                planner.finished(rid)
            step += 1
            assert step < 5000
    return out, plans


def make(model, budget=16 << 20, prefix=True, max_running=16, chunk=256):
    pool = BlockPool.for_model(model, budget, prefix_cache=prefix)
    return Batch(model, pool, Sampler, lambda r: None), Planner(pool, max_running, chunk)


def alone(model, prompt, opts):
    return list(generate_ids(model, prompt, opts, frozenset()))


def test_eight_concurrent_requests_give_the_tokens_they_give_alone(tiny):
    _, model = tiny
    rng = random.Random(0)
    prompts = [[rng.randrange(2, 300) for _ in range(3 + 9 * i)] for i in range(8)]
    requests = [Request(f"r{i}", p, options(i, 12 + 4 * i), frozenset()) for i, p in enumerate(prompts)]
    batch, planner = make(model)
    got, plans = run(batch, planner, requests)
    for r in requests:
        assert got[r.id] == alone(model, r.prompt, r.options), r.id
    assert max(len(p.decode) for p in plans) == 8  # they really shared steps
    batch.pool.check()


@pytest.mark.parametrize("quant", ["int8", "int4"])
def test_quantized_weights_inside_a_batch_give_the_tokens_they_give_alone(tiny, quant, monkeypatch):
    # torch's packed kernels compute each activation row on its own, so sharing a step changes nothing.
    # Greedy: a sampled token can turn on the last bit in which the batch's paged attention and the
    # lone request's contiguous cache differ once activations are rounded to bfloat16.
    monkeypatch.setattr(quant_module, "int4_layout", quant_module.torch_int4_layout)
    path, _ = tiny
    model = load_model(open_checkpoint(path), torch.float32, torch.device("cpu"), quant=quant)
    requests = _quantized_requests()
    batch, planner = make(model)
    got, plans = run(batch, planner, requests)
    for r in requests:
        assert got[r.id] == alone(model, r.prompt, r.options), r.id
    assert max(len(p.decode) for p in plans) == 6
    batch.pool.check()


def test_native_int4_inside_a_batch_gives_the_tokens_alone_would_up_to_near_ties(tiny):
    """The native int4 kernel computes each row on its own too, but it rounds activations to int8 per
    group, which can turn the last bit in which paged and contiguous attention differ into one
    rounding step: on a random model with flat logits that flips near-ties. So every token the batch
    picks must be alone's greedy choice on the same history, or within a hair of it."""
    if not quant_module.native_int4():
        pytest.skip("the native int4 kernel does not run here")
    path, _ = tiny
    model = load_model(open_checkpoint(path), torch.float32, torch.device("cpu"), quant="int4")
    requests = _quantized_requests()
    batch, planner = make(model)
    got, plans = run(batch, planner, requests)
    exact = 0
    for r in requests:
        gaps = greedy_gaps(model, r.prompt, got[r.id])
        assert max(gaps) <= 0.05, (r.id, gaps)  # a wrong operation moves whole tenths of the range
        exact += sum(g == 0 for g in gaps)
    assert exact >= 0.9 * sum(len(got[r.id]) for r in requests)
    assert max(len(p.decode) for p in plans) == 6
    batch.pool.check()


def _quantized_requests() -> list[Request]:
    rng = random.Random(1)
    prompts = [[rng.randrange(2, 300) for _ in range(2 + 7 * i)] for i in range(6)]
    greedy = [
        GenerationOptions.from_ollama({"temperature": 0, "num_predict": 10 + 3 * i, "num_ctx": 256}) for i in range(6)
    ]
    return [Request(f"q{i}", p, greedy[i], frozenset()) for i, p in enumerate(prompts)]


def greedy_gaps(model, prompt: list[int], tokens: list[int]) -> list[float]:
    """For each token, how far below the best logit it is on the lone model given the same history,
    as a fraction of that position's logit range (0: it is the greedy choice)."""
    seq = prompt + tokens
    cache = KVCache.for_model(model, batch=1, max_len=len(seq) + 1)
    with torch.inference_mode(), prefill_numerics():  # as the batch computes prompts
        logits = model(torch.tensor([seq]), torch.arange(len(seq))[None], cache)[0].float()
    gaps = []
    for i, token in enumerate(tokens):
        row = logits[len(prompt) - 1 + i]
        gaps.append(float((row.max() - row[token]) / (row.max() - row.min())))
    return gaps


def test_a_long_prompt_is_prefilled_in_chunks_while_the_others_decode(tiny):
    _, model = tiny
    short = [Request(f"s{i}", [5 + i, 6, 7], options(0, 40), frozenset()) for i in range(3)]
    long = Request("long", [(i * 7) % 290 + 2 for i in range(200)], options(0, 8), frozenset())
    batch, planner = make(model, chunk=32)
    planner.waiting.extend(short)
    with torch.inference_mode():
        for _ in range(3):  # the short ones are decoding before the long one arrives
            for event in batch.step(planner.plan(batch, set())):
                assert not event.done
    got, plans = run(batch, planner, [long])
    chunked = [p for p in plans if any(rid == "long" for rid, _ in p.prefill)]
    assert len(chunked) == 200 // 32 + 1  # one chunk of at most 32 tokens a step
    assert all(sum(n for _, n in p.prefill) <= 32 for p in plans)
    assert all(len(p.decode) == 3 for p in chunked[:-1])  # nobody waited for the prompt
    assert got["long"] == alone(model, long.prompt, long.options)


def test_the_second_turn_reuses_the_first_turns_blocks_and_gives_the_same_tokens(tiny):
    _, model = tiny
    first = [(i * 11) % 290 + 2 for i in range(70)]
    batch, planner = make(model)
    one, _ = run(batch, planner, [Request("t1", first, options(0, 10), frozenset())])
    second = first + one["t1"] + [9, 8, 7]
    two, _ = run(batch, planner, [Request("t2", second, options(0, 10), frozenset())])
    stats = batch.pool.stats()
    assert stats["prefix_hit_tokens"] >= 64 and stats["prefix_hits"] >= 4
    fresh_batch, fresh_planner = make(model, prefix=False)
    without, _ = run(fresh_batch, fresh_planner, [Request("t2", second, options(0, 10), frozenset())])
    assert two["t2"] == without["t2"] == alone(model, second, options(0, 10))
    assert fresh_batch.pool.stats()["prefix_hits"] == 0


def test_after_200_mixed_requests_every_block_is_free(tiny):
    _, model = tiny
    rng = random.Random(1)
    batch, planner = make(model, budget=2 << 20, max_running=6)  # small: requests wait for room
    requests, cancel_at = [], {}
    for i in range(200):
        shared = [3, 4, 5, 6] * rng.randrange(0, 12)  # common prefixes, so blocks get reused
        prompt = shared + [rng.randrange(2, 300) for _ in range(rng.randrange(1, 30))]
        requests.append(Request(f"m{i}", prompt, options(i, rng.randrange(1, 12)), frozenset()))
        if rng.random() < 0.25:
            cancel_at[f"m{i}"] = rng.randrange(0, 150)
    run(batch, planner, requests, cancel_at)
    assert not batch.running and not planner.reserved
    batch.pool.check()
    stats = batch.pool.stats()
    assert stats["blocks_used"] == 0 and stats["blocks_free"] == stats["blocks"]
    assert stats["prefix_hits"] > 0


def test_a_request_that_does_not_fit_now_waits_for_room(tiny):
    _, model = tiny
    batch, planner = make(model, budget=1 << 20)
    big = planner.pool.num_blocks // 2 + 1  # two of these cannot be reserved together
    tokens = big * planner.pool.block_size - 8
    opts = GenerationOptions.from_ollama({"num_predict": tokens, "num_ctx": tokens + 16})
    requests = [Request(f"w{i}", [5, 6, 7], opts, frozenset()) for i in range(2)]
    planner.waiting.extend(requests)
    first = planner.plan(batch, set())
    assert [r.id for r in first.add] == ["w0"] and [r.id for r in planner.waiting] == ["w1"]


def test_a_constrained_request_inside_a_batch_validates(tiny):
    path, model = tiny
    tokenizer = Tokenizer.for_model(path)
    vocab = vocabulary_for(path, model.config.vocab_size)
    grammars = {}

    def constraint(request):
        return LocalConstraint(grammars.pop(request.id))

    pool = BlockPool.for_model(model, 16 << 20)
    batch, planner = Batch(model, pool, Sampler, constraint), Planner(pool, 16)
    opts = GenerationOptions.from_ollama({"temperature": 1.0, "seed": 3, "num_predict": 160, "num_ctx": 256})
    grammars["json"] = Grammar(vocab, "schema", BOUNDED_SCHEMA)
    requests = [Request("json", tokenizer.encode("hello"), opts, tokenizer.eos_ids, constrained=True)]
    fox = tokenizer.encode("the quick brown fox")
    requests += [Request(f"free{i}", fox, options(i, 30), frozenset()) for i in range(3)]
    got, _ = run(batch, planner, requests)
    jsonschema.validate(json.loads(tokenizer.decode(got["json"])), BOUNDED_SCHEMA)
    for i in range(3):
        assert got[f"free{i}"] == alone(model, fox, options(i, 30))


@pytest.mark.parametrize("quant", ["none", "int8", "int4"])
def test_a_prompt_answers_the_same_whether_its_first_blocks_were_cached_or_not(tiny, quant):
    """The same request twice: the second finds the first's full blocks in the prefix cache and
    prefills only the tail, of 1 to 17 rows here. Row for row it computes what the first computed, so
    greedy tokens and seeded samples come out the same (Ollama's `seed` makes output reproducible)."""
    path, _ = tiny
    model = load_model(open_checkpoint(path), torch.float32, torch.device("cpu"), quant=quant)
    rng = random.Random(3)
    for tail in (1, 2, 3, 5, 12, 17):
        prompt = [rng.randrange(2, 300) for _ in range(32 + tail)]
        for sampling in ({"temperature": 0}, {"temperature": 0.9, "seed": 7}):
            opts = GenerationOptions.from_ollama({**sampling, "num_predict": 12, "num_ctx": 256})
            batch, planner = make(model)
            first, _ = run(batch, planner, [Request("a", prompt, opts, frozenset())])
            second, _ = run(batch, planner, [Request("b", prompt, opts, frozenset())])
            assert batch.pool.prefix.hits > 0, "the second request did not reuse the first's blocks"
            assert second["b"] == first["a"], (tail, sampling)
