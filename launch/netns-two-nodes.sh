#!/usr/bin/env bash
# netns-two-nodes.sh: a two-node tp-ollama cluster on ONE Linux machine, for trying the multi-node path
# without a second machine. Each "node" runs in its own network namespace (and, by default, its own UTS
# namespace with its own hostname, so that the ranks see two hosts and `--comm auto` picks the TCP mesh
# exactly as on two machines). The namespaces are joined by one veth pair:
#
#     netns tpo-<pid>-n0 (node 0)                    netns tpo-<pid>-n1 (node 1)
#     10.77.0.1/24 on veth tpo<pid>a  <──── veth ────>  10.77.0.2/24 on veth tpo<pid>b
#     rendezvous store on 10.77.0.1:PORT
#
# Traffic stays on that pair: the addresses exist only inside the namespaces this script creates, there
# is no route out of them, and nothing is added to the machine's own network namespace.
#
# Today `tp-ollama launch` runs ONE generation (the prompt) and node 0 prints the text; when the HTTP
# server lands, its flag goes after PROMPT like any other tp-ollama flag.
#
# Needs: root (network namespaces), iproute2 (`ip`; `tc` for --rate), util-linux (`unshare`) and
# `hostname` unless --share-hostname, and tp-ollama on PATH (or TP_OLLAMA=/path/to/tp-ollama).
#
# Everything created is removed on exit, also on failure or Ctrl-C: the processes inside the two
# namespaces (found with `ip netns pids`), the namespaces, the veth pair and the temporary log folder.
set -euo pipefail

usage() {
    cat <<'EOF'
Usage: netns-two-nodes.sh [OPTIONS] MODEL PROMPT [TP-OLLAMA LAUNCH FLAGS...]

Start node 0 and node 1 of a 2-node tp-ollama cluster in two network namespaces on this machine,
print node 0's output (the generated text) and tear everything down on exit. Needs root.
Today this runs a one-shot generation; later tp-ollama flags (the server) pass through unchanged.

Options (before MODEL):
  --rate RATE            limit the veth to RATE in both directions with a tbf qdisc (e.g. 1gbit,
                         100mbit). netem (delay, loss) is not available on every kernel, so none here.
  --burst SIZE           tbf burst (default 64kb)
  --tbf-latency TIME     tbf latency: how long a packet may queue (default 50ms)
  --port PORT            rendezvous port on node 0 (default 29511)
  --nproc-per-node N     engine ranks per node (default 1)
  --share-hostname       keep this machine's hostname in both namespaces: the ranks then know they
                         share a kernel and `--comm auto` uses shared memory instead of the network
  --timeout SECONDS      stop both nodes after this long (default 0: no limit)
  -h, --help             show this help

Environment:
  TP_OLLAMA              the tp-ollama command (default: tp-ollama from PATH)
  OMP_NUM_THREADS        threads per rank (default: this machine's CPUs / (2 x nproc-per-node))

Example:
  sudo launch/netns-two-nodes.sh --rate 1gbit smollm2:135m "The capital of France is" \
      --temperature 0 --num-predict 8
EOF
}

die() {
    echo "netns-two-nodes.sh: $*" >&2
    exit 2
}

RATE=""
BURST="64kb"
TBF_LATENCY="50ms"
PORT=29511
NPROC=1
SHARE_HOSTNAME=0
TIMEOUT=0
ADDR0=10.77.0.1
ADDR1=10.77.0.2

while [ $# -gt 0 ]; do
    case "$1" in
        -h | --help) usage; exit 0 ;;
        --rate) RATE=${2:?--rate needs a value}; shift 2 ;;
        --burst) BURST=${2:?--burst needs a value}; shift 2 ;;
        --tbf-latency) TBF_LATENCY=${2:?--tbf-latency needs a value}; shift 2 ;;
        --port) PORT=${2:?--port needs a value}; shift 2 ;;
        --nproc-per-node) NPROC=${2:?--nproc-per-node needs a value}; shift 2 ;;
        --share-hostname) SHARE_HOSTNAME=1; shift ;;
        --timeout) TIMEOUT=${2:?--timeout needs a value}; shift 2 ;;
        --) shift; break ;;
        -*) die "unknown option $1 (script options go before MODEL; tp-ollama flags after PROMPT; see --help)" ;;
        *) break ;;
    esac
done
[ $# -ge 2 ] || { usage >&2; exit 2; }
MODEL=$1
PROMPT=$2
shift 2
EXTRA=("$@")

[[ $PORT =~ ^[0-9]+$ ]] || die "--port $PORT is not a number"
[[ $NPROC =~ ^[1-9][0-9]*$ ]] || die "--nproc-per-node $NPROC is not a positive number"
[[ $TIMEOUT =~ ^[0-9]+$ ]] || die "--timeout $TIMEOUT is not a whole number of seconds"
[ "$(id -u)" -eq 0 ] || die "needs root (network namespaces); try: sudo $0 ..."
command -v ip >/dev/null || die "needs iproute2's ip (apt-get install -y iproute2)"
[ -z "$RATE" ] || command -v tc >/dev/null || die "--rate needs iproute2's tc"
if [ "$SHARE_HOSTNAME" -eq 0 ]; then
    command -v unshare >/dev/null || die "needs util-linux's unshare (or pass --share-hostname)"
    command -v hostname >/dev/null || die "needs the hostname command (or pass --share-hostname)"
fi
read -r -a TP_CMD <<<"${TP_OLLAMA:-tp-ollama}"
[ "${#TP_CMD[@]}" -gt 0 ] || die "TP_OLLAMA is empty"
TP_PATH=$(command -v "${TP_CMD[0]}") || die "${TP_CMD[0]} not found (activate the venv or set TP_OLLAMA)"
TP_CMD[0]=$TP_PATH
if [ -z "${OMP_NUM_THREADS:-}" ]; then
    cpus=$(nproc 2>/dev/null || echo 2)
    OMP_NUM_THREADS=$((cpus / (2 * NPROC)))
    [ "$OMP_NUM_THREADS" -ge 1 ] || OMP_NUM_THREADS=1
fi
export OMP_NUM_THREADS

# Names carry this shell's pid, so two runs at once do not collide (interface names: 15 chars at most).
ID=$$
NS0="tpo-$ID-n0"
NS1="tpo-$ID-n1"
VETH0="tpo${ID}a"
VETH1="tpo${ID}b"

CREATED_NS=()    # only what this run created is removed
CREATED_LINK=""
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

cleanup() {
    local rc=$? pid ns
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
    # 2. Namespaces: deleting one destroys the veth end inside it, and with it the peer.
    for ns in "${CREATED_NS[@]}"; do ip netns delete "$ns" 2>/dev/null; done
    # 3. The veth pair, if it was never moved into the namespaces.
    [ -z "$CREATED_LINK" ] || ip link delete "$CREATED_LINK" 2>/dev/null
    [ -z "$WORKDIR" ] || rm -rf "$WORKDIR"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
trap 'exit 129' HUP

WORKDIR=$(mktemp -d "${TMPDIR:-/tmp}/tp-ollama-netns.XXXXXX")

# ---- the simulated network ----------------------------------------------------------------------------
ip netns add "$NS0"
CREATED_NS+=("$NS0")
ip netns add "$NS1"
CREATED_NS+=("$NS1")
ip link add "$VETH0" type veth peer name "$VETH1"
CREATED_LINK=$VETH0
ip link set "$VETH0" netns "$NS0"
ip link set "$VETH1" netns "$NS1"
CREATED_LINK=""  # now inside the namespaces: it goes with them
ip -n "$NS0" addr add "$ADDR0/24" dev "$VETH0"
ip -n "$NS1" addr add "$ADDR1/24" dev "$VETH1"
for ns in "$NS0" "$NS1"; do ip -n "$ns" link set lo up; done
ip -n "$NS0" link set "$VETH0" up
ip -n "$NS1" link set "$VETH1" up
if [ -n "$RATE" ]; then
    # tbf shapes what leaves an interface: one qdisc on each end limits both directions.
    ip netns exec "$NS0" tc qdisc add dev "$VETH0" root tbf rate "$RATE" burst "$BURST" latency "$TBF_LATENCY"
    ip netns exec "$NS1" tc qdisc add dev "$VETH1" root tbf rate "$RATE" burst "$BURST" latency "$TBF_LATENCY"
fi

# ---- the two nodes --------------------------------------------------------------------------------------
# start_node RANK NAMESPACE INTERFACE: the same tp-ollama command on both nodes, only --node-rank differs.
# GLOO_SOCKET_IFNAME: gloo (torch.distributed's CPU backend, which tp-ollama also initialises) picks its
# interface from the hostname, which resolves to nothing usable inside a fresh namespace.
start_node() {
    local rank=$1 ns=$2 ifname=$3
    local -a cmd=(ip netns exec "$ns" env "GLOO_SOCKET_IFNAME=$ifname" "OMP_NUM_THREADS=$OMP_NUM_THREADS")
    if [ "$SHARE_HOSTNAME" -eq 0 ]; then
        # a UTS namespace with its own hostname: the ranks of this node see a host of their own
        # shellcheck disable=SC2016 # $1 and $@ belong to the inner sh
        cmd+=(unshare --uts -- sh -c 'hostname "$1" && shift && exec "$@"' sh "tpo-node$rank")
    fi
    cmd+=("${TP_CMD[@]}" launch "$MODEL" "$PROMPT"
        --nnodes 2 --node-rank "$rank" --nproc-per-node "$NPROC"
        --master-addr "$ADDR0" --master-port "$PORT" "${EXTRA[@]}")
    if [ "$rank" -eq 0 ]; then
        "${cmd[@]}" </dev/null &  # node 0: its stdout and stderr are ours
    else
        "${cmd[@]}" </dev/null >"$WORKDIR/node$rank.log" 2>&1 &
    fi
    PIDS+=("$!")
}

# wait_for PID NAME: its exit status; 124 when the deadline passes first.
DEADLINE=0
[ "$TIMEOUT" -eq 0 ] || DEADLINE=$((SECONDS + TIMEOUT))
wait_for() {
    local pid=$1 name=$2 rc=0
    while kill -0 "$pid" 2>/dev/null; do
        if [ "$DEADLINE" -ne 0 ] && [ "$SECONDS" -ge "$DEADLINE" ]; then
            echo "netns-two-nodes.sh: gave up waiting for $name, stopping both nodes" >&2
            return 124
        fi
        sleep 0.2
    done
    wait "$pid" || rc=$?
    return "$rc"
}

start_node 0 "$NS0" "$VETH0"
start_node 1 "$NS1" "$VETH1"

rc0=0
wait_for "${PIDS[0]}" "node 0 (--timeout $TIMEOUT s)" || rc0=$?
rc1=0
if [ "$rc0" -eq 124 ]; then
    rc1=124
else
    # node 1 ends right after node 0 (its agent's exit barrier); give it half a minute at most.
    [ "$DEADLINE" -ne 0 ] && [ $((DEADLINE - SECONDS)) -lt 30 ] || DEADLINE=$((SECONDS + 30))
    wait_for "${PIDS[1]}" "node 1 to finish after node 0" || rc1=$?
fi
if [ -s "$WORKDIR/node1.log" ]; then
    sed 's/^/[node 1] /' "$WORKDIR/node1.log" >&2
fi
if [ "$rc0" -ne 0 ]; then
    exit "$rc0"
fi
if [ "$rc1" -ne 0 ]; then
    echo "netns-two-nodes.sh: node 1 exited with status $rc1" >&2
    exit "$rc1"
fi
