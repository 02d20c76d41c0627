"""The native decode step (tp_ollama.models.native_decode) against the torch modules it replaces, on
tiny random models of every family: the same token through both, each with its own KV cache.

Both paths quantize activations to int8 per group inside the int4 kernel, which turns a last-bit
difference before a matmul (a GELU computed by another formula, attention summed in another order)
into a difference of one int8 step after it. So the two agree to within such steps, not bit for bit:
the bounds below are what a few of those allow, and far below what any wrong operation gives."""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import weakref

import pytest
import torch

from tests.kernels.test_quant import needs_native
from tests.tiny import MODEL_TYPES, make_hf_model, prompt_ids, save_hf
from tp_ollama.checkpoints.loader import load_model, open_checkpoint
from tp_ollama.engine.batch import PagedBatchCache
from tp_ollama.engine.direct import generate_ids
from tp_ollama.engine.kv_cache import KVCache
from tp_ollama.engine.options import GenerationOptions
from tp_ollama.engine.paged_kv import BlockPool
from tp_ollama.kernels import quant
from tp_ollama.kernels.quant import prefill_numerics
from tp_ollama.models import native_decode
from tp_ollama.models.native_decode import native_decoder

pytestmark = needs_native

N_PROMPT = 12  # past the tiny models' sliding window of 8: decode writes into a full ring
N_DECODE = 20


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """One saved tiny checkpoint per family."""
    out = {}
    for kind in MODEL_TYPES:
        model = make_hf_model(kind)
        if kind == "gemma3_text":
            model.config.tie_word_embeddings = True
        out[kind] = save_hf(model, tmp_path_factory.mktemp(kind))
    return out


def load(path, dtype: torch.dtype, quant: str = "int4"):
    torch.set_num_threads(2)
    return load_model(open_checkpoint(path), dtype, torch.device("cpu"), quant=quant)


def prefilled(model, tokens: list[int]) -> tuple[native_decode.NativeDecoder, list[KVCache]]:
    """The model's native decoder and two KV caches holding the same prefill of tokens[:N_PROMPT]."""
    decoder = native_decoder(model)
    assert decoder is not None
    caches = [KVCache.for_model(model, batch=1, max_len=64) for _ in range(2)]
    prompt = torch.tensor([tokens[:N_PROMPT]])
    with torch.inference_mode():
        for cache in caches:
            model.hidden_states(prompt, torch.arange(N_PROMPT)[None], cache)
    return decoder, caches


def both_paths(model, tokens: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(N_DECODE, hidden) final hidden states of each decode step, native and torch, fed the same
    tokens after the same prefill."""
    decoder, caches = prefilled(model, tokens)
    native_rows, torch_rows = [], []
    with torch.inference_mode():
        for i in range(N_PROMPT, N_PROMPT + N_DECODE):
            ids, pos = torch.tensor([[tokens[i]]]), torch.tensor([[i]])
            assert decoder.fits(ids, pos, caches[0])
            native_rows.append(decoder.hidden_states(ids, pos, caches[0])[0, -1].float())
            torch_rows.append(model.hidden_states(ids, pos, caches[1])[0, -1].float())
            for mine, theirs in zip(caches[0].layers, caches[1].layers, strict=True):
                assert mine.used == theirs.used
                assert torch.equal(mine.pos, theirs.pos), "the native step wrote other positions into the cache"
                # Each step starts from the same cache: what is compared is one step's difference.
                theirs.k.copy_(mine.k), theirs.v.copy_(mine.v)
    return torch.stack(native_rows), torch.stack(torch_rows)


@pytest.mark.parametrize("quant", ["int4", "int8"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "f32"])
@pytest.mark.parametrize("kind", MODEL_TYPES)
def test_native_step_computes_what_the_modules_do(checkpoints, kind, dtype, quant):
    """Every decode step, from the same cache: within a few int8 steps of the modules (a wrong
    rotary, a missed bias or norm, a key left out of attention gives 0.5-1.5 here)."""
    model = load(checkpoints[kind], dtype, quant)
    got, want = both_paths(model, prompt_ids(N_PROMPT + N_DECODE))
    rel = ((got - want).norm(dim=-1) / want.norm(dim=-1)).max().item()
    cos = torch.nn.functional.cosine_similarity(got, want, dim=-1).min().item()
    assert rel < 0.15 and cos > 0.99, f"{kind}: hidden states differ by {rel:.3g} of their norm (cosine {cos:.4f})"


def paged_both_paths(model, prompts: list[list[int]], steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(steps, B, hidden) hidden states of a batch decoding together on paged KV pools, native and
    torch: sequences of different lengths, blocks of 4 positions (so attention crosses many), each
    step starting from the same pool contents."""
    decoder = native_decoder(model)
    assert decoder is not None
    pools = [BlockPool.for_model(model, 1 << 20, block_size=4, prefix_cache=False) for _ in range(2)]
    windows = [block.self_attn.window for block in model.model.layers]
    seqs = [[pool.new_sequence(p)[0] for p in prompts] for pool in pools]
    native_rows, torch_rows = [], []
    with torch.inference_mode():
        for pool_seqs in seqs:
            for seq, prompt in zip(pool_seqs, prompts, strict=True):
                assert seq.reserve(len(prompt))
                cache = PagedBatchCache(seq.pool, [seq], [0], [len(prompt)], windows)
                model.hidden_states(torch.tensor([prompt]), torch.arange(len(prompt))[None], cache)
                seq.commit(prompt)
        for step in range(steps):
            ids = torch.tensor([[(7 * step + 3 * i) % 300 + 3] for i in range(len(prompts))])
            positions = [len(p) + step for p in prompts]
            for seq in seqs[0] + seqs[1]:
                assert seq.reserve(1)
            native_rows.append(decoder.decode_paged(ids, positions, seqs[0], pools[0])[:, -1].float())
            cache = PagedBatchCache(pools[1], seqs[1], positions, [1] * len(prompts), windows)
            torch_rows.append(model.hidden_states(ids, torch.tensor(positions)[:, None], cache)[:, -1].float())
            for mine, theirs in zip(pools[0].k + pools[0].v, pools[1].k + pools[1].v, strict=True):
                theirs.copy_(mine)  # each step starts from the same pool: one step's difference
            for pool_seqs in seqs:
                for seq, token in zip(pool_seqs, ids[:, 0].tolist(), strict=True):
                    seq.commit([token])
    return torch.stack(native_rows), torch.stack(torch_rows)


@pytest.mark.parametrize("quant", ["int4", "int8"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "f32"])
@pytest.mark.parametrize("kind", ["llama", "mistral", "qwen2", "gemma3_text"])
def test_paged_batch_step_computes_what_the_modules_do(checkpoints, kind, dtype, quant):
    """The server's batch: rows at positions 3..21 (past the sliding window of 8) in blocks of 4."""
    model = load(checkpoints[kind], dtype, quant)
    prompts = [prompt_ids(n, seed=n) for n in (3, 9, 14)]
    got, want = paged_both_paths(model, prompts, steps=8)
    rel = ((got - want).norm(dim=-1) / want.norm(dim=-1)).max().item()
    cos = torch.nn.functional.cosine_similarity(got, want, dim=-1).min().item()
    assert rel < 0.15 and cos > 0.99, f"{kind}: hidden states differ by {rel:.3g} of their norm (cosine {cos:.4f})"


def test_paged_step_refuses_a_position_not_reserved(checkpoints):
    model = load(checkpoints["llama"], torch.bfloat16)
    decoder = native_decoder(model)
    assert decoder is not None
    pool = BlockPool.for_model(model, 1 << 20, block_size=4, prefix_cache=False)
    seq, _ = pool.new_sequence([5, 6])
    assert seq.reserve(2)
    with pytest.raises(ValueError, match="cannot write position 4"):
        decoder.decode_paged(torch.tensor([[7]]), [4], [seq], pool)


@pytest.mark.parametrize("quant", ["int4", "int8"])
@pytest.mark.parametrize("kind", MODEL_TYPES)
def test_first_token_is_bit_exact_in_bfloat16(checkpoints, kind, quant):
    """At position 0 attention is the token's own value and rotary the identity, so in bfloat16 every
    rounding of the two paths meets: equal to the last bit."""
    model = load(checkpoints[kind], torch.bfloat16, quant)
    decoder = native_decoder(model)
    assert decoder is not None
    ids, pos = torch.tensor([[7]]), torch.tensor([[0]])
    with torch.inference_mode():
        got = decoder.hidden_states(ids, pos, KVCache.for_model(model, batch=1, max_len=16))
        want = model.hidden_states(ids, pos, KVCache.for_model(model, batch=1, max_len=16))
    assert torch.equal(got, want)


def test_generation_takes_the_native_step(checkpoints, monkeypatch):
    model = load(checkpoints["gemma3_text"], torch.bfloat16)
    calls = []
    step = native_decode.NativeDecoder.decode_paged
    monkeypatch.setattr(native_decode.NativeDecoder, "decode_paged", lambda *a, **k: calls.append(1) or step(*a, **k))
    options = GenerationOptions.from_ollama({"temperature": 0, "num_predict": 6, "num_ctx": 64})
    tokens = list(generate_ids(model, prompt_ids(N_PROMPT), options))
    assert len(tokens) == 6 and len(calls) == 5  # the prefill and nothing else on the modules
    # the tokens the modules choose, fed the same tokens (teacher-forced on a contiguous cache): the
    # paged step agrees with them to within a few int8 steps (above), so a greedy choice may differ
    # only where the modules' two best logits are that close.
    for step, (best, runner_up, chosen) in enumerate(modules_choices(load(checkpoints["gemma3_text"], torch.bfloat16),
                                                                      prompt_ids(N_PROMPT), tokens)):  # fmt: skip
        assert chosen == best[1] or best[0] - chosen_logit(runner_up, chosen) < NEAR_TIE, f"step {step}"


NEAR_TIE = 0.05  # logits; a wrong operation moves them by whole units


def chosen_logit(runner_up: tuple[float, int], chosen: int) -> float:
    assert chosen == runner_up[1], "the native step chose neither of the modules' two best tokens"
    return runner_up[0]


def modules_choices(
    model, prompt: list[int], tokens: list[int]
) -> list[tuple[tuple[float, int], tuple[float, int], int]]:
    """Per generated token: the modules' best and second best (logit, id) before it, and the token
    chosen, the modules running over a contiguous cache with no native step."""
    cache = KVCache.for_model(model, batch=1, max_len=len(prompt) + len(tokens))
    ids, pos = torch.tensor([prompt]), torch.arange(len(prompt))[None]
    out = []
    with torch.inference_mode():
        for n, token in enumerate(tokens):
            with prefill_numerics() if n == 0 else contextlib.nullcontext():  # the prompt as generation takes it
                logits = model.logits(model.hidden_states(ids, pos, cache)[:, -1]).float()[0]
            top = logits.topk(2)
            pairs = [(float(v), int(i)) for v, i in zip(top.values, top.indices, strict=True)]
            out.append((pairs[0], pairs[1], token))
            ids, pos = torch.tensor([[token]]), torch.tensor([[len(prompt) + n]])
    return out


def logits_both_ways(model, tokens: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(N_DECODE, vocab) logits of each decode step: the token-to-logits call, and the native layers
    followed by the model's own embedding, final norm and head, from the same caches."""
    decoder, caches = prefilled(model, tokens)
    assert decoder.takes_tokens
    native_rows, module_rows = [], []
    with torch.inference_mode():
        for i in range(N_PROMPT, N_PROMPT + N_DECODE):
            ids, pos = torch.tensor([[tokens[i]]]), torch.tensor([[i]])
            native_rows.append(decoder.logits(ids, pos, caches[0]))
            module_rows.append(model.logits(decoder.hidden_states(ids, pos, caches[1])[:, -1]).float()[0])
    return torch.stack(native_rows), torch.stack(module_rows)


@pytest.mark.parametrize("quant", ["int4", "int8"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "f32"])
@pytest.mark.parametrize("kind", MODEL_TYPES)
def test_token_to_logits_call_embeds_and_projects_as_the_modules(checkpoints, kind, dtype, quant):
    """In bfloat16 equal to the last bit (the embedding dequantized, the final norm and the head
    rounded as the modules do); in float32 the final norm's sum runs in another order."""
    got, want = logits_both_ways(load(checkpoints[kind], dtype, quant), prompt_ids(N_PROMPT + N_DECODE))
    if dtype == torch.bfloat16:
        assert torch.equal(got, want)
    else:
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "f32"])
def test_token_to_logits_call_reads_a_float_embedding(checkpoints, dtype):
    """An embedding left in the activation dtype (a plain nn.Embedding) beside a quantized head."""
    model = load(checkpoints["llama"], dtype)
    weight = model.model.embed_tokens.qweight.dequantize(dtype)
    model.model.embed_tokens = torch.nn.Embedding.from_pretrained(weight)
    kind = native_decode.EMBED_BF16 if dtype == torch.bfloat16 else native_decode.EMBED_F32
    assert native_decoder(model).decoder.embed_kind == kind  # type: ignore[union-attr]
    got, want = logits_both_ways(model, prompt_ids(N_PROMPT + N_DECODE))
    tolerance = 0.0 if dtype == torch.bfloat16 else 1e-4  # as in the test above
    torch.testing.assert_close(got, want, rtol=tolerance, atol=tolerance)


def test_paged_token_to_logits_call_matches_the_modules_head(checkpoints):
    model = load(checkpoints["gemma3_text"], torch.bfloat16)
    decoder = native_decoder(model)
    assert decoder is not None
    pools = [BlockPool.for_model(model, 1 << 20, block_size=4, prefix_cache=False) for _ in range(2)]
    windows = [block.self_attn.window for block in model.model.layers]
    prompts = [prompt_ids(n, seed=n) for n in (3, 9, 14)]
    with torch.inference_mode():
        outs = []
        for pool, as_logits in zip(pools, (True, False), strict=True):
            seqs = [pool.new_sequence(p)[0] for p in prompts]
            for seq, prompt in zip(seqs, prompts, strict=True):
                assert seq.reserve(len(prompt) + 1)
                cache = PagedBatchCache(pool, [seq], [0], [len(prompt)], windows)
                model.hidden_states(torch.tensor([prompt]), torch.arange(len(prompt))[None], cache)
                seq.commit(prompt)
            ids, positions = torch.tensor([[5], [6], [7]]), [len(p) for p in prompts]
            out = decoder.decode_paged(ids, positions, seqs, pool, logits=as_logits)
            outs.append(out if as_logits else model.logits(out[:, -1]).float())
    assert outs[0].shape == (3, decoder.vocab) and torch.equal(outs[0], outs[1])


def test_token_ids_outside_the_vocabulary_are_refused(checkpoints):
    model = load(checkpoints["llama"], torch.bfloat16)
    decoder = native_decoder(model)
    assert decoder is not None
    cache = KVCache.for_model(model, batch=1, max_len=16)
    for bad in (-1, decoder.vocab):
        expected = rf"token {bad} at position 0: it takes token ids in 0\.\.{decoder.vocab - 1}"
        with pytest.raises(ValueError, match=expected):
            decoder.logits(torch.tensor([[bad]]), torch.tensor([[0]]), cache)
    assert all(kv.used == 0 for kv in cache.layers)  # nothing written


def test_logit_softcapping_keeps_the_modules_head(checkpoints, monkeypatch):
    model = load(checkpoints["gemma3_text"], torch.bfloat16)
    monkeypatch.setattr(model, "config", dataclasses.replace(model.config, final_logit_softcapping=30.0))
    decoder = native_decoder(model)
    assert decoder is not None and not decoder.takes_tokens


def test_float_weights_keep_the_modules(checkpoints):
    assert native_decoder(load(checkpoints["llama"], torch.bfloat16, "none")) is None


def test_int4_in_torchs_layout_keeps_the_modules(checkpoints, monkeypatch):
    """Where int4 codes are packed for torch's kernel (no native kernel), the step cannot read them."""
    monkeypatch.setattr(quant, "int4_layout", quant.torch_int4_layout)
    assert native_decoder(load(checkpoints["llama"], torch.bfloat16, "int4")) is None


def test_switched_off(checkpoints, monkeypatch):
    monkeypatch.setenv(native_decode.ENV_SWITCH, "0")
    assert native_decoder(load(checkpoints["llama"], torch.bfloat16)) is None


def test_fits_only_one_token_of_one_sequence_in_order(checkpoints):
    model = load(checkpoints["llama"], torch.bfloat16)
    decoder = native_decoder(model)
    assert decoder is not None
    cache = KVCache.for_model(model, batch=1, max_len=32)
    with torch.inference_mode():
        model.hidden_states(torch.tensor([prompt_ids(4)]), torch.arange(4)[None], cache)
    one = torch.tensor([[5]])
    assert decoder.fits(one, torch.tensor([[4]]), cache)
    assert not decoder.fits(one, torch.tensor([[6]]), cache)  # positions 4 and 5 are not in the cache
    assert decoder.fits_at(4, cache) and not decoder.fits_at(6, cache)
    assert not decoder.fits(torch.tensor([[5, 6]]), torch.tensor([[4, 5]]), cache)
    pair = KVCache.for_model(model, batch=2, max_len=32)
    assert not decoder.fits(torch.tensor([[5], [6]]), torch.tensor([[0], [0]]), pair)


def test_a_dropped_model_is_freed_at_once(checkpoints):
    """The model holds its decoder; the decoder must not hold the model, or every weight would wait
    for the cycle collector after a server unloads it."""
    model = load(checkpoints["llama"], torch.bfloat16)
    assert native_decoder(model) is not None
    ref = weakref.ref(model)
    gc.disable()
    try:
        del model
        assert ref() is None
    finally:
        gc.enable()


TP_SPLITS = [(2, None), (3, None), (2, (2.0, 1.0))]  # even, uneven by count, uneven by weight


@pytest.mark.slow
@pytest.mark.parametrize("quant", ["int4", "int8"])
@pytest.mark.parametrize("kind", ["llama", "qwen2", "gemma3_text"])
def test_a_tensor_parallel_shard_takes_the_native_step(checkpoints, kind, quant):
    """Each rank of TP 2 and 3 (even and uneven splits) runs its shard through the native step, which
    sums o's and down's outputs through the communicator's native shared-memory all-reduce (counted
    in its stats like the others), and computes what the shard's torch
    modules (the TP plan's hooks and all) compute, within what the whole model allows above."""
    from tests.parallel.tp_entry import native_shard_runs
    from tp_ollama.launch import Cluster, run_workers

    layers = len(load(checkpoints[kind], torch.float32, quant).model.layers)
    for world, weights in TP_SPLITS:
        results = run_workers(Cluster(nproc_per_node=world), native_shard_runs, str(checkpoints[kind]), "bfloat16",
                              quant, weights)  # fmt: skip
        for rank, r in sorted(results.items()):
            where = f"{kind} TP {world} {weights} rank {rank}"
            assert r["why_not"] is None, f"{where}: {r['why_not']}"
            assert r["native_reduce"], f"{where}: the step sums through Python, not the shared-memory all-reduce"
            # One for the embedding and two a layer, none for the head (each rank samples its own
            # slice), in each forward: the 3 prompts' prefill into each of the two pools, then 6 steps
            # of each path.
            assert r["all_reduces"] == (2 * 3 + 2 * 6) * (1 + 2 * layers), where
            assert r["rel"] < 0.15 and r["cos"] > 0.99, f"{where}: differ by {r['rel']:.3g} (cosine {r['cos']:.4f})"


def test_a_binding_that_disagrees_with_the_library_keeps_the_modules(checkpoints, monkeypatch):
    monkeypatch.setattr(native_decode, "binding_layout", lambda: [0])  # as imported there
    model = load(checkpoints["llama"], torch.float32, "int4")
    assert native_decoder(model) is None
    assert "structs do not match" in native_decode.why_not_native(model)
