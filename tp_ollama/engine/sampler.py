"""Next-token sampling with llama.cpp's chain: penalties, top_k, typical_p, top_p, min_p, temperature, draw.

Each stage is a small pure function so that the chain can later be split across tensor-parallel ranks.
After `top_k` the candidates are a pair `(logits, ids)`, both (n,), sorted by logit descending; the later
truncation stages keep that order (top_p and min_p rely on it) and remove a candidate by setting its
logit to -inf, so shapes stay fixed and no stage syncs with the host. When no stage truncates, the draw
runs on the unsorted vocabulary instead: it does not depend on the order.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Sequence

import torch

from tp_ollama.engine.options import SamplingOptions
from tp_ollama.kernels import native

# (logits float32 (n,), token ids int64 (n,)), sorted by logit descending
Candidates = tuple[torch.Tensor, torch.Tensor]


def greedy(logits: torch.Tensor) -> int:
    """The arg-max token; ties go to the lowest id (torch.argmax returns the first maximum)."""
    found = native.argmax(logits)
    return int(torch.argmax(logits)) if found is None else found


def history_window(history: Sequence[int], repeat_last_n: int) -> Sequence[int]:
    """The part of `history` the penalties look at: the last `repeat_last_n` ids, all (-1) or none (0)."""
    if repeat_last_n == 0:
        return ()
    if repeat_last_n < 0:
        return history
    return history[-repeat_last_n:]


def apply_penalties(logits: torch.Tensor, window: Sequence[int], options: SamplingOptions) -> torch.Tensor:
    """llama.cpp's repetition penalties over the ids in `window`; a new (vocab,) tensor when any applies.

    A logit > 0 is divided by repeat_penalty and any other is multiplied (so the penalty always lowers it),
    then `count * frequency_penalty + (count > 0) * presence_penalty` is subtracted.
    """
    repeat, frequency, presence = options.repeat_penalty, options.frequency_penalty, options.presence_penalty
    if (repeat == 1.0 and frequency == 0 and presence == 0) or len(window) == 0:
        return logits
    ids, counts = torch.unique(torch.as_tensor(window, dtype=torch.int64), return_counts=True)  # (u,), (u,)
    ids = ids.to(logits.device)
    counts = counts.to(device=logits.device, dtype=torch.float32)
    seen = logits[ids]
    seen = torch.where(seen > 0, seen / repeat, seen * repeat)
    seen = seen - counts * frequency - presence
    out = logits.clone()
    out[ids] = seen
    return out


def top_k(logits: torch.Tensor, k: int) -> Candidates:
    """The k highest logits, sorted descending; k 0 (or >= vocab) sorts them all (ties: lowest id first)."""
    if 0 < k < logits.shape[0]:
        values, ids = torch.topk(logits, k)
        return values, ids
    values, ids = torch.sort(logits, descending=True, stable=True)
    return values, ids


def typical_p(cands: Candidates, p: float) -> Candidates:
    """Locally typical sampling: keep the tokens whose surprise is closest to the entropy, up to mass p.

    Like llama.cpp, tokens are taken in order of |-log p_i - H| until their cumulative probability first
    exceeds p (that token included). The candidates keep their logit order; dropped ones become -inf.
    """
    if p >= 1.0:
        return cands
    logits, ids = cands
    probs = torch.softmax(logits, dim=0)  # (n,)
    entropy = -torch.special.xlogy(probs, probs).sum()  # xlogy(0, 0) = 0 for already-dropped candidates
    shifted = (-torch.log(probs) - entropy).abs()  # inf for dropped candidates, so they sort last
    order = torch.argsort(shifted, stable=True)
    ordered = probs[order]
    mass_before = torch.cumsum(ordered, dim=0) - ordered  # exclusive cumulative sum, in typical order
    keep_in_order = mass_before <= p  # the first candidate always has 0 before it
    keep = torch.empty_like(keep_in_order).scatter_(0, order, keep_in_order)
    return logits.masked_fill(~keep, -math.inf), ids


def top_p(cands: Candidates, p: float) -> Candidates:
    """Nucleus sampling: keep the smallest logit-ordered prefix whose probability reaches p (at least one)."""
    if p >= 1.0:
        return cands
    logits, ids = cands
    probs = torch.softmax(logits, dim=0)  # (n,), non-increasing because the candidates are sorted
    mass_before = torch.cumsum(probs, dim=0) - probs
    drop = mass_before >= p
    drop[0] = False  # p == 0 would otherwise drop everything
    return logits.masked_fill(drop, -math.inf), ids


def min_p(cands: Candidates, p: float) -> Candidates:
    """Keep tokens whose probability is at least p times the top one's (in logits: >= max + log p)."""
    if p <= 0.0:
        return cands
    logits, ids = cands
    threshold = logits[0] + math.log(p)  # logits[0] is the maximum; it always survives
    return logits.masked_fill(logits < threshold, -math.inf), ids


def draw(cands: Candidates, temperature: float, generator: torch.Generator) -> int:
    """Scale by temperature, softmax, and pick one candidate by inverting the CDF at one uniform number.

    The uniform comes from a CPU generator so the same seed gives the same tokens on any device. With u in
    (0, 1] and right=False, candidate i owns the interval (cdf[i-1], cdf[i]], which is empty when its
    probability is 0, so a removed candidate is never picked, whatever the candidates' order.
    """
    logits, ids = cands
    probs = torch.softmax(logits / temperature, dim=0)
    cdf = torch.cumsum(probs.to(torch.float64), dim=0)  # (n,)
    u = 1.0 - float(torch.rand((), generator=generator, dtype=torch.float64))  # in (0, 1]
    target = cdf[-1:] * u  # (1,) float64, on the candidates' device
    index = torch.searchsorted(cdf, target).clamp_(max=cdf.shape[0] - 1)
    return int(ids[index])


_MASK64 = (1 << 64) - 1


def random_stream(seed: int, position: int) -> torch.Generator:
    """The random numbers of one sampling step: a generator seeded from the request's seed and the
    step's position (how many tokens precede the one drawn), by SplitMix64's mixing. They do not depend
    on how many draws came before, so a request resumed from any point (re-prefilled after a node
    failure, say) draws what it would have drawn, and its text is the text of a run without the
    fault."""
    z = (seed + (position + 1) * 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    generator = torch.Generator(device="cpu")
    generator.manual_seed((z ^ (z >> 31)) >> 1)  # 63 bits: manual_seed takes a signed 64-bit value
    return generator


class Sampler:
    """Chooses the next token for one request; holds that request's options and seed."""

    def __init__(self, options: SamplingOptions, vocab_size: int) -> None:
        if vocab_size < 1:
            raise ValueError(f"vocab_size must be >= 1, got {vocab_size}")
        self.options = options
        self.vocab_size = vocab_size
        # Ollama: seed >= 0 reproduces; None or negative means a fresh random seed per request.
        self.seed = options.seed if options.seed is not None and options.seed >= 0 else secrets.randbits(63)
        o = options
        self._truncates = 0 < o.top_k < vocab_size or o.typical_p < 1 or o.top_p < 1 or o.min_p > 0

    def __call__(self, logits: torch.Tensor, history: Sequence[int]) -> int:
        """Pick the next id from `logits` (vocab,) given `history`, the prompt and generated ids so far."""
        if logits.shape != (self.vocab_size,):
            raise ValueError(f"expected logits of shape ({self.vocab_size},), got {tuple(logits.shape)}")
        opts = self.options
        scores = apply_penalties(logits.float(), history_window(history, opts.repeat_last_n), opts)
        if opts.greedy:
            return greedy(scores)
        if not self._truncates:
            # Nothing needs the logit order, and sorting 262k logits costs ~50 ms on a CPU.
            all_ids = torch.arange(self.vocab_size, device=scores.device)
            return draw((scores, all_ids), opts.temperature, random_stream(self.seed, len(history)))
        cands = top_k(scores, opts.top_k)
        cands = typical_p(cands, opts.typical_p)
        cands = top_p(cands, opts.top_p)
        cands = min_p(cands, opts.min_p)
        return draw(cands, opts.temperature, random_stream(self.seed, len(history)))
