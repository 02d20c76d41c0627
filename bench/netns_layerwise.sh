#!/usr/bin/env bash
# Tensor vs layer-wise vs one node in the network-namespace cluster (launch/netns-cluster.sh): K
# namespaces of one core each, tbf 1gbit, 0.5 ms one-way delay on the TCP mesh; one stream and
# STREAMS requests decoding together (bench decode --streams), the cost model's prediction beside each
# figure (calibrated by the one-node run, which runs on one core outside the namespaces).
#
#   bench/netns_layerwise.sh MODEL NAME [--nodes 2] [--streams 8] [--gen-tokens 64] [--rounds 2]
#
# Writes bench/results/netns_NAME_{one,tpK,ppK}.json (with .md and plots). Needs root. Namespaces beyond
# the machine's cores share cores (node i runs on core i mod cores): their figures are not one core each.
set -euo pipefail
cd "$(dirname "$0")/.."

model=$1 name=$2
shift 2
nodes=2 streams=8 gen=64 rounds=2 delay_us=500 rate=1gbit
while [[ $# -gt 0 ]]; do
  case "$1" in
    --nodes) nodes=$2 ;;
    --streams) streams=$2 ;;
    --gen-tokens) gen=$2 ;;
    --rounds) rounds=$2 ;;
    --delay-us) delay_us=$2 ;;
    --rate) rate=$2 ;;
    *) echo "netns_layerwise.sh: unknown option $1 (see the header of $0)" >&2; exit 2 ;;
  esac
  shift 2
done
export PATH=$PWD/.venv/bin:$PATH
out=bench/results/netns_${name}
common=(--streams "$streams" --gen-tokens "$gen" --rounds "$rounds" --no-progress)

if [[ ! -f ${out}_one.json ]]; then
  taskset -c 0 env OMP_NUM_THREADS=1 tp-ollama bench decode "$model" "${common[@]}" --out "${out}_one.json"
fi
cores=$(nproc)
for mode in tp pp; do
  launch/netns-cluster.sh --nodes "$nodes" --rate "$rate" --delay-us "$delay_us" --exec sh -c \
    "exec taskset -c \"\$((NODE_RANK % $cores))\" env OMP_NUM_THREADS=1 tp-ollama bench decode '$model' \
       --$mode $nodes ${common[*]} --calibration ${out}_one.json --ranks-per-host 1 --nnodes \"\$NNODES\" \
       --node-rank \"\$NODE_RANK\" --master-addr \"\$MASTER_ADDR\" --master-port \"\$MASTER_PORT\" \
       --out ${out}_${mode}${nodes}.json"
done
