"""tp_ollama.launch: the cluster's numbers checked before anything starts, --bootstrap and --tp-weights parsed,
real ranks started by torchrun's agent (their results by rank, a failed rank as one line), and torch's
failure records read into that line. The deployment recipes in launch/: test_launch_recipes.py."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

from tp_ollama.errors import ConfigError, TpOllamaError
from tp_ollama.launch import (
    REPORTED_EXIT,
    Cluster,
    ReportedError,
    describe_failure,
    free_port,
    parse_bootstrap,
    parse_weights,
    run_workers,
)

# --- entry points of the ranks (spawned: they must be importable from this module) -------------------------


def where_am_i(tag: str) -> tuple[str, int, int]:
    return tag, int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])


def report_and_exit() -> None:
    """What a rank does once it has printed its one-line error (tp_ollama.oneshot_ranks.worker_main)."""
    raise SystemExit(REPORTED_EXIT)


# --- tests -------------------------------------------------------------------------------------------------


def test_a_cluster_checks_its_numbers_before_anything_starts():
    assert Cluster(nnodes=2, node_rank=1, nproc_per_node=3, master_port=29511).world_size == 6
    bad = [
        ({"nnodes": 0}, "--nnodes 0 is invalid: expected at least 1"),
        ({"nnodes": 2, "node_rank": 2, "master_port": 1}, r"--node-rank 2 is invalid: expected 0\.\.1"),
        ({"nproc_per_node": 0}, "--nproc-per-node 0 is invalid"),
        ({"nnodes": 2}, "several nodes need a fixed --master-port"),
    ]
    for kwargs, message in bad:
        with pytest.raises(ConfigError, match=message):
            Cluster(**kwargs)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("10.0.0.1:29500", ("10.0.0.1", 29500)),
        ("node0.local:7", ("node0.local", 7)),
        ("[::1]:8080", ("::1", 8080)),
        ("/ip4/192.168.1.2/tcp/4001", ("192.168.1.2", 4001)),
        ("/dns4/node0/tcp/9/", ("node0", 9)),
    ],
)
def test_bootstrap_takes_host_port_and_the_multiaddr_form(value: str, expected: tuple[str, int]):
    assert parse_bootstrap(value) == expected


def test_a_bad_bootstrap_is_refused_with_the_expected_forms():
    with pytest.raises(ConfigError, match=r"--bootstrap 'node0' is invalid: expected HOST:PORT or /ip4/"):
        parse_bootstrap("node0")
    with pytest.raises(ConfigError, match=r"--bootstrap port 70000 is invalid: expected 1\.\.65535"):
        parse_bootstrap("node0:70000")
    with pytest.raises(ConfigError, match="port 0 is invalid"):
        parse_bootstrap("/ip4/10.0.0.1/tcp/0")


def test_tp_weights_are_numbers_or_nothing():
    assert parse_weights(None) is None and parse_weights("") is None
    assert parse_weights("2,1,1") == (2.0, 1.0, 1.0)
    assert parse_weights("0.5") == (0.5,)
    with pytest.raises(ConfigError, match=r"--tp-weights '2,fast' is invalid: expected numbers like 2,1,1"):
        parse_weights("2,fast")


def test_a_free_port_can_be_bound():
    port = free_port()
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))
    assert 0 < port < 65536


def test_the_ranks_results_come_back_by_rank():
    assert run_workers(Cluster(nproc_per_node=2), where_am_i, "hi") == {0: ("hi", 0, 2), 1: ("hi", 1, 2)}


def test_a_rank_that_already_reported_its_error_is_not_described_again():
    with pytest.raises(ReportedError, match=r"^engine rank 0 failed$"):
        run_workers(Cluster(), report_and_exit)


def failed(rank: int, exitcode: int, tmp_path: Path, record: object = None) -> ChildFailedError:
    """torch's own failure of one rank, with the error file its @record writes when `record` is given."""
    error_file = tmp_path / f"error-{rank}.json"
    if record is not None:
        error_file.write_text(json.dumps({"message": record}))
    failure = ProcessFailure(local_rank=rank, pid=4242, exitcode=exitcode, error_file=str(error_file))
    return ChildFailedError("tp-ollama", {rank: failure})


def test_a_failure_is_one_line_naming_the_rank_and_the_first_line_of_its_error(tmp_path: Path):
    record = {"message": "ValueError: boom\nmore lines", "extraInfo": {"py_callstack": "...", "timestamp": "1"}}
    assert describe_failure(failed(2, 1, tmp_path, record)) == "engine rank 2 failed: ValueError: boom"
    plain = failed(0, 1, tmp_path, "RuntimeError: no memory")
    assert describe_failure(plain) == "engine rank 0 failed: RuntimeError: no memory"
    # No record (the rank died without one): torch's advice is not a reason, the exit code is.
    assert describe_failure(failed(1, 9, tmp_path)) == "engine rank 1 failed: exit code 9"
    with pytest.raises(ReportedError, match="engine rank 3 failed"):
        describe_failure(failed(3, REPORTED_EXIT, tmp_path))
    assert not issubclass(ReportedError, ConfigError) and issubclass(ReportedError, TpOllamaError)
