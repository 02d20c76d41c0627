"""What several store test files share: a Modelfile's worth of create arguments, and the blob listing."""

from __future__ import annotations

from tp_ollama.store.model_store import ModelStore

TEMPLATE = "{{ if .System }}<|system|>{{ .System }}{{ end }}<|user|>{{ .Prompt }}<|assistant|>"

FULL = dict(
    system="You are terse.",
    template=TEMPLATE,
    parameters={"temperature": 0.2, "stop": ["<|user|>", "###"], "num_ctx": "2048"},
    messages=[{"role": "user", "content": "hi"}, {"role": "Assistant", "content": "hello"}],
    license="MIT License",
)


def blobs(store: ModelStore) -> set[str]:
    return {p.name for p in store.blobs.iterdir()} if store.blobs.is_dir() else set()
