"""tp_ollama.checkpoints.loader: dtype names, the reader a path opens with, and a model built from a tiny
random checkpoint: every weight read from the file, and a file that lacks a tensor or holds one of another
shape refused with the name and the shapes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.tiny import make_hf_model, save_hf, write_gguf
from tp_ollama.checkpoints.loader import load_model, open_checkpoint, parse_dtype, resolve_dtype
from tp_ollama.errors import CheckpointError

Q_PROJ = "model.layers.0.self_attn.q_proj.weight"


@pytest.fixture(scope="module")
def hf_model() -> Any:
    return make_hf_model("llama")


@pytest.fixture
def hf_dir(hf_model: Any, tmp_path: Path) -> Path:
    return save_hf(hf_model, tmp_path / "hf")


def test_auto_dtype_resolves_to_a_real_dtype():
    assert resolve_dtype("auto", "cpu") in (torch.bfloat16, torch.float32)
    assert resolve_dtype("float32", "cpu") is torch.float32


def test_dtype_names_map_to_torch_and_others_are_refused_naming_the_supported_ones():
    names = ("float32", "bfloat16", "float16")
    assert [parse_dtype(n) for n in names] == [torch.float32, torch.bfloat16, torch.float16]
    with pytest.raises(CheckpointError, match=r"dtype 'int8' is not supported; supported: auto, float32, bfloat16"):
        parse_dtype("int8")
    with pytest.raises(CheckpointError, match="dtype 'fp32'"):
        resolve_dtype("fp32")


def test_a_directory_opens_as_safetensors_and_a_gguf_file_by_its_magic(hf_model: Any, hf_dir: Path, tmp_path: Path):
    ckpt = open_checkpoint(hf_dir)
    assert (ckpt.format, ckpt.config.model_type) == ("safetensors", "llama")
    ckpt.close()
    write_gguf(hf_model, tmp_path / "m.gguf", "llama", "F32")
    ckpt = open_checkpoint(tmp_path / "m.gguf")
    assert (ckpt.format, ckpt.config.model_type) == ("gguf", "llama")
    ckpt.close()


def test_a_path_that_is_neither_is_refused_without_echoing_its_bytes(tmp_path: Path):
    with pytest.raises(CheckpointError, match=r"absent\.gguf: no such file or directory"):
        open_checkpoint(tmp_path / "absent.gguf")
    text = tmp_path / "notes.txt"
    text.write_text("hello there")
    with pytest.raises(CheckpointError, match=r"notes\.txt: not a GGUF file \(it does not begin with 'GGUF'\)") as e:
        open_checkpoint(text)
    assert "hell" not in str(e.value)  # an error may reach a remote client: never a file's contents


def test_every_weight_is_the_files_and_the_model_is_ready(hf_model: Any, hf_dir: Path):
    model = load_model(open_checkpoint(hf_dir), torch.float32)
    expected = hf_model.state_dict()
    for name, param in model.named_parameters():
        assert param.device.type == "cpu" and param.dtype == torch.float32
        assert torch.equal(param, expected[name]), name
    assert not model.training
    bf16 = load_model(open_checkpoint(hf_dir), torch.bfloat16)
    assert torch.equal(bf16.get_parameter(Q_PROJ), expected[Q_PROJ].bfloat16())


def test_a_shard_function_sees_the_model_before_any_weight_is_read(hf_dir: Path):
    seen: list[str] = []

    def shard(model: torch.nn.Module) -> torch.nn.Module:
        seen.append(model.get_parameter(Q_PROJ).device.type)
        return model

    load_model(open_checkpoint(hf_dir), torch.float32, shard=shard)
    assert seen == ["meta"]


def test_a_missing_or_misshapen_tensor_is_named(hf_dir: Path):
    weights = hf_dir / "model.safetensors"
    tensors = load_file(weights)
    save_file({k: v for k, v in tensors.items() if k != Q_PROJ}, weights)
    with pytest.raises(CheckpointError, match=rf"missing tensors {Q_PROJ} \(of 1\)"):
        load_model(open_checkpoint(hf_dir), torch.float32)
    save_file({**tensors, Q_PROJ: tensors[Q_PROJ][:64]}, weights)
    with pytest.raises(CheckpointError, match=rf"tensor {Q_PROJ} has shape \(64, 64\), the config implies \(128, 64\)"):
        load_model(open_checkpoint(hf_dir), torch.float32)
