"""`tp-ollama serve` and node 0 of `tp-ollama launch`: the HTTP front end in this process, the engine
groups (one per replica: torchrun's agent and its ranks) in child process sessions it starts and stops."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
from typing import Any

from tp_ollama import __version__

log = logging.getLogger(__name__)


def build(settings: Any) -> tuple[list[Any], Any]:
    """The engine handles (one EngineClient per replica) and the Starlette app for these settings."""
    from tp_ollama.server.app import create_app
    from tp_ollama.server.engine_client import EngineClient
    from tp_ollama.server.replicas import ReplicaSet
    from tp_ollama.store.model_store import ModelStore

    c, i, a = settings.cluster, settings.inference, settings.api
    ft = i.fault_tolerance
    weights = ",".join(f"{w:g}" for w in i.tp_weights) if i.tp_weights else None
    pp = i.partitioning.stages(c.world_size, c.nnodes)
    pp_weights = ",".join(f"{w:g}" for w in i.partitioning.pp_weights) if i.partitioning.pp_weights else None
    former = coordinator(settings) if c.nnodes > 1 else None
    engines = []
    for index, port in enumerate(master_ports(settings)):
        engine = EngineClient.spawn(
            c.nproc_per_node, comm=c.comm, device=replica_device(i.device, index, c.nproc_per_node),
            tp_weights=weights, join_timeout_s=c.join_timeout,
            nnodes=c.nnodes, master_addr=c.rendezvous_addr, master_port=port, max_running=i.max_concurrent,
            kv_cache_bytes=settings.performance.caching.size, prefix_cache=settings.performance.caching.enabled,
            replays=ft.retry_attempts if ft.enabled else 0, retry_timeout_s=ft.retry_timeout, former=former,
            pp=pp, pp_weights=pp_weights, strategy=i.partitioning.strategy,
            memory_budget=i.partitioning.memory_budget,
        )  # fmt: skip
        engines.append(engine)
    app = create_app(
        ReplicaSet(engines, i.load_balancing.algorithm, slots=i.max_concurrent),
        store=ModelStore(settings.models.storage_path, extra_roots=settings.models.extra_stores),
        allow_server_paths=settings.models.allow_server_paths,
        version=__version__,
        allowed_origins=a.origins,
        max_body_bytes=a.max_body_bytes,
        default_num_ctx=i.num_ctx,
        max_num_ctx=i.max_num_ctx,
        max_num_predict=i.max_num_predict if i.max_num_predict > 0 else 1 << 30,
        keep_alive_s=i.keep_alive,
        dtype=i.dtype,
        quant=i.quant,
        timeout_s=i.timeout,
        bind_host=a.host,
        compression=settings.performance.compression.enabled,
        max_concurrent=i.max_concurrent,
        max_queue=i.max_queue,
    )
    return engines, app


def coordinator(settings: Any) -> Any:
    """Node 0's membership coordinator for a cluster of several nodes, with its shared secret (made
    and saved here when none is configured) in the environment its ranks inherit."""
    from tp_ollama.membership import wire
    from tp_ollama.membership.coordinator import Coordinator

    c, i = settings.cluster, settings.inference
    secret, generated = wire.ensure_secret(c.secret)
    if generated:
        log.warning(
            "generated the cluster secret %s and saved it to %s (readable by you only); start the other nodes "
            "with %s=%s or give them that file", secret, wire.secret_file(), wire.SECRET_ENV, secret,
        )  # fmt: skip
    os.environ[wire.SECRET_ENV] = secret
    template = wire.Form(
        generation=0, nnodes=c.nnodes, node_rank=0, master_addr=c.rendezvous_addr, master_port=0, comm=c.comm,
        join_timeout_s=c.join_timeout, max_running=i.max_concurrent,
        kv_cache_bytes=settings.performance.caching.size, prefix_cache=settings.performance.caching.enabled,
        min_replicas=settings.models.replication.min_replicas, pp=i.partitioning.stages(c.world_size, c.nnodes),
        pp_weights=",".join(f"{w:g}" for w in i.partitioning.pp_weights) or None,
        strategy=i.partitioning.strategy, memory_budget=i.partitioning.memory_budget,
    )  # fmt: skip
    return Coordinator(
        nnodes=c.nnodes, nproc=c.nproc_per_node, master_addr=c.rendezvous_addr, port=c.rendezvous_port,
        secret=secret, detect_timeout_s=i.fault_tolerance.detect_timeout, min_nodes=c.min_nodes,
        retry_timeout_s=i.fault_tolerance.retry_timeout, join_timeout_s=c.join_timeout,
        tp_weights=i.tp_weights or None, form_template=template, reshard=i.fault_tolerance.reshard,
    )  # fmt: skip


def replica_device(device: str, replica: int, ranks_per_replica: int) -> str:
    """Replica r's ranks start at GPU r x ranks (cuda:FIRST), so replicas fill the GPUs in turn
    instead of all starting at GPU 0; CPU stays cpu."""
    return f"cuda:{replica * ranks_per_replica}" if device == "cuda" and replica > 0 else device


def master_ports(settings: Any) -> list[int]:
    """One torchrun rendezvous port per replica. Several nodes share the configured port (one
    replica); replicas on one node each get a free port of their own, all found while every probe
    socket is still open so that no two are the same."""
    c = settings.cluster
    if c.nnodes > 1:
        return [c.rendezvous_port]
    replicas = settings.models.replication.min_replicas
    if replicas == 1:
        return [0]  # the launcher picks a free one
    probes = [socket.socket() for _ in range(replicas)]
    try:
        for probe in probes:
            probe.bind((c.rendezvous_addr, 0))
        return [int(probe.getsockname()[1]) for probe in probes]
    finally:
        for probe in probes:
            probe.close()


async def serve(engines: list[Any], app: Any, settings: Any) -> None:
    import uvicorn

    # uvicorn's loggers go through ours (tp_ollama.logs): its own config would add a second format
    # and reset the levels, the access log among them (every request at INFO).
    config = uvicorn.Config(app, host=settings.api.host, port=settings.api.port, log_config=None, log_level=None)
    server = uvicorn.Server(config)
    formers = {id(e.former): e.former for e in engines if e.former is not None}.values()
    try:
        for former in formers:
            await former.start()
        for engine in engines:
            engine.begin()
        await server.serve()
    finally:
        for engine in engines:
            engine.request_shutdown()  # before any await: uvicorn re-raises Ctrl-C, cancelling this task
        for former in formers:
            former.say_bye()
        await asyncio.gather(*(engine.close() for engine in engines), return_exceptions=True)
        await asyncio.gather(*(former.close() for former in formers), return_exceptions=True)


def _exit_on_sigterm(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


def run(settings: Any, debug: bool = False) -> None:
    # uvicorn handles SIGTERM itself, then restores the previous handler and raises the signal again;
    # with Python's default handler that would kill this process before the engine group is stopped.
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    for note in settings.notes():
        log.warning("%s", note)
    engines, app = build(settings)
    try:
        asyncio.run(serve(engines, app, settings))
    finally:
        for engine in engines:
            engine.terminate(grace_s=20)  # whatever happened above, no rank outlives the front end
            engine.launcher.close()


def serve_cluster(
    cluster: Any, config: str | None, host: str | None, port: int | None, tp_weights: str | None, comm: str,
    device: str, dtype: str, quant: str, num_ctx: int, debug: bool, pp: int = 1, pp_weights: str | None = None,
    strategy: str | None = None,
) -> None:  # fmt: skip
    """launch without a prompt: node 0 runs the front end and its ranks, the others their ranks."""
    from pathlib import Path

    from tp_ollama.config.loading import load_settings

    flags = {
        "host": host, "port": port, "nnodes": cluster.nnodes, "node_rank": cluster.node_rank,
        "nproc_per_node": cluster.nproc_per_node, "master_addr": cluster.master_addr,
        "master_port": cluster.master_port, "join_timeout": cluster.join_timeout_s, "comm": comm,
        "tp_weights": tp_weights, "device": device, "dtype": dtype, "quant": quant, "num_ctx": num_ctx,
        "pp": pp if pp > 1 else None, "pp_weights": pp_weights, "strategy": strategy,
    }  # fmt: skip
    settings = load_settings(Path(config) if config else None, os.environ, flags)
    if cluster.node_rank > 0:
        from tp_ollama.membership import wire
        from tp_ollama.membership.agent import NodeAgent

        signal.signal(signal.SIGTERM, _exit_on_sigterm)  # the agent's ranks are stopped on the way out
        stores = tuple(str(p) for p in (settings.models.storage_path, *settings.models.extra_stores))
        NodeAgent(cluster, wire.configured_secret(settings.cluster.secret), device, stores).run()
        return
    run(settings, debug)
