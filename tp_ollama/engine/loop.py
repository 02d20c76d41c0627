"""The serving loop of an engine group: one `Tick` a step, decided by rank 0, run by every rank.

Rank 0 reads its link (the front end's socket, or a caller in-process), admits and cancels requests,
and plans the step; it broadcasts the tick (the control commands to run, then the batch's plan), every
rank applies it, and rank 0 sends the tokens back. Requests join and leave the running batch at every
step (engine/batch.py). A structured-output grammar runs on rank 0 only; its bitmask of allowed
tokens is broadcast at the step that samples for that request and every rank masks its own slice.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from tp_ollama.engine.batch import Event
from tp_ollama.engine.link import Link, SocketLink
from tp_ollama.engine.protocol import (
    Ack,
    Cancel,
    Control,
    DescribeCluster,
    Done,
    Embed,
    Failed,
    FinalStats,
    Generate,
    Load,
    Loaded,
    RankFailure,
    Reply,
    Shutdown,
    Tick,
    Token,
    Unload,
    decode_failure,
    decode_tick,
    encode,
)
from tp_ollama.engine.state import EngineJob, EngineState
from tp_ollama.errors import TpOllamaError
from tp_ollama.logs import setup_logging
from tp_ollama.parallel.comm import join_group

log = logging.getLogger(__name__)

IDLE_TICK_S = 1.0  # rank 0 tells idle ranks it is alive this often, well inside the comm timeout
IDLE = Tick()


@dataclass
class Stepped:
    """What one tick did on this rank: the tick itself and the batch's events."""

    tick: Tick
    events: list[Event] = field(default_factory=list)

    @property
    def shutdown(self) -> bool:
        return any(isinstance(cmd, Shutdown) for cmd in self.tick.control)


class EngineLoop:
    """One rank's loop. `link` is rank 0's channel to its requests; None on the other ranks."""

    def __init__(self, state: EngineState, link: Link | None) -> None:
        self.state, self.link = state, link

    def run(self) -> None:
        """Tick until shutdown. Everything a rank does is inference: one mode for the whole loop, so
        buffers that the communicator caches during a step are never updated outside inference mode."""
        with torch.inference_mode():
            while not self.step().shutdown:
                pass

    def step(self) -> Stepped:
        """One tick: decided here on rank 0, received on the others, then applied."""
        comm = self.state.comm
        data = None
        if comm.rank == 0:
            assert self.link is not None
            data = encode(self._decide(self.link))
        tick = decode_tick(comm.broadcast_bytes(data, src=0))
        out = Stepped(tick)
        for cmd in tick.control:
            if isinstance(cmd, Shutdown):
                return out
            self._run_command(cmd)
        if tick.plan is not None and self.state.batch is not None:
            out.events = self.state.batch.step(tick.plan)
            if self.link is not None:
                self._report(out.events)
        return out

    def _report(self, events: list[Event]) -> None:
        assert self.link is not None and self.state.planner is not None
        for event in events:
            if event.token is not None:
                self.link.send(Token(event.id, event.token))
            if event.stats is not None:
                self.link.send(Done(event.id, event.stats))
                self.state.planner.finished(event.id)

    def _decide(self, link: Link) -> Tick:
        """Rank 0: read the link, queue and cancel requests, and plan the next step."""
        state = self.state
        commands = link.poll(0 if state.busy() else IDLE_TICK_S)
        if link.closed:  # an in-process front end closed its end
            return Tick(control=[Shutdown()])
        tick = Tick()
        cancelled: set[str] = set()
        if link.lost:  # the front end went away: nobody reads these answers any more
            link.lost = False
            cancelled |= set(state.active_ids())
        for cmd in commands:
            if isinstance(cmd, Generate):
                try:
                    state.admit(cmd)
                except TpOllamaError as e:
                    link.send(Failed(cmd.id, str(e)))
                    tick.ended.append(cmd.id)
            elif isinstance(cmd, Cancel):
                queued = state.queued(cmd.id)
                if queued:  # a running one ends in the batch, with its counts
                    link.send(Done(cmd.id, FinalStats(done_reason="cancel")))
                if queued or state.running(cmd.id):
                    cancelled.add(cmd.id)
            else:
                if isinstance(cmd, Load | Unload) and state.busy():
                    # Only after the front end's scheduler has let every request finish, normally; any
                    # left are told why they end.
                    for rid in state.active_ids():
                        link.send(Failed(rid, "the model was unloaded while this request was running"))
                tick.control.append(cmd)
        tick.ended += sorted(cancelled)
        if state.planner is not None and state.batch is not None and (state.busy() or cancelled):
            for rid in cancelled:
                state.grammars.pop(rid, None)
            tick.plan = state.planner.plan(state.batch, cancelled)
        return tick

    def _run_command(self, cmd: Control) -> None:
        """Run one control command on every rank; rank 0 answers. Errors are agreed on by all ranks first,
        so a failure on one rank (say, a missing file on node 1) is reported instead of hanging the others."""
        state, comm = self.state, self.state.comm
        error = ""
        reply: Reply = Ack(cmd.id)
        try:
            if isinstance(cmd, Load):
                reply = Loaded(cmd.id, state.load(cmd))
            elif isinstance(cmd, Unload):
                state.unload()
            elif isinstance(cmd, Embed):
                reply = state.embed(cmd)
            elif isinstance(cmd, DescribeCluster):
                reply = state.cluster(cmd.id)
        except TpOllamaError as e:
            error = f"rank {comm.rank}: {e}" if comm.rank else str(e)
        errors = comm.all_gather(torch.tensor([1 if error else 0], dtype=torch.int64))
        if int(errors.sum()):
            src = int(errors.argmax())
            agreed = decode_failure(comm.broadcast_bytes(encode(RankFailure(error)) if comm.rank == src else None, src))
            reply = Failed(cmd.id, agreed.error)
            if isinstance(cmd, Load):
                state.unload()
        if self.link is not None:
            self.link.send(reply)


def engine_main(job: EngineJob) -> None:
    """torchrun entry point of `serve` and `launch`: serve the front end's commands until shutdown."""
    setup_logging()
    comm = join_group(job.comm, job.timeout_s)
    link = SocketLink(job.socket_path) if comm.rank == 0 else None
    try:
        EngineLoop(EngineState(job, comm), link).run()
    finally:
        comm.close()
        if link is not None:
            link.close()
