"""tp_ollama.text.process: the tokenizer and text of a one-shot generation in a helper process."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.tiny import make_hf_model, save_hf, save_tiny_tokenizer
from tp_ollama.checkpoints.tokenizer import Tokenizer
from tp_ollama.errors import TpOllamaError
from tp_ollama.text.process import TextProcess
from tp_ollama.text.prompt import prompt_tokens


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    directory = save_hf(make_hf_model("llama"), tmp_path_factory.mktemp("tiny-llama"))
    save_tiny_tokenizer(directory)
    return directory


def generate(tiny_dir: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "tp_ollama", "generate", str(tiny_dir), "hello world", "--temperature", "0"]
    return subprocess.run([*cmd, *extra], capture_output=True, text=True, timeout=180)


def test_a_stop_string_cuts_the_text_and_ends_generation(tiny_dir):
    whole = generate(tiny_dir, "--num-predict", "24")
    assert whole.returncode == 0, whole.stderr
    text = whole.stdout
    assert len(text) > 6, text
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    cut = generate(tiny_dir, "--num-predict", "24", "--stop", stop, "--verbose")
    assert cut.returncode == 0, cut.stderr
    assert cut.stdout == text[: text.index(stop)]
    evals = [line for line in cut.stderr.splitlines() if line.startswith("eval count:")]
    assert evals and int(evals[0].split()[2]) < 24, cut.stderr  # generation ended at the stop, not at 24


def test_the_helper_encodes_and_prints_what_the_tokenizer_gives(tiny_dir, capfd):
    tokenizer = Tokenizer.from_hf_dir(tiny_dir)
    text = TextProcess(tiny_dir, "hello world", chat=False, system=None, stops=())
    try:
        ids, eos = text.prompt()
        assert ids == prompt_tokens(tokenizer, "hello world")
        assert eos == tokenizer.eos_ids
        for token in ids:
            assert text.push(token)
        text.finish()
    finally:
        text.close()
    assert capfd.readouterr().out == tokenizer.decode(ids, skip_special_tokens=True)


def test_a_tokenizer_error_comes_back_as_one(tmp_path):
    text = TextProcess(tmp_path, "hi", chat=False, system=None, stops=())  # a directory without a tokenizer
    try:
        with pytest.raises(TpOllamaError):
            text.prompt()
    finally:
        text.close()
    assert not text._process.is_alive()


def test_a_helper_that_dies_is_an_error_not_a_hang(tiny_dir):
    text = TextProcess(tiny_dir, "hello world", chat=False, system=None, stops=())
    try:
        text.prompt()
        text._process.kill()
        text._process.join(10)
        with pytest.raises(TpOllamaError, match="exited before it could print a token"):
            text.push(5)
    finally:
        text.close()
