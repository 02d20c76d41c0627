#!/usr/bin/env bash
# ssh-two-machines.sh: start one tp-ollama cluster on two (or more) machines over ssh.
#
# The first host is node 0: it hosts the rendezvous (torchrun's TCP store at --master-addr:--master-port)
# and prints the generated text. Every host runs the same `tp-ollama launch` command; only --node-rank
# differs. Node 0's stdout and stderr are streamed here; the other nodes' output goes to log files
# (--log-dir) and is printed, prefixed with the node, when the run ends.
#
# Today `tp-ollama launch` runs ONE generation (the prompt); when the HTTP server lands, its flag goes
# after PROMPT like any other tp-ollama flag, and this script keeps the cluster up until Ctrl-C.
#
# On exit (normal end, error, Ctrl-C, TERM) every node that is still running is stopped over ssh: the
# remote command runs in its own session (setsid), so the whole process group (the torchrun agent and its
# ranks) is signalled: TERM, then KILL after 5 s.
#
# Each host needs: passwordless ssh from here (keys or an agent), bash and setsid (util-linux), and
# tp-ollama installed with the same version and the same model (the same name, or a file at the same
# path with the same bytes). The hosts must reach node 0's master port and each other's ephemeral ports
# (see launch/README.md).
set -euo pipefail

usage() {
    cat <<'EOF'
Usage: ssh-two-machines.sh [OPTIONS] MODEL PROMPT [TP-OLLAMA LAUNCH FLAGS...]

Run `tp-ollama launch` on every host over ssh (first host = node 0), stream node 0's output, and
stop every remote process on exit. Today this runs a one-shot generation.

Options (before MODEL):
  --hosts H0,H1[,...]    ssh destinations ([user@]host), node 0 first; or the HOSTS environment
                         variable (commas or spaces). At least two.
  --master-addr ADDR     address of node 0 as every node, node 0 included, reaches it (default: H0
                         without user@; pass an address when H0 is an ssh alias or names another
                         network). Not a loopback address unless all hosts are this machine: the ranks
                         advertise the interface they use to reach it.
  --master-port PORT     rendezvous port on node 0 (default 29511)
  --nproc-per-node N     engine ranks on every host (default 1)
  --remote-cmd CMD       tp-ollama on the hosts (default: $TP_OLLAMA_REMOTE or tp-ollama), e.g.
                         /opt/tp-ollama/.venv/bin/tp-ollama (a venv's entry point needs no activation)
  --env NAME=VALUE       set on every node; repeat. E.g. OMP_NUM_THREADS=16, GLOO_SOCKET_IFNAME=eth0
  --ssh-option OPT       one more argument for ssh; repeat (e.g. --ssh-option -oConnectTimeout=5)
  --log-dir DIR          where the other nodes' logs go (default: a new temporary folder)
  --dry-run              print the ssh command lines and exit
  -h, --help             show this help

Environment: SSH (the ssh client, default ssh), HOSTS, TP_OLLAMA_REMOTE.

Example:
  launch/ssh-two-machines.sh --hosts gpu1,gpu2 --env OMP_NUM_THREADS=8 \
      smollm2:135m "The capital of France is" --temperature 0 --num-predict 8
EOF
}

die() {
    echo "ssh-two-machines.sh: $*" >&2
    exit 2
}

HOSTS_SPEC=${HOSTS:-}
MASTER_ADDR=""
MASTER_PORT=29511
NPROC=1
REMOTE_CMD=${TP_OLLAMA_REMOTE:-tp-ollama}
ENVS=()
SSH_EXTRA=()
LOG_DIR=""
DRY_RUN=0

while [ $# -gt 0 ]; do
    case "$1" in
        -h | --help) usage; exit 0 ;;
        --hosts) HOSTS_SPEC=${2:?--hosts needs a value}; shift 2 ;;
        --master-addr) MASTER_ADDR=${2:?--master-addr needs a value}; shift 2 ;;
        --master-port) MASTER_PORT=${2:?--master-port needs a value}; shift 2 ;;
        --nproc-per-node) NPROC=${2:?--nproc-per-node needs a value}; shift 2 ;;
        --remote-cmd) REMOTE_CMD=${2:?--remote-cmd needs a value}; shift 2 ;;
        --env) ENVS+=("${2:?--env needs NAME=VALUE}"); shift 2 ;;
        --ssh-option) SSH_EXTRA+=("${2:?--ssh-option needs a value}"); shift 2 ;;
        --log-dir) LOG_DIR=${2:?--log-dir needs a value}; shift 2 ;;
        --dry-run) DRY_RUN=1; shift ;;
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

read -r -a HOST_LIST <<<"${HOSTS_SPEC//,/ }"
NNODES=${#HOST_LIST[@]}
[ "$NNODES" -ge 2 ] || die "give at least two hosts with --hosts H0,H1 (or HOSTS=\"H0 H1\")"
[[ $MASTER_PORT =~ ^[0-9]+$ ]] || die "--master-port $MASTER_PORT is not a number"
[[ $NPROC =~ ^[1-9][0-9]*$ ]] || die "--nproc-per-node $NPROC is not a positive number"
for kv in "${ENVS[@]}"; do
    [[ $kv =~ ^[A-Za-z_][A-Za-z0-9_]*= ]] || die "--env $kv is not NAME=VALUE"
done
if [ -z "$MASTER_ADDR" ]; then
    MASTER_ADDR=${HOST_LIST[0]#*@}
fi
read -r -a SSH_CMD <<<"${SSH:-ssh}"
# BatchMode: fail at once instead of prompting for a password in the background. ServerAlive: notice a
# dead link. ssh keeps the first value of an option, so --ssh-option values come first and win.
SSH_CMD+=("${SSH_EXTRA[@]}" -o BatchMode=yes -o ConnectTimeout=10 -o ServerAliveInterval=15 -o ServerAliveCountMax=4)

# A name for this run's pid files on the hosts (two hosts may be one machine: the file names differ).
RUN_ID="$(date +%s)-$$"

# sq WORD: WORD quoted for any POSIX shell ('...', with ' written as '\'').
sq() {
    local squote="'" escaped="'\\''"
    printf "'%s'" "${1//$squote/$escaped}"
}

# Each node runs `setsid -w bash -s` and reads its script from stdin: one level of quoting (sq) only,
# whatever the login shell. setsid gives the node a session and process group of its own whose id is
# the wrapper's pid ($$), so that remote_stop reaches the torchrun agent and all its ranks.
REMOTE_SHELL="setsid -w bash -s"

# remote_start RANK: the script of node RANK: record the pid, run tp-ollama, remove the pid file.
remote_start() {
    local rank=$1 pidfile="/tmp/tp-ollama-ssh-$RUN_ID-node$1.pid" script kv a
    local -a argv=("$MODEL" "$PROMPT" --nnodes "$NNODES" --node-rank "$rank" --nproc-per-node "$NPROC"
        --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT" "${EXTRA[@]}")
    script="echo \$\$ > $pidfile; env"
    for kv in "${ENVS[@]}"; do
        script+=" $(sq "$kv")"
    done
    # REMOTE_CMD goes in as written (it may be a path with ~ or several words); the arguments quoted.
    script+=" $REMOTE_CMD launch"
    for a in "${argv[@]}"; do
        script+=" $(sq "$a")"
    done
    printf '%s\n' "$script; rc=\$?; rm -f $pidfile; exit \$rc"
}

# remote_stop RANK: TERM the node's process group, KILL it after 5 s, remove the pid file. Nothing to do
# when the pid file is gone: the node's wrapper removes it when tp-ollama ends.
remote_stop() {
    local pidfile="/tmp/tp-ollama-ssh-$RUN_ID-node$1.pid"
    printf '%s\n' "p=\$(cat $pidfile 2>/dev/null) || exit 0; kill -TERM -- -\$p 2>/dev/null;" \
        "for i in 1 2 3 4 5 6 7 8 9 10; do kill -0 -- -\$p 2>/dev/null || break; sleep 0.5; done;" \
        "kill -KILL -- -\$p 2>/dev/null; rm -f $pidfile; exit 0"
}

if [ "$DRY_RUN" -eq 1 ]; then
    for rank in $(seq 0 $((NNODES - 1))); do
        echo "# node $rank"
        printf '%s ' "${SSH_CMD[@]}" "${HOST_LIST[$rank]}"
        printf "'%s' <<'EOF'\n" "$REMOTE_SHELL"
        remote_start "$rank"
        echo "EOF"
    done
    exit 0
fi

OWN_LOG_DIR=0
if [ -z "$LOG_DIR" ]; then
    LOG_DIR=$(mktemp -d "${TMPDIR:-/tmp}/tp-ollama-ssh.XXXXXX")
    OWN_LOG_DIR=1
fi
mkdir -p "$LOG_DIR"

PIDS=()  # local ssh client of each node, by rank
RCS=()

cleanup() {
    local rc=$? rank pid
    local -a stoppers=()
    trap - EXIT INT TERM HUP
    set +e
    # Stop every node, also one whose ssh session ended early (a dropped link leaves the remote running);
    # on a normal end the pid files are gone and the stop commands return at once.
    for rank in "${!PIDS[@]}"; do
        if kill -0 "${PIDS[$rank]}" 2>/dev/null; then
            echo "ssh-two-machines.sh: stopping node $rank on ${HOST_LIST[$rank]}" >&2
        fi
        "${SSH_CMD[@]}" "${HOST_LIST[$rank]}" bash -s <<<"$(remote_stop "$rank")" >/dev/null 2>&1 &
        stoppers+=("$!")
    done
    for pid in "${stoppers[@]}"; do wait "$pid"; done
    # The node sessions end with their remote commands; give them 10 s, then close them from here.
    for rank in "${!PIDS[@]}"; do
        pid=${PIDS[$rank]}
        for _ in $(seq 50); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.2
        done
        kill "$pid" 2>/dev/null
        wait "$pid" 2>/dev/null
    done
    local said=0
    for rank in "${!PIDS[@]}"; do
        if [ "$rank" -gt 0 ] && [ -s "$LOG_DIR/node$rank.log" ]; then
            sed "s/^/[node $rank] /" "$LOG_DIR/node$rank.log" >&2
            said=1
        fi
    done
    if [ "$said" -eq 1 ] || [ "$OWN_LOG_DIR" -eq 0 ]; then
        echo "ssh-two-machines.sh: the logs of nodes 1..$((NNODES - 1)) are in $LOG_DIR" >&2
    else
        rm -rf "$LOG_DIR"  # a temporary folder of empty logs
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
trap 'exit 129' HUP

for rank in $(seq 0 $((NNODES - 1))); do
    host=${HOST_LIST[$rank]}
    if [ "$rank" -eq 0 ]; then
        "${SSH_CMD[@]}" "$host" "$REMOTE_SHELL" <<<"$(remote_start 0)" &
    else
        "${SSH_CMD[@]}" "$host" "$REMOTE_SHELL" <<<"$(remote_start "$rank")" >"$LOG_DIR/node$rank.log" 2>&1 &
    fi
    PIDS[rank]=$!
done

# Node 0 decides: when it is done, the others finish within moments (their agents' exit barrier).
rc0=0
wait "${PIDS[0]}" || rc0=$?
RCS[0]=$rc0
for rank in $(seq 1 $((NNODES - 1))); do
    for _ in $(seq 150); do  # 30 s at most
        kill -0 "${PIDS[$rank]}" 2>/dev/null || break
        sleep 0.2
    done
    if kill -0 "${PIDS[$rank]}" 2>/dev/null; then
        echo "ssh-two-machines.sh: node $rank still runs 30 s after node 0 ended" >&2
        RCS[rank]=124
    else
        RCS[rank]=0
        wait "${PIDS[$rank]}" || RCS[rank]=$?
    fi
done
[ "$rc0" -eq 0 ] || exit "$rc0"
for rank in $(seq 1 $((NNODES - 1))); do
    if [ "${RCS[$rank]}" -ne 0 ]; then
        echo "ssh-two-machines.sh: node $rank (${HOST_LIST[$rank]}) exited with status ${RCS[$rank]}" >&2
        exit "${RCS[$rank]}"
    fi
done
