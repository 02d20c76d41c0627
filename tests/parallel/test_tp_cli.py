"""tp-ollama generate --tp N and launch across two "nodes", as a user runs them: the sharded text is
exactly the unsharded text, bad layouts fail with one line, and nothing is left running."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import psutil
import pytest

from tests.store.test_embedded import GEMMA_PROMPTS, SMOL_CHATS, SMOL_PROMPTS
from tests.waits import wait_until
from tp_ollama.completion import load, stream_text
from tp_ollama.engine.options import GenerationOptions, SamplingOptions
from tp_ollama.launch import free_port
from tp_ollama.text.prompt import prompt_tokens

pytestmark = pytest.mark.slow

# One prompt of each kind: every reference prompt's sharded logits are checked position by position on
# tiny checkpoints (test_plans); here the real models run through the real command at TP=2 and 3.
CASES = [("gemma3:270m", GEMMA_PROMPTS[0], False), ("smollm2:135m", SMOL_PROMPTS[0], False),
         ("smollm2:135m", SMOL_CHATS[0], True)]  # fmt: skip
GREEDY = ["--temperature", "0", "--num-predict", "32", "--dtype", "float32", "--quant", "none"]


def cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "tp_ollama", *args], capture_output=True, text=True, timeout=timeout, env=env
    )


@pytest.fixture(scope="module")
def unsharded() -> dict[tuple[str, str, bool], str]:
    """The TP=1 text of every reference prompt (equal to transformers', see tests/store/test_embedded.py)."""
    texts = {}
    options = GenerationOptions(sampling=SamplingOptions(temperature=0), num_predict=32)
    for model in ("gemma3:270m", "smollm2:135m"):
        loaded = load(model, "float32", quant="none")
        for m, prompt, chat in CASES:
            if m == model:
                ids = prompt_tokens(loaded.tokenizer, prompt, chat=chat)
                texts[(m, prompt, chat)] = "".join(stream_text(loaded, ids, options))
    return texts


@pytest.mark.parametrize("tp", [2, 3])
@pytest.mark.parametrize(("model", "prompt", "chat"), CASES)
def test_sharded_text_equals_unsharded(unsharded, model, prompt, chat, tp):
    done = cli("generate", model, prompt, *GREEDY, "--tp", str(tp), *(["--chat"] if chat else []))
    assert done.returncode == 0, done.stderr
    assert done.stdout == unsharded[(model, prompt, chat)]


@pytest.mark.parametrize(
    ("model", "prompt", "chat", "pp", "tp"),
    [(*CASES[0], 2, 1), (*CASES[1], 3, 1), (*CASES[2], 2, 1), (*CASES[1], 2, 2)],
    ids=["gemma3-pp2", "smol-pp3", "smol-chat-pp2", "smol-tp2-pp2"],
)
def test_pipeline_text_equals_unsharded(unsharded, model, prompt, chat, pp, tp):
    """Layer-wise stages (--pp), and TP inside them (--tp 2 --pp 2): the same text as one process."""
    flags = ["--pp", str(pp), "--tp", str(tp), *(["--chat"] if chat else [])]
    done = cli("generate", model, prompt, *GREEDY, *flags)
    assert done.returncode == 0, done.stderr
    assert done.stdout == unsharded[(model, prompt, chat)]


def test_auto_partitioning_says_its_choice_and_keeps_the_text(unsharded):
    """--strategy auto: the cost model picks tensor or layer-wise over the link it measures, says which
    with the predicted tok/s of each, and the text is one process's."""
    model, prompt, chat = CASES[1]
    done = cli("generate", model, prompt, *GREEDY, "--tp", "2", "--strategy", "auto")
    assert done.returncode == 0, done.stderr
    assert done.stdout == unsharded[(model, prompt, chat)]
    line = next(x for x in done.stderr.splitlines() if "partitioning auto:" in x)
    m = re.search(
        r"auto: (tensor|layerwise) over 2 ranks, predicted ([\d.]+) tok/s \((tensor|layerwise) ([\d.]+), one node", line
    )
    assert m is not None, line
    assert m.group(1) != m.group(3) and float(m.group(2)) >= float(m.group(4)), line


def test_a_model_over_one_ranks_memory_budget_loads_over_two_stages():
    """inference.partitioning.memory_budget below the model's packed weights (98 MB for smollm2:135m):
    one process refuses with the sizes; two stages (19 and 11 layers, the tied head on the last) fit and
    write one process's text."""
    model, prompt, _ = CASES[1]
    alone = cli("generate", model, prompt, "--memory-budget", "70MB", "--num-predict", "4")
    assert alone.returncode == 1 and "Traceback" not in alone.stderr
    assert "more than inference.partitioning.memory_budget = 70.0 MB: split it over more ranks" in alone.stderr
    greedy = ["--temperature", "0", "--num-predict", "16"]  # the file's own precision: 98 MB in all
    staged = cli("generate", model, prompt, *greedy, "--pp", "2", "--memory-budget", "70MB")
    assert staged.returncode == 0, staged.stderr
    assert staged.stdout == cli("generate", model, prompt, *greedy).stdout


def test_two_nodes_through_launch(unsharded):
    port = str(free_port())
    prompt = "The capital of France is"
    common = ["launch", "smollm2:135m", prompt, *GREEDY, "--nnodes", "2", "--master-port", port]
    node1 = subprocess.Popen(
        [sys.executable, "-m", "tp_ollama", *common, "--node-rank", "1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    try:
        node0 = cli(*common, "--node-rank", "0")
        out1, err1 = node1.communicate(timeout=120)
    finally:
        node1.kill()
    assert node0.returncode == 0, node0.stderr
    assert node1.returncode == 0, err1
    assert node0.stdout == unsharded[("smollm2:135m", prompt, False)]
    assert out1 == ""  # text comes out on node 0 only


def our_processes() -> set[int]:
    """tp-ollama processes this test session started and that are still alive (other children, such as
    multiprocessing's resource tracker from earlier tests, are not ours to count)."""
    alive = set()
    for p in psutil.Process().children(recursive=True):
        try:
            cmdline = " ".join(p.cmdline())
            if p.status() != psutil.STATUS_ZOMBIE and ("tp_ollama" in cmdline or "spawn_main" in cmdline):
                alive.add(p.pid)
        except psutil.NoSuchProcess:
            continue
    return alive


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--tp", "10"], "tensor-parallel degree 10 exceeds the model's 9 attention heads"),
        (["--tp", "2", "--tp-weights", "1,2,3"], "--tp-weights has 3 values (1,2,3) but the world size is 2"),
        (["--tp", "2", "--comm", "carrier-pigeon"], "carrier-pigeon"),
        (["--pp", "31"], "pipeline degree 31 exceeds the model's 30 layers: use at most 30 stages"),
        (["--tp", "2", "--strategy", "hybrid"], "--strategy hybrid is TP inside pipeline stages, but 2 ranks in 1 st"),
    ],
)
def test_bad_layouts_fail_with_one_line(args, message):
    done = cli("generate", "smollm2:135m", "hi", *args)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [done.stderr.strip()]
    assert message in done.stderr and "Traceback" not in done.stderr
    assert our_processes() == set()


def test_a_node_that_never_joins_times_out_cleanly():
    done = cli(
        "launch", "smollm2:135m", "hi", "--nnodes", "2", "--node-rank", "0",
        "--master-port", str(free_port()), "--join-timeout", "4", timeout=60,
    )  # fmt: skip
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "did not form within 4 s" in lines[0] and "1/2" in lines[0], done.stderr
    assert our_processes() == set()


def test_two_nodes_serve_the_ollama_api(tmp_path):
    """launch without a prompt: node 0 serves HTTP over a group whose ranks span both nodes."""
    import signal

    import httpx
    import ollama

    rdzv, http_port = str(free_port()), free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OLLAMA_MODELS": str(tmp_path)}
    common = [sys.executable, "-m", "tp_ollama", "launch", "--nnodes", "2", "--master-port", rdzv]
    log1 = tmp_path / "node1.log"
    with log1.open("w") as sink:
        node1 = subprocess.Popen([*common, "--node-rank", "1"], env=env, stderr=sink)
    node0 = subprocess.Popen([*common, "--node-rank", "0", "--port", str(http_port)], env=env)
    url = f"http://127.0.0.1:{http_port}"

    def answers() -> bool:  # another process: its socket answering is the readiness signal
        try:
            httpx.get(url, timeout=1)
            return True
        except httpx.TransportError:
            assert node0.poll() is None, "node 0 exited before it served"
            return False

    try:
        wait_until(answers, 120, what="node 0 serving HTTP")
        with ollama.Client(host=url) as client:
            reply = client.chat(
                model="smollm2:135m",
                messages=[{"role": "user", "content": "Name the capital of France."}],
                options={"temperature": 0, "num_predict": 24},
            )
        assert "Paris" in reply.message.content
        everything = psutil.Process(node0.pid).children(recursive=True) + psutil.Process(node1.pid).children(
            recursive=True
        )
        node0.send_signal(signal.SIGINT)
        assert node0.wait(timeout=60) in (0, 130)
        assert node1.wait(timeout=60) == 0, log1.read_text()
        _, alive = psutil.wait_procs(everything, timeout=30)
        assert alive == []
    finally:
        for p in (node0, node1):
            p.kill()
