#!/usr/bin/env bash
# Set up (if needed), check lint, formatting and types, then run the whole test suite. A lint, format
# or type finding fails the run before any test starts.
#
# With no arguments the suite runs in three steps, every test in one of them: the tests that are
# neither `slow` nor `timing`, spread over the cores with pytest-xdist (TP_OLLAMA_TEST_WORKERS,
# default: one worker per core); then the `slow` ones (the embedded models against transformers, real
# servers and torchrun groups started and signalled from the test process), one at a time; then the
# `timing` ones, alone, since they hold a measured time against a prediction and another test on the
# same cores would skew it. With arguments, they all go to one pytest run (`scripts/test.sh tests/engine -x`).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy tp_ollama
pytest=(.venv/bin/python -m pytest)
if [ $# -gt 0 ]; then
    exec "${pytest[@]}" "$@"
fi
# A worker that dies (the kernel's out-of-memory killer, a crash in native code) ends the step with
# its test named: pytest-xdist's loadgroup scheduling can wait forever for a replaced worker.
workers=(-n "${TP_OLLAMA_TEST_WORKERS:-auto}" --dist loadgroup --max-worker-restart 0)
# Each step has a bound of its own too, so that nothing outlives the run (every test has one).
timeout -k 30 1800 "${pytest[@]}" -q "${workers[@]}" -m "not slow and not timing"
timeout -k 30 1800 "${pytest[@]}" -q -m "slow and not timing"
timeout -k 30 600 "${pytest[@]}" -q -m "timing"
