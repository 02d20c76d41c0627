"""Profile a few decode steps of a random-weight Llama-3.2-1B-shaped model on CUDA in float32 and
bfloat16 (torch.profiler tables, top ops by self CPU and by CUDA time).

    python bench/gpu_profile.py > bench/results/gpu_profile.txt
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from tp_ollama.checkpoints.loader import load_model, open_checkpoint
from tp_ollama.engine.direct import generate_ids
from tp_ollama.engine.options import GenerationOptions, SamplingOptions


def main() -> None:
    import transformers as tf

    cfg = tf.LlamaConfig(
        vocab_size=128256,
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=4,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=64,
        tie_word_embeddings=True,
    )
    with tempfile.TemporaryDirectory() as tmp:
        tf.AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).save_pretrained(Path(tmp) / "m")
        for dtype in (torch.float32, torch.bfloat16):
            model = load_model(open_checkpoint(Path(tmp) / "m"), dtype, "cuda")
            options = GenerationOptions(sampling=SamplingOptions(temperature=0), num_predict=40, num_ctx=256)
            gen = generate_ids(model, list(range(10, 42)), options, frozenset())
            for _ in range(5):
                next(gen)
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                for _ in range(5):
                    next(gen)
                torch.cuda.synchronize()
            print(f"===== {dtype}")
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))
            print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=12))
            gen.close()


if __name__ == "__main__":
    main()
