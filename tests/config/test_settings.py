"""The settings tree: defaults, the shipped config files, notes, and what it shows."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import yaml

from tests.config.test_loading import load_text
from tp_ollama.config.loading import load_settings
from tp_ollama.config.settings import COMM_KINDS, NOT_IMPLEMENTED, Compression, Settings
from tp_ollama.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]
DEFAULT_YAML = REPO / "configs" / "default.yaml"


# ---- defaults and the shipped files --------------------------------------------------------------


def test_settings_are_frozen():
    s = load_settings(None, {}, {})
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.api.port = 1  # type: ignore[misc]


def test_default_yaml_is_the_defaults():
    assert load_settings(DEFAULT_YAML, {}, {}) == load_settings(None, {}, {}) == Settings()


def test_default_yaml_lists_every_key():
    schema = set(json_leaves(Settings().to_dict()))
    assert leaf_keys(yaml.safe_load(DEFAULT_YAML.read_text())) == schema


def leaf_keys(tree: dict, prefix: str = "") -> set[str]:
    out: set[str] = set()
    for key, value in tree.items():
        if isinstance(value, dict):
            out |= leaf_keys(value, f"{prefix}{key}.")
        else:
            out.add(prefix + key)
    return out


def json_leaves(tree: dict, prefix: str = "") -> list[str]:
    return [
        k
        for key, v in tree.items()
        for k in (json_leaves(v, f"{prefix}{key}.") if isinstance(v, dict) else [prefix + key])
    ]


def test_three_node_example_loads():
    s = load_settings(REPO / "configs" / "cluster-3-nodes.yaml", {}, {"node_rank": 1})
    assert (s.cluster.world_size, s.cluster.node_rank, s.inference.tp_weights) == (3, 1, (2.0, 1.0, 1.0))
    assert s.notes() == []


# ---- notes and output ----------------------------------------------------------------------------


ORIGINAL_DESIGN = """
api:
  port: 11434
  host: "0.0.0.0"
p2p:
  port: 4001
  discovery:
    enabled: true
    interval: "30s"
inference:
  max_concurrent: 10
  timeout: "5m"
  partitioning:
    strategy: "tensor"
    max_partitions: 10
  aggregation:
    strategy: "concat"
  load_balancing:
    enabled: true
    algorithm: "round_robin"
  fault_tolerance:
    enabled: true
    retry_attempts: 3
models:
  storage_path: "./models"
  replication:
    min_replicas: 2
    max_replicas: 5
    strategy: "geographic"
performance:
  caching:
    enabled: true
    size: "1GB"
    ttl: "1h"
  compression:
    enabled: true
    algorithm: "gzip"
"""


def test_the_original_designs_file_loads_with_notes(tmp_path):
    s = load_text(tmp_path, ORIGINAL_DESIGN)
    assert (s.api.host, s.cluster.rendezvous_port, s.inference.max_concurrent) == ("0.0.0.0", 4001, 10)
    notes = s.notes()
    # Two replicas, balanced round robin: implemented, so no notes for them.
    assert (s.models.replication.min_replicas, s.inference.load_balancing.algorithm) == (2, "round_robin")
    assert len(notes) == 3, notes  # discovery, max_replicas and the replication strategy
    assert (s.inference.fault_tolerance.enabled, s.inference.fault_tolerance.retry_attempts) == (True, 3)
    text = "\n".join(notes)
    for fragment in (
        "cluster.discovery.enabled = true",
        "the rendezvous is static",
        "models.replication.max_replicas = 5",
        "models.replication.strategy = 'geographic'",
    ):
        assert fragment in text, text
    for implemented in ("aggregation", "compression", "load_balancing", "replication.min_replicas", "caching", "fault"):
        assert implemented not in text, text
    assert s.performance.compression == Compression(enabled=True, algorithm="gzip")


NON_DEFAULT = {
    "cluster.discovery": ("cluster.discovery.interval", "1m"),
    "inference.aggregation": ("inference.aggregation.strategy", "sum"),
    "models.replication.max_replicas": ("models.replication.max_replicas", 3),
    "models.replication.strategy": ("models.replication.strategy", "geographic"),
    "performance.caching.ttl": ("performance.caching.ttl", "2h"),
}


def test_notes_cover_every_not_implemented_section():
    assert Settings().notes() == []
    assert set(NON_DEFAULT) == set(NOT_IMPLEMENTED)
    for section, (key, value) in NON_DEFAULT.items():
        notes = load_settings(None, {}, {key: value}).notes()
        assert len(notes) == 1 and key in notes[0] and NOT_IMPLEMENTED[section] in notes[0], (key, notes)


def test_compression_is_gzip_on_by_default_and_can_be_turned_off(tmp_path):
    assert Settings().performance.compression == Compression(enabled=True, algorithm="gzip")
    off = load_text(tmp_path, "performance:\n  compression:\n    enabled: false\n    algorithm: gzip\n")
    assert off.performance.compression == Compression(enabled=False, algorithm="gzip")
    assert off.notes() == []  # implemented: no "accepted but not implemented" warning
    flag = load_settings(None, {}, {"performance.compression.enabled": "off"})
    assert flag.performance.compression.enabled is False
    for value in ("br", "deflate", ""):
        expected = (
            rf"performance\.compression\.algorithm = '{value}' \(from flag performance\.compression\.algorithm\) "
        )
        with pytest.raises(ConfigError, match=expected + r'is invalid: expected one of "gzip"$'):
            load_settings(None, {}, {"performance.compression.algorithm": value})
    with pytest.raises(ConfigError, match=r"performance\.compression\.enabled = 'sometimes' .* expected true or false"):
        load_text(tmp_path, "performance:\n  compression:\n    enabled: sometimes\n")


def test_to_dict_is_json_and_describe_is_short():
    s = load_settings(None, {"OLLAMA_HOST": "[::]:8080"}, {"nnodes": 2, "bootstrap": "10.0.0.1:4001"})
    data = json.loads(json.dumps(s.to_dict()))
    assert data["api"] == {
        "host": "::",
        "port": 8080,
        "origins": [],
        "max_body_bytes": 64 * 2**20,
        "request_timeout": 60.0,
    }
    assert data["inference"]["keep_alive"] == 300.0 and isinstance(data["models"]["storage_path"], str)
    text = s.describe()
    assert "[::]:8080 (clients: http://[::1]:8080)" in text
    assert "2 node(s) x 1 rank(s) = TP 2" in text and "rendezvous 10.0.0.1:4001" in text
    assert len(text.splitlines()) <= 5


def test_comm_kinds_match_the_communicators():
    from tp_ollama.parallel.comm import COMM_KINDS as REAL

    assert REAL == COMM_KINDS


def test_admission_and_replica_defaults():
    s = Settings()
    # 4 at once per replica: a batching engine; upstream's 1 would leave its batch empty (default.yaml says why).
    assert (s.inference.max_concurrent, s.inference.max_queue) == (4, 512)
    assert (s.models.replication.min_replicas, s.models.replication.max_replicas) == (1, 0)
    assert (s.inference.load_balancing.enabled, s.inference.load_balancing.algorithm) == (True, "least_loaded")
    assert "inference: 4 at once per replica, queue 512" in s.describe()
    assert "replicas: 1 engine group(s) of TP 1" in s.describe()
