"""The serving loop of an engine group. Every rank runs `serve_loop`; rank 0 also talks to the front
end over a socket and decides each step: it broadcasts one `tick` per step (the control commands to
run, then the batch's plan), every rank applies it, and rank 0 streams the tokens back. Requests
join and leave the running batch at every step (engine/batch.py).

Wire format on the socket: one JSON object per line, every one tagged with the request's "id".
  front end -> rank 0: {"op": "generate", "id", "ids", "options", "eos", "format"} | {"op": "cancel", "id"}
                       | {"op": "load" | "unload" | "embed" | "cluster" | "shutdown", "id", ...}
  rank 0 -> front end: {"id", "token": t} ... {"id", "done": true, stats...} | {"id", "error": "..."}
                       | {"id", "ok": true, ...}

A structured-output grammar runs on rank 0 only; its bitmask of allowed tokens is broadcast at the
step that samples for that request and every rank masks its own vocabulary slice. The same loop
serves a group of one inside the front-end process (LocalEngine), over a socket pair.
"""

from __future__ import annotations

import json
import logging
import os
import select
import socket
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from tp_ollama.checkpoints.quantize import describe_precision, precision_line
from tp_ollama.engine.batch import Batch, Plan, Planner, Request
from tp_ollama.engine.constraint import Grammar, GrammarVocabulary, LocalConstraint, ShardedConstraint, vocabulary_for
from tp_ollama.engine.embed import embed_batch
from tp_ollama.engine.options import check_prompt
from tp_ollama.engine.paged_kv import BlockPool
from tp_ollama.errors import TpOllamaError
from tp_ollama.kernels.linear import model_bytes
from tp_ollama.parallel.facts import rank_facts
from tp_ollama.parallel.preflight import link_preflight
from tp_ollama.parallel.worker import load_shard, local_threads, options_from_data, rank_device, sampler_for

log = logging.getLogger(__name__)

IDLE_TICK_S = 1.0  # rank 0 tells idle ranks it is alive this often, well inside the comm timeout
DEFAULT_KV_BYTES = 2 << 30


@dataclass
class RunRecord:
    """What one request did on rank 0, kept for observation (tests, logs)."""

    id: str
    prompt_tokens: int
    eval_count: int = 0
    cancelled: bool = False
    eval_count_at_cancel: int | None = None  # tokens already generated when the cancel arrived
    done_reason: str = ""
    finished: bool = False


@dataclass(frozen=True)
class EngineJob:
    socket_path: str
    comm: str = "auto"
    device: str = "cpu"
    tp_weights: tuple[float, ...] | None = None
    timeout_s: float = 120.0
    debug: bool = False
    max_running: int = 16  # sequences decoding together
    kv_cache_bytes: int = DEFAULT_KV_BYTES  # per rank
    prefix_cache: bool = True


class FrontEndLink:
    """Rank 0's end of the socket: line-delimited JSON, one front end at a time. Listens on a path
    (a separate front-end process), or uses an already connected socket (a socket pair in-process)."""

    def __init__(self, path: str | None = None, conn: socket.socket | None = None) -> None:
        self.server: socket.socket | None = None
        if path is not None:
            Path(path).unlink(missing_ok=True)
            self.server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.server.bind(path)
            os.chmod(path, 0o600)  # the engine takes orders from this user only
            self.server.listen(1)
        self.conn = conn
        self.buffer = b""
        self.lost = False  # set when a front end went away, until the loop has dealt with it

    def poll_all(self, timeout: float) -> list[dict[str, Any]]:
        """Every complete message available, waiting up to `timeout` seconds for the first."""
        if b"\n" not in self.buffer and self._wait(timeout):
            self._read()
        return self._pop_all()

    def _wait(self, timeout: float) -> bool:
        if self.conn is None:
            if self.server is None:
                return False
            ready, _, _ = select.select([self.server], [], [], timeout)
            if not ready:
                return False
            self.conn, _ = self.server.accept()
            timeout = 0
        ready, _, _ = select.select([self.conn], [], [], timeout)
        return bool(ready)

    def _read(self) -> None:
        assert self.conn is not None
        while True:
            try:
                data = self.conn.recv(1 << 20, socket.MSG_DONTWAIT)
            except BlockingIOError:
                return
            except OSError:
                data = b""
            if not data:  # the front end went away; a new one may connect
                self.conn.close()
                self.conn, self.buffer, self.lost = None, b"", True
                return
            self.buffer += data
            if len(data) < 1 << 20:
                return

    def _pop_all(self) -> list[dict[str, Any]]:
        out = []
        while b"\n" in self.buffer:
            line, _, self.buffer = self.buffer.partition(b"\n")
            out.append(dict(json.loads(line)))
        return out

    def send(self, obj: dict[str, Any]) -> None:
        if self.conn is not None:
            try:
                self.conn.sendall(json.dumps(obj).encode() + b"\n")
            except OSError:
                self.conn, self.lost = None, True

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
        if self.server is not None:
            self.server.close()


class SoloComm:
    """The communicator of a group of one: every collective is the identity."""

    rank, world_size, seconds = 0, 1, 0.0

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def all_gather(self, t: torch.Tensor) -> torch.Tensor:
        return t[None]

    def broadcast(self, t: torch.Tensor, src: int = 0) -> torch.Tensor:
        return t

    def broadcast_bytes(self, data: bytes | None, src: int = 0) -> bytes:
        assert data is not None
        return data

    def close(self) -> None:
        pass


class EngineState:
    """What every rank keeps between steps: the loaded shard, its KV pool and the running batch; on
    rank 0 also the planner and the grammars of structured requests."""

    def __init__(self, job: EngineJob, comm: Any) -> None:
        self.job, self.comm = job, comm
        self.model: Any = None
        self.layout: Any = None
        self.loaded: dict[str, Any] | None = None
        self.batch: Batch | None = None
        self.planner: Planner | None = None
        self.vocabulary: GrammarVocabulary | None = None  # rank 0, built on the first structured request
        self.grammars: dict[str, Grammar] = {}  # rank 0
        self.records: dict[str, RunRecord] = {}  # rank 0, every request since start, in arrival order

    # --- control commands (every rank) -------------------------------------------------------------

    def load(self, cmd: dict[str, Any]) -> dict[str, Any]:
        key = {"path": cmd["path"], "dtype": cmd["dtype"], "num_ctx": cmd["num_ctx"], "quant": cmd.get("quant", "none")}
        if self.loaded is not None and {k: self.loaded[k] for k in key} == key:
            return self.loaded
        self.unload()
        t0 = time.perf_counter()
        world = self.comm.world_size
        model, layout, _ = load_shard(
            Path(cmd["path"]), self.comm, cmd["dtype"], self.job.device, self.job.tp_weights, key["quant"]
        )
        pool = BlockPool.for_model(model, self.job.kv_cache_bytes, prefix_cache=self.job.prefix_cache)
        # Block ids are shared by every rank's plan: each rank's pool must have as many as the smallest.
        fewest = int(self.comm.all_gather(torch.tensor([pool.num_blocks], dtype=torch.int64)).min())
        if fewest < pool.num_blocks:
            budget = fewest * pool.bytes_per_block()
            pool = BlockPool.for_model(model, budget, prefix_cache=self.job.prefix_cache)
        self.model, self.layout = model, layout
        self.batch = Batch(model, pool, sampler_for(layout, self.comm), self._constraint, self.comm)
        if self.comm.rank == 0:
            self.planner = Planner(pool, self.job.max_running)
        size = model_bytes(model)
        described = [{**entry, "device": self.job.device} for entry in layout.describe()]
        precision = describe_precision(model)
        warning = link_preflight(self.comm, model)
        if self.comm.rank == 0:
            log.warning("loaded %s: %s", cmd["path"], precision_line(precision))
        if warning is not None:
            log.warning("%s", warning)
        self.loaded = {**key, "world_size": world, "layout": described, "size_bytes": size * world,
                       "precision": precision,
                       "load_seconds": time.perf_counter() - t0, "kv_blocks": pool.num_blocks,
                       "kv_block_size": pool.block_size}  # fmt: skip
        return self.loaded

    def unload(self) -> None:
        self.model = self.layout = self.loaded = self.batch = self.planner = self.vocabulary = None
        self.grammars.clear()

    def embed(self, cmd: dict[str, Any]) -> dict[str, Any]:
        if self.model is None:
            raise TpOllamaError("no model is loaded")
        vectors = embed_batch(self.model, cmd["inputs"])
        return {"embeddings": vectors.tolist() if self.comm.rank == 0 else []}

    def cluster(self) -> dict[str, Any]:
        """Every rank's facts, collected on rank 0 (one small broadcast from each rank)."""
        mine = json.dumps(rank_facts(self.comm.rank, rank_device(self.job.device))).encode()
        ranks = [json.loads(self.comm.broadcast_bytes(mine if r == self.comm.rank else None, src=r))
                 for r in range(self.comm.world_size)]  # fmt: skip
        facts: dict[str, Any] = {"world_size": self.comm.world_size, "ranks": ranks, "as_of": time.time()}
        if self.batch is not None:
            facts["kv_cache"] = self.batch.pool.stats()
            facts["running"] = len(self.batch.running)
            facts["waiting"] = len(self.planner.waiting) if self.planner is not None else 0
        return facts

    # --- requests (rank 0) -------------------------------------------------------------------------

    def admit(self, cmd: dict[str, Any]) -> Request:
        """Check a generate request and queue it; TpOllamaError (sent back to its caller) if it cannot run."""
        if self.model is None or self.planner is None:
            raise TpOllamaError("no model is loaded")
        options = options_from_data(cmd["options"])
        check_prompt(len(cmd["ids"]), options)
        request = Request(cmd["id"], list(cmd["ids"]), options, frozenset(cmd["eos"]), bool(cmd.get("format")))
        blocks = self.planner.need(request)
        if blocks > self.batch.pool.num_blocks:  # type: ignore[union-attr]
            raise TpOllamaError(
                f"the request needs {blocks} KV cache blocks ({request.options.num_ctx} tokens of num_ctx) "
                f"but the cache holds {self.batch.pool.num_blocks}: "  # type: ignore[union-attr]
                "lower num_ctx or num_predict, or raise performance.caching.size"
            )
        fmt = cmd.get("format")
        if fmt:
            if self.vocabulary is None:
                self.vocabulary = vocabulary_for(Path(self.loaded["path"]), int(self.model.config.vocab_size))  # type: ignore[index]
            self.grammars[request.id] = Grammar(self.vocabulary, fmt["kind"], fmt.get("schema"))
        self.planner.waiting.append(request)
        self.records[request.id] = RunRecord(request.id, len(request.prompt))
        return request

    def _constraint(self, request: Request) -> Any:
        grammar = self.grammars.pop(request.id, None)
        if self.comm.world_size == 1:
            assert grammar is not None
            return LocalConstraint(grammar)
        span = self.layout.vocab[self.comm.rank]
        return ShardedConstraint(grammar, span, int(self.model.config.vocab_size), self.comm)

    def busy(self) -> bool:
        return self.batch is not None and bool(self.batch.running or (self.planner and self.planner.waiting))


def engine_main(job: EngineJob) -> None:
    """torchrun entry point: serve commands until shutdown."""
    from tp_ollama.parallel.comm import init_distributed, make_comm

    logging.basicConfig(level=logging.DEBUG if job.debug else logging.WARNING, stream=sys.stderr)
    torch.set_num_threads(local_threads(int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))
    init_distributed("nccl" if job.comm == "nccl" else "gloo", job.timeout_s)
    comm = make_comm(job.comm, job.timeout_s)
    link = FrontEndLink(job.socket_path) if comm.rank == 0 else None
    try:
        serve_loop(EngineState(job, comm), link)
    finally:
        comm.close()
        if link is not None:
            link.close()


def serve_loop(state: EngineState, link: FrontEndLink | None) -> None:
    """Run ticks until shutdown. Everything a rank does is inference: one mode for the whole loop, so
    buffers that the communicator caches during a step are never updated outside inference mode."""
    with torch.inference_mode():
        while _tick(state, link):
            pass


def _tick(state: EngineState, link: FrontEndLink | None) -> bool:
    comm = state.comm
    tick: dict[str, Any] | None = None
    if comm.rank == 0:
        assert link is not None
        tick = _decide(state, link)
        if tick is None:
            tick = {"control": [], "plan": None}  # nothing to do: an idle tick keeps the group alive
    data = json.dumps(tick).encode() if comm.rank == 0 else None
    tick = json.loads(comm.broadcast_bytes(data, src=0))
    assert tick is not None
    for cmd in tick["control"]:
        if cmd.get("op") == "shutdown":
            return False
        _run_command(state, cmd, link)
    if tick["plan"] is not None and state.batch is not None:
        events = state.batch.step(_plan_from_data(tick["plan"]))
        if link is not None:
            for event in events:
                record = state.records.get(event.id)
                if event.token is not None:
                    link.send({"id": event.id, "token": event.token})
                    if record is not None:
                        record.eval_count += 1
                if event.done and record is not None:
                    record.finished, record.done_reason = True, str(event.stats.get("done_reason", ""))
                if event.done:
                    link.send({"id": event.id, "done": True, **event.stats})
                    assert state.planner is not None
                    state.planner.finished(event.id)
    return True


def _decide(state: EngineState, link: FrontEndLink) -> dict[str, Any] | None:
    """Rank 0: read the front end, queue and cancel requests, and plan the next step."""
    messages = link.poll_all(0 if state.busy() else IDLE_TICK_S)
    if link.conn is None and link.server is None:  # an in-process front end closed its end
        return {"control": [{"op": "shutdown"}], "plan": None}
    control: list[dict[str, Any]] = []
    cancelled: set[str] = set()
    if link.lost:  # the front end went away: nobody reads these answers any more
        link.lost = False
        if state.batch is not None:
            cancelled |= set(state.batch.running)
        if state.planner is not None:
            cancelled |= {r.id for r in state.planner.waiting}
    for msg in messages:
        op = msg.get("op")
        if op == "generate":
            try:
                state.admit(msg)
            except TpOllamaError as e:
                link.send({"id": msg.get("id"), "error": str(e)})
        elif op == "cancel":
            rid = msg.get("id")
            queued = state.planner is not None and any(r.id == rid for r in state.planner.waiting)
            running = state.batch is not None and rid in state.batch.running
            if queued or running:
                cancelled.add(str(rid))
                record = state.records.get(str(rid))
                if record is not None:
                    record.cancelled, record.finished = True, True
                    record.eval_count_at_cancel = record.eval_count
                link.send({"id": rid, "done": True, "done_reason": "cancel"})
        else:
            if op in ("load", "unload") and state.busy():
                # Only after the front end's scheduler has let every request finish, normally; any
                # left are told why they end.
                for rid in [*state.batch.running, *(r.id for r in state.planner.waiting)]:  # type: ignore[union-attr]
                    link.send({"id": rid, "error": "the model was unloaded while this request was running"})
            control.append(msg)
    plan = None
    if state.planner is not None and state.batch is not None and (state.busy() or cancelled):
        for rid in cancelled:
            state.grammars.pop(rid, None)
        plan = _plan_to_data(state.planner.plan(state.batch, cancelled))
    if not control and plan is None:
        return None
    return {"control": control, "plan": plan}


def _plan_to_data(plan: Plan) -> dict[str, Any]:
    add = [
        {"id": r.id, "prompt": r.prompt, "options": asdict(r.options), "eos": sorted(r.eos), "format": r.constrained}
        for r in plan.add
    ]
    return {
        "add": add,
        "drop": plan.drop,
        "prefill": plan.prefill,
        "decode": plan.decode,
    }


def _plan_from_data(data: dict[str, Any]) -> Plan:
    add = [Request(r["id"], r["prompt"], options_from_data(r["options"]), frozenset(r["eos"]), r["format"])
           for r in data["add"]]  # fmt: skip
    return Plan(add, list(data["drop"]), [(rid, int(n)) for rid, n in data["prefill"]], list(data["decode"]))


def _run_command(state: EngineState, cmd: dict[str, Any], link: FrontEndLink | None) -> None:
    """Run one control command on every rank; rank 0 answers. Errors are agreed on by all ranks first,
    so a failure on one rank (say, a missing file on node 1) is reported instead of hanging the others."""
    op = cmd.get("op")
    rid = cmd.get("id")
    error = ""
    result: dict[str, Any] = {}
    try:
        if op == "load":
            result = state.load(cmd)
        elif op == "unload":
            state.unload()
        elif op == "embed":
            result = state.embed(cmd)
        elif op == "cluster":
            result = state.cluster()
        else:
            raise TpOllamaError(f"unknown engine command {op!r}")
    except TpOllamaError as e:
        error = f"rank {state.comm.rank}: {e}" if state.comm.rank else str(e)
    errors = state.comm.all_gather(torch.tensor([1 if error else 0], dtype=torch.int64))
    if int(errors.sum()):
        messages = json.loads(state.comm.broadcast_bytes(json.dumps([error]).encode(), src=int(errors.argmax())))
        if link is not None:
            link.send({"id": rid, "error": messages[0]})
        if op == "load":
            state.unload()
        return
    if link is not None:
        link.send({"id": rid, "ok": True, **result})
