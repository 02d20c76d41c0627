"""Fixtures shared by the bench tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests import tiny


@pytest.fixture(scope="package")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random llama as an HF directory, with a tokenizer (for the commands that take text); made once
    for test_decode.py and test_compare.py, which only read it."""
    directory = tmp_path_factory.mktemp("tiny-llama")
    tiny.save_hf(tiny.make_hf_model("llama"), directory)
    tiny.save_tiny_tokenizer(directory)
    return directory
