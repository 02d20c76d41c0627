"""The command line as a user runs it: real processes, real files, one-line errors."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest

from tests.tiny import make_hf_model, save_hf, save_tiny_tokenizer, write_gguf


def cli(*args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "tp_ollama", *args], capture_output=True, text=True, timeout=timeout)


def assert_one_line_error(done: subprocess.CompletedProcess[str], *fragments: str) -> None:
    assert done.returncode != 0
    assert done.stdout == ""
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert "Traceback" not in done.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    directory = save_hf(make_hf_model("llama"), tmp_path_factory.mktemp("tiny-llama"))
    save_tiny_tokenizer(directory)
    return directory


def test_help_lists_the_commands():
    done = cli("--help")
    assert done.returncode == 0
    assert "generate" in done.stdout


def test_generate_writes_only_the_generated_text(tiny_dir):
    done = cli("generate", str(tiny_dir), "hello world", "--temperature", "0", "--num-predict", "8")
    assert done.returncode == 0, done.stderr
    assert done.stdout and "hello world" not in done.stdout
    again = cli("generate", str(tiny_dir), "hello world", "--temperature", "0", "--num-predict", "8")
    assert again.stdout == done.stdout


def test_missing_file():
    assert_one_line_error(cli("generate", "/nonexistent/model.gguf", "hi"), "/nonexistent/model.gguf")


def test_unknown_model_name_lists_the_available_ones():
    assert_one_line_error(cli("generate", "nosuchmodel:7b", "hi"), "nosuchmodel:7b", "gemma3:270m")


def test_truncated_gguf(tmp_path):
    path = tmp_path / "m.gguf"
    write_gguf(make_hf_model("llama"), path, "llama", "F32")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    assert_one_line_error(cli("generate", str(path), "hi"), str(path))


def test_not_a_gguf_file(tmp_path):
    path = tmp_path / "junk.gguf"
    path.write_bytes(b"this is not a model at all")
    assert_one_line_error(cli("generate", str(path), "hi"), str(path), "GGUF")


def test_unsupported_gguf_tensor_type(tmp_path):
    path = tmp_path / "iq.gguf"
    hf = make_hf_model("llama")
    write_gguf(hf, path, "llama", "F32")
    # Rewrite with the first MLP weight stored as IQ4_NL, a type we do not dequantize.
    reader = gguf.GGUFReader(str(path))
    writer = gguf.GGUFWriter(str(tmp_path / "iq2.gguf"), "llama")
    for field in reader.fields.values():
        if field.name.startswith("llama.") and field.types and len(field.types) == 1:
            writer.add_key_value(field.name, field.contents(), field.types[0])
    for t in reader.tensors:
        data = np.asarray(t.data)
        if t.name == "blk.0.ffn_up.weight":
            rows, cols = data.shape
            raw = np.zeros((rows, cols // 32 * 18), dtype=np.uint8)
            writer.add_tensor(t.name, raw, raw_dtype=gguf.GGMLQuantizationType.IQ4_NL)
        else:
            writer.add_tensor(t.name, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    done = cli("generate", str(tmp_path / "iq2.gguf"), "hi")
    assert_one_line_error(done, "iq2.gguf", "IQ4_NL", "Q4_K")


def copy_of(tiny_dir: Path, target: Path) -> Path:
    """A copy of the tiny checkpoint that a test may damage."""
    target.mkdir()
    for f in tiny_dir.iterdir():
        (target / f.name).write_bytes(f.read_bytes())
    return target


def test_truncated_safetensors(tmp_path, tiny_dir):
    bad = copy_of(tiny_dir, tmp_path / "bad")
    weights = bad / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    assert_one_line_error(cli("generate", str(bad), "hi"), "model.safetensors")


def test_corrupt_safetensors_header(tmp_path, tiny_dir):
    bad = copy_of(tiny_dir, tmp_path / "bad")
    weights = bad / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[8:40] = b"#" * 32  # inside the JSON header
    weights.write_bytes(bytes(data))
    assert_one_line_error(cli("generate", str(bad), "hi"), "model.safetensors")


def test_unsupported_model_type(tmp_path, tiny_dir):
    bad = copy_of(tiny_dir, tmp_path / "gpt2ish")
    config = (bad / "config.json").read_text().replace('"model_type": "llama"', '"model_type": "gpt2"')
    (bad / "config.json").write_text(config)
    assert_one_line_error(cli("generate", str(bad), "hi"), "gpt2", "gemma3_text", "qwen3")


def test_prompt_longer_than_num_ctx(tiny_dir):
    done = cli("generate", str(tiny_dir), "hello world " * 20, "--num-ctx", "8")
    assert_one_line_error(done, "num_ctx=8")


def test_bad_option_value(tiny_dir):
    assert_one_line_error(cli("generate", str(tiny_dir), "hi", "--temperature", "-1"), "temperature")
    assert_one_line_error(cli("generate", str(tiny_dir), "hi", "--dtype", "int3"), "int3", "bfloat16")


def test_debug_shows_the_traceback():
    done = cli("generate", "/nonexistent/model.gguf", "hi", "--debug")
    assert done.returncode != 0
    assert "Traceback" in done.stderr


def test_a_bad_log_level_is_one_line(tiny_dir):
    done = cli("generate", str(tiny_dir), "hi", "--log-level", "loud")
    assert_one_line_error(done, "--log-level 'loud'", "debug, info, warning, error")


def test_debug_logs_go_to_stderr_only(tiny_dir):
    args = ("generate", str(tiny_dir), "hello world", "--temperature", "0", "--num-predict", "8")
    quiet = cli(*args, "--log-level", "error")
    debug = subprocess.run(
        [sys.executable, "-m", "tp_ollama", *args], capture_output=True, text=True, timeout=180,
        env={**os.environ, "OLLAMA_DEBUG": "1"},
    )  # fmt: skip
    assert quiet.returncode == 0 and debug.returncode == 0, debug.stderr
    assert debug.stdout == quiet.stdout and quiet.stdout
    assert "level=DEBUG" in debug.stderr and "level=" not in quiet.stderr
