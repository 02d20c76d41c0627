"""What a rank keeps between steps: loading (and keeping a load that asks for the same), admission's
checks with their numbers, and a KV pool sized by need."""

from __future__ import annotations

import pytest

from tests.tiny import make_hf_model, save_hf
from tp_ollama.engine.options import GenerationOptions, SamplingOptions
from tp_ollama.engine.protocol import Generate, Load, OutputFormat
from tp_ollama.engine.sampler import Sampler
from tp_ollama.engine.state import EngineJob, EngineState, sampler_for
from tp_ollama.errors import RequestError, TpOllamaError
from tp_ollama.parallel.comm import SoloComm

GREEDY = SamplingOptions(temperature=0)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_hf(make_hf_model("llama"), tmp_path_factory.mktemp("llama"))


def test_a_load_describes_itself_and_the_same_load_is_kept(model_dir):
    state = EngineState(EngineJob(kv_cache_bytes=1 << 20), SoloComm())
    info = state.load(Load("a", str(model_dir), num_ctx=128))
    assert info.world_size == 1 and info.kv_blocks > 0 and info.layout[0]["device"] == "cpu"
    assert info.precision["dtype"] == "float32" and info.size_bytes > 0
    model = state.model
    assert state.load(Load("b", str(model_dir), num_ctx=128)) is info and state.model is model
    state.load(Load("c", str(model_dir), num_ctx=256))  # another num_ctx: loaded again
    assert state.model is not model


def test_admission_checks_the_prompt_and_the_kv_cache(model_dir):
    state = EngineState(EngineJob(kv_cache_bytes=None), SoloComm())
    with pytest.raises(TpOllamaError, match="no model is loaded"):
        state.admit(Generate("a", [1], GenerationOptions(), frozenset()))
    state.load(Load("l", str(model_dir), num_ctx=64))  # sized for one sequence of 64 positions
    with pytest.raises(RequestError, match="empty"):
        state.admit(Generate("a", [], GenerationOptions(GREEDY), frozenset()))
    with pytest.raises(
        TpOllamaError, match=r"needs 16 KV cache blocks \(256 tokens of num_ctx\) but the cache holds 4"
    ):
        state.admit(Generate("a", [1, 2], GenerationOptions(GREEDY, num_ctx=256), frozenset()))
    request = state.admit(Generate("b", [1, 2], GenerationOptions(GREEDY, num_ctx=64), frozenset()))
    assert state.queued("b") and request.prompt == [1, 2] and not request.constrained
    assert state.active_ids() == ["b"] and state.busy()


def test_a_kv_pool_sized_by_need_grows_and_a_fixed_one_does_not(model_dir):
    grows = EngineState(EngineJob(kv_cache_bytes=None), SoloComm())
    grows.load(Load("l", str(model_dir), num_ctx=64))
    assert grows.batch.pool.num_blocks == 4
    grows.fit_kv(200)
    assert grows.batch.pool.num_blocks == 13
    fixed = EngineState(EngineJob(kv_cache_bytes=1 << 20), SoloComm())
    fixed.load(Load("l", str(model_dir), num_ctx=64))
    blocks = fixed.batch.pool.num_blocks
    fixed.fit_kv(100_000)
    assert fixed.batch.pool.num_blocks == blocks


def test_a_structured_request_gets_its_grammar_from_the_models_tokenizer(tmp_path):
    from tests.tiny import write_chat_gguf

    path = write_chat_gguf(tmp_path / "chat.gguf")
    state = EngineState(EngineJob(kv_cache_bytes=None), SoloComm())
    state.load(Load("l", str(path), num_ctx=64))
    options = GenerationOptions(GREEDY, num_ctx=64)
    request = state.admit(Generate("s", [1, 2], options, frozenset(), OutputFormat("json")))
    assert request.constrained and "s" in state.grammars


def test_one_rank_samples_alone():
    assert sampler_for(None, SoloComm()) is Sampler  # type: ignore[arg-type]
