"""tp_ollama.parallel.shard: a rank's threads and device, the pre-flight check of a model's layout before any
process starts, and a group of one loading the plain model (shards of several ranks: test_plans.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.tiny import make_hf_model, save_hf
from tp_ollama.checkpoints.loader import load_model, open_checkpoint
from tp_ollama.errors import ConfigError
from tp_ollama.parallel.comm import SoloComm
from tp_ollama.parallel.shard import load_shard, preflight, rank_device


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny llama: 4 query heads, 2 KV heads."""
    return save_hf(make_hf_model("llama"), tmp_path_factory.mktemp("tiny-llama"))


def test_a_cpu_rank_runs_on_the_cpu():
    assert rank_device("cpu") == torch.device("cpu")


def test_preflight_checks_the_communicator_and_the_layout_from_the_config(checkpoint: Path):
    preflight(str(checkpoint), 2, None, "auto")
    preflight(str(checkpoint), 3, (2.0, 1.0, 1.0), "gloo")
    with pytest.raises(ConfigError, match="communicator 'mpi' is not supported"):
        preflight(str(checkpoint), 2, None, "mpi")
    with pytest.raises(ConfigError, match="tensor-parallel degree 5 exceeds the model's 4 attention heads"):
        preflight(str(checkpoint), 5, None, "auto")
    with pytest.raises(ConfigError, match="--tp-weights has 3 values"):
        preflight(str(checkpoint), 2, (1.0, 1.0, 1.0), "auto")


def test_a_group_of_one_loads_the_whole_model(checkpoint: Path):
    model, layout, ckpt = load_shard(checkpoint, SoloComm(), "float32")
    whole = load_model(open_checkpoint(checkpoint), torch.float32)
    assert ckpt.path == checkpoint and ckpt.format == "safetensors"
    assert layout.world_size == 1
    shard, full = dict(model.named_parameters()), dict(whole.named_parameters())
    assert shard.keys() == full.keys()
    assert all(torch.equal(shard[name], full[name]) for name in full)
    assert not any(module._forward_hooks for module in model.modules())  # no collectives on its path
