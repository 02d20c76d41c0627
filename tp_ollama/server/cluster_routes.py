"""Observability routes: the /api/distributed/* endpoints kept from the "distributed Ollama" design
(spec/config-and-cluster.md), mapped onto the engine's tensor-parallel groups (one per replica; each
rank names its `replica`), and Prometheus' GET /metrics.

Engine facts come from Engine.cluster() (answered from a snapshot while a request holds the group,
so these answer promptly during a generation) and Engine.loaded(); request facts from the Monitor.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from tp_ollama.engine.protocol import WEIGHT_FACTS
from tp_ollama.errors import EngineUnavailable
from tp_ollama.server.engine_api import LoadedModel
from tp_ollama.server.schemas import json_response
from tp_ollama.server.text_service import TextService

log = logging.getLogger(__name__)

CLUSTER_TIMEOUT_S = 2.0

# TPLayout.describe() keys -> the names these endpoints use for each split.
SHARE_NAMES = {
    "q_heads": "attention_heads",
    "kv_heads": "kv_heads",
    "mlp_rows": "mlp_columns",
    "vocab_rows": "vocab_rows",
}


def loaded_name(service: TextService) -> str | None:
    """The display name of the model on the engine, or None."""
    running = service.scheduler.running()
    return str(running[0]["name"]) if running else None


async def cluster_facts(service: TextService) -> dict[str, Any]:
    """Engine.cluster(), given CLUSTER_TIMEOUT_S to answer. Shielded: a remote engine's call cut short
    would leave its reply on the socket for the next call."""
    try:
        return await asyncio.wait_for(asyncio.shield(service.engine.cluster()), CLUSTER_TIMEOUT_S)
    except TimeoutError:
        raise EngineUnavailable(f"the engine did not answer within {CLUSTER_TIMEOUT_S:g} s") from None


def share(entry: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """One rank's layout entry as its share of each split: spans [start, end) with their counts."""
    if entry is None:
        return None
    out: dict[str, Any] = {}
    for key, value in entry.items():
        if key in ("rank", "device") or key in WEIGHT_FACTS:
            continue
        name = SHARE_NAMES.get(key)
        if name is not None and isinstance(value, list | tuple) and len(value) == 2:
            start, end = int(value[0]), int(value[1])
            out[name] = {"start": start, "end": end, "count": end - start}
        else:
            out[key] = value
    return out


def _layout_by_rank(loaded: LoadedModel | None) -> dict[int, Mapping[str, Any]]:
    return {int(entry["rank"]): entry for entry in loaded.layout} if loaded is not None else {}


def _device_kind(device: object) -> str:
    return str(device).split(":", 1)[0]


def nodes_view(facts: Mapping[str, Any], loaded: LoadedModel | None) -> list[dict[str, Any]]:
    """Ranks grouped by host, with each host's memory and each rank's memory and share."""
    layout = _layout_by_rank(loaded)
    hosts: dict[str, list[Mapping[str, Any]]] = {}
    for rank in sorted(facts["ranks"], key=lambda r: (int(r.get("replica", 0)), int(r["rank"]))):
        hosts.setdefault(str(rank["host"]), []).append(rank)
    nodes = []
    for host, ranks in hosts.items():
        total = int(ranks[0].get("mem_total_bytes", 0))
        free = int(ranks[0].get("mem_available_bytes", 0))
        memory: dict[str, int] = {"used_bytes": total - free, "free_bytes": free, "total_bytes": total}
        on_device = [r for r in ranks if int(r.get("device_mem_total_bytes") or 0) > 0]
        if on_device:
            memory["device_used_bytes"] = sum(int(r["device_mem_used_bytes"]) for r in on_device)
            memory["device_total_bytes"] = sum(int(r["device_mem_total_bytes"]) for r in on_device)
        entries = []
        for r in ranks:
            rank_memory = {"rss_bytes": int(r.get("rss_bytes", 0))}
            if r in on_device:
                rank_memory["device_used_bytes"] = int(r["device_mem_used_bytes"])
                rank_memory["device_total_bytes"] = int(r["device_mem_total_bytes"])
            entries.append(
                {
                    "rank": int(r["rank"]),
                    "replica": int(r.get("replica", 0)),
                    "pid": r.get("pid"),
                    "device": r.get("device"),
                    "alive": bool(r.get("alive")),
                    "memory": rank_memory,
                    "share": share(layout.get(int(r["rank"]))),
                }
            )
        nodes.append(
            {
                "host": host,
                "device": ",".join(sorted({_device_kind(r.get("device")) for r in ranks})),
                "memory": memory,
                "ranks": entries,
            }
        )
    return nodes


def model_view(service: TextService, loaded: LoadedModel, hosts: Mapping[int, str]) -> dict[str, Any]:
    layout = _layout_by_rank(loaded)
    ranks = []
    for r in range(loaded.world_size):
        entry = layout.get(r, {})
        weights = {k.removesuffix("_from") if k == "weights_from" else k: entry[k] for k in WEIGHT_FACTS if k in entry}
        ranks.append({"rank": r, "host": hosts.get(r), "device": entry.get("device"), **(share(entry) or {}),
                      "weights": weights})  # fmt: skip
    return {
        "name": loaded_name(service) or loaded.path.name,
        "path": str(loaded.path),
        "format": "safetensors" if loaded.path.is_dir() else "gguf",
        "dtype": loaded.dtype,
        "quant": loaded.quant,
        "precision": loaded.precision,
        "num_ctx": loaded.num_ctx,
        "size": loaded.size_bytes,
        "parallelism": {
            "strategy": "tensor",
            "degree": loaded.world_size,
            # Relative share per rank (--tp-weights); an even split when the layout names none.
            "weights": [float(layout.get(r, {}).get("weight", 1.0)) for r in range(loaded.world_size)],
        },
        "layout": ranks,  # the same in every replica
        "replicas": len(service.engine),
        # The model's files, and what node 0 sent of each to nodes that lack them (their ranks' slices).
        "files": [
            {"name": name or loaded.path.name, "digest": digest, "size": size} for name, digest, size in loaded.files
        ],
        "sent": service.engine.files_sent(),
    }


def routes(service: TextService, version: str) -> list[Route]:
    monitor = service.monitor

    async def status(request: Request) -> Response:
        loaded = service.engine.loaded()
        error = None
        try:
            facts = await cluster_facts(service)
        except Exception as e:  # the status route reports a broken group rather than failing
            log.warning("engine cluster() failed: %s", e)
            error = str(e) or type(e).__name__
            world_size = loaded.world_size * len(service.engine) if loaded else 0
            facts = {"world_size": world_size, "ranks": []}
        ranks = [
            {"rank": r["rank"], "replica": int(r.get("replica", 0)), "host": r["host"], "pid": r["pid"],
             "device": r["device"], "alive": bool(r["alive"])}
            for r in facts["ranks"]
        ]  # fmt: skip
        # Each replica's load: requests running there now and routed there in all.
        replicas = facts.get("replicas") or [{**s, "alive": False} for s in service.engine.stats()]
        scheduler = service.scheduler
        membership = service.engine.membership()
        body: dict[str, Any] = {
            "state": membership["state"],
            "world_size": facts["world_size"],
            "configured_world_size": sum(int(v.get("configured_world_size", 0)) for v in membership["replicas"]),
            "nodes": len({r["host"] for r in ranks}),
            "ranks": ranks,
            "replicas": replicas,
            "admission": {
                "running": scheduler.active,
                "capacity": scheduler.capacity,
                "waiting": scheduler.waiting,
                "max_queue": service.limits.max_queue,
            },
            "healthy": error is None
            and membership["state"] == "healthy"
            and len(ranks) == facts["world_size"]
            and all(r["alive"] for r in ranks)
            and all(r.get("alive", True) for r in replicas),
            "membership": membership,
            "uptime_seconds": monitor.uptime_seconds(),
            "version": version,
            "model": loaded_name(service),
        }
        if error is not None:
            body["error"] = error
        return json_response(body)

    async def nodes(request: Request) -> Response:
        facts = await cluster_facts(service)
        return json_response({"world_size": facts["world_size"], "nodes": nodes_view(facts, service.engine.loaded())})

    async def models(request: Request) -> Response:
        # `sent` (bytes node 0 sent each node of each file) grows while a load streams slices, before
        # the model is listed.
        loaded = service.engine.loaded()
        if loaded is None:
            return json_response({"models": [], "sent": service.engine.files_sent()})
        try:
            facts = await cluster_facts(service)
            hosts = {int(r["rank"]): str(r["host"]) for r in facts["ranks"]}
        except Exception as e:  # hosts are a detail here; the split is known without them
            log.warning("engine cluster() failed: %s", e)
            hosts = {}
        return json_response({"models": [model_view(service, loaded, hosts)], "sent": service.engine.files_sent()})

    async def refresh_engine_facts() -> None:
        try:
            monitor.engine_facts(await cluster_facts(service))
        except Exception as e:  # the request counters are worth answering with on their own
            log.warning("engine cluster() failed: %s", e)

    async def metrics(request: Request) -> Response:
        await refresh_engine_facts()
        return json_response(monitor.snapshot())

    async def requests(request: Request) -> Response:
        return json_response({"requests": monitor.active()})

    async def events(request: Request) -> Response:
        """Membership events, oldest first: nodes joined, left and rejoined, failures detected,
        groups formed, requests replayed, recoveries and their seconds."""
        membership = service.engine.membership()
        return json_response({"events": service.engine.events(), "counters": membership["counters"]})

    async def prometheus(request: Request) -> Response:
        await refresh_engine_facts()
        return Response(monitor.exposition(), media_type=CONTENT_TYPE_LATEST)

    return [
        Route("/api/distributed/status", status, methods=["GET"]),
        Route("/api/distributed/nodes", nodes, methods=["GET"]),
        Route("/api/distributed/models", models, methods=["GET"]),
        Route("/api/distributed/metrics", metrics, methods=["GET"]),
        Route("/api/distributed/requests", requests, methods=["GET"]),
        Route("/api/distributed/events", events, methods=["GET"]),
        Route("/metrics", prometheus, methods=["GET"]),
    ]
