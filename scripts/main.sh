#!/usr/bin/env bash
# Set up (if needed) and start the Ollama-compatible server on 127.0.0.1:11434; the embedded default
# model gemma3:270m (and smollm2:135m) need no pull. Arguments replace the default command, e.g.
#   scripts/main.sh serve --tp 2
#   scripts/main.sh generate smollm2:135m "Hello" --chat
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
if [ $# -eq 0 ]; then
    set -- serve
fi
exec .venv/bin/tp-ollama "$@"
