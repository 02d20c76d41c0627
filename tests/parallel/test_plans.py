"""tp_ollama.parallel.plans applied by real torchrun workers on CPU: TP=2, 3 and 4 (and uneven weights) against
the unsharded model, position by position."""

from __future__ import annotations

import numpy as np
import pytest

from tests.parallel.tp_entry import N_PROMPT, sharded_runs
from tests.tiny import MODEL_TYPES, prompt_ids
from tp_ollama.launch import Cluster, run_workers

# (world size, weights): 4 query heads / 2 KV heads in every tiny model, so
# tp=2 -> 2/2 heads; tp=3 -> 2/1/1 (ranks 1 and 2 share KV head 1); tp=4 > n_kv (replication);
# weights 3,1 -> 3/1, rank 0's heads straddle both KV groups.
LAYOUTS = [(2, None), (3, None), (4, None), (2, (3.0, 1.0))]


@pytest.mark.parametrize(("world", "weights"), LAYOUTS, ids=["tp2", "tp3", "tp4", "tp2-weighted"])
def test_sharded_matches_unsharded(world, weights, checkpoints, reference):
    tokens = prompt_ids(N_PROMPT + 16)
    dirs = [str(checkpoints[k]) for k in MODEL_TYPES]
    results = run_workers(Cluster(nproc_per_node=world), sharded_runs, dirs, tokens, N_PROMPT, weights, "gloo")
    assert sorted(results) == list(range(world))
    for kind, d in zip(MODEL_TYPES, dirs, strict=True):
        ref = reference[kind]
        full = np.zeros_like(ref["logits"])
        for r in range(world):
            a, b = results[r][d]["span"]
            full[:, a:b] = results[r][d]["logits"]
        err = float(np.abs(full - ref["logits"]).max())
        assert err < 1e-4, f"{kind} tp={world} weights={weights}: max abs logit difference {err}"
        for r in range(world):
            assert results[r][d]["greedy"] == ref["greedy"], f"{kind} rank {r}"
            layers = results[r][d]["layers"]
            # Two all-reduces per layer (after attention, after the MLP) plus the embedding's.
            assert results[r][d]["forward_all_reduces"] == 2 * layers + 1
            # A decode step: those, rank 0's tick (the step's plan), one candidate exchange.
            assert results[r][d]["decode_step_collectives"] == {
                "all_reduce": 2 * layers + 1,
                "broadcast_bytes": 1,
                "all_gather": 1,
            }, kind
        # Each rank holds a part of the model: no rank has all the parameters.
        assert max(results[r][d]["params"] for r in range(world)) < ref["params"]


def test_a_plan_pattern_matches_whole_path_components_and_must_match_something():
    """`*` stands for one component of a module path (model.layers.*.mlp is every layer's MLP, not a
    module nested deeper); a pattern that matches no module is a plan written for other names, and
    says which."""
    from torch import nn

    from tp_ollama.parallel.plans import ShardStyle, apply_plan

    class Record(ShardStyle):
        def __init__(self) -> None:
            self.seen: list[nn.Module] = []

        def apply(self, module: nn.Module) -> None:
            self.seen.append(module)

    model = nn.Module()
    model.layers = nn.ModuleList([nn.Module() for _ in range(3)])
    for layer in model.layers:
        layer.mlp = nn.Module()
        layer.mlp.inner = nn.Module()
    mlp, everything = Record(), Record()
    apply_plan(model, {"layers.*.mlp": mlp, "layers.*": everything})
    assert mlp.seen == [layer.mlp for layer in model.layers]
    assert everything.seen == list(model.layers)
    with pytest.raises(ValueError, match=r"\['layers\.\*\.attn'\] match no module"):
        apply_plan(model, {"layers.*.mlp": Record(), "layers.*.attn": Record()})
