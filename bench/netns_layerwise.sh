#!/usr/bin/env bash
# Tensor vs layer-wise vs one node in the network-namespace cluster (launch/netns-cluster.sh): K
# namespaces of one core each, tbf 1gbit, 0.5 ms one-way delay on the TCP mesh; one stream and
# STREAMS requests decoding together (bench decode --streams), the cost model's prediction beside each
# figure (calibrated by the one-node run, which runs on one core outside the namespaces).
#
#   bench/netns_layerwise.sh MODEL NAME [--nodes 2] [--streams 8] [--gen-tokens 64] [--rounds 2]
#
# Writes bench/results/netns_layerwise_NAME_{one,tpK,ppK,auto}.json (with .md and plots). Needs root.
# Namespaces beyond the machine's cores share cores (node i runs on core i mod cores): their figures
# are not one core each.
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
out=bench/results/netns_layerwise_${name}
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

# What `--strategy auto` picks over the same link, against the fastest of the runs above (single stream
# and STREAMS streams), in ${out}_auto.json.
log=$(mktemp)
trap 'rm -f "$log"' EXIT
launch/netns-cluster.sh --nodes "$nodes" --rate "$rate" --delay-us "$delay_us" --exec sh -c \
  "exec taskset -c \"\$((NODE_RANK % $cores))\" env OMP_NUM_THREADS=1 tp-ollama launch '$model' 'The capital of France is' \
     --strategy auto --num-predict 8 --temperature 0 --nnodes \"\$NNODES\" --node-rank \"\$NODE_RANK\" \
     --master-addr \"\$MASTER_ADDR\" --master-port \"\$MASTER_PORT\"" >"$log" 2>&1
python - "$log" "$out" "$nodes" <<'PY'
import json, re, sys
log, out, nodes = open(sys.argv[1]).read(), sys.argv[2], sys.argv[3]
line = re.search(r'partitioning auto: [^"]*', log).group(0)
picked = re.match(r"partitioning auto: (\w+)", line).group(1)
runs = {"tensor": f"{out}_tp{nodes}.json", "layerwise": f"{out}_pp{nodes}.json", "one node": f"{out}_one.json"}
measured = {}
for name, path in runs.items():
    r = json.load(open(path))["results"][0]
    measured[name] = {"single_tok_s": r["decode_tok_s"], "streams_tok_s": r["streams"]["decode_tok_s"]}
group = {k: v for k, v in measured.items() if k != "one node"}
best = {m: max(group, key=lambda k: group[k][m]) for m in ("single_tok_s", "streams_tok_s")}
report = {"line": line, "picked": picked, "measured": measured, "fastest_of_the_group": best,
          "picked_the_fastest": all(b == picked for b in best.values())}
json.dump(report, open(f"{out}_auto.json", "w"), indent=2)
print(json.dumps(report, indent=2))
PY
