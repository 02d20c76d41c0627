"""The serving loop on one rank, fed through an in-process link: what each command gets back, and
that requests leave the batch and the KV pool when they end, are cancelled or the front end leaves."""

from __future__ import annotations

import pytest

from tests.tiny import make_hf_model, save_hf
from tp_ollama.engine.link import LocalLink
from tp_ollama.engine.loop import EngineLoop
from tp_ollama.engine.options import GenerationOptions, SamplingOptions
from tp_ollama.engine.protocol import (
    Ack,
    Cancel,
    DescribeCluster,
    Done,
    Embed,
    Embedded,
    Failed,
    Generate,
    Load,
    Loaded,
    Shutdown,
    Token,
    Unload,
)
from tp_ollama.engine.state import EngineJob, EngineState
from tp_ollama.parallel.comm import SoloComm

GREEDY = GenerationOptions(SamplingOptions(temperature=0), num_predict=5, num_ctx=64)
MAX_TICKS = 200  # far more than any request here needs: only a loop that never ends reaches it


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_hf(make_hf_model("llama"), tmp_path_factory.mktemp("llama"))


@pytest.fixture
def loop(model_dir):
    link = LocalLink()
    loop = EngineLoop(EngineState(EngineJob(kv_cache_bytes=1 << 20), SoloComm()), link)
    link.inbox.append(Load("load", str(model_dir), num_ctx=64))
    loop.step()
    assert isinstance(link.outbox.popleft(), Loaded)
    return loop


def run_until_idle(loop: EngineLoop) -> list:
    """Step until nothing is queued or running; every reply sent meanwhile."""
    assert loop.link is not None
    for _ in range(MAX_TICKS):
        loop.step()
        if not loop.state.busy():
            replies = list(loop.link.outbox)
            loop.link.outbox.clear()
            return replies
    raise AssertionError(f"still busy after {MAX_TICKS} ticks")


def test_a_request_streams_its_tokens_then_its_counts(loop):
    loop.link.inbox.append(Generate("a", [5, 6, 7], GREEDY, frozenset()))
    replies = run_until_idle(loop)
    tokens = [r.token for r in replies if isinstance(r, Token)]
    assert len(tokens) == 5 and isinstance(replies[-1], Done)
    stats = replies[-1].stats
    assert stats.done_reason == "length" and stats.eval_count == 5 and stats.prompt_eval_count == 3
    assert loop.state.batch.pool.num_used() == 0


def test_requests_share_steps_and_each_ends_on_its_own(loop):
    loop.link.inbox.extend([Generate("a", [5, 6, 7], GREEDY, frozenset()), Generate("b", [9, 8], GREEDY, frozenset())])
    replies = run_until_idle(loop)
    done = {r.id: r.stats for r in replies if isinstance(r, Done)}
    assert set(done) == {"a", "b"} and all(s.eval_count == 5 for s in done.values())
    assert sum(isinstance(r, Token) for r in replies) == 10


def test_a_refused_request_is_told_why_and_ends_at_once(loop):
    loop.link.inbox.append(Generate("long", list(range(1, 80)), GREEDY, frozenset()))
    stepped = loop.step()
    assert stepped.tick.ended == ["long"]
    (reply,) = loop.link.outbox
    assert isinstance(reply, Failed) and "num_ctx=64" in reply.error
    assert not loop.state.busy()


def test_cancelling_a_running_request_ends_it_with_its_counts(loop):
    options = GenerationOptions(SamplingOptions(temperature=0), num_predict=50, num_ctx=64)
    loop.link.inbox.append(Generate("a", [5, 6, 7], options, frozenset()))
    for _ in range(3):
        loop.step()
    loop.link.inbox.append(Cancel("a"))
    stepped = loop.step()
    assert "a" in stepped.tick.ended and stepped.tick.plan.drop == ["a"]
    replies = list(loop.link.outbox)
    done = replies[-1]
    assert isinstance(done, Done) and done.stats.done_reason == "cancel"
    assert done.stats.eval_count == sum(isinstance(r, Token) for r in replies) == 3
    assert not loop.state.busy() and loop.state.batch.pool.num_used() == 0


def test_cancelling_a_queued_request_answers_at_once(loop):
    loop.state.planner.max_running = 1
    loop.link.inbox.extend([Generate("a", [5, 6], GREEDY, frozenset()), Generate("b", [7, 8], GREEDY, frozenset())])
    loop.step()  # a runs, b waits for a place
    assert loop.state.queued("b")
    loop.link.inbox.append(Cancel("b"))
    loop.step()
    assert any(isinstance(r, Done) and r.id == "b" and r.stats.done_reason == "cancel" for r in loop.link.outbox)
    assert not loop.state.queued("b")
    loop.link.outbox.clear()
    replies = run_until_idle(loop)
    assert not any(r.id == "b" for r in replies)


def test_a_front_end_that_leaves_takes_its_requests_with_it(loop):
    options = GenerationOptions(SamplingOptions(temperature=0), num_predict=50, num_ctx=64)
    loop.link.inbox.append(Generate("a", [5, 6, 7], options, frozenset()))
    loop.step()
    loop.link.lost = True
    stepped = loop.step()
    assert stepped.tick.ended == ["a"] and not loop.state.busy() and not loop.link.lost


def test_control_commands_answer_and_a_failed_load_says_why(loop, tmp_path):
    loop.link.inbox.append(Embed("e", [[5, 6], [7]]))
    loop.step()
    (embedded,) = loop.link.outbox
    assert isinstance(embedded, Embedded) and len(embedded.embeddings) == 2
    loop.link.outbox.clear()
    loop.link.inbox.append(DescribeCluster("c"))
    loop.step()
    facts = loop.link.outbox.popleft()
    assert facts.world_size == 1 and facts.ranks[0]["rank"] == 0 and facts.kv_cache["blocks"] > 0
    loop.link.inbox.append(Load("bad", str(tmp_path / "missing.gguf")))
    loop.step()
    failed = loop.link.outbox.popleft()
    assert isinstance(failed, Failed) and "missing.gguf" in failed.error
    assert loop.state.loaded is None  # a failed load leaves nothing half loaded
    loop.link.inbox.append(Generate("a", [5], GREEDY, frozenset()))
    loop.step()
    assert loop.link.outbox.popleft() == Failed("a", "no model is loaded")


def test_unloading_under_running_requests_tells_them(loop):
    options = GenerationOptions(SamplingOptions(temperature=0), num_predict=50, num_ctx=64)
    loop.link.inbox.append(Generate("a", [5, 6, 7], options, frozenset()))
    loop.step()
    loop.link.outbox.clear()
    loop.link.inbox.append(Unload("u"))
    loop.step()
    replies = list(loop.link.outbox)
    assert Failed("a", "the model was unloaded while this request was running") in replies
    assert Ack("u") in replies and loop.state.model is None


def test_shutdown_ends_the_loop_and_a_closed_link_shuts_it_down(loop):
    loop.link.inbox.append(Shutdown())
    loop.run()  # returns
    loop.link.closed = True
    assert loop.step().shutdown
