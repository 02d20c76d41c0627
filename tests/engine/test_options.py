"""Options with Ollama's names: each bad value is refused naming the option, JSON numbers are coerced as
upstream does, and a prompt is checked against num_ctx."""

from __future__ import annotations

import math
from typing import Any

import pytest

from tp_ollama.engine.options import GenerationOptions, SamplingOptions, check_prompt
from tp_ollama.errors import RequestError


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("temperature", -0.1),
        ("temperature", math.nan),
        ("top_k", -1),
        ("top_p", 1.5),
        ("min_p", -0.1),
        ("typical_p", 0.0),
        ("repeat_penalty", 0.0),
        ("repeat_last_n", -2),
        ("presence_penalty", math.inf),
    ],
)
def test_invalid_sampling_options_name_the_option(name: str, value: float) -> None:
    kwargs: dict[str, Any] = {name: value}
    with pytest.raises(RequestError, match=f"option {name}="):
        SamplingOptions(**kwargs)


@pytest.mark.parametrize(
    ("name", "value"), [("temperature", "hot"), ("top_k", True), ("num_ctx", "big"), ("seed", math.inf)]
)
def test_non_numeric_ollama_options_name_the_option(name: str, value: object) -> None:
    with pytest.raises(RequestError, match=f"option {name}="):
        GenerationOptions.from_ollama({name: value})


def test_json_numbers_are_coerced_for_int_options() -> None:
    options = GenerationOptions.from_ollama({"top_k": 40.0, "seed": 3.0, "temperature": 1, "num_ctx": 2048.0})
    assert options.sampling.top_k == 40 and isinstance(options.sampling.top_k, int)
    assert options.sampling.seed == 3 and isinstance(options.sampling.seed, int)
    assert options.sampling.temperature == 1.0
    assert options.num_ctx == 2048 and isinstance(options.num_ctx, int)


def test_stop_and_counts_from_ollama_options() -> None:
    options = GenerationOptions.from_ollama({"stop": "END", "num_predict": 7, "mirostat": 1, "top_k": None})
    assert options.stop == ("END",) and options.num_predict == 7 and options.sampling.top_k == 40
    assert GenerationOptions.from_ollama({"stop": ["a", "b"]}).stop == ("a", "b")
    with pytest.raises(RequestError, match="option num_predict=-3"):
        GenerationOptions(num_predict=-3)


def test_a_prompt_must_be_non_empty_and_leave_room_in_num_ctx() -> None:
    check_prompt(3, GenerationOptions(num_ctx=4))
    with pytest.raises(RequestError, match="empty"):
        check_prompt(0, GenerationOptions())
    with pytest.raises(RequestError, match="4 tokens long, which does not fit num_ctx=4"):
        check_prompt(4, GenerationOptions(num_ctx=4))
