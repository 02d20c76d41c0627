"""tp_ollama.engine.flow: decode steps flowing through 2 and 3 pipeline stages in real torchrun ranks,
on tiny random models (torch modules and the native step): requests decoding together get the
tokens each gets alone, the stages work in the same ticks, and a request cancelled between stages
leaves the others' tokens as they were."""

from __future__ import annotations

import pytest

from tests.tiny import make_hf_model, prompt_ids, save_hf
from tp_ollama.engine.direct import DirectEngine
from tp_ollama.engine.options import GenerationOptions, SamplingOptions
from tp_ollama.engine.state import EngineJob
from tp_ollama.launch import Cluster, run_workers
from tp_ollama.parallel.comm import join_group


def _options(i: int) -> GenerationOptions:
    sampling = SamplingOptions(temperature=0) if i % 2 == 0 else SamplingOptions(temperature=0.9, seed=i, top_k=20)
    return GenerationOptions(sampling=sampling, num_predict=10 + 3 * i, num_ctx=96)


def flow_runs(path: str, pp: int, dtype: str, quant: str) -> dict[str, object]:
    comm = join_group("auto", 60)
    engine = DirectEngine(EngineJob(kv_cache_bytes=None, pp=pp, timeout_s=60, prefix_cache=False), comm)
    engine.load(path, dtype=dtype, num_ctx=96, quant=quant)
    prompts = [prompt_ids(4 + 5 * i, seed=i) for i in range(5)]
    options = [_options(i) for i in range(5)]
    alone = [engine.generate_all([p], [o])[0] for p, o in zip(prompts, options, strict=True)]
    full_alone = engine.state.batch.flow.full_ticks  # type: ignore[union-attr]
    engine.state.fit_kv(*(len(p) + o.num_predict for p, o in zip(prompts, options, strict=True)))  # a fresh batch
    flow = engine.state.batch.flow  # type: ignore[union-attr]
    together = engine.generate_all(prompts, options)
    full_together = flow.full_ticks
    cancelled = engine.generate_all(prompts, options, cancel_after={1: 4, 2: 7})
    left = sorted(flow.flying())
    # A long prompt in chunks of 48: through the stages in turn (no flow), then flowing, chunk after chunk.
    long, greedy = prompt_ids(200, seed=9), GenerationOptions(sampling=SamplingOptions(temperature=0), num_predict=8)
    engine.state.fit_kv(len(long) + 8, *(len(p) + o.num_predict for p, o in zip(prompts[:2], options[:2], strict=True)))
    if engine.state.planner is not None:  # rank 0's
        engine.state.planner.chunk = 48
    batch = engine.state.batch
    flow = batch.flow  # type: ignore[union-attr]
    batch.flow = None  # type: ignore[union-attr]
    in_turn = engine.generate_all([long], [greedy])
    batch.flow = flow  # type: ignore[union-attr]
    before = flow.full_ticks
    flowing = engine.generate_all([long], [greedy])
    full_long = flow.full_ticks - before
    # Several prompts, long and short, flowing together with decoding ones.
    mixed = engine.generate_all([long, *prompts[:2]], [greedy, *options[:2]])
    decode = engine.state.loaded.precision["decode"]  # type: ignore[union-attr]
    if comm.rank == 0:
        engine.close()
    else:
        engine.follow()
    comm.close()
    return {"alone": alone, "together": together, "cancelled": cancelled, "full_alone": full_alone,
            "full_together": full_together, "left": left, "decode": decode, "in_turn": in_turn,
            "flowing": flowing, "full_long": full_long, "mixed": mixed}  # fmt: skip


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    return {kind: save_hf(make_hf_model(kind), tmp_path_factory.mktemp(kind)) for kind in ("llama", "gemma3_text")}


RUNS = [
    ("llama", 2, 1, "float32", "none"),
    ("gemma3_text", 2, 1, "bfloat16", "int8"),
    ("llama", 3, 1, "bfloat16", "int8"),
    ("gemma3_text", 2, 2, "bfloat16", "int8"),  # hybrid: TP inside each stage
]


@pytest.mark.parametrize(
    ("kind", "pp", "tp", "dtype", "quant"),
    RUNS,
    ids=["llama-pp2-torch", "gemma3-pp2-native", "llama-pp3-native", "gemma3-tp2-pp2-native"],
)
def test_requests_flowing_through_the_stages_get_their_own_tokens(checkpoints, kind, pp, tp, dtype, quant):
    results = run_workers(Cluster(nproc_per_node=pp * tp), flow_runs, str(checkpoints[kind]), pp, dtype, quant)
    assert sorted(results) == list(range(pp * tp))
    first = results[0]
    for r in results.values():  # every rank saw the same tokens
        assert (r["alone"], r["together"], r["cancelled"]) == (first["alone"], first["together"], first["cancelled"])
    alone, together, cancelled = first["alone"], first["together"], first["cancelled"]
    assert [len(t) for t in alone] == [10 + 3 * i for i in range(5)]
    assert together == alone
    # The stages ran at once: alone, one sequence is never in two stages; together they overlap.
    assert first["full_alone"] == 0
    assert first["full_together"] >= 10
    # Cancelled ones stop where they were cancelled (between stages or not), the others are unchanged.
    assert cancelled[1] == alone[1][:4] and cancelled[2] == alone[2][:7]
    assert [cancelled[i] for i in (0, 3, 4)] == [alone[i] for i in (0, 3, 4)]
    assert first["left"] == []
    # A long prompt's chunks flow: stages work on two chunks at once, and the tokens are those of the
    # stages taking the prompt in turn.
    assert first["flowing"] == first["in_turn"] and len(first["flowing"][0]) == 8
    assert first["full_long"] >= 1
    assert first["mixed"] == [first["in_turn"][0], *alone[:2]]
    assert (first["decode"] == "native") == (quant == "int8"), first["decode"]
