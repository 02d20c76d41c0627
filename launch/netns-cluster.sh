#!/usr/bin/env bash
# netns-cluster.sh: a K-node tp-ollama cluster on ONE Linux machine, for trying the multi-node path (and
# measuring it over a slower link) without K machines. Each "node" runs in its own network namespace and,
# by default, its own UTS namespace with its own hostname, so the ranks see K hosts and `--comm auto` picks
# the TCP mesh exactly as on K machines. The nodes are joined by a Linux bridge that lives in a namespace
# of its own:
#
#     netns tpo-<pid>-n0          netns tpo-<pid>-n1               netns tpo-<pid>-n<K-1>
#     10.78.0.1/24                10.78.0.2/24                     10.78.0.K/24
#     tpo<pid>n0 (tbf)            tpo<pid>n1 (tbf)          ...    tpo<pid>n<K-1> (tbf)
#         |  veth                     |  veth                          |  veth
#     tpo<pid>b0 (tbf) ---------- tpo<pid>b1 (tbf) --------- ... --- tpo<pid>b<K-1> (tbf)
#                      bridge tpo<pid>br, in netns tpo-<pid>-br
#
# Node 0 hosts the rendezvous store on 10.78.0.1:PORT. Nothing is added to the machine's own network
# namespace: every interface is created inside the namespaces above, the addresses exist only there and
# there is no route out of them.
#
# --rate puts a tbf qdisc on both ends of every veth (tbf shapes what leaves an interface, so one on each
# end shapes both directions). --delay-us exports TP_OLLAMA_LINK_DELAY_US to every node: the TCP transport
# then holds each message that long before sending it (netem, the kernel's delay qdisc, is missing on some
# kernels; see tp_ollama/parallel/fastcomm_tcp.py).
#
# Needs: root (network namespaces), iproute2 (`ip`; `tc` for --rate), util-linux (`unshare`) and
# `hostname` unless --share-hostname, and tp-ollama on PATH (or TP_OLLAMA=/path/to/tp-ollama).
#
# Everything created is removed on exit, also on failure, --timeout or Ctrl-C: the processes inside the
# namespaces (found with `ip netns pids`), the veths, the bridge, the namespaces and the log folder.
set -euo pipefail

PROG=netns-cluster.sh
MAX_NODES=32
MAX_DELAY_US=10000000  # fastcomm_tcp.MAX_LINK_DELAY_US
GRACE_S=30             # after node 0 succeeds, how long the others may take to finish

usage() {
    cat <<'EOF'
Usage: netns-cluster.sh [OPTIONS] MODEL PROMPT [TP-OLLAMA LAUNCH FLAGS...]
       netns-cluster.sh [OPTIONS] --exec [--] COMMAND [ARGS...]

Start K nodes of a tp-ollama cluster in K network namespaces on this machine, joined by a bridge in a
namespace of its own; each node runs
    tp-ollama launch MODEL PROMPT --nnodes K --node-rank I --nproc-per-node N \
        --master-addr 10.78.0.1 --master-port PORT [TP-OLLAMA LAUNCH FLAGS...]
Node 0's output (the generated text: today launch runs a one-shot generation) is this script's output;
the other nodes log to a temporary folder, printed on stderr when the run fails. Everything is torn down
on exit. Needs root.

Options (before MODEL):
  --nodes K              number of nodes, 2 to 32 (default 2); node I has address 10.78.0.(I+1)/24
  --rate RATE            limit every node's link to RATE in both directions with tbf qdiscs
                         (e.g. 1gbit, 100mbit, 500kbit)
  --burst SIZE           tbf burst (default 64kb)
  --tbf-latency TIME     tbf latency: how long a packet may queue (default 50ms)
  --delay-us US          emulated one-way latency in microseconds, added by tp-ollama's TCP transport to
                         every message (exports TP_OLLAMA_LINK_DELAY_US; the kernel's netem is not
                         available everywhere). Only the TCP mesh is delayed, not gloo or the rendezvous.
  --port PORT            rendezvous port on node 0 (default 29511)
  --nproc-per-node N     engine ranks per node (default 1)
  --share-hostname       keep this machine's hostname in every namespace: the ranks then know they
                         share a kernel and `--comm auto` uses shared memory (no link, no delay)
  --timeout SECONDS      stop every node after this long, exit status 124 (default 0: no limit)
  --exec                 run COMMAND (everything after --exec, or after a following --) in every
                         namespace instead of tp-ollama launch, with NODE_RANK, NNODES, NPROC_PER_NODE,
                         MASTER_ADDR, MASTER_PORT, NODE_ADDR and NODE_IFNAME in its environment. Use
                         sh -c '...' to expand them per node.
  -h, --help             show this help

Environment:
  TP_OLLAMA              the tp-ollama command (default: tp-ollama from PATH)
  OMP_NUM_THREADS        threads per rank (default: this machine's CPUs / (K x nproc-per-node), at least 1)
Every node also gets GLOO_SOCKET_IFNAME=its interface, and the rest of this script's environment.

Examples:
  sudo launch/netns-cluster.sh --nodes 3 --rate 1gbit --delay-us 200 smollm2:135m \
      "The capital of France is" --temperature 0 --num-predict 8
  sudo launch/netns-cluster.sh --nodes 2 --delay-us 100 --exec sh -c 'tp-ollama bench collectives \
      --nnodes "$NNODES" --node-rank "$NODE_RANK" --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT"'
EOF
}

die() {
    echo "$PROG: $*" >&2
    exit 2
}

need_value() {
    [ $# -ge 2 ] || die "$1 needs a value"
}

NODES=2
RATE=""
BURST="64kb"
TBF_LATENCY="50ms"
DELAY_US=""
PORT=29511
NPROC=1
SHARE_HOSTNAME=0
TIMEOUT=0
EXEC=0

while [ $# -gt 0 ]; do
    case "$1" in
        -h | --help) usage; exit 0 ;;
        --nodes) need_value "$@"; NODES=$2; shift 2 ;;
        --rate) need_value "$@"; RATE=$2; shift 2 ;;
        --burst) need_value "$@"; BURST=$2; shift 2 ;;
        --tbf-latency) need_value "$@"; TBF_LATENCY=$2; shift 2 ;;
        --delay-us) need_value "$@"; DELAY_US=$2; shift 2 ;;
        --port) need_value "$@"; PORT=$2; shift 2 ;;
        --nproc-per-node) need_value "$@"; NPROC=$2; shift 2 ;;
        --share-hostname) SHARE_HOSTNAME=1; shift ;;
        --timeout) need_value "$@"; TIMEOUT=$2; shift 2 ;;
        --exec)
            EXEC=1
            shift
            [ "${1:-}" != "--" ] || shift
            break
            ;;
        --) shift; break ;;
        -*) die "unknown option $1 (script options go before MODEL; tp-ollama flags after PROMPT; see --help)" ;;
        *) break ;;
    esac
done
if [ "$EXEC" -eq 1 ]; then
    [ $# -ge 1 ] || die "--exec needs a command to run in every namespace (see --help)"
    RUN=("$@")
else
    [ $# -ge 2 ] || { usage >&2; exit 2; }
    MODEL=$1
    PROMPT=$2
    shift 2
    EXTRA=("$@")
fi

# ---- the settings, then what the machine must have: nothing is created before both are checked ----------
if ! [[ $NODES =~ ^[0-9]{1,3}$ ]] || [ "$((10#$NODES))" -lt 2 ] || [ "$((10#$NODES))" -gt "$MAX_NODES" ]; then
    die "--nodes $NODES is invalid: expected a whole number from 2 to $MAX_NODES"
fi
NODES=$((10#$NODES))
# (the number part all zeros: tc refuses a zero rate)
if [ -n "$RATE" ] && { ! [[ ${RATE,,} =~ ^[0-9]+(\.[0-9]+)?([kmgt]i?)?(bit|bps)$ ]] || [[ ${RATE%%[!0-9.]*} =~ ^[0.]+$ ]]; }; then
    die "--rate $RATE is invalid: expected a rate above 0 like 1gbit, 100mbit or 500kbit (tc's units: bit, kbit, mbit, gbit, bps, mbps...)"
fi
[[ ${BURST,,} =~ ^[0-9]+([kmg]?(b|bit)?)$ ]] || die "--burst $BURST is invalid: expected a size like 64kb or 1mb"
[[ ${TBF_LATENCY,,} =~ ^[0-9]+(\.[0-9]+)?(s|secs?|ms|msecs?|us|usecs?)$ ]] ||
    die "--tbf-latency $TBF_LATENCY is invalid: expected a time like 50ms or 1s"
if [ -n "$DELAY_US" ]; then
    if ! [[ $DELAY_US =~ ^[0-9]{1,9}$ ]] || [ "$((10#$DELAY_US))" -gt "$MAX_DELAY_US" ]; then
        die "--delay-us $DELAY_US is invalid: expected a whole number of microseconds from 0 to $MAX_DELAY_US, e.g. 200"
    fi
    DELAY_US=$((10#$DELAY_US))
fi
if ! [[ $PORT =~ ^[0-9]{1,5}$ ]] || [ "$((10#$PORT))" -lt 1 ] || [ "$((10#$PORT))" -gt 65535 ]; then
    die "--port $PORT is invalid: expected a port number from 1 to 65535"
fi
PORT=$((10#$PORT))
[[ $NPROC =~ ^[1-9][0-9]*$ ]] || die "--nproc-per-node $NPROC is invalid: expected a positive whole number"
[[ $TIMEOUT =~ ^[0-9]+$ ]] || die "--timeout $TIMEOUT is invalid: expected a whole number of seconds"

[ "$(id -u)" -eq 0 ] || die "needs root (network namespaces); try: sudo $0 ..."
command -v ip >/dev/null || die "needs iproute2's ip (apt-get install -y iproute2)"
[ -z "$RATE" ] || command -v tc >/dev/null || die "--rate needs iproute2's tc (apt-get install -y iproute2)"
if [ "$SHARE_HOSTNAME" -eq 0 ]; then
    command -v unshare >/dev/null || die "needs util-linux's unshare (or pass --share-hostname)"
    command -v hostname >/dev/null || die "needs the hostname command (or pass --share-hostname)"
fi
if [ "$EXEC" -eq 1 ]; then
    command -v "${RUN[0]}" >/dev/null || die "--exec: ${RUN[0]} not found"
else
    read -r -a TP_CMD <<<"${TP_OLLAMA:-tp-ollama}"
    [ "${#TP_CMD[@]}" -gt 0 ] || die "TP_OLLAMA is empty"
    TP_PATH=$(command -v "${TP_CMD[0]}") || die "${TP_CMD[0]} not found (activate the venv or set TP_OLLAMA)"
    TP_CMD[0]=$TP_PATH
fi
if [ -z "${OMP_NUM_THREADS:-}" ]; then
    cpus=$(nproc 2>/dev/null || echo 2)
    OMP_NUM_THREADS=$((cpus / (NODES * NPROC)))
    [ "$OMP_NUM_THREADS" -ge 1 ] || OMP_NUM_THREADS=1
fi
export OMP_NUM_THREADS
[ -z "$DELAY_US" ] || export TP_OLLAMA_LINK_DELAY_US="$DELAY_US"
# What the link was set to, for the bench reports (which measure it): informational only.
[ -z "$RATE" ] || export TP_OLLAMA_LINK_RATE="$RATE"

# Names carry this shell's pid, so two runs at once do not collide (interface names: 15 chars at most,
# "tpo" + 7-digit pid + "n31" is 13).
ID=$$
BRNS="tpo-$ID-br"
BRIDGE="tpo${ID}br"
MASTER_ADDR=10.78.0.1
node_ns() { echo "tpo-$ID-n$1"; }
node_if() { echo "tpo${ID}n$1"; }  # the node's end of its veth
port_if() { echo "tpo${ID}b$1"; }  # the bridge's end
node_addr() { echo "10.78.0.$(($1 + 1))"; }

CREATED_NS=()  # only what this run created is removed
CREATED_PORTS=()
PIDS=()
WORKDIR=""

kill_namespace_processes() {
    local sig=$1 ns pid
    for ns in "${CREATED_NS[@]}"; do
        # Every process in a namespace this script created was started by this script.
        for pid in $(ip netns pids "$ns" 2>/dev/null); do
            kill "-$sig" "$pid" 2>/dev/null || true
        done
    done
}

namespace_processes_left() {
    local ns
    for ns in "${CREATED_NS[@]}"; do
        [ -z "$(ip netns pids "$ns" 2>/dev/null)" ] || return 0
    done
    return 1
}

show_node_logs() {
    local i
    for ((i = 1; i < NODES; i++)); do
        [ -s "$WORKDIR/node$i.log" ] || continue
        sed "s/^/[node $i] /" "$WORKDIR/node$i.log" >&2
    done
}

cleanup() {
    local rc=$? pid port i
    trap - EXIT INT TERM HUP
    set +e
    # 1. Processes: TERM lets the torchrun agents stop their ranks; KILL whatever is left after 5 s.
    for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null; done
    kill_namespace_processes TERM
    for _ in $(seq 50); do
        namespace_processes_left || break
        sleep 0.1
    done
    kill_namespace_processes KILL
    for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null; done
    # 2. The logs of the other nodes tell why a run failed.
    [ "$rc" -eq 0 ] || [ -z "$WORKDIR" ] || show_node_logs
    # 3. Links: deleting the bridge's end of a veth deletes the node's end with it, at once (a deleted
    #    namespace releases its interfaces only when the kernel gets round to it).
    for port in "${CREATED_PORTS[@]}"; do ip -n "$BRNS" link delete "$port" 2>/dev/null; done
    # 4. The namespaces, newest first so that the bridge's (with the bridge in it) goes last, and the logs.
    for ((i = ${#CREATED_NS[@]} - 1; i >= 0; i--)); do ip netns delete "${CREATED_NS[i]}" 2>/dev/null; done
    [ -z "$WORKDIR" ] || rm -rf "$WORKDIR"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
trap 'exit 129' HUP

WORKDIR=$(mktemp -d "${TMPDIR:-/tmp}/tp-ollama-netns.XXXXXX")

# ---- the simulated network ----------------------------------------------------------------------------
# shape NAMESPACE INTERFACE: tbf on what leaves the interface.
shape() {
    [ -z "$RATE" ] || tc -n "$1" qdisc add dev "$2" root tbf rate "$RATE" burst "$BURST" latency "$TBF_LATENCY"
}

# The bridge's namespace is created first and deleted last: the node namespaces' veths hang off it.
ip netns add "$BRNS"
CREATED_NS+=("$BRNS")
ip -n "$BRNS" link add "$BRIDGE" type bridge  # STP is off: a port forwards as soon as it is up
ip -n "$BRNS" link set "$BRIDGE" up
for ((i = 0; i < NODES; i++)); do
    ns=$(node_ns "$i")
    ip netns add "$ns"
    CREATED_NS+=("$ns")
    # Created inside the bridge's namespace with its peer put straight into the node's: the pair never
    # exists in the machine's own namespace.
    ip -n "$BRNS" link add "$(port_if "$i")" type veth peer name "$(node_if "$i")" netns "$ns"
    CREATED_PORTS+=("$(port_if "$i")")
    ip -n "$BRNS" link set "$(port_if "$i")" master "$BRIDGE" up
    ip -n "$ns" addr add "$(node_addr "$i")/24" dev "$(node_if "$i")"
    ip -n "$ns" link set lo up
    ip -n "$ns" link set "$(node_if "$i")" up
    shape "$BRNS" "$(port_if "$i")"
    shape "$ns" "$(node_if "$i")"
done

# ---- the nodes ------------------------------------------------------------------------------------------
# start_node RANK: the same command on every node, only the rank (and what derives from it) differs.
# GLOO_SOCKET_IFNAME: gloo (torch.distributed's CPU backend, which tp-ollama also initialises) picks its
# interface from the hostname, which resolves to nothing usable inside a fresh namespace.
start_node() {
    local rank=$1 ns ifname
    ns=$(node_ns "$rank")
    ifname=$(node_if "$rank")
    local -a env=("GLOO_SOCKET_IFNAME=$ifname")
    if [ "$EXEC" -eq 1 ]; then
        env+=("NODE_RANK=$rank" "NNODES=$NODES" "NPROC_PER_NODE=$NPROC" "MASTER_ADDR=$MASTER_ADDR"
            "MASTER_PORT=$PORT" "NODE_ADDR=$(node_addr "$rank")" "NODE_IFNAME=$ifname")
    fi
    local -a cmd=(ip netns exec "$ns" env "${env[@]}")
    if [ "$SHARE_HOSTNAME" -eq 0 ]; then
        # a UTS namespace with its own hostname: the ranks of this node see a host of their own
        # shellcheck disable=SC2016 # $1 and $@ belong to the inner sh
        cmd+=(unshare --uts -- sh -c 'hostname "$1" && shift && exec "$@"' sh "tpo-node$rank")
    fi
    if [ "$EXEC" -eq 1 ]; then
        cmd+=("${RUN[@]}")
    else
        cmd+=("${TP_CMD[@]}" launch "$MODEL" "$PROMPT"
            --nnodes "$NODES" --node-rank "$rank" --nproc-per-node "$NPROC"
            --master-addr "$MASTER_ADDR" --master-port "$PORT" "${EXTRA[@]}")
    fi
    if [ "$rank" -eq 0 ]; then
        "${cmd[@]}" </dev/null &  # node 0: its stdout and stderr are ours
    else
        "${cmd[@]}" </dev/null >"$WORKDIR/node$rank.log" 2>&1 &
    fi
    PIDS+=("$!")
}

for ((i = 0; i < NODES; i++)); do start_node "$i"; done

# now_ms: wall-clock milliseconds (bash's SECONDS ticks in whole seconds: a 1 s limit could end at once).
now_ms() {
    local us=${EPOCHREALTIME//[!0-9]/}
    echo $((10#$us / 1000))
}

# Watch every node: the first one to fail ends the run with its status (the cleanup stops the others and
# prints their logs); once node 0 has succeeded the others get GRACE_S s to follow (in launch mode they
# end right after it, at their agents' exit barrier).
DEADLINE=0  # in now_ms; 0: none
DEADLINE_WHY="after --timeout $TIMEOUT s"
[ "$TIMEOUT" -eq 0 ] || DEADLINE=$(($(now_ms) + TIMEOUT * 1000))
declare -a RCS=()
left=$NODES
while [ "$left" -gt 0 ]; do
    for ((i = 0; i < NODES; i++)); do
        [ -z "${RCS[i]:-}" ] || continue
        kill -0 "${PIDS[i]}" 2>/dev/null && continue
        rc=0
        wait "${PIDS[i]}" || rc=$?
        RCS[i]=$rc
        left=$((left - 1))
        if [ "$rc" -ne 0 ]; then
            [ "$i" -eq 0 ] || echo "$PROG: node $i exited with status $rc" >&2
            exit "$rc"
        fi
        if [ "$i" -eq 0 ] && [ "$EXEC" -eq 0 ]; then
            grace_end=$(($(now_ms) + GRACE_S * 1000))
            if [ "$DEADLINE" -eq 0 ] || [ "$grace_end" -lt "$DEADLINE" ]; then
                DEADLINE=$grace_end
                DEADLINE_WHY="$GRACE_S s after node 0 finished"
            fi
        fi
    done
    [ "$left" -gt 0 ] || break
    if [ "$DEADLINE" -ne 0 ] && [ "$(now_ms)" -ge "$DEADLINE" ]; then
        waiting=()
        for ((i = 0; i < NODES; i++)); do [ -n "${RCS[i]:-}" ] || waiting+=("$i"); done
        echo "$PROG: node(s) ${waiting[*]} still running $DEADLINE_WHY, stopping them" >&2
        exit 124
    fi
    sleep 0.2
done
