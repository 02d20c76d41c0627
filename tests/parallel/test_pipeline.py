"""tp_ollama.parallel.pipeline: stage layouts, and real torchrun workers running 2 and 3 stages (and
uneven stage weights) of every tiny family against the whole model, position by position."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from tests.parallel.tp_entry import N_PROMPT, pipeline_runs
from tests.tiny import MODEL_TYPES, prompt_ids
from tp_ollama.errors import ConfigError
from tp_ollama.launch import Cluster, run_workers
from tp_ollama.parallel.pipeline import PipelineLayout


def test_stages_take_contiguous_layers_in_proportion_to_their_weights():
    cfg = SimpleNamespace(num_hidden_layers=18)
    assert PipelineLayout.build(cfg, 2).layers == ((0, 9), (9, 18))
    assert PipelineLayout.build(cfg, 3, (2.0, 1.0, 1.0)).layers == ((0, 9), (9, 14), (14, 18))
    assert PipelineLayout.build(cfg, 4).layers == ((0, 5), (5, 10), (10, 14), (14, 18))
    assert PipelineLayout.build(cfg, 2).describe(1) == {"stage": 1, "stages": 2, "layers": [9, 18], "stage_weight": 1.0}


def test_a_stage_layout_that_cannot_be_is_refused_with_what_would_do():
    cfg = SimpleNamespace(num_hidden_layers=3)
    with pytest.raises(ConfigError, match="pipeline degree 4 exceeds the model's 3 layers: use at most 3 stages"):
        PipelineLayout.build(cfg, 4)
    with pytest.raises(ConfigError, match="--pp-weights has 1 values \\(2\\) but there are 2 stages"):
        PipelineLayout.build(cfg, 2, (2.0,))
    with pytest.raises(ConfigError, match="--pp-weights must all be > 0, got 1,0"):
        PipelineLayout.build(cfg, 2, (1.0, 0.0))


@pytest.mark.parametrize(
    ("stages", "weights", "tp"),
    [(2, None, 1), (3, None, 1), (2, (1.0, 2.0), 1), (2, None, 2)],
    ids=["pp2", "pp3", "pp2-weighted", "tp2-pp2"],
)
def test_stages_compute_what_the_whole_model_computes(stages, weights, tp, checkpoints, reference):
    tokens = prompt_ids(N_PROMPT + 16)
    dirs = [str(checkpoints[k]) for k in MODEL_TYPES]
    results = run_workers(
        Cluster(nproc_per_node=stages * tp), pipeline_runs, dirs, tokens, N_PROMPT, stages, weights, tp
    )
    assert sorted(results) == list(range(stages * tp))
    for kind, d in zip(MODEL_TYPES, dirs, strict=True):
        ref = reference[kind]
        last = [results[r][d] for r in range((stages - 1) * tp, stages * tp)]  # the last stage's ranks
        assert last[0]["vocab"][0] == 0 and last[-1]["vocab"][1] == ref["logits"].shape[-1]
        logits = np.concatenate([part["logits"] for part in last], axis=-1)  # their vocabulary slices in order
        err = float(np.abs(logits - ref["logits"]).max())
        assert err < 1e-4, f"{kind} pp={stages} tp={tp} weights={weights}: max abs logit difference {err}"
        covered = []
        for r in range(0, stages * tp, tp):
            covered += list(range(*results[r][d]["layers"]))
        for r in range(stages * tp):
            assert results[r][d]["greedy"] == ref["greedy"], f"{kind} rank {r}"
            assert results[r][d]["layers"] == results[r - r % tp][d]["layers"]  # a stage's ranks hold its layers
            assert results[r][d]["params"] < ref["params"], f"{kind} rank {r} holds the whole model"
            if r < (stages - 1) * tp:
                assert results[r][d]["logits"].shape[-1] == 0  # only the last stage has logits
        assert covered == list(range(len(covered))) and len(covered) >= stages
