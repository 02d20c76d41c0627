"""gemma3:270m with quantized weights: int8 follows float32 greedy decoding, every packing writes
fluent text, and TP=2 gives TP=1's tokens."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from tests.store.test_embedded import GEMMA_PROMPTS, cli_generate
from tp_ollama.checkpoints.loader import load_model, open_checkpoint
from tp_ollama.engine.direct import generate_ids
from tp_ollama.engine.options import GenerationOptions, SamplingOptions
from tp_ollama.store.embedded import resolve_model
from tp_ollama.text.prompt import tokenizer_at

pytestmark = pytest.mark.slow
N_TOKENS = 16


@pytest.fixture(scope="module")
def gemma():
    path = resolve_model("gemma3:270m")
    ckpt = open_checkpoint(path)
    tokenizer = tokenizer_at(path)
    yield ckpt, tokenizer
    ckpt.close()


def greedy(model: torch.nn.Module, tokenizer, prompt: str) -> list[int]:
    ids = tokenizer.encode(prompt, add_special_tokens=True)
    options = GenerationOptions(sampling=SamplingOptions(temperature=0), num_predict=N_TOKENS, num_ctx=256)
    return list(generate_ids(model, ids, options, frozenset(tokenizer.eos_ids)))


def degenerate(tokens: list[int]) -> bool:
    """One token making up more than half the output: a loop, not text."""
    return not tokens or Counter(tokens).most_common(1)[0][1] > len(tokens) / 2


def test_int8_follows_float32(gemma):
    ckpt, tokenizer = gemma
    reference = load_model(ckpt, torch.float32)
    expected = {p: greedy(reference, tokenizer, p) for p in GEMMA_PROMPTS}
    del reference
    # bfloat16 activations: the packed kernels compute in bfloat16 whatever the model dtype.
    model = load_model(ckpt, torch.bfloat16, quant="int8")
    got = {p: greedy(model, tokenizer, p) for p in GEMMA_PROMPTS}
    agree = [p for p in GEMMA_PROMPTS if got[p][:8] == expected[p][:8]]
    texts = {p: tokenizer.decode(got[p]) for p in GEMMA_PROMPTS}
    assert len(agree) >= 2, f"first 8 tokens agree with float32 only for {agree}: {texts}"
    assert not [p for p in GEMMA_PROMPTS if degenerate(got[p])], texts


@pytest.mark.parametrize("quant", ["int4", "auto"])
def test_other_packings_write_text(gemma, quant):
    ckpt, tokenizer = gemma
    model = load_model(ckpt, torch.bfloat16, quant=quant)
    for prompt in GEMMA_PROMPTS:
        tokens = greedy(model, tokenizer, prompt)
        assert len(tokens) == N_TOKENS and not degenerate(tokens), f"{quant}: {tokenizer.decode(tokens)!r}"


def test_int8_tp2_gives_tp1_tokens():
    prompt = GEMMA_PROMPTS[0]
    quant = ("--num-predict", "16", "--quant", "int8")
    one = cli_generate("gemma3:270m", prompt, *quant)
    two = cli_generate("gemma3:270m", prompt, *quant, "--tp", "2")
    assert one and two == one
