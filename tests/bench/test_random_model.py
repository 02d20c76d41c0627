"""Random-weight checkpoints of real shapes: loadable by the project's own loader, truncatable, and
refused when the disk cannot hold them."""

from __future__ import annotations

import json
from collections import namedtuple

import pytest
import torch

from tp_ollama.bench import random_model
from tp_ollama.bench.random_model import file_bytes, tensor_shapes, write_random_model
from tp_ollama.checkpoints.loader import load_model, open_checkpoint
from tp_ollama.engine.kv_cache import KVCache
from tp_ollama.errors import ConfigError
from tp_ollama.parallel.shapes import SHAPES, ModelShape, shape_of


def tiny(model_type: str, tied: bool = True, layers: int = 3) -> ModelShape:
    return ModelShape(model_type, 64, 256, layers, 4, 2, 16, 320, tied)


@pytest.mark.parametrize(
    ("model_type", "tied"), [("gemma3_text", True), ("llama", False), ("qwen2", True), ("qwen3", False)]
)
def test_writes_a_checkpoint_the_loader_runs(tmp_path, model_type, tied):
    shape = tiny(model_type, tied)
    d = write_random_model(shape, tmp_path / model_type, dtype="bfloat16", seed=1)
    ckpt = open_checkpoint(d)
    assert ckpt.config.model_type == model_type
    assert shape_of(ckpt.config) == shape
    model = load_model(ckpt, torch.float32)
    # Every parameter the model has, nothing more, at the stated shapes.
    assert {n: tuple(p.shape) for n, p in model.named_parameters()} == dict(tensor_shapes(shape))
    assert sum(p.numel() for p in model.parameters()) == shape.parameters()
    file = d / "model.safetensors"
    header = int.from_bytes(file.read_bytes()[:8], "little")
    assert file.stat().st_size == 8 + header + file_bytes(shape, "bfloat16")
    assert not list(d.glob("*.partial"))
    cache = KVCache.for_model(model, batch=1, max_len=8)
    with torch.inference_mode():
        logits = model(torch.tensor([[1, 2, 3]]), torch.arange(3)[None], cache)  # (1, 3, vocab)
    assert logits.shape == (1, 3, 320)
    assert torch.isfinite(logits).all()
    assert logits.std() > 0


def test_layers_truncates_the_model(tmp_path):
    d = write_random_model(tiny("llama", layers=6), tmp_path / "cut", dtype="float32", layers=2)
    config = json.loads((d / "config.json").read_text())
    assert config["num_hidden_layers"] == 2
    names = {n for n, _ in tensor_shapes(tiny("llama", layers=2))}
    model = load_model(open_checkpoint(d), torch.float32)
    assert len(model.model.layers) == 2
    assert {n for n, _ in model.named_parameters()} == names
    assert not any(n.startswith("model.layers.2.") for n in names)
    for bad in (0, 7):
        with pytest.raises(ConfigError, match=f"layers={bad} is invalid: expected 1..6"):
            write_random_model(tiny("llama", layers=6), tmp_path / f"bad{bad}", layers=bad)


def test_seed_decides_the_values(tmp_path):
    shape = tiny("llama")
    a = write_random_model(shape, tmp_path / "a", seed=3) / "model.safetensors"
    b = write_random_model(shape, tmp_path / "b", seed=3) / "model.safetensors"
    c = write_random_model(shape, tmp_path / "c", seed=4) / "model.safetensors"
    assert a.read_bytes() == b.read_bytes() != c.read_bytes()


def test_refuses_when_the_disk_is_too_small(tmp_path, monkeypatch):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(random_model.shutil, "disk_usage", lambda path: usage(10**6, 10**6 - 1000, 1000))
    target = tmp_path / "big" / "llama3-8b"
    with pytest.raises(ConfigError) as e:
        write_random_model(SHAPES["llama3-8b"], target)
    need = file_bytes(SHAPES["llama3-8b"], "bfloat16")
    message = str(e.value)
    assert "1000 bytes" in message and "free" in message
    needed = int(message.split(" needs ")[1].split(" bytes")[0])
    assert need < needed < need + 10**6  # the data plus the header
    assert not (tmp_path / "big").exists()


def test_tokenizer_is_byte_level_and_small_vocabularies_go_without(tmp_path):
    from tp_ollama.checkpoints.tokenizer import Tokenizer

    d = write_random_model(tiny("llama"), tmp_path / "tok")
    tokenizer = Tokenizer.from_hf_dir(d)
    ids = tokenizer.encode("héllo wörld")
    assert ids[0] == 256 and max(ids) < 320  # <bos>, then one id per UTF-8 byte
    assert tokenizer.decode(ids) == "héllo wörld"
    assert tokenizer.eos_ids == {257}
    small = ModelShape("llama", 64, 256, 1, 4, 2, 16, 200, True)
    d = write_random_model(small, tmp_path / "small")
    assert not (d / "tokenizer.json").exists()
    assert "eos_token_id" not in json.loads((d / "config.json").read_text())


def test_bad_dtype_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="dtype 'int8' is not supported"):
        write_random_model(tiny("llama"), tmp_path / "x", dtype="int8")
