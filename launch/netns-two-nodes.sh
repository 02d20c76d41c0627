#!/usr/bin/env bash
# netns-two-nodes.sh: a two-node tp-ollama cluster on ONE Linux machine, in network namespaces. Kept for
# its documented usage; it is `netns-cluster.sh --nodes 2` with the same options (see that script for the
# network it builds, node 0 on 10.78.0.1 and node 1 on 10.78.0.2, and for how it is torn down).
set -euo pipefail

usage() {
    cat <<'EOF'
Usage: netns-two-nodes.sh [OPTIONS] MODEL PROMPT [TP-OLLAMA LAUNCH FLAGS...]

Start node 0 and node 1 of a 2-node tp-ollama cluster in two network namespaces on this machine,
print node 0's output (the generated text) and tear everything down on exit. Needs root.
Today this runs a one-shot generation; later tp-ollama flags (the server) pass through unchanged.

The same as `netns-cluster.sh --nodes 2 [OPTIONS] MODEL PROMPT ...`: every option of netns-cluster.sh
but --nodes works here (run `netns-cluster.sh --help`), among them:
  --rate RATE            limit both nodes' links to RATE in both directions with tbf (e.g. 1gbit)
  --burst SIZE           tbf burst (default 64kb)
  --tbf-latency TIME     tbf latency: how long a packet may queue (default 50ms)
  --delay-us US          emulated one-way latency of the TCP mesh, in microseconds
  --port PORT            rendezvous port on node 0 (default 29511)
  --nproc-per-node N     engine ranks per node (default 1)
  --share-hostname       keep this machine's hostname in both namespaces (shared memory, not the link)
  --timeout SECONDS      stop both nodes after this long (default 0: no limit)
  -h, --help             show this help

Example:
  sudo launch/netns-two-nodes.sh --rate 1gbit smollm2:135m "The capital of France is" \
      --temperature 0 --num-predict 8
EOF
}

for arg in "$@"; do
    case "$arg" in
        --) break ;;
        -h | --help) usage; exit 0 ;;
        --nodes) echo "netns-two-nodes.sh: --nodes is always 2 here; use netns-cluster.sh --nodes K" >&2; exit 2 ;;
    esac
done
# exec keeps this pid, so the namespaces are named after the pid the caller sees (tpo-<pid>-n0 ...).
exec "$(dirname "${BASH_SOURCE[0]}")/netns-cluster.sh" --nodes 2 "$@"
