from __future__ import annotations

from pathlib import Path

import pytest

from tests.server.chat_models import make_chat_model
from tp_ollama.checkpoints.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def chat_tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    """The tiny chat model's tokenizer: Qwen3's thinking and tool-call tags, `<|python_tag|>` a special token."""
    directory: Path = make_chat_model(tmp_path_factory.mktemp("tiny-qwen3"))
    return Tokenizer.from_hf_dir(directory)
