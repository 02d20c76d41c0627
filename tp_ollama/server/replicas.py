"""Replicas: R independent engine groups (`serve --replicas R`, models.replication.min_replicas) behind
one front end, as one Engine.

Each replica holds the whole model (itself split over its own TP ranks); a request runs on one of them.
`generate` and `embed` go to a replica that holds the model, picked by `algorithm`: "least_loaded"
(the fewest requests running; ties to the lowest index) or "round_robin" (the next one in turn with a
free slot). `load` and `unload` apply to every replica, and `loaded()` names the model only when every
replica holds it, so the scheduler loads it again on a replica that lost it (a group that died is
restarted by its EngineClient on that call). Until then routing passes over such a replica.

The front end always talks to a ReplicaSet (TextService wraps a single engine in one), so the cluster
endpoints describe one replica or several the same way.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

from tp_ollama.engine.options import GenerationOptions
from tp_ollama.engine.protocol import OutputFormat
from tp_ollama.errors import ConfigError
from tp_ollama.server.engine_api import Engine, LoadedModel, LoadRequest, TokenEvent

ALGORITHMS = ("least_loaded", "round_robin")


@dataclass
class Replica:
    """One engine group and what the front end has sent it."""

    index: int
    engine: Engine
    running: int = 0  # requests in the engine now (generate streams open, embeds in flight)
    requests_total: int = 0  # requests routed here since start
    failed_total: int = 0  # of those, how many the engine failed

    def stats(self, ready: bool) -> dict[str, Any]:
        return {
            "replica": self.index,
            "running": self.running,
            "requests_total": self.requests_total,
            "failed_total": self.failed_total,
            "ready": ready,
        }


class ReplicaSet:
    """The Engine protocol over `engines`. `slots`: requests one replica takes at once
    (inference.max_concurrent); round robin passes over a replica that has none free, and the front
    end's scheduler admits `slots` x len(engines) requests, so least_loaded never exceeds it either."""

    def __init__(self, engines: Sequence[Engine], algorithm: str = "least_loaded", slots: int | None = None) -> None:
        if not engines:
            raise ConfigError("a replica set needs at least one engine, got none")
        if algorithm not in ALGORITHMS:
            raise ConfigError(
                f"load balancing algorithm {algorithm!r} is unknown: expected one of {', '.join(ALGORITHMS)}"
            )
        if slots is not None and slots < 1:
            raise ConfigError(f"slots = {slots} is invalid: expected at least 1 request per replica")
        self.replicas = [Replica(i, engine) for i, engine in enumerate(engines)]
        self.algorithm = algorithm
        self.slots = slots
        self._target: LoadRequest | None = None  # the model every replica was last asked to hold
        self._turn = 0  # round robin: the replica to try first next time

    def __len__(self) -> int:
        return len(self.replicas)

    # --- Engine protocol -------------------------------------------------------------------------

    async def load(self, request: LoadRequest) -> LoadedModel:
        """Load on every replica at once; the first failure is raised once all have answered."""
        self._target = request
        results = await asyncio.gather(*(r.engine.load(request) for r in self.replicas), return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                raise result
        first = results[0]
        assert isinstance(first, LoadedModel)
        return first

    async def unload(self) -> None:
        self._target = None
        results = await asyncio.gather(*(r.engine.unload() for r in self.replicas), return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                raise result

    def loaded(self) -> LoadedModel | None:
        """The model, when every replica holds the same one (its LoadedModel describes one replica:
        world_size is the TP degree of each group)."""
        models = [r.engine.loaded() for r in self.replicas]
        first = models[0]
        if first is None or any(m is None or not _same(m, first) for m in models[1:]):
            return None
        return first

    async def generate(
        self,
        prompt: list[int],
        options: GenerationOptions,
        eos_ids: frozenset[int],
        output_format: OutputFormat | None = None,
    ) -> AsyncIterator[TokenEvent]:
        # Runs at the first __anext__: the replica is picked when the request starts, not when its
        # stream is created.
        replica = self._pick()
        replica.running += 1
        replica.requests_total += 1
        events: AsyncIterator[TokenEvent] | None = None
        try:
            events = replica.engine.generate(prompt, options, eos_ids, output_format)
            async for event in events:
                yield event
        except Exception:
            replica.failed_total += 1
            raise
        finally:
            try:
                aclose = getattr(events, "aclose", None)
                if aclose is not None:
                    await aclose()  # closing early cancels the request in that engine
            finally:
                replica.running -= 1

    async def embed(self, inputs: list[list[int]]) -> list[list[float]]:
        replica = self._pick()
        replica.running += 1
        replica.requests_total += 1
        try:
            return await replica.engine.embed(inputs)
        except Exception:
            replica.failed_total += 1
            raise
        finally:
            replica.running -= 1

    async def cluster(self) -> dict[str, Any]:
        """Every replica's ranks, each marked with its `replica`, and a `replicas` list with each one's
        load. A replica that cannot answer shows its error and no ranks; if none can, the first
        error is raised, as a single engine's would be."""
        answers = await asyncio.gather(*(r.engine.cluster() for r in self.replicas), return_exceptions=True)
        failures = [a for a in answers if isinstance(a, BaseException)]
        if len(failures) == len(answers):
            raise failures[0]
        ranks: list[dict[str, Any]] = []
        replicas: list[dict[str, Any]] = []
        world_size, as_of = 0, 0.0
        for replica, answer in zip(self.replicas, answers, strict=True):
            entry = replica.stats(self._ready(replica))
            if isinstance(answer, BaseException):
                entry.update(world_size=0, alive=False, error=str(answer) or type(answer).__name__)
            else:
                mine = [{**rank, "replica": replica.index} for rank in answer.get("ranks", [])]
                ranks += mine
                world_size += int(answer.get("world_size", len(mine)))
                as_of = max(as_of, float(answer.get("as_of", 0.0)))
                alive = len(mine) == int(answer.get("world_size", len(mine))) and all(r.get("alive") for r in mine)
                entry.update(world_size=int(answer.get("world_size", len(mine))), alive=alive)
                if answer.get("kv_cache"):
                    entry["kv_cache"] = answer["kv_cache"]
            replicas.append(entry)
        return {"world_size": world_size, "ranks": ranks, "as_of": as_of, "replicas": replicas}

    async def close(self) -> None:
        await asyncio.gather(*(r.engine.close() for r in self.replicas), return_exceptions=True)

    def membership(self) -> dict[str, Any]:
        """The state of the worst replica's group (recovering, then degraded, then healthy), every
        replica's own, and the failure counters summed over them."""
        views = []
        for r in self.replicas:
            view = getattr(r.engine, "membership", None)
            views.append({"replica": r.index, **(view() if view is not None else {"state": "healthy"})})
        order = ("healthy", "degraded", "recovering")
        state = max((v["state"] for v in views), key=order.index)
        counters: dict[str, float] = {}
        for v in views:
            for key, value in v.get("counters", {}).items():
                counters[key] = counters.get(key, 0) + value
        return {"state": state, "replicas": views, "counters": counters}

    def files_sent(self) -> list[dict[str, Any]]:
        """What node 0 sent of the loaded models' files to each node (tp_ollama.membership.files)."""
        for r in self.replicas:
            former = getattr(r.engine, "former", None)
            if former is not None:
                return list(former.files.report())
        return []

    def events(self) -> list[dict[str, Any]]:
        """Every replica's membership events, oldest first, each naming its replica."""
        out = []
        for r in self.replicas:
            log = getattr(r.engine, "events", None)
            if log is not None:
                out += [{**e, "replica": r.index} for e in log.events]
        return sorted(out, key=lambda e: e["time"])

    # --- routing ---------------------------------------------------------------------------------

    def stats(self) -> list[dict[str, Any]]:
        """Each replica's load and counters, without asking the engines (for /metrics)."""
        return [r.stats(self._ready(r)) for r in self.replicas]

    def _ready(self, replica: Replica) -> bool:
        """Holds the model the set was last asked to load (a group that died holds nothing)."""
        model = replica.engine.loaded()
        target = self._target
        return model is not None and (target is None or (model.path == target.path and model.num_ctx == target.num_ctx))

    def _pick(self) -> Replica:
        # With none ready, any replica: its engine then reports the problem (or restarts its group).
        ready = [r for r in self.replicas if self._ready(r)] or self.replicas
        if self.algorithm == "round_robin":
            n = len(self.replicas)
            order = sorted(ready, key=lambda r: (r.index - self._turn) % n)
            free = [r for r in order if self.slots is None or r.running < self.slots]
            if free:
                self._turn = (free[0].index + 1) % n
                return free[0]
        return min(ready, key=lambda r: (r.running, r.index))


def _same(a: LoadedModel, b: LoadedModel) -> bool:
    return a.path == b.path and a.num_ctx == b.num_ctx and a.dtype == b.dtype and a.quant == b.quant
