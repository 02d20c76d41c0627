#!/usr/bin/env bash
# Set up (if needed), check lint, formatting and types, then run the whole test suite. Extra arguments
# go to pytest. A lint, format or type finding fails the run before any test starts.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy tp_ollama
exec .venv/bin/python -m pytest "$@"
