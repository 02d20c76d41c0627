"""The serving loop of a tensor-parallel engine group. Every rank runs `engine_main`; rank 0 also
listens on a local socket for the front end and decides each step: it broadcasts each command
(load, generate, unload, stop) to the other ranks, streams generated token ids back, and turns a
cancel from the front end into a lockstep stop, so the whole group leaves the request within one step.

Wire format on the socket: one JSON object per line.
  front end -> rank 0: {"op": "load", "path", "dtype", "num_ctx"} | {"op": "generate", "ids", "options",
                       "eos", "format"} | {"op": "embed", "inputs"} | {"op": "cluster"} | {"op": "cancel"}
                       | {"op": "unload"} | {"op": "shutdown"}
  rank 0 -> front end: {"ok": true, ...} | {"error": "..."} | {"token": t} ... {"done": true, stats...}

A structured-output grammar ("format": {"kind", "schema"}) runs on rank 0 only; its bitmask of
allowed tokens is broadcast each step and every rank masks its own vocabulary slice.
"""

from __future__ import annotations

import json
import logging
import os
import select
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tp_ollama.engine.constraint import Grammar, GrammarVocabulary, LocalConstraint, ShardedConstraint, vocabulary_for
from tp_ollama.engine.embed import embed_batch
from tp_ollama.engine.generate import GenerationStats, check_prompt, generate_tokens
from tp_ollama.errors import TpOllamaError
from tp_ollama.parallel.facts import rank_facts
from tp_ollama.parallel.worker import (
    BroadcastLockstep,
    load_shard,
    local_threads,
    options_from_data,
    rank_device,
    sampler_for,
)

log = logging.getLogger(__name__)

IDLE_TICK_S = 1.0  # rank 0 tells idle ranks it is alive this often, well inside the comm timeout


@dataclass(frozen=True)
class EngineJob:
    socket_path: str
    comm: str = "auto"
    device: str = "cpu"
    tp_weights: tuple[float, ...] | None = None
    timeout_s: float = 120.0
    debug: bool = False


class FrontEndLink:
    """Rank 0's end of the local socket: line-delimited JSON, one front end at a time."""

    def __init__(self, path: str) -> None:
        Path(path).unlink(missing_ok=True)
        self.server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.server.bind(path)
        os.chmod(path, 0o600)  # the engine takes orders from this user only
        self.server.listen(1)
        self.conn: socket.socket | None = None
        self.buffer = b""

    def poll(self, timeout: float) -> dict[str, Any] | None:
        """The next command, or None after `timeout` seconds without one."""
        if b"\n" in self.buffer:
            return self._pop()
        if self.conn is None:
            ready, _, _ = select.select([self.server], [], [], timeout)
            if not ready:
                return None
            self.conn, _ = self.server.accept()
            return self.poll(0)
        ready, _, _ = select.select([self.conn], [], [], timeout)
        if not ready:
            return None
        data = self.conn.recv(1 << 16)
        if not data:  # the front end went away; a new one may connect
            self.conn.close()
            self.conn, self.buffer = None, b""
            return None
        self.buffer += data
        return self._pop() if b"\n" in self.buffer else None

    def _pop(self) -> dict[str, Any]:
        line, _, self.buffer = self.buffer.partition(b"\n")
        return dict(json.loads(line))

    def send(self, obj: dict[str, Any]) -> None:
        if self.conn is not None:
            try:
                self.conn.sendall(json.dumps(obj).encode() + b"\n")
            except OSError:
                self.conn = None

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
        self.server.close()


class CancellableLockstep(BroadcastLockstep):
    """Rank 0 reads the socket before each step: a cancel (or a vanished front end) stops the group."""

    def __init__(self, comm: Any, link: FrontEndLink | None) -> None:
        super().__init__(comm)
        self.link = link

    def proceed(self) -> bool:
        if self.comm.rank == 0 and self.link is not None:
            msg = self.link.poll(0)
            go = self.link.conn is not None and not (msg and msg.get("op") == "cancel")
            self.flag.fill_(1 if go else 0)
        return bool(self.comm.broadcast(self.flag, src=0)[0])


class EngineState:
    """What every rank keeps between commands: the loaded shard and its layout."""

    def __init__(self, job: EngineJob, comm: Any) -> None:
        self.job, self.comm = job, comm
        self.model: Any = None
        self.layout: Any = None
        self.loaded: dict[str, Any] | None = None
        self.vocabulary: GrammarVocabulary | None = None  # rank 0, built on the first structured request
        self.grammar: Grammar | None = None  # rank 0, the running request's

    def load(self, cmd: dict[str, Any]) -> dict[str, Any]:
        key = {"path": cmd["path"], "dtype": cmd["dtype"], "num_ctx": cmd["num_ctx"]}
        if self.loaded is not None and {k: self.loaded[k] for k in key} == key:
            return self.loaded
        self.unload()
        t0 = time.perf_counter()
        world = self.comm.world_size
        self.model, layout, _ = load_shard(
            Path(cmd["path"]), self.comm, cmd["dtype"], self.job.device, self.job.tp_weights
        )
        self.layout = layout
        size = sum(p.numel() * p.element_size() for p in self.model.parameters())
        self.loaded = {**key, "world_size": world, "layout": layout.describe(), "size_bytes": size * world,
                       "load_seconds": time.perf_counter() - t0}  # fmt: skip
        return self.loaded

    def unload(self) -> None:
        self.model, self.layout, self.loaded, self.vocabulary = None, None, None, None

    def prepare_generate(self, cmd: dict[str, Any]) -> None:
        """Checks before every rank commits to a request: a bad prompt or schema fails here, on all."""
        if self.model is None:
            raise TpOllamaError("no model is loaded")
        check_prompt(len(cmd["ids"]), options_from_data(cmd["options"]))
        self.grammar = None
        fmt = cmd.get("format")
        if fmt and self.comm.rank == 0:
            if self.vocabulary is None:
                self.vocabulary = vocabulary_for(Path(self.loaded["path"]), self.vocab_size)  # type: ignore[index]
            self.grammar = Grammar(self.vocabulary, fmt["kind"], fmt.get("schema"))

    @property
    def vocab_size(self) -> int:
        return int(self.model.config.vocab_size)

    def generate(self, cmd: dict[str, Any], link: FrontEndLink | None) -> None:
        options = options_from_data(cmd["options"])
        sampler = sampler_for(self.layout, self.comm)
        constraint: Any = None
        if cmd.get("format"):
            if self.comm.world_size == 1:
                assert self.grammar is not None
                constraint = LocalConstraint(self.grammar)
            else:
                span = self.layout.vocab[self.comm.rank]
                constraint = ShardedConstraint(self.grammar, span, self.vocab_size, self.comm)
        stats = GenerationStats()
        comm_before = getattr(self.comm, "seconds", 0.0)
        tokens = generate_tokens(
            self.model, cmd["ids"], options, frozenset(cmd["eos"]), stats, sampler,
            CancellableLockstep(self.comm, link), constraint,
        )  # fmt: skip
        for token in tokens:
            if link is not None:
                link.send({"token": token})
        self.grammar = None
        if link is not None:
            fields = ("done_reason", "prompt_eval_count", "prompt_eval_duration", "eval_count", "eval_duration")
            comm_ns = int((getattr(self.comm, "seconds", 0.0) - comm_before) * 1e9)
            link.send({"done": True, **{f: getattr(stats, f) for f in fields}, "comm_duration": comm_ns})

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
        return {"world_size": self.comm.world_size, "ranks": ranks, "as_of": time.time()}


def engine_main(job: EngineJob) -> None:
    """torchrun entry point: serve commands until shutdown."""
    from tp_ollama.parallel.comm import init_distributed, make_comm

    logging.basicConfig(level=logging.DEBUG if job.debug else logging.WARNING, stream=sys.stderr)
    torch.set_num_threads(local_threads(int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))
    init_distributed("nccl" if job.comm == "nccl" else "gloo", job.timeout_s)
    comm = make_comm(job.comm, job.timeout_s)
    link = FrontEndLink(job.socket_path) if comm.rank == 0 else None
    state = EngineState(job, comm)
    try:
        # Everything a rank does is inference: one mode for the whole loop, so buffers that the
        # communicator caches during a step are never updated outside inference mode later.
        with torch.inference_mode():
            _serve(state, link)
    finally:
        comm.close()
        if link is not None:
            link.close()


def _serve(state: EngineState, link: FrontEndLink | None) -> None:
    comm = state.comm
    while True:
        cmd = link.poll(IDLE_TICK_S) if link is not None else None
        if comm.rank == 0 and cmd is None:
            cmd = {"op": "idle"}
        cmd = json.loads(comm.broadcast_bytes(json.dumps(cmd).encode() if comm.rank == 0 else None, src=0))
        op = cmd.get("op")
        if op == "idle":
            continue
        if op == "shutdown":
            return
        _run_command(state, cmd, link)


def _run_command(state: EngineState, cmd: dict[str, Any], link: FrontEndLink | None) -> None:
    """Run one command on every rank; rank 0 answers. Errors are agreed on by all ranks first, so a
    failure on one rank (say, a missing file on node 1) is reported instead of hanging the others."""
    op = cmd.get("op")
    error = ""
    result: dict[str, Any] = {}
    try:
        if op == "load":
            result = state.load(cmd)
        elif op == "unload":
            state.unload()
        elif op == "generate":
            state.prepare_generate(cmd)
        elif op == "embed":
            result = state.embed(cmd)
        elif op == "cluster":
            result = state.cluster()
        elif op == "cancel":
            return  # arrived after its request ended
        else:
            raise TpOllamaError(f"unknown engine command {op!r}")
    except TpOllamaError as e:
        error = f"rank {state.comm.rank}: {e}" if state.comm.rank else str(e)
    errors = state.comm.all_gather(torch.tensor([1 if error else 0], dtype=torch.int64))
    if int(errors.sum()):
        messages = json.loads(state.comm.broadcast_bytes(json.dumps([error]).encode(), src=int(errors.argmax())))
        if link is not None:
            link.send({"error": messages[0]})
        if op == "load":
            state.unload()
        return
    if op == "generate":
        try:
            state.generate(cmd, link)
        except TpOllamaError as e:
            if link is not None:
                link.send({"error": str(e)})
        return
    if link is not None:
        link.send({"ok": True, **result})
