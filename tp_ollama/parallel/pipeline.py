"""Layer-wise (pipeline) partitioning: each stage holds a contiguous range of the model's layers.

Stage 0 holds the embedding and the first layers, the last stage the final norm and the LM head (and
the embedding too when the head is tied to it); each stage reads only its own tensors. A forward pass
runs the stages in order: a stage runs its layers and hands the hidden states to the next one (a
broadcast from the stage's rank on the group's communicator: every rank takes part in every hand-over,
so the collectives stay in the same order on all ranks). The last stage computes the logits and picks
each token; it broadcasts the token, so every rank's batch advances alike
(tp_ollama.engine.sharded_sampling.PipelineSampler).

Rank r is stage r // tp; with tp > 1 (hybrid) the stage's tp ranks split its layers, embedding and
head as tensor parallelism does, over a communicator of their own, and the stage's first rank hands
the hidden states on. Stage sizes follow per-stage
weights (`--pp-weights`): each stage's share of the work, the LM head counted on the last stage,
at least one layer each (`stage_spans`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from tp_ollama.errors import ConfigError
from tp_ollama.parallel.comm import Comm
from tp_ollama.parallel.layout import Span, check_weights, split_units


@dataclass(frozen=True)
class PipelineLayout:
    """Which layers each stage holds."""

    stages: int
    weights: tuple[float, ...]
    layers: tuple[Span, ...]  # per stage, [start, end)
    n_layers: int

    @classmethod
    def build(
        cls, config: Any, stages: int, weights: Sequence[float] | None = None, by_work: bool = True
    ) -> PipelineLayout:
        """`by_work`: the LM head counts on the last stage (`stage_spans`); False balances the layers
        alone, which balances memory (a tied embedding sits on the first and the last stage alike):
        under a memory budget."""
        n = int(config.num_hidden_layers)
        w = tuple(float(x) for x in (weights or [1.0] * stages))
        if stages < 1:
            raise ConfigError(f"pipeline degree {stages} is invalid: expected at least 1")
        check_weights(w, stages, "--pp-weights", f"there are {stages} stages", "stage")
        if stages > n:
            raise ConfigError(f"pipeline degree {stages} exceeds the model's {n} layers: use at most {n} stages")
        return cls(stages, w, tuple(stage_spans(n, w, head_units(config) if by_work else 0.0)), n)

    def describe(self, stage: int) -> dict[str, Any]:
        a, b = self.layers[stage]
        return {"stage": stage, "stages": self.stages, "layers": [a, b], "stage_weight": self.weights[stage]}


def head_units(config: Any) -> float:
    """The LM head's work per token in layers' work (multiply-adds: weights read alike): what the
    last stage does beyond its layers. 0 for a config without the sizes it needs."""
    try:
        d, vocab, mlp = int(config.hidden_size), int(config.vocab_size), int(config.intermediate_size)
        hd = int(getattr(config, "head_dim", None) or d // int(config.num_attention_heads))
        q, kv = int(config.num_attention_heads) * hd, int(config.num_key_value_heads) * hd
    except (AttributeError, TypeError, ValueError):
        return 0.0
    layer = d * (q + 2 * kv) + q * d + 3 * d * mlp
    return vocab * d / layer


def stage_spans(n_layers: int, weights: Sequence[float], head: float = 0.0) -> list[Span]:
    """Contiguous layer ranges, each stage's work (its layers, and `head` layers' worth on the last)
    in proportion to its weight, at least one layer each. With several sequences flowing through the
    stages (engine/flow.py) the slowest stage sets the pace, so the last stage holds fewer layers
    where the head is large: gemma3:270m's head does as much as 30 of its layers."""
    total = n_layers + head
    shares = [total * w / sum(weights) for w in weights]
    shares[-1] -= head
    return split_units(n_layers, [max(x, 1e-6) for x in shares], "layers")


class AbsentAttention(nn.Module):
    """What the KV pool and the batch ask of a layer's attention that another stage holds."""

    absent = True

    def __init__(self, window: int | None, head_dim: int) -> None:
        super().__init__()
        self.window, self.head_dim = window, head_dim


class AbsentBlock(nn.Module):
    """A layer another stage holds: no weights, no KV heads here."""

    absent = True

    def __init__(self, window: int | None, head_dim: int) -> None:
        super().__init__()
        self.self_attn = AbsentAttention(window, head_dim)

    def forward(self, *args: Any) -> torch.Tensor:
        raise RuntimeError("a layer of another pipeline stage ran here")


class Absent(nn.Module):
    """A module (embedding, norm, head) that only another stage holds."""

    absent = True

    def forward(self, *args: Any) -> torch.Tensor:
        raise RuntimeError("a module of another pipeline stage ran here")


class Stage:
    """This rank's place in the pipeline, and the hand-overs between stages."""

    def __init__(
        self, layout: PipelineLayout, stage: int, comm: Comm, ranks_per_stage: int = 1, tp_comm: Comm | None = None
    ) -> None:
        self.layout, self.index, self.comm = layout, stage, comm
        # TP inside the stage (hybrid): its ranks' own communicator; the hand-overs stay on `comm`.
        self.tp_comm = tp_comm
        self.first, self.last = stage == 0, stage == layout.stages - 1
        self.layers = range(*layout.layers[stage])
        self.sources = [s * ranks_per_stage for s in range(layout.stages)]  # each stage's first rank
        self._alone: tuple[torch.Tensor | None] | None = None

    @property
    def tp_rank(self) -> int:
        """This rank's place among its stage's ranks (its vocabulary slice of a head split by TP)."""
        return self.tp_comm.rank if self.tp_comm is not None else 0

    @contextmanager
    def alone(self, handed: torch.Tensor | None) -> Iterator[None]:
        """Inside: `run` runs this stage only, without hand-overs, on `handed` (what the stage before
        handed over earlier; None on the first stage, which embeds). The engine's flowing decode steps
        (tp_ollama.engine.flow) move the hidden states between stages themselves."""
        self._alone = (handed,)
        try:
            yield
        finally:
            self._alone = None

    def run(
        self,
        embed: Callable[[], torch.Tensor],
        body: Callable[[torch.Tensor], torch.Tensor],
        shape: tuple[int, ...],
        device: torch.device,
    ) -> torch.Tensor:
        """The hidden states after this stage's layers (`body`): its own on the last stage, what the
        stage before handed over elsewhere. Every rank calls this in step. Hand-overs are float32
        (B, T, hidden), whichever way a stage runs its layers (torch modules or the native step):
        bfloat16 activations travel exactly."""
        if self._alone is not None:
            handed = self._alone[0]
            if handed is None:
                if not self.first:
                    raise RuntimeError(f"stage {self.index} ran alone without the hidden states of the stage before")
                handed = embed().float()
            return body(handed).float()
        x = embed().float() if self.first else torch.empty(shape, dtype=torch.float32, device=device)
        for s in range(self.layout.stages):
            if s == self.index:
                x = body(x).float()
            if s < self.layout.stages - 1:
                x = self.comm.broadcast(x.contiguous(), src=self.sources[s])
        return x


def stage_of(model: nn.Module) -> Stage | None:
    return model.__dict__.get("pipeline")


def apply_stage(
    model: nn.Module, layout: PipelineLayout, stage: int, comm: Comm, tp: int = 1, tp_comm: Comm | None = None
) -> nn.Module:
    """Cut a model (on the meta device) down to one stage: other stages' layers become AbsentBlock,
    the embedding stays on the first stage (and the last, where the head is tied to it), the final
    norm and the head on the last. The stage runs through `Stage` (the families' hidden_states).
    With `tp` > 1 ranks per stage the stage's modules are then split among them as tensor
    parallelism splits a whole model, over `tp_comm` (parallel/plans.py skips the absent ones)."""
    cfg: Any = model.config
    body: Any = model.model
    a, b = layout.layers[stage]
    for i, block in enumerate(body.layers):
        if not a <= i < b:
            body.layers[i] = AbsentBlock(block.self_attn.window, block.self_attn.head_dim)
    first, last = stage == 0, stage == layout.stages - 1
    if not first and not (last and cfg.tie_word_embeddings):
        body.embed_tokens = Absent()
    if not last:
        body.norm = Absent()
        if getattr(model, "lm_head", None) is not None:
            model.lm_head = Absent()
    model.__dict__["pipeline"] = Stage(layout, stage, comm, tp, tp_comm)
    return model
