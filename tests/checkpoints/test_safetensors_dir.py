"""tp_ollama.checkpoints.safetensors_dir: a Hugging Face directory of one file or a sharded index, read whole
or by rows and columns, multimodal Gemma 3 names read under the text model's, and every broken directory
refused naming the file and what is wrong."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from tests.tiny import hf_config
from tp_ollama.checkpoints.safetensors_dir import SafetensorsCheckpoint
from tp_ollama.errors import CheckpointError

EMBED = "model.embed_tokens.weight"
NORM = "model.norm.weight"


def hf_dir(path: Path, files: dict[str, dict[str, torch.Tensor]], index: bool = False) -> Path:
    """A tiny llama's config.json with `files` (name -> tensors) beside it, and their index when asked."""
    path.mkdir()
    (path / "config.json").write_text(hf_config("llama").to_json_string(use_diff=False))
    for name, tensors in files.items():
        save_file(tensors, path / name)
    if index:
        weight_map = {key: name for name, tensors in files.items() for key in tensors}
        (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return path


def table(rows: int, cols: int) -> torch.Tensor:
    return torch.arange(rows * cols, dtype=torch.float32).view(rows, cols)


def test_whole_tensors_rows_and_columns_in_the_asked_dtype(tmp_path: Path):
    t = table(4, 6)
    ckpt = SafetensorsCheckpoint(hf_dir(tmp_path / "m", {"model.safetensors": {EMBED: t, NORM: t[0].clone()}}))
    assert ckpt.format == "safetensors" and ckpt.config.model_type == "llama"
    assert ckpt.names() == {EMBED, NORM}
    assert ckpt.shape(EMBED) == (4, 6) and ckpt.shape(NORM) == (6,)
    assert torch.equal(ckpt.read(EMBED, torch.float32), t)
    assert torch.equal(ckpt.read(EMBED, torch.float32, rows=(1, 3)), t[1:3])
    assert torch.equal(ckpt.read(EMBED, torch.float32, cols=(2, 5)), t[:, 2:5])
    assert torch.equal(ckpt.read(EMBED, torch.float32, rows=(3, 4), cols=(0, 1)), t[3:4, 0:1])
    assert ckpt.read(NORM, torch.bfloat16).dtype == torch.bfloat16
    assert ckpt.extra_tensors(torch.float32) == {}
    info = ckpt.model_info()
    assert info["general.architecture"] == "llama" and info["llama.hidden_size"] == 64
    assert info["llama.num_key_value_heads"] == 2
    ckpt.close()


def test_a_sharded_index_reads_each_tensor_from_its_file(tmp_path: Path):
    files = {"part-1.safetensors": {EMBED: table(4, 6)}, "part-2.safetensors": {NORM: table(1, 6)[0] + 100}}
    ckpt = SafetensorsCheckpoint(hf_dir(tmp_path / "m", files, index=True))
    assert ckpt.names() == {EMBED, NORM}
    assert torch.equal(ckpt.read(EMBED, torch.float32), table(4, 6))
    assert torch.equal(ckpt.read(NORM, torch.float32), table(1, 6)[0] + 100)


def test_multimodal_gemma3_names_are_read_as_the_text_models(tmp_path: Path):
    files = {"model.safetensors": {"model.language_model.norm.weight": table(1, 6)[0], "lm_head.weight": table(2, 6)}}
    ckpt = SafetensorsCheckpoint(hf_dir(tmp_path / "m", files))
    assert ckpt.names() == {NORM, "lm_head.weight"}
    assert torch.equal(ckpt.read(NORM, torch.float32), table(1, 6)[0])
    assert ckpt.shape("lm_head.weight") == (2, 6)


def test_tensors_and_ranges_that_are_not_there_are_named(tmp_path: Path):
    ckpt = SafetensorsCheckpoint(hf_dir(tmp_path / "m", {"model.safetensors": {EMBED: table(4, 6)}}))
    with pytest.raises(CheckpointError, match=f"tensor {NORM} is missing from the checkpoint"):
        ckpt.read(NORM, torch.float32)
    with pytest.raises(CheckpointError, match=rf"model\.safetensors: rows 2:9 of tensor {EMBED} is outside 0:4"):
        ckpt.read(EMBED, torch.float32, rows=(2, 9))
    with pytest.raises(CheckpointError, match=rf"columns 5:7 of tensor {EMBED} is outside 0:6"):
        ckpt.read(EMBED, torch.float32, cols=(5, 7))


def test_broken_directories_are_refused_naming_the_file(tmp_path: Path):
    weights = {"model.safetensors": {EMBED: table(4, 6)}}
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match=r"empty: no config\.json"):
        SafetensorsCheckpoint(empty)
    bad_json = hf_dir(tmp_path / "bad-json", weights)
    (bad_json / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"config\.json: not valid JSON"):
        SafetensorsCheckpoint(bad_json)
    no_weights = hf_dir(tmp_path / "no-weights", {})
    with pytest.raises(CheckpointError, match=r"no model\.safetensors or model\.safetensors\.index\.json"):
        SafetensorsCheckpoint(no_weights)
    lost_part = hf_dir(tmp_path / "lost-part", {"part-1.safetensors": {EMBED: table(4, 6)}}, index=True)
    (lost_part / "part-1.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"part-1\.safetensors: missing \(named in the safetensors index\)"):
        SafetensorsCheckpoint(lost_part)
    bad_index = hf_dir(tmp_path / "bad-index", weights)
    (bad_index / "model.safetensors.index.json").write_text('{"files": []}')
    with pytest.raises(CheckpointError, match="not a valid safetensors index"):
        SafetensorsCheckpoint(bad_index)
    corrupt = hf_dir(tmp_path / "corrupt", weights)
    (corrupt / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{broken}")
    with pytest.raises(CheckpointError, match=r"model\.safetensors: not a readable safetensors file"):
        SafetensorsCheckpoint(corrupt)
