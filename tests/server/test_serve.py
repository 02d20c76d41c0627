"""tp_ollama.server.serve: where each replica's engine group runs and the rendezvous port it gets (`tp-ollama
serve` as a user runs it, with one or two ranks: test_serve_tp.py; with two replicas: test_replicas.py)."""

from __future__ import annotations

from typing import Any

from tp_ollama.config.loading import load_settings
from tp_ollama.server.serve import master_ports


def settings(**flags: Any) -> Any:
    return load_settings(None, {}, flags)


def test_one_node_one_replica_lets_the_launcher_pick_the_port():
    assert master_ports(settings()) == [0]


def test_several_nodes_share_the_configured_port():
    assert master_ports(settings(nnodes=2, master_port=29600)) == [29600]


def test_replicas_on_one_node_each_get_a_free_port_of_their_own():
    ports = master_ports(settings(replicas=3))
    assert len(ports) == 3 and len(set(ports)) == 3 and all(0 < p < 65536 for p in ports)


def test_replicas_on_gpus_start_where_the_previous_replica_ended(monkeypatch):
    from tp_ollama.parallel.shard import rank_device
    from tp_ollama.server.serve import replica_device

    devices = [replica_device("cuda", r, 2) for r in range(3)]
    assert devices == ["cuda", "cuda:2", "cuda:4"]
    assert replica_device("cpu", 1, 2) == "cpu"
    monkeypatch.setattr("torch.cuda.device_count", lambda: 4)
    placed = []
    for device in devices:
        for local in (0, 1):
            monkeypatch.setenv("LOCAL_RANK", str(local))
            placed.append(rank_device(device).index)
    assert placed == [0, 1, 2, 3, 0, 1]  # a third replica of two shares GPUs 0-1 round-robin
