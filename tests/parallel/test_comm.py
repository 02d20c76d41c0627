"""tp_ollama.parallel.comm: the group of one is the identity, Timed adds up the time inside collectives and
passes everything else through, host staging leaves CPU tensors to the inner communicator, and make_comm builds
each kind over a real (one-rank) torch.distributed group. Collectives between real ranks: test_fastcomm.py,
test_plans.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator

import pytest
import torch
import torch.distributed as dist

from tests.waits import HANG_S
from tp_ollama.errors import ConfigError
from tp_ollama.launch import free_port
from tp_ollama.parallel.comm import COMM_KINDS, HostStaged, SoloComm, Timed, check_comm_kind, make_comm, threads_for


def test_a_group_of_one_returns_what_it_is_given():
    comm = SoloComm()
    t = torch.arange(4.0)
    assert comm.all_reduce(t) is t and comm.broadcast(t) is t
    assert torch.equal(comm.all_gather(t), t[None])
    assert comm.broadcast_bytes(b"abc") == b"abc"
    assert (comm.rank, comm.world_size, comm.seconds) == (0, 1, 0.0)


def test_timed_adds_up_the_time_inside_collectives_and_passes_the_rest_through():
    inner = SoloComm()
    inner.transport = "solo"
    timed = Timed(inner)
    t = torch.ones(3)
    assert timed.all_reduce(t) is t and timed.broadcast(t, 0) is t
    assert timed.all_gather(t).shape == (1, 3)
    assert timed.broadcast_bytes(b"x") == b"x"
    assert timed.seconds > 0
    assert timed.stats is inner.stats and (timed.rank, timed.world_size) == (0, 1)
    assert timed.transport == "solo"


def test_host_staging_leaves_cpu_tensors_to_the_inner_communicator():
    staged = HostStaged(SoloComm())
    t = torch.ones(3)
    assert staged.all_reduce(t) is t and staged.broadcast(t) is t
    gathered = staged.all_gather(t)
    assert gathered.shape == (1, 3) and gathered.device == t.device
    assert staged.broadcast_bytes(b"\x00\x01") == b"\x00\x01"


def test_an_unknown_kind_is_refused_naming_the_supported_ones():
    for kind in COMM_KINDS:
        check_comm_kind(kind)
    with pytest.raises(ConfigError, match="communicator 'mpi' is not supported; supported: auto, shm, tcp, gloo, nccl"):
        check_comm_kind("mpi")
    with pytest.raises(ConfigError, match="'mpi'"):
        make_comm("mpi", 1.0)


@pytest.fixture
def one_rank_group() -> Iterator[None]:
    """The default torch.distributed group, of this process alone (what torchrun makes on each rank)."""
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_each_kind_is_a_timed_communicator_over_the_process_group(one_rank_group: None):
    gloo = make_comm("gloo", 10.0)
    assert isinstance(gloo, Timed) and isinstance(gloo.inner, HostStaged)
    t = torch.arange(3.0)
    assert torch.equal(gloo.all_reduce(t), torch.arange(3.0))
    assert torch.equal(gloo.all_gather(t), t[None])
    assert gloo.broadcast_bytes(b"ok") == b"ok"
    assert gloo.stats["all_reduce"] == 1 and gloo.stats["broadcast_bytes"] == 1
    for kind, transport in (("tcp", "tcp"), ("auto", "shm")):
        fast = make_comm(kind, 10.0)
        assert isinstance(fast, Timed) and fast.transport == transport and fast.world_size == 1
        assert torch.equal(fast.all_reduce(torch.ones(2)), torch.ones(2))
        fast.close()


def test_ranks_on_one_host_share_its_cores_unless_omp_num_threads_says(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    cores = len(os.sched_getaffinity(0))
    assert threads_for(1) == cores
    assert threads_for(2) == max(1, cores // 2)
    assert threads_for(4 * cores) == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert threads_for(8) == 3
    for unusable in ("0", "many"):
        monkeypatch.setenv("OMP_NUM_THREADS", unusable)
        assert threads_for(1) == cores


@pytest.mark.slow
def test_two_launch_nodes_on_one_machine_find_each_other_and_split_its_cores():
    """As two terminals running `tp-ollama launch --nnodes 2 --node-rank N` would: each node starts
    one rank with LOCAL_WORLD_SIZE 1, and the ranks learn at rendezvous that they share this host."""
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    port = free_port()
    nodes = [subprocess.Popen([sys.executable, "-m", "tests.parallel.tp_entry", str(n), str(port)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for n in (0, 1)]  # fmt: skip
    try:
        outs = [node.communicate(timeout=HANG_S)[0] for node in nodes]
    finally:
        for node in nodes:
            node.kill()
    assert [node.returncode for node in nodes] == [0, 0]
    shares = [json.loads(out.strip().splitlines()[-1]) for out in outs]
    cores = len(os.sched_getaffinity(0))
    for share in shares:
        assert share == {"threads": max(1, cores // 2), "transport": "shm", "ranks_on_host": 2}
