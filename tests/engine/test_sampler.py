"""Sampler chain: reproducibility, each truncation stage, penalties, and the empirical distribution."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

from tp_ollama.engine.options import SamplingOptions
from tp_ollama.engine.sampler import (
    Sampler,
    apply_penalties,
    greedy,
    min_p,
    top_k,
    top_p,
    typical_p,
)
from tp_ollama.kernels import native

# Every truncation knob off: the draw is from softmax(logits / temperature).
PLAIN = {"top_k": 0, "top_p": 1.0, "min_p": 0.0, "typical_p": 1.0}


def _sampler(vocab: int, **options: Any) -> Sampler:
    return Sampler(SamplingOptions(**options), vocab)


def _logits(probs: list[float]) -> torch.Tensor:
    return torch.tensor(probs).log()


def _draws(sampler: Sampler, logits: torch.Tensor, n: int, start: int = 0) -> list[int]:
    """Draws at positions start.. (a history of that many tokens; penalties are off by default)."""
    return [sampler(logits, [0] * i) for i in range(start, start + n)]


def _kept(cands: tuple[torch.Tensor, torch.Tensor]) -> set[int]:
    logits, ids = cands
    return set(ids[torch.isfinite(logits)].tolist())


# --- seeds ---------------------------------------------------------------------------------------------


def test_fixed_seed_reproduces_the_same_draws() -> None:
    flat = torch.zeros(1000)
    first = _draws(_sampler(1000, seed=7, temperature=1.0, **PLAIN), flat, 50)
    again = _draws(_sampler(1000, seed=7, temperature=1.0, **PLAIN), flat, 50)
    other = _draws(_sampler(1000, seed=8, temperature=1.0, **PLAIN), flat, 50)
    assert first == again
    assert first != other
    assert len(set(first)) > 40  # a flat distribution really is being sampled


def test_a_draw_depends_on_the_seed_and_position_only() -> None:
    """A request resumed at position 30 (re-prefilled after a node failure) draws what the
    uninterrupted one drew there; the same position drawn twice gives the same token."""
    flat = torch.zeros(1000)
    whole = _draws(_sampler(1000, seed=7, temperature=1.0, **PLAIN), flat, 50)
    resumed = _draws(_sampler(1000, seed=7, temperature=1.0, **PLAIN), flat, 20, start=30)
    assert resumed == whole[30:]
    sampler = _sampler(1000, seed=7, temperature=1.0, top_k=40, top_p=0.9)
    assert sampler(flat, [1, 2, 3]) == sampler(flat, [4, 5, 6])


def test_no_seed_or_negative_seed_picks_a_fresh_random_seed() -> None:
    seeds = {_sampler(10, seed=None).seed, _sampler(10, seed=-1).seed, _sampler(10, seed=-1).seed}
    assert len(seeds) == 3
    assert _sampler(10, seed=5).seed == 5


# --- greedy and the truncation stages ------------------------------------------------------------------


def test_temperature_zero_is_argmax_and_ties_go_to_the_lowest_id() -> None:
    gen = torch.Generator().manual_seed(0)
    sampler = _sampler(500, temperature=0.0, top_k=3, top_p=0.1, min_p=0.5, typical_p=0.2)
    for _ in range(20):
        logits = torch.randn(500, generator=gen)
        assert sampler(logits, []) == int(torch.argmax(logits))
    tied = torch.tensor([0.0, 3.0, 1.0, 3.0])
    assert _sampler(4, temperature=0.0)(tied, []) == 1
    assert greedy(tied) == 1


@pytest.mark.skipif(not native.available(), reason="the native kernels do not run here")
@pytest.mark.parametrize("n", [1, 15, 16, 17, 33, 1000, 262_144])
def test_native_argmax_is_torch_argmax_with_ties_nans_and_tails(n: int) -> None:
    gen = torch.Generator().manual_seed(n)
    cases = {
        "random": torch.randn(n, generator=gen),
        "few values (ties across lanes)": torch.randint(0, 3, (n,), generator=gen).float(),
        "all -inf": torch.full((n,), -math.inf),
        "one +inf late": torch.randn(n, generator=gen).index_fill_(0, torch.tensor([n - 1]), math.inf),
    }
    nans = torch.randn(n, generator=gen)
    nans[torch.randint(0, n, (2,), generator=gen)] = math.nan  # the first NaN wins, as in torch
    cases["NaN"] = nans
    for name, x in cases.items():
        assert native.argmax(x) == int(torch.argmax(x)), name
        assert greedy(x) == int(torch.argmax(x)), name
    assert native.argmax(torch.randn(2 * n)[::2]) is not None  # strided input is copied, not refused
    assert native.argmax(torch.randn(n).double()) is None  # greedy then falls back to torch


def test_top_k_one_equals_greedy_on_random_logits() -> None:
    gen = torch.Generator().manual_seed(1)
    sampler = _sampler(4096, seed=3, temperature=1.5, top_k=1, top_p=1.0)
    for _ in range(20):
        logits = torch.randn(4096, generator=gen) * 3
        assert sampler(logits, []) == greedy(logits)


def test_top_k_keeps_the_k_highest_sorted() -> None:
    values, ids = top_k(torch.tensor([0.1, 5.0, -2.0, 3.0, 4.0]), 3)
    assert ids.tolist() == [1, 4, 3]
    assert values.tolist() == [5.0, 4.0, 3.0]
    values, ids = top_k(torch.tensor([1.0, 2.0, 2.0, 0.0]), 0)  # disabled: a full, stable sort
    assert ids.tolist() == [1, 2, 0, 3]


def test_top_p_keeps_the_smallest_prefix_reaching_p() -> None:
    cands = top_k(_logits([0.2, 0.5, 0.3]), 0)  # sorted ids: 1 (0.5), 2 (0.3), 0 (0.2)
    assert _kept(top_p(cands, 0.45)) == {1}
    assert _kept(top_p(cands, 0.7)) == {1, 2}
    assert _kept(top_p(cands, 0.0)) == {1}  # always at least one
    assert _kept(top_p(cands, 1.0)) == {0, 1, 2}


def test_small_top_p_samples_only_the_top_token() -> None:
    logits = _logits([0.25, 0.3, 0.2, 0.25])
    sampler = _sampler(4, seed=0, temperature=1.0, top_k=0, top_p=0.01)
    assert set(_draws(sampler, logits, 200)) == {1}


def test_min_p_is_relative_to_the_top_probability() -> None:
    cands = top_k(_logits([0.1, 0.4, 0.2, 0.3]), 0)
    assert _kept(min_p(cands, 0.6)) == {1, 3}  # 0.3 >= 0.6 * 0.4 > 0.2
    logits = _logits([0.3, 0.299, 0.2, 0.201])
    sampler = _sampler(4, seed=0, temperature=1.0, top_k=0, top_p=1.0, min_p=0.999)
    assert set(_draws(sampler, logits, 200)) == {0}


def test_typical_p_can_drop_the_most_likely_token() -> None:
    # Entropy 1.22 nats; surprises 0.69, 1.61, 1.61, 2.30. Tokens 1 and 2 are the most typical and
    # already hold 0.4 > 0.3 of the mass, so the most likely token 0 goes, and so does token 3.
    logits = _logits([0.5, 0.2, 0.2, 0.1])
    assert _kept(typical_p(top_k(logits, 0), 0.3)) == {1, 2}
    assert _kept(typical_p(top_k(logits, 0), 1.0)) == {0, 1, 2, 3}
    sampler = _sampler(4, seed=0, temperature=1.0, top_k=0, top_p=1.0, typical_p=0.3)
    assert set(_draws(sampler, logits, 200)) == {1, 2}


def test_removed_candidates_are_never_drawn() -> None:
    logits = torch.tensor([-math.inf, 0.0, -math.inf, 0.0, -math.inf])
    sampler = _sampler(5, seed=11, temperature=1.0, **PLAIN)
    assert set(_draws(sampler, logits, 300)) == {1, 3}


# --- penalties -----------------------------------------------------------------------------------------


def test_penalties_values_follow_llama_cpp() -> None:
    logits = torch.tensor([2.0, -1.0, 0.5, 3.0])
    opts = SamplingOptions(repeat_penalty=2.0, frequency_penalty=0.1, presence_penalty=0.25)
    out = apply_penalties(logits, [0, 1, 0], opts)
    # 0: 2/2 - 2*0.1 - 0.25; 1: -1*2 - 0.1 - 0.25; 2 and 3 unseen.
    torch.testing.assert_close(out, torch.tensor([0.55, -2.35, 0.5, 3.0]))
    assert logits.tolist() == [2.0, -1.0, 0.5, 3.0]  # the input is not modified


@pytest.mark.parametrize(
    ("logits", "history", "options"),
    [
        ([2.0, 1.9, 0.0], [0], {"repeat_penalty": 1.1}),  # positive logit: 2.0 / 1.1 < 1.9
        ([-1.0, -1.05, -5.0], [0], {"repeat_penalty": 1.1}),  # negative logit: -1.0 * 1.1 < -1.05
        ([2.0, 1.9, 0.0], [0], {"presence_penalty": 0.2}),
        ([2.0, 1.9, 0.0], [0, 0], {"frequency_penalty": 0.06}),  # 2 * 0.06 > 0.1
    ],
)
def test_penalties_move_a_greedy_choice_away_from_seen_tokens(
    logits: list[float], history: list[int], options: dict[str, float]
) -> None:
    scores = torch.tensor(logits)
    assert _sampler(3, temperature=0.0)(scores, history) == 0
    assert _sampler(3, temperature=0.0, **options)(scores, history) == 1


def test_frequency_penalty_scales_with_the_count() -> None:
    scores = torch.tensor([2.0, 1.9, 0.0])
    sampler = _sampler(3, temperature=0.0, frequency_penalty=0.06)
    assert sampler(scores, [0]) == 0  # 2.0 - 0.06 still wins
    assert sampler(scores, [0, 0]) == 1


def test_repeat_last_n_bounds_the_penalised_history() -> None:
    scores = torch.tensor([2.0, 1.9, 0.0, 0.0, 0.0, 0.0])
    history = [0, 2, 3, 4]

    def pick(repeat_last_n: int) -> int:
        return _sampler(6, temperature=0.0, repeat_penalty=1.5, repeat_last_n=repeat_last_n)(scores, history)

    assert pick(3) == 0  # token 0 is four back, outside the window
    assert pick(4) == 1
    assert pick(-1) == 1  # the whole history
    assert pick(0) == 0  # disabled


# --- the draw ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("temperature", "truncation"),
    [
        (1.0, PLAIN),  # nothing truncates: drawn in vocab order, unsorted
        (1.0, {**PLAIN, "top_k": 4}),  # top_k == vocab: drawn from the sorted candidates
        (0.5, PLAIN),
    ],
)
def test_empirical_frequencies_match_softmax(temperature: float, truncation: dict[str, float]) -> None:
    logits = torch.tensor([-1.0, 1.0, 0.0, 0.5])
    sampler = _sampler(4, seed=1234, temperature=temperature, **truncation)
    counts = torch.bincount(torch.tensor(_draws(sampler, logits, 5000)), minlength=4).double()
    expected = torch.softmax(logits.double() / temperature, dim=0)
    torch.testing.assert_close(counts / 5000, expected, atol=0.02, rtol=0)


def test_default_options_sample_within_the_vocab_from_bf16_logits() -> None:
    gen = torch.Generator().manual_seed(2)
    logits = torch.randn(32000, generator=gen).to(torch.bfloat16)
    sampler = _sampler(32000, seed=9)
    picks = [sampler(logits, list(range(100))) for _ in range(20)]
    assert all(0 <= p < 32000 for p in picks)
    top40 = set(torch.topk(logits.float(), 40).indices.tolist())
    assert set(picks) <= top40


def test_logits_of_the_wrong_shape_are_rejected() -> None:
    with pytest.raises(ValueError, match=r"\(8,\)"):
        _sampler(8)(torch.zeros(9), [])


# --- option validation ---------------------------------------------------------------------------------
