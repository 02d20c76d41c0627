"""Tiny random checkpoints made with transformers, for parity tests. Every weight (norms and biases
included) is random, so a mis-mapped or ignored tensor shows up in the logits."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

MODEL_TYPES = ["llama", "llama3_rope", "mistral", "qwen2", "qwen3", "gemma3_text"]
GGUF_TYPES = ["llama", "qwen2", "qwen3", "gemma3_text"]  # mistral GGUFs use the llama architecture

_COMMON: dict[str, Any] = dict(
    vocab_size=320,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=32,
    max_position_embeddings=256,
    rms_norm_eps=1e-6,
    tie_word_embeddings=False,
)


def hf_config(kind: str) -> Any:
    import transformers as tf

    if kind in ("llama", "llama3_rope"):
        kw = dict(_COMMON)
        if kind == "llama3_rope":
            kw["rope_parameters"] = {
                "rope_type": "llama3",
                "rope_theta": 500000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            }
        return tf.LlamaConfig(**kw)
    if kind == "mistral":
        return tf.MistralConfig(**_COMMON, sliding_window=8)
    if kind == "qwen2":
        return tf.Qwen2Config(**{**_COMMON, "tie_word_embeddings": True})
    if kind == "qwen3":
        return tf.Qwen3Config(**_COMMON)
    if kind == "gemma3_text":
        # 6 layers: the default pattern makes layer 5 global and the rest sliding (window 8).
        kw = {**_COMMON, "num_hidden_layers": 6, "tie_word_embeddings": True}
        return tf.Gemma3TextConfig(**kw, sliding_window=8, query_pre_attn_scalar=32)
    raise ValueError(kind)


def make_hf_model(kind: str, seed: int = 0) -> Any:
    import transformers as tf

    torch.manual_seed(seed)
    cfg = hf_config(kind)
    model = tf.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1 and "norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn_like(p) if kind != "gemma3_text" else 0.2 * torch.randn_like(p))
            else:
                p.copy_(0.15 * torch.randn_like(p))
    return model.eval()


def save_hf(model: Any, directory: Path) -> Path:
    model.save_pretrained(directory, safe_serialization=True)
    return directory


def prompt_ids(n: int, vocab: int = 320, seed: int = 1) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (n,), generator=g).tolist()


# --- GGUF writing, the way llama.cpp's convert_hf_to_gguf lays tensors out -------------------------

_GGUF_ARCH = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gemma3_text": "gemma3"}
_BLOCK = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
    "input_layernorm": "attn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def _gguf_name(hf: str, gemma: bool) -> str:
    if hf.startswith("model.embed_tokens."):
        return "token_embd." + hf.rsplit(".", 1)[1]
    if hf.startswith("model.norm."):
        return "output_norm.weight"
    if hf.startswith("lm_head."):
        return "output.weight"
    parts = hf.split(".")
    layer, rest, kind = parts[2], ".".join(parts[3:-1]), parts[-1]
    block = dict(_BLOCK)
    if gemma:
        block.update(
            post_attention_layernorm="post_attention_norm",
            pre_feedforward_layernorm="ffn_norm",
            post_feedforward_layernorm="post_ffw_norm",
        )
    else:
        block["post_attention_layernorm"] = "ffn_norm"
    return f"blk.{layer}.{block[rest]}.{kind}"


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(
    model: Any, path: Path, kind: str, qtype_name: str, extra_metadata: Any = None
) -> dict[str, torch.Tensor]:
    """Write `model` as a GGUF file with 2-D weights in `qtype_name` (F32, F16, Q8_0) and return the
    dequantized HF state dict: the reference that the file really holds. `extra_metadata(writer)`
    may add keys (a tokenizer, a chat template)."""
    import gguf

    arch = _GGUF_ARCH[kind]
    gemma = arch == "gemma3"
    cfg = model.config
    qtype = gguf.GGMLQuantizationType[qtype_name]
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    rope = cfg.rope_parameters["full_attention"] if gemma else cfg.rope_parameters
    writer.add_rope_freq_base(rope["rope_theta"])
    writer.add_key_length(cfg.head_dim)
    writer.add_value_length(cfg.head_dim)
    writer.add_rope_dimension_count(cfg.head_dim)
    if gemma:
        writer.add_sliding_window(cfg.sliding_window)
    if extra_metadata is not None:
        extra_metadata(writer)
    reference: dict[str, torch.Tensor] = {}
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        w = tensor.float().numpy()
        if arch == "llama" and ("q_proj.weight" in name or "k_proj.weight" in name):
            heads = cfg.num_attention_heads if "q_proj" in name else cfg.num_key_value_heads
            w = _permute(w, heads)
        if gemma and name.endswith("norm.weight"):
            w = w + 1.0
        if w.ndim == 2 and qtype_name != "F32":
            raw = gguf.quants.quantize(w, qtype)
            writer.add_tensor(_gguf_name(name, gemma), raw, raw_dtype=qtype)
            deq = gguf.quants.dequantize(raw, qtype).reshape(w.shape)
        else:
            writer.add_tensor(_gguf_name(name, gemma), w.astype(np.float32))
            deq = w
        if arch == "llama" and ("q_proj.weight" in name or "k_proj.weight" in name):
            heads = cfg.num_attention_heads if "q_proj" in name else cfg.num_key_value_heads
            # undo the permutation on the dequantized values for the HF-layout reference
            deq = deq.reshape(heads, deq.shape[0] // heads // 2, 2, -1).swapaxes(1, 2).reshape(deq.shape)
        if gemma and name.endswith("norm.weight"):
            deq = deq - 1.0
        reference[name] = torch.from_numpy(np.ascontiguousarray(deq)).float()
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return reference


def save_tiny_tokenizer(directory: Path, vocab_size: int = 300) -> None:
    """A real byte-level BPE tokenizer trained on a few sentences, small enough for the tiny models."""
    import json

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    text = ["hello world, the quick brown fox jumps over the lazy dog"] * 20
    tok.train_from_iterator(text, trainer)
    tok.save(str(directory / "tokenizer.json"))
    template = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    template += "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    config = {"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": True, "chat_template": template}
    (directory / "tokenizer_config.json").write_text(json.dumps(config))


# A Llama-3.1-style template with tool support: tools are listed as JSON in the system turn, a tool
# call is a bare JSON object {"name", "parameters"}, and tool results come back as role "tool" turns.
TOOLS_TEMPLATE = (
    "{{ bos_token }}{% if tools %}<|system|>You can call these functions; answer with "
    '{"name": ..., "parameters": {...}}:\n{% for t in tools %}{{ t | tojson }}\n{% endfor %}{% endif %}'
    "{% for m in messages %}<|{{ m['role'] }}|>"
    "{% if m.get('tool_calls') %}{% for c in m['tool_calls'] %}"
    '{"name": "{{ c.function.name }}", "parameters": {{ c.function.arguments | tojson }}}'
    "{% endfor %}{% else %}{{ m['content'] }}{% endif %}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def write_chat_gguf(path: Path, kind: str = "llama", chat_template: str = TOOLS_TEMPLATE, seed: int = 0) -> Path:
    """A tiny random model as one self-contained GGUF file: weights (F32), the tiny byte-level BPE
    tokenizer padded to the model's vocabulary, and `chat_template`. Loads like any real GGUF, so it
    can be uploaded as a blob, created FROM, served and sharded."""
    import json
    import tempfile

    import gguf

    model = make_hf_model(kind, seed)
    with tempfile.TemporaryDirectory() as tmp:
        save_tiny_tokenizer(Path(tmp))
        spec = json.loads((Path(tmp) / "tokenizer.json").read_text())
    vocab: dict[str, int] = spec["model"]["vocab"]
    for added in spec["added_tokens"]:
        vocab[added["content"]] = added["id"]
    tokens = [""] * model.config.vocab_size
    types = [gguf.TokenType.UNUSED] * len(tokens)
    for token, i in vocab.items():
        tokens[i] = token
        types[i] = gguf.TokenType.CONTROL if token in ("<s>", "</s>") else gguf.TokenType.NORMAL
    for i, token in enumerate(tokens):
        if not token:
            tokens[i] = f"<unused{i}>"
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]

    def tokenizer_metadata(writer: Any) -> None:
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre("default")
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        writer.add_token_merges(merges)
        writer.add_bos_token_id(vocab["<s>"])
        writer.add_eos_token_id(vocab["</s>"])
        writer.add_add_bos_token(True)
        writer.add_chat_template(chat_template)

    write_gguf(model, path, kind, "F32", extra_metadata=tokenizer_metadata)
    return path
