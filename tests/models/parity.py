"""Our models against transformers on tiny random checkpoints, position by position: the checks that
test_llama.py and test_gemma3.py run on each model type of their family."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from tests.tiny import make_hf_model, prompt_ids, save_hf
from tp_ollama.checkpoints.loader import load_model, open_checkpoint
from tp_ollama.engine.direct import generate_ids
from tp_ollama.engine.kv_cache import KVCache
from tp_ollama.engine.options import GenerationOptions, SamplingOptions

PROMPT_LEN = 20  # longer than the sliding windows (8) of the mistral and gemma3 configs
GREEDY = GenerationOptions(sampling=SamplingOptions(temperature=0), num_predict=32, num_ctx=128)


def hf_greedy(model, prompt: list[int], n: int) -> list[int]:
    out = model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, min_new_tokens=n, pad_token_id=0)
    return out[0, len(prompt) :].tolist()


def stepwise_logits(model, tokens: list[int], n_prompt: int) -> torch.Tensor:
    """Our logits for every position of `tokens`: one prefill of n_prompt, then one token a step."""
    cache = KVCache.for_model(model, batch=1, max_len=len(tokens) + 1)
    with torch.inference_mode():
        ids = torch.tensor([tokens[:n_prompt]])
        rows = [model.logits(model.hidden_states(ids, torch.arange(n_prompt)[None], cache))[0]]
        for i in range(n_prompt, len(tokens)):
            h = model.hidden_states(torch.tensor([[tokens[i]]]), torch.tensor([[i]]), cache)
            rows.append(model.logits(h)[0])
    return torch.cat(rows)  # (len(tokens), vocab)


Pair = tuple[str, Any, nn.Module]


def load_pair(kind: str, tmp_path_factory: pytest.TempPathFactory) -> Pair:
    """(kind, the transformers model, ours loaded from its saved checkpoint)."""
    hf = make_hf_model(kind)
    directory = save_hf(hf, tmp_path_factory.mktemp(kind))
    ours = load_model(open_checkpoint(Path(directory)), torch.float32)
    return kind, hf, ours


def assert_logits_match_over_prefill_and_16_decode_steps(pair: Pair) -> None:
    kind, hf, ours = pair
    prompt = prompt_ids(PROMPT_LEN)
    continuation = hf_greedy(hf, prompt, 16)
    tokens = prompt + continuation
    with torch.no_grad():
        ref = hf(torch.tensor([tokens])).logits[0]
    got = stepwise_logits(ours, tokens, PROMPT_LEN)
    assert got.shape == ref.shape
    err = (got - ref).abs().max().item()
    assert err < 1e-4, f"{kind}: max abs logit difference {err}"


def assert_greedy_tokens_identical_for_32_steps(pair: Pair) -> None:
    kind, hf, ours = pair
    prompt = prompt_ids(PROMPT_LEN, seed=7)
    expected = hf_greedy(hf, prompt, 32)
    got = list(generate_ids(ours, prompt, GREEDY))
    assert got == expected, kind
