"""Settings, resolved once: defaults < YAML file < environment < flags, into a frozen `Settings`.

Every problem is one `ConfigError` naming the dotted key, the value, where the value came from and what
was expected. An unknown key is an error (with the closest known key when it looks like a typo). The
file keeps the sections of the original "distributed Ollama" design (`p2p` is read as `cluster`).
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, cast

import yaml

from tp_ollama.config.kinds import Given, Kind
from tp_ollama.config.settings import Settings, key_schema, leaves, value_kinds
from tp_ollama.config.values import InvalidValue, parse_ollama_host, strip_env
from tp_ollama.errors import ConfigError
from tp_ollama.launch import parse_bootstrap

# Environment variables (Ollama's names) and the keys they set. OLLAMA_HOST sets host and port.
ENV_VARS: dict[str, tuple[str, ...]] = {
    "OLLAMA_HOST": ("api.host", "api.port"),
    "OLLAMA_ORIGINS": ("api.origins",),
    "OLLAMA_MODELS": ("models.storage_path",),
    "OLLAMA_KEEP_ALIVE": ("inference.keep_alive",),
    "OLLAMA_NUM_PARALLEL": ("inference.max_concurrent",),
    "OLLAMA_MAX_QUEUE": ("inference.max_queue",),
    "OLLAMA_CONTEXT_LENGTH": ("inference.num_ctx",),
}
# Upstream reads 0 in these as "automatic": here that is the configured value.
_ENV_ZERO_IS_UNSET = ("OLLAMA_NUM_PARALLEL", "OLLAMA_CONTEXT_LENGTH")

# Flag names (as the CLI spells its options, `-` or `_`) and the keys they set. Any dotted key
# ("api.port") is a flag too. `bootstrap` (HOST:PORT or /ip4/A.B.C.D/tcp/PORT) sets the rendezvous
# address and port.
FLAGS: dict[str, str] = {
    "host": "api.host",
    "port": "api.port",
    "origins": "api.origins",
    "nnodes": "cluster.nnodes",
    "node_rank": "cluster.node_rank",
    "nproc_per_node": "cluster.nproc_per_node",
    "tp": "cluster.nproc_per_node",
    "master_addr": "cluster.rendezvous_addr",
    "master_port": "cluster.rendezvous_port",
    "join_timeout": "cluster.join_timeout",
    "comm": "cluster.comm",
    "num_parallel": "inference.max_concurrent",
    "max_queue": "inference.max_queue",
    "load_balancing": "inference.load_balancing.algorithm",
    "replicas": "models.replication.min_replicas",
    "keep_alive": "inference.keep_alive",
    "num_ctx": "inference.num_ctx",
    "tp_weights": "inference.tp_weights",
    "pp": "inference.partitioning.pp",
    "strategy": "inference.partitioning.strategy",
    "memory_budget": "inference.partitioning.memory_budget",
    "pp_weights": "inference.partitioning.pp_weights",
    "dtype": "inference.dtype",
    "quant": "inference.quant",
    "device": "inference.device",
    "models": "models.storage_path",
    "extra_stores": "models.extra_stores",
}

_SECTION_ALIASES = {"p2p": "cluster"}  # the original design's name for the cluster section
_KEY_ALIASES = {"p2p.port": "rendezvous_port"}


def _suggest(section: str, written: str, key: str) -> str:
    """`did you mean X?` for a typo within the section, or the same name in another section."""
    schema = key_schema()
    siblings = [k.rsplit(".", 1)[-1] for k in schema if k.rpartition(".")[0] == section]
    siblings += [k.rpartition(".")[2] for k in _KEY_ALIASES if k.rpartition(".")[0] == written]
    if section == "":
        siblings += list(_SECTION_ALIASES)
    close = difflib.get_close_matches(key, siblings, n=1, cutoff=0.6)
    if close:
        return f"; did you mean {written + '.' if written else ''}{close[0]}?"
    elsewhere = [k for k in schema if k.rsplit(".", 1)[-1] == key]
    if elsewhere:
        return f"; did you mean {' or '.join(elsewhere)}?"
    return f"; expected one of: {', '.join(sorted(siblings))}"


class _UniqueKeyLoader(yaml.SafeLoader):
    """Safe YAML that refuses a key given twice in one mapping (the second would silently win)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, str) and key in seen:
                raise ConfigError(f"key {key!r} appears twice (line {key_node.start_mark.line + 1})")
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _read_file(path: Path) -> dict[str, Given]:
    try:
        tree = yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)
    except OSError as e:
        raise ConfigError(f"config file {path}: {e.strerror or e}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {' '.join(str(e).split())}") from None
    except ConfigError as e:
        raise ConfigError(f"config file {path}: {e}") from None
    given: dict[str, Given] = {}
    _walk(tree, "", "", path, given)
    return given


def _walk(tree: Any, section: str, written: str, path: Path, given: dict[str, Given]) -> None:
    schema = key_schema()
    if tree is None:
        return
    if not isinstance(tree, dict):
        what = f"section {written}" if written else "the top level"
        raise ConfigError(f"config file {path}: {what} must be a mapping of keys, got {tree!r}")
    if section == "" and "p2p" in tree and "cluster" in tree:
        raise ConfigError(f"config file {path}: p2p is another name for cluster; give one of them")
    for key, value in tree.items():
        where = f"{written}.{key}" if written else str(key)
        name = _KEY_ALIASES.get(where, _SECTION_ALIASES.get(key, key) if section == "" else key)
        dotted = f"{section}.{name}" if section else str(name)
        if not isinstance(key, str) or dotted not in schema:
            raise ConfigError(f"config file {path}: unknown key {where}{_suggest(section, written, str(key))}")
        if isinstance(schema[dotted], Kind):
            origin = f"in {path}" if where == dotted else f"{where} in {path}"
            given[dotted] = Given(value, origin, base=path.parent)
        else:
            _walk(value, dotted, where, path, given)


def _read_env(env: Mapping[str, str]) -> dict[str, Given]:
    given: dict[str, Given] = {}
    for var, keys in ENV_VARS.items():
        value = strip_env(env.get(var, ""))
        if not value or (var in _ENV_ZERO_IS_UNSET and value == "0"):
            continue
        if var == "OLLAMA_HOST":
            parsed = parse_ollama_host(value)
            given["api.host"] = Given(parsed.host, f"from {var}", text=True)
            given["api.port"] = Given(parsed.port, f"from {var}", text=True)
        else:
            given[keys[0]] = Given(value, f"from {var}", text=True)
    return given


def _read_flags(flags: Mapping[str, Any]) -> dict[str, Given]:
    schema = key_schema()
    given: dict[str, Given] = {}
    for name, value in flags.items():
        if value is None:
            continue
        norm = name.lstrip("-").replace("-", "_")
        flag = f"--{norm.replace('_', '-')}" if "." not in norm else f"flag {norm}"
        if norm == "bootstrap":
            named = {f.lstrip("-").replace("-", "_") for f, v in flags.items() if v is not None}
            if {"master_addr", "master_port"} & named:
                raise ConfigError("--bootstrap sets the rendezvous address and port: give it or --master-addr/port")
            addr, port = parse_bootstrap(str(value))
            given["cluster.rendezvous_addr"] = Given(addr, f"from {flag}", text=True)
            given["cluster.rendezvous_port"] = Given(port, f"from {flag}", text=True)
            continue
        key = FLAGS.get(norm, norm)
        if not isinstance(schema.get(key), Kind):
            close = difflib.get_close_matches(norm, [*FLAGS, *value_kinds(), "bootstrap"], n=1, cutoff=0.6)
            hint = f"; did you mean {close[0]}?" if close else "; expected a name in FLAGS or a dotted key"
            raise ConfigError(f"unknown setting {name!r}{hint}")
        given[key] = Given(value, f"from {flag}", text=True)
    return given


def _build(cls: type, prefix: str, given: Mapping[str, Given]) -> Any:
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        key = prefix + f.name
        if "kind" not in f.metadata:
            kwargs[f.name] = _build(cast(type, f.default_factory), key + ".", given)
        elif key in given:
            g = given[key]
            try:
                kwargs[f.name] = f.metadata["kind"].parse(g)
            except InvalidValue as e:
                raise ConfigError(f"{key} = {g.value!r} ({g.origin}) {e.reason}") from None
    return cls(**kwargs)


def _check(s: Settings, given: Mapping[str, Given]) -> None:
    """Rules between keys, checked once everything is parsed."""

    def bad(key: str, rule: str) -> ConfigError:
        value = dict(leaves(s))[key]
        origin = given[key].origin if key in given else "default"
        return ConfigError(f"{key} = {value_kinds()[key].show(value)} ({origin}) is invalid: {rule}")

    c, i, r = s.cluster, s.inference, s.models.replication
    if c.node_rank >= c.nnodes:
        raise bad("cluster.node_rank", f"expected 0..{c.nnodes - 1} for cluster.nnodes = {c.nnodes}")
    if c.nnodes > 1 and c.rendezvous_port == 0:
        raise bad("cluster.rendezvous_port", f"{c.nnodes} nodes need a fixed port, the same on every node")
    if i.tp_weights and len(i.tp_weights) != c.world_size:
        raise bad(
            "inference.tp_weights",
            f"expected one weight per rank: {c.world_size} (cluster.nnodes {c.nnodes} x nproc_per_node "
            f"{c.nproc_per_node}), got {len(i.tp_weights)}",
        )
    stages = i.partitioning.stages(c.world_size, c.nnodes)
    if c.world_size % stages:
        raise bad("inference.partitioning.pp", f"{c.world_size} ranks cannot form {stages} stages (ranks = tp x pp)")
    if i.partitioning.strategy == "hybrid" and (stages == 1 or stages == c.world_size):
        raise bad(
            "inference.partitioning.strategy",
            f"hybrid is TP inside pipeline stages, but {c.world_size} ranks in {stages} stages leaves "
            "one of the two out: give pp (or several nodes, a stage each) with more ranks than stages",
        )
    if i.partitioning.pp_weights and len(i.partitioning.pp_weights) != stages:
        raise bad("inference.partitioning.pp_weights", f"expected one weight per stage: {stages}")
    if 0 < i.partitioning.max_partitions < c.world_size:
        raise bad("inference.partitioning.max_partitions", f"the cluster has {c.world_size} ranks, more than this")
    if i.num_ctx > i.max_num_ctx:
        raise bad("inference.num_ctx", f"expected at most inference.max_num_ctx = {i.max_num_ctx}")
    if i.max_num_predict == 0:
        raise bad("inference.max_num_predict", "expected -1 (no bound) or a positive number of tokens")
    if 0 < r.max_replicas < r.min_replicas:
        raise bad("models.replication.min_replicas", f"expected at most max_replicas = {r.max_replicas}")
    if r.min_replicas > 1 and c.nnodes > 1:
        raise bad(
            "models.replication.min_replicas",
            f"replicas run on one node (each an engine group of its own), but cluster.nnodes = {c.nnodes}; "
            "expected 1 replica, or cluster.nnodes = 1",
        )
    if r.min_replicas > 1 and not i.load_balancing.enabled:
        raise bad(
            "inference.load_balancing.enabled",
            f"{r.min_replicas} replicas (models.replication.min_replicas) need requests spread over them: "
            "expected true, or 1 replica",
        )


def load_settings(config_path: Path | None, env: Mapping[str, str], flags: Mapping[str, Any]) -> Settings:
    """Defaults < YAML file < environment (ENV_VARS) < flags (FLAGS names or dotted keys), checked once.

    A flag whose value is None is not given (a CLI option left unset).
    """
    given = _read_file(config_path) if config_path is not None else {}
    given.update(_read_env(env))
    given.update(_read_flags(flags))
    settings: Settings = _build(Settings, "", given)
    _check(settings, given)
    return settings
