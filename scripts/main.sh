#!/usr/bin/env bash
# Set up (if needed) and run tp-ollama on the embedded default model. Arguments replace the default
# command, e.g. scripts/main.sh generate smollm2:135m "Hello" --chat
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
if [ $# -eq 0 ]; then
    set -- generate gemma3:270m "Once upon a time, there was a little robot who" --num-predict 64
fi
exec .venv/bin/tp-ollama "$@"
