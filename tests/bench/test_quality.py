"""bench quality: the figures against the float32 model, on a tiny GGUF and on known distributions."""

from __future__ import annotations

import math

import pytest
import torch

from tests.tiny import write_chat_gguf
from tp_ollama.bench.quality import MIN_TOKENS, SKIP, TEXT, Tally, parse_setting, run_quality, text_chunks
from tp_ollama.bench.schema import validate
from tp_ollama.errors import ConfigError
from tp_ollama.text.prompt import tokenizer_at


@pytest.fixture(scope="module")
def gguf(tmp_path_factory):
    return write_chat_gguf(tmp_path_factory.mktemp("quality") / "tiny.gguf")


def test_tally_matches_the_definitions():
    ref = torch.log_softmax(torch.tensor([[2.0, 1.0, 0.0], [0.0, 3.0, 0.0]]), -1)
    same, other = Tally(), Tally()
    same.add(ref, ref, torch.tensor([0, 1]))
    assert same.figures()["top1_agreement"] == 1.0 and same.figures()["mean_kl"] == pytest.approx(0.0, abs=1e-7)
    assert same.figures()["perplexity"] == pytest.approx(math.exp(-(ref[0, 0] + ref[1, 1]).item() / 2))
    flipped = torch.log_softmax(torch.tensor([[0.0, 1.0, 2.0], [0.0, 3.0, 0.0]]), -1)
    other.add(ref, flipped, torch.tensor([0, 1]))
    p = ref[0].exp()
    kl0 = float((p * (ref[0] - flipped[0])).sum())
    figures = other.figures()
    assert figures["top1_agreement"] == 0.5 and figures["positions"] == 2
    assert figures["mean_kl"] == pytest.approx(kl0 / 2, rel=1e-5) and figures["max_kl"] == pytest.approx(kl0, rel=1e-5)


def test_settings_are_quant_slash_dtype_and_a_bad_one_is_named():
    assert parse_setting("auto/auto") == ("auto", "auto")
    assert parse_setting("int4/float32") == ("int4", "float32")
    for bad in ("int4", "int3/auto", "auto/fp8"):
        with pytest.raises(ConfigError, match=f"precision setting '{bad}' is not QUANT/DTYPE"):
            parse_setting(bad)


def test_the_shipped_text_is_long_enough_and_chunks_start_with_bos(gguf):
    tokenizer = tokenizer_at(gguf)
    chunks = text_chunks(tokenizer, TEXT.read_text(), chunk=256)
    assert sum(len(c) for c in chunks) >= MIN_TOKENS
    assert all(len(c) <= 256 for c in chunks) and all(len(c) > SKIP + 1 for c in chunks)
    if tokenizer.bos_id is not None:
        assert all(c[0] == tokenizer.bos_id for c in chunks)


def test_float32_agrees_with_itself_and_int4_departs_from_it(gguf):
    report = run_quality(str(gguf), ["none/float32", "int4/float32"], llama_cpp=True, threads=1, max_tokens=120,
                         argv=["tp-ollama", "bench", "quality"])  # fmt: skip
    validate(report)
    assert report["kind"] == "quality" and report["settings"]["tokens"] == 120
    by_target = {r["target"]: r for r in report["results"]}
    assert by_target["reference (float32)"]["quality"]["top1_agreement"] == 1.0
    exact = by_target["tp-ollama none/float32"]["quality"]
    assert exact["top1_agreement"] == 1.0 and exact["mean_kl"] < 1e-5
    assert exact["positions"] == 120 - SKIP - 1
    packed = by_target["tp-ollama int4/float32"]["quality"]
    assert packed["mean_kl"] > 10 * exact["mean_kl"] and packed["positions"] == exact["positions"]
    assert by_target["tp-ollama int4/float32"]["config"]["resolved_dtype"] == "float32"
    llama = by_target.get("llama.cpp")
    if llama is None:  # llama-cpp-python is an optional extra; without it the report says so
        assert any("llama.cpp" in note for note in report["notes"])
    else:
        assert llama["quality"]["top1_agreement"] > 0.5
