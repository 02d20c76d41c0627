"""The embedded models through the real CLI print exactly what transformers' greedy decoding of the
same GGUF prints (float32, 32 tokens)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from tp_ollama.store.embedded import resolve_model

pytestmark = pytest.mark.slow

GEMMA_PROMPTS = [
    "Once upon a time, there was a little robot who",
    "def fibonacci(n):",
    "Water boils at a temperature of",
]
SMOL_PROMPTS = ["The capital of France is", "def fibonacci(n):"]
SMOL_CHATS = ["What is the capital of France?", "Write a haiku about the sea."]


def cli_generate(model: str, prompt: str, *extra: str) -> str:
    cmd = [sys.executable, "-m", "tp_ollama", "generate", model, prompt, "--temperature", "0"]
    cmd += ["--num-predict", "32", "--dtype", "float32", *extra]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=os.environ.copy())
    assert done.returncode == 0, done.stderr
    return done.stdout


class Reference:
    """transformers on the same GGUF file, float32, greedy."""

    def __init__(self, model: str) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        path = resolve_model(model)
        self.tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        self.model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)

    def complete(self, ids: list[int]) -> str:
        with torch.no_grad():
            out = self.model.generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False)
        return self.tok.decode(out[0, len(ids) :], skip_special_tokens=True)

    def raw(self, prompt: str) -> str:
        return self.complete(self.tok(prompt).input_ids)

    def chat(self, prompt: str) -> str:
        text = self.tok.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
        )
        return self.complete(self.tok(text, add_special_tokens=False).input_ids)


@pytest.fixture(scope="module")
def gemma_ref():
    return Reference("gemma3:270m")


@pytest.fixture(scope="module")
def smol_ref():
    return Reference("smollm2:135m")


@pytest.mark.parametrize("prompt", GEMMA_PROMPTS)
def test_gemma3_270m_matches_transformers(gemma_ref, prompt):
    expected = gemma_ref.raw(prompt)
    assert expected.strip(), "the reference produced no text"
    assert cli_generate("gemma3:270m", prompt) == expected


@pytest.mark.parametrize("prompt", SMOL_PROMPTS)
def test_smollm2_135m_matches_transformers(smol_ref, prompt):
    assert cli_generate("smollm2:135m", prompt) == smol_ref.raw(prompt)


@pytest.mark.parametrize("prompt", SMOL_CHATS)
def test_smollm2_135m_chat_matches_transformers(smol_ref, prompt):
    expected = smol_ref.chat(prompt)
    got = cli_generate("smollm2:135m", prompt, "--chat")
    assert got == expected
    if "France" in prompt:
        assert "Paris" in got
