"""What the tests that hold a split model against the whole one share: a tiny random checkpoint of
every family, and the whole model's logits position by position and greedy tokens (each module gets
its own, as a module fixture)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.parallel.tp_entry import N_PROMPT, whole_model_reference
from tests.tiny import MODEL_TYPES, make_hf_model, prompt_ids, save_hf


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return {kind: save_hf(make_hf_model(kind), tmp_path_factory.mktemp(kind)) for kind in MODEL_TYPES}


@pytest.fixture(scope="module")
def reference(checkpoints: dict[str, Path]) -> dict[str, dict]:
    """The whole model's (TP=1) logits position by position and greedy tokens (validated against
    transformers elsewhere)."""
    return whole_model_reference(checkpoints, prompt_ids(N_PROMPT + 16), N_PROMPT)
