"""Loading settings: precedence (default < file < env < flag), unknown keys, and the one-line errors."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from tp_ollama.config.loading import FLAGS, load_settings
from tp_ollama.config.settings import DEFAULT_ORIGINS, Settings
from tp_ollama.config.values import client_url
from tp_ollama.errors import ConfigError


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return path


def load_text(tmp_path: Path, text: str, env: dict[str, str] | None = None, **flags: object) -> Settings:
    return load_settings(write(tmp_path, text), env or {}, flags)


# ---- precedence ----------------------------------------------------------------------------------


def test_ollama_host_from_the_environment_sets_host_and_port():
    s = load_settings(None, {"OLLAMA_HOST": "0.0.0.0:8080"}, {})
    assert (s.api.host, s.api.port) == ("0.0.0.0", 8080)
    assert s.api.client_url() == "http://127.0.0.1:8080"
    assert client_url("::", 1) == "http://[::1]:1"


def test_default_file_env_flag_precedence(tmp_path):
    text = "api:\n  port: 1111\ninference:\n  keep_alive: 10m\n  max_concurrent: 2\n  num_ctx: 2048\n"
    assert load_settings(None, {}, {}).api.port == 11434
    assert load_text(tmp_path, text).api.port == 1111
    env = {"OLLAMA_HOST": ":2222", "OLLAMA_KEEP_ALIVE": "-1", "OLLAMA_NUM_PARALLEL": "3"}
    s = load_text(tmp_path, text, env)
    assert (s.api.port, s.inference.keep_alive, s.inference.max_concurrent) == (2222, -1.0, 3)
    assert s.inference.num_ctx == 2048  # no env: the file's value
    s = load_text(tmp_path, text, env, port=3333, keep_alive="0", num_parallel=4, **{"inference.num_ctx": 1024})
    assert (s.api.port, s.inference.keep_alive, s.inference.max_concurrent) == (3333, 0.0, 4)
    assert s.inference.num_ctx == 1024


def test_environment_variables():
    env = {
        "OLLAMA_MODELS": "/srv/models",
        "OLLAMA_ORIGINS": "chrome-extension://*, moz-extension://*",
        "OLLAMA_MAX_QUEUE": "8",
        "OLLAMA_CONTEXT_LENGTH": "8192",
        "OLLAMA_KEEP_ALIVE": "'1h30m'",
        "UNRELATED": "x",
    }
    s = load_settings(None, env, {})
    assert s.models.storage_path == Path("/srv/models")
    assert s.api.origins == ("chrome-extension://*", "moz-extension://*")
    assert s.api.allowed_origins == (*DEFAULT_ORIGINS, "chrome-extension://*", "moz-extension://*")
    assert (s.inference.max_queue, s.inference.num_ctx, s.inference.keep_alive) == (8, 8192, 5400.0)


def test_zero_means_automatic_for_num_parallel_and_context_length(tmp_path):
    s = load_text(
        tmp_path, "inference:\n  max_concurrent: 2\n", {"OLLAMA_NUM_PARALLEL": "0", "OLLAMA_CONTEXT_LENGTH": "0"}
    )
    assert (s.inference.max_concurrent, s.inference.num_ctx) == (2, 4096)


def test_unset_flags_do_not_override(tmp_path):
    assert load_text(tmp_path, "api:\n  port: 1111\n", port=None).api.port == 1111


def test_cluster_flags_and_bootstrap():
    s = load_settings(
        None, {}, {"nnodes": 3, "node-rank": 2, "bootstrap": "/ip4/10.0.0.1/tcp/4001", "tp_weights": "2,1,1"}
    )
    c = s.cluster
    assert (c.nnodes, c.node_rank, c.rendezvous_addr, c.rendezvous_port, c.world_size) == (3, 2, "10.0.0.1", 4001, 3)
    assert s.inference.tp_weights == (2.0, 1.0, 1.0)
    launch = c.launch_cluster()
    assert (launch.master_addr, launch.master_port, launch.world_size) == ("10.0.0.1", 4001, 3)
    with pytest.raises(ConfigError, match="--bootstrap"):
        load_settings(None, {}, {"bootstrap": "10.0.0.1:4001", "master_port": 1})


def test_unknown_flag_suggests_the_close_name():
    with pytest.raises(ConfigError, match=r"unknown setting 'node_rnak'; did you mean node_rank\?"):
        load_settings(None, {}, {"node_rnak": 1})


def test_every_flag_names_a_key():
    for name in FLAGS:
        load_settings(None, {}, {name: None})  # no error: the alias resolves


# ---- unknown keys and wrong values ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("apii:\n  port: 1\n", r"unknown key apii; did you mean api\?"),
        ("api:\n  prot: 1\n", r"unknown key api\.prot; did you mean api\.port\?"),
        ("cluster:\n  nnode: 2\n", r"unknown key cluster\.nnode; did you mean cluster\.nnodes\?"),
        (
            "cluster:\n  discovery:\n    enable: true\n",
            r"cluster\.discovery\.enable; did you mean cluster\.discovery\.enabled",
        ),
        ("p2p:\n  prt: 4001\n", r"unknown key p2p\.prt; did you mean p2p\.port\?"),
        ("inference:\n  max_concurent: 2\n", r"inference\.max_concurent; did you mean inference\.max_concurrent\?"),
        (
            "inference:\n  partitioning:\n    strategie: tensor\n",
            r"inference\.partitioning\.strategie; did you mean inference\.partitioning\.strategy\?",
        ),
        ("models:\n  storage: /x\n", r"unknown key models\.storage; did you mean models\.storage_path\?"),
        (
            "performance:\n  caching:\n    sizes: 1GB\n",
            r"performance\.caching\.sizes; did you mean performance\.caching\.size\?",
        ),
        (
            "inference:\n  port: 1\n",
            r"unknown key inference\.port; did you mean api\.port\?",
        ),
        (
            "models:\n  zzz: 1\n",
            r"unknown key models\.zzz; expected one of: allow_server_paths, extra_stores, replication, storage_path",
        ),
    ],
)
def test_unknown_keys_are_errors_naming_the_key(tmp_path, text, message):
    with pytest.raises(ConfigError, match=message) as e:
        load_text(tmp_path, text)
    assert str(tmp_path / "config.yaml") in str(e.value)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("api:\n  port: '80x'\n", r"api\.port = '80x' \(in .*\) is invalid: expected an integer 0\.\.65535"),
        ("api:\n  port: 70000\n", r"api\.port = 70000 .* expected an integer 0\.\.65535"),
        ("api:\n  port: true\n", r"api\.port = True .* expected an integer"),
        ("api:\n  port: 8080.5\n", r"api\.port = 8080\.5 .* expected an integer"),
        ("api:\n  origins: chrome-extension://*\n", r"api\.origins = 'chrome-extension://\*' .* expected a list"),
        ("api:\n  max_body_bytes: lots\n", r"api\.max_body_bytes = 'lots' .* expected a size such as"),
        ("cluster:\n  nnodes: 0\n", r"cluster\.nnodes = 0 .* expected an integer >= 1"),
        ("cluster:\n  comm: mpi\n", r'cluster\.comm = \'mpi\' .* expected one of "auto", "shm", "tcp", "gloo", "nccl"'),
        ("cluster:\n  join_timeout: 0\n", r"cluster\.join_timeout = 0 .* expected a duration .* > 0s"),
        (
            "cluster:\n  discovery:\n    enabled: 'yes'\n",
            r"cluster\.discovery\.enabled = 'yes' .* expected true or false",
        ),
        ("inference:\n  timeout: 5 minutes\n", r"inference\.timeout = '5 minutes' .* expected a duration such as"),
        ("inference:\n  timeout: -1s\n", r"inference\.timeout = '-1s' .* >= 0s"),
        (
            "inference:\n  dtype: fp8\n",
            r'inference\.dtype = \'fp8\' .* expected one of "auto", "float32", "bfloat16", "float16"',
        ),
        (
            "inference:\n  quant: int3\n",
            r'inference\.quant = \'int3\' .* expected one of "none", "int8", "int4", "auto"',
        ),
        ("inference:\n  tp_weights: [1, -1]\n", r"inference\.tp_weights = \[1, -1\] .* positive numbers"),
        ("inference: 5\n", r"section inference must be a mapping of keys, got 5"),
        ("models:\n  storage_path: 5\n", r"models\.storage_path = 5 .* expected a directory path"),
        (
            "performance:\n  compression:\n    algorithm: zstd\n",
            r"compression\.algorithm = 'zstd' .* expected one of \"gzip\"",
        ),
        ("p2p:\n  port: 99999\n", r"cluster\.rendezvous_port = 99999 \(p2p\.port in .*\) is invalid"),
        ("- a\n- b\n", r"the top level must be a mapping"),
        ("api:\n  port: 1\n  port: 2\n", r"key 'port' appears twice \(line 3\)"),
        ("api: [\n", r"is not valid YAML"),
    ],
)
def test_wrong_values_name_the_key_value_and_expectation(tmp_path, text, message):
    with pytest.raises(ConfigError, match=message):
        load_text(tmp_path, text)


def test_errors_from_env_and_flags_say_where_the_value_came_from():
    with pytest.raises(ConfigError, match=r"inference\.max_concurrent = 'many' \(from OLLAMA_NUM_PARALLEL\)"):
        load_settings(None, {"OLLAMA_NUM_PARALLEL": "many"}, {})
    with pytest.raises(ConfigError, match=r"inference\.keep_alive = '5 min' \(from OLLAMA_KEEP_ALIVE\)"):
        load_settings(None, {"OLLAMA_KEEP_ALIVE": "5 min"}, {})
    with pytest.raises(ConfigError, match=r"cluster\.node_rank = 3 \(from --node-rank\) is invalid: expected 0\.\.2"):
        load_settings(None, {}, {"nnodes": 3, "node-rank": 3})
    with pytest.raises(ConfigError, match=r"api\.port = 'x' \(from flag api\.port\)"):
        load_settings(None, {}, {"api.port": "x"})


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        ({"tp_weights": "2,1"}, r"inference\.tp_weights = .* one weight per rank: 3 .* got 2"),
        ({"inference.num_ctx": 9000, "inference.max_num_ctx": 8192}, r"inference\.num_ctx = 9000 .* at most"),
        ({"cluster.rendezvous_port": 0}, r"cluster\.rendezvous_port = 0 .* 3 nodes need a fixed port"),
        ({"inference.partitioning.max_partitions": 2}, r"max_partitions = 2 .* the cluster has 3 ranks"),
        ({"inference.max_num_predict": 0}, r"inference\.max_num_predict = 0 .* expected -1"),
        (
            {"models.replication.min_replicas": 3, "models.replication.max_replicas": 1},
            r"min_replicas = 3 .* at most max_replicas = 1",
        ),
        ({"replicas": 2}, r"min_replicas = 2 \(from --replicas\) .* cluster\.nnodes = 3; expected 1 replica"),
    ],
)
def test_rules_between_keys(flags, message):
    with pytest.raises(ConfigError, match=message):
        load_settings(None, {}, {"nnodes": 3, **flags})


def test_partitioning_strategies_and_stages(tmp_path):
    s = load_text(tmp_path, "cluster:\n  nproc_per_node: 3\ninference:\n  partitioning:\n    strategy: layerwise\n")
    assert s.inference.partitioning.stages(s.cluster.world_size) == 3  # a stage per rank
    s = load_text(tmp_path, "cluster:\n  nproc_per_node: 2\ninference:\n  partitioning:\n    pp: 2\n")
    assert s.inference.partitioning.stages(2) == 2 and s.inference.partitioning.strategy == "tensor"
    s = load_text(tmp_path, "cluster:\n  nproc_per_node: 2\ninference:\n  partitioning:\n    strategy: auto\n")
    assert s.inference.partitioning.stages(2) == 1  # auto decides at each load
    s = load_text(tmp_path, "cluster:\n  nproc_per_node: 4\ninference:\n  partitioning:\n    pp: 2\n")
    assert s.inference.partitioning.stages(4) == 2  # TP 2 inside each of 2 stages
    hybrid = "inference:\n  partitioning:\n    strategy: hybrid\n"
    s = load_text(tmp_path, f"cluster:\n  nnodes: 2\n  nproc_per_node: 2\n  rendezvous_port: 29500\n{hybrid}")
    assert s.inference.partitioning.stages(4, 2) == 2  # a stage per node
    with pytest.raises(ConfigError, match=r"strategy = 'hybrid' .* 2 ranks in 1 stages leaves one of the two out"):
        load_text(tmp_path, f"cluster:\n  nproc_per_node: 2\n{hybrid}")
    with pytest.raises(ConfigError, match="3 ranks cannot form 2 stages"):
        load_text(tmp_path, "cluster:\n  nproc_per_node: 3\ninference:\n  partitioning:\n    pp: 2\n")
    with pytest.raises(ConfigError, match=r"pp_weights .* expected one weight per stage: 2"):
        load_text(
            tmp_path,
            "cluster:\n  nproc_per_node: 2\ninference:\n  partitioning:\n    pp: 2\n    pp_weights: [1, 2, 3]\n",
        )


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match=r"config file .*nope\.yaml"):
        load_settings(tmp_path / "nope.yaml", {}, {})


def test_relative_storage_path_is_relative_to_the_file(tmp_path):
    assert load_text(tmp_path, "models:\n  storage_path: ./models\n").models.storage_path == tmp_path / "models"


def test_p2p_and_cluster_together_are_an_error(tmp_path):
    with pytest.raises(ConfigError, match="p2p is another name for cluster"):
        load_text(tmp_path, "p2p:\n  port: 1\ncluster:\n  nnodes: 1\n")


# ---- admission and replicas ----------------------------------------------------------------------


def test_replicas_and_admission_from_file_env_and_flags(tmp_path):
    text = (
        "inference:\n  max_concurrent: 2\n  max_queue: 8\n  load_balancing:\n    algorithm: round_robin\n"
        "models:\n  replication:\n    min_replicas: 3\n"
    )
    s = load_text(tmp_path, text)
    i, r = s.inference, s.models.replication
    assert (i.max_concurrent, i.max_queue, i.load_balancing.algorithm, r.min_replicas) == (2, 8, "round_robin", 3)
    assert s.notes() == []  # replicas and load balancing are implemented
    assert "replicas: 3 engine group(s) of TP 1, round_robin" in s.describe()
    env = {"OLLAMA_NUM_PARALLEL": "6", "OLLAMA_MAX_QUEUE": "1"}
    s = load_text(tmp_path, text, env)
    assert (s.inference.max_concurrent, s.inference.max_queue) == (6, 1)
    # The serve command's flags, as text: --replicas, --load-balancing, --num-parallel, --max-queue.
    flags = {"replicas": "2", "load_balancing": "least_loaded", "num_parallel": "3", "max_queue": "16"}
    s = load_text(tmp_path, text, env, **flags)
    i, r = s.inference, s.models.replication
    assert (i.max_concurrent, i.max_queue, i.load_balancing.algorithm, r.min_replicas) == (3, 16, "least_loaded", 2)
    assert load_settings(None, {}, {"replicas": 4, "models.replication.max_replicas": 4}).models.replication == (
        dataclasses.replace(Settings().models.replication, min_replicas=4, max_replicas=4)
    )


@pytest.mark.parametrize(
    ("env", "flags", "message"),
    [
        (
            {"OLLAMA_MAX_QUEUE": "0"},
            {},
            r"inference\.max_queue = '0' \(from OLLAMA_MAX_QUEUE\) is invalid: expected an integer >= 1",
        ),
        (
            {"OLLAMA_NUM_PARALLEL": "-2"},
            {},
            r"inference\.max_concurrent = '-2' \(from OLLAMA_NUM_PARALLEL\) is invalid: expected an integer >= 1",
        ),
        (
            {},
            {"replicas": "two"},
            r"models\.replication\.min_replicas = 'two' \(from --replicas\) is invalid: expected an integer >= 1",
        ),
        (
            {},
            {"replicas": 0},
            r"models\.replication\.min_replicas = 0 \(from --replicas\) is invalid: expected an integer >= 1",
        ),
        (
            {},
            {"load_balancing": "random"},
            r"inference\.load_balancing\.algorithm = 'random' \(from --load-balancing\) is invalid: "
            r"expected one of \"least_loaded\", \"round_robin\"",
        ),
        (
            {},
            {"replicas": 2, "inference.load_balancing.enabled": "false"},
            r"inference\.load_balancing\.enabled = false \(from flag inference\.load_balancing\.enabled\) is "
            r"invalid: 2 replicas .* expected true, or 1 replica",
        ),
        (
            {},
            {"replicas": 3, "models.replication.max_replicas": 2},
            r"models\.replication\.min_replicas = 3 \(from --replicas\) is invalid: expected at most max_replicas = 2",
        ),
    ],
)
def test_bad_admission_and_replica_values_name_the_value_and_the_expectation(env, flags, message):
    with pytest.raises(ConfigError, match=message):
        load_settings(None, env, flags)
