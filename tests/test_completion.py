"""Ollama's sampling options act on real generations of the embedded SmolLM2 model."""

from __future__ import annotations

import pytest

from tp_ollama.completion import LoadedModel, load, stream_text
from tp_ollama.engine.direct import GenerationStats
from tp_ollama.engine.options import GenerationOptions, SamplingOptions
from tp_ollama.errors import RequestError
from tp_ollama.text.prompt import prompt_tokens

pytestmark = pytest.mark.slow

REPEATING = "I like to eat apples and"  # greedy SmolLM2 loops on one sentence here


@pytest.fixture(scope="module")
def smol() -> LoadedModel:
    return load("smollm2:135m", "float32", quant="none")  # the texts below are the float32 model's


def run(model: LoadedModel, prompt: str, **kw) -> tuple[str, GenerationStats]:
    sampling = {k: kw.pop(k) for k in list(kw) if k in SamplingOptions.__dataclass_fields__}
    options = GenerationOptions(sampling=SamplingOptions(**sampling), **kw)
    stats = GenerationStats()
    text = "".join(stream_text(model, prompt_tokens(model.tokenizer, prompt), options, stats))
    return text, stats


def test_fixed_seed_reproduces_and_seeds_differ(smol):
    a, _ = run(smol, "Once upon a time", temperature=1.0, seed=42, num_predict=24)
    b, _ = run(smol, "Once upon a time", temperature=1.0, seed=42, num_predict=24)
    c, _ = run(smol, "Once upon a time", temperature=1.0, seed=7, num_predict=24)
    assert a == b
    assert a != c


def test_top_k_1_equals_greedy(smol):
    greedy, _ = run(smol, "Once upon a time", temperature=0, num_predict=24)
    top1, _ = run(smol, "Once upon a time", temperature=1.5, top_k=1, seed=3, num_predict=24)
    assert top1 == greedy


def test_stop_string_cuts_and_is_not_emitted(smol):
    full, _ = run(smol, REPEATING, temperature=0, num_predict=24)
    stop = "what to do"
    assert stop in full
    cut, stats = run(smol, REPEATING, temperature=0, num_predict=24, stop=(stop,))
    assert cut == full[: full.index(stop)]
    assert stats.done_reason == "stop"


def test_num_predict_bounds_the_count(smol):
    _, stats = run(smol, REPEATING, temperature=0, num_predict=5)
    assert stats.eval_count == 5
    assert stats.done_reason == "length"


def test_repeat_penalty_changes_a_repeating_greedy_output(smol):
    plain, _ = run(smol, REPEATING, temperature=0, num_predict=40)
    penalised, _ = run(smol, REPEATING, temperature=0, num_predict=40, repeat_penalty=1.5)
    assert plain.count("I'm not sure what to do with it") >= 2
    assert penalised != plain
    assert penalised.count("I'm not sure what to do with it") < plain.count("I'm not sure what to do with it")


def test_end_of_turn_ends_a_chat_answer(smol):
    ids = prompt_tokens(smol.tokenizer, "Name the capital of France.", chat=True)
    stats = GenerationStats()
    options = GenerationOptions(sampling=SamplingOptions(temperature=0), num_predict=64)
    text = "".join(stream_text(smol, ids, options, stats))
    assert "Paris" in text and "<|im_end|>" not in text
    assert stats.done_reason == "stop" and stats.eval_count < 64


def test_prompt_longer_than_num_ctx_is_refused(smol):
    with pytest.raises(RequestError, match="num_ctx=4"):
        run(smol, "one two three four five six seven", num_ctx=4)
