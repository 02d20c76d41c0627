"""Quantized loading of whole models: which tensors get which packing, and that the quantized model
still computes what the float one does (within what int8 / int4 rounding allows)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tests.tiny import make_hf_model, prompt_ids, save_hf, write_gguf
from tp_ollama.checkpoints.loader import load_model, open_checkpoint
from tp_ollama.checkpoints.quantize import describe_precision, packing_for
from tp_ollama.engine.kv_cache import KVCache
from tp_ollama.errors import ConfigError
from tp_ollama.kernels.linear import QuantEmbedding, QuantLinear
from tp_ollama.kernels.quant import native_int4

N_PROMPT = 12


def logits_of(model: nn.Module, tokens: list[int]) -> torch.Tensor:
    """(T, V) float32 logits: a prefill of N_PROMPT tokens, then one token a step."""
    cache = KVCache.for_model(model, batch=1, max_len=len(tokens) + 1)
    with torch.inference_mode():
        rows = [model(torch.tensor([tokens[:N_PROMPT]]), torch.arange(N_PROMPT)[None], cache)[0]]
        for i in range(N_PROMPT, len(tokens)):
            rows.append(model(torch.tensor([[tokens[i]]]), torch.tensor([[i]]), cache)[0])
    return torch.cat(rows).float()


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Worst per-position cosine similarity of two (T, V) logit tables."""
    return float(torch.nn.functional.cosine_similarity(a, b, dim=-1).min())


def with_weights_of(model: nn.Module, quantized: nn.Module) -> nn.Module:
    """`model` (float) with every weight replaced by what the quantized model's packing holds."""
    for path, module in quantized.named_modules():
        # A fused layer is only its parts (q/k/v, gate/up) stacked; the parts are views into it.
        if isinstance(module, QuantLinear | QuantEmbedding) and not path.endswith(".fused"):
            model.get_submodule(path).weight.data = module.qweight.dequantize(torch.float32)
    return model


@pytest.mark.parametrize("kind", ["llama", "gemma3_text"])
@pytest.mark.parametrize("quant", ["int8", "int4"])
def test_quantized_model_computes_its_weights(tmp_path, kind, quant):
    """The packed kernels compute what the packed weights say: against a float model holding the
    dequantized weights, only the kernels' activation rounding differs: bfloat16 in torch's, int8 per
    group of 32 in the native int4 kernel (coarser: steps of max|x| / 127 of each group)."""
    model = make_hf_model(kind)
    if kind == "gemma3_text":
        model.config.tie_word_embeddings = True
    ckpt = open_checkpoint(save_hf(model, tmp_path))
    tokens = prompt_ids(N_PROMPT + 6)
    quantized = load_model(ckpt, torch.float32, quant=quant)
    linears = [m for m in quantized.modules() if isinstance(m, nn.Linear)]
    assert not linears, f"{len(linears)} linear layers left in float"
    assert isinstance(quantized.model.embed_tokens, QuantEmbedding)
    got = logits_of(quantized, tokens)
    ref = logits_of(with_weights_of(load_model(ckpt, torch.float32), quantized), tokens)
    assert got.shape == ref.shape
    floor = 0.985 if quant == "int4" and native_int4() else 0.995
    assert cosine(got, ref) > floor, f"{kind} {quant}: worst cosine {cosine(got, ref):.4f}"
    if quant == "int8":
        # Per-channel int8 barely moves even these random (chaotic, 0.15-std) weights.
        plain = logits_of(load_model(ckpt, torch.float32), tokens)
        assert cosine(got, plain) > 0.995, f"{kind}: worst cosine against float {cosine(got, plain):.4f}"
    bf16 = logits_of(load_model(ckpt, torch.bfloat16, quant=quant), tokens)
    assert cosine(bf16, ref) > 0.99, f"{kind} {quant} bfloat16: worst cosine {cosine(bf16, ref):.4f}"


@pytest.mark.parametrize(("qtype", "expected"), [("Q4_0", "int4"), ("Q8_0", "int8"), ("F32", "float32")])
def test_auto_follows_the_file(tmp_path, qtype, expected):
    model = make_hf_model("qwen2")  # q/k/v biases: quantized linears keep them
    write_gguf(model, tmp_path / "m.gguf", "qwen2", qtype)
    ckpt = open_checkpoint(tmp_path / "m.gguf")
    loaded = load_model(ckpt, torch.float32, quant="auto")
    weights = describe_precision(loaded)["weights"]
    assert set(weights) == {expected}, weights
    assert sum(weights.values()) == 3 * 7 + 1  # seven linears per layer and the tied embedding
    tokens = prompt_ids(N_PROMPT + 4)
    assert cosine(logits_of(loaded, tokens), logits_of(load_model(ckpt, torch.float32), tokens)) > 0.97


def test_biases_and_shapes_survive(tmp_path):
    model = make_hf_model("qwen2")
    ckpt = open_checkpoint(save_hf(model, tmp_path))
    loaded = load_model(ckpt, torch.float32, quant="int8")
    q_proj = loaded.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj, QuantLinear) and q_proj.bias is not None
    assert torch.equal(q_proj.bias, model.model.layers[0].self_attn.q_proj.bias.detach())
    assert q_proj.qweight.shape == (128, 64)


def test_packing_rules():
    assert packing_for("none", "Q4_K") is None
    assert packing_for("int8", "F32") == "int8"
    assert packing_for("int4", "Q8_0") == "int4"
    assert packing_for("auto", "Q4_K") == "int4"
    assert packing_for("auto", "Q6_K") == "int8"
    assert packing_for("auto", "F16") is None
    assert packing_for("auto", None) is None  # safetensors: float stays float


def test_unknown_quant_mode_is_refused(tmp_path):
    ckpt = open_checkpoint(save_hf(make_hf_model("llama"), tmp_path))
    with pytest.raises(ConfigError, match=r"quant 'int3' is not supported; expected one of none, int8, int4, auto"):
        load_model(ckpt, torch.float32, quant="int3")


@pytest.mark.parametrize("qtype", ["Q8_0", "F32"])
@pytest.mark.parametrize("packing", ["int8", "int4"])
def test_a_weight_read_in_bands_is_the_weight_read_whole(tmp_path, monkeypatch, qtype, packing):
    """The 320-row embedding read 256 rows at a time (READ_CHUNK_ELEMENTS down to one element) packs
    into the same weight as read at once, each band copied into the whole as it comes; Q8_0 blocks
    kept as int8 hold the file's values exactly."""
    from tp_ollama.checkpoints import quantize
    from tp_ollama.kernels import native

    model = make_hf_model("llama")
    write_gguf(model, tmp_path / "m.gguf", "llama", qtype)
    ckpt = open_checkpoint(tmp_path / "m.gguf")
    name = "model.embed_tokens.weight"
    param = torch.empty(ckpt.shape(name))
    whole = quantize.read_packed(ckpt, name, param, packing)
    monkeypatch.setattr(quantize, "READ_CHUNK_ELEMENTS", 1)
    banded = quantize.read_packed(ckpt, name, param, packing)
    assert banded.kind == whole.kind and banded.shape == whole.shape == (320, 64)
    assert torch.equal(banded.dequantize(), whole.dequantize())
    if qtype == "Q8_0" and packing == "int8" and native.available():
        assert torch.equal(banded.dequantize(), ckpt.read(name, torch.float32))
