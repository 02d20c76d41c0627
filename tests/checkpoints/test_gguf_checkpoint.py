"""GGUF files written from tiny random models load into our models with the same logits as
transformers running on the weights the file really holds (dequantized)."""

from __future__ import annotations

import pytest
import torch

from tests.tiny import GGUF_TYPES, make_hf_model, prompt_ids, write_gguf
from tp_ollama.checkpoints.gguf_checkpoint import GGUFCheckpoint
from tp_ollama.checkpoints.loader import load_model, open_checkpoint
from tp_ollama.engine.kv_cache import KVCache


@pytest.mark.parametrize("qtype", ["F32", "F16", "Q8_0"])
@pytest.mark.parametrize("kind", GGUF_TYPES)
def test_gguf_logits_match_dequantized_reference(kind, qtype, tmp_path):
    hf = make_hf_model(kind)
    reference = write_gguf(hf, tmp_path / "m.gguf", kind, qtype)
    hf.load_state_dict(reference, strict=False)  # tied lm_head follows embed_tokens
    ours = load_model(open_checkpoint(tmp_path / "m.gguf"), torch.float32)
    tokens = prompt_ids(24)
    with torch.inference_mode():
        ref = hf(torch.tensor([tokens])).logits[0]
        cache = KVCache.for_model(ours, batch=1, max_len=32)
        got = ours.logits(ours.hidden_states(torch.tensor([tokens]), torch.arange(24)[None], cache))[0]
    err = (got - ref).abs().max().item()
    assert err < 1e-4, f"{kind} {qtype}: max abs logit difference {err}"


def test_head_aligned_row_slices_equal_rows_of_the_whole(tmp_path):
    """The llama Q/K un-permutation works per head, so a rank's slice equals its rows of the whole."""
    hf = make_hf_model("llama")
    write_gguf(hf, tmp_path / "m.gguf", "llama", "Q8_0")
    ckpt = GGUFCheckpoint(tmp_path / "m.gguf")
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.self_attn.k_proj.weight"):
        whole = ckpt.read(name, torch.float32)
        part = ckpt.read(name, torch.float32, rows=(32, 64))
        assert torch.equal(part, whole[32:64])
    down = "model.layers.0.mlp.down_proj.weight"
    assert torch.equal(ckpt.read(down, torch.float32, cols=(32, 96)), ckpt.read(down, torch.float32)[:, 32:96])


def test_gguf_metadata_becomes_the_family_config(tmp_path):
    hf = make_hf_model("gemma3_text")
    write_gguf(hf, tmp_path / "g.gguf", "gemma3_text", "F32")
    cfg = GGUFCheckpoint(tmp_path / "g.gguf").config
    assert cfg.model_type == "gemma3_text"
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (4, 2, 32)
    assert cfg.sliding_window == 8 and cfg.tie_word_embeddings
    assert list(cfg.layer_types) == list(hf.config.layer_types)
