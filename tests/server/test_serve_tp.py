"""`tp-ollama serve --tp 1` and `--tp 2` as a user runs them: a real server process whose engine is a
torchrun group of one or two ranks, driven by the official ollama and openai clients."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import httpx
import ollama
import openai
import psutil
import pytest
import torch

from tp_ollama.completion import load, prompt_tokens, stream_text
from tp_ollama.engine.options import GenerationOptions, SamplingOptions
from tp_ollama.launch import free_port

pytestmark = pytest.mark.slow

STARTUP_S = 120


@pytest.fixture(scope="module", params=[1, 2], ids=["tp1", "tp2"])
def server(request, tmp_path_factory):
    port = free_port()
    env = {**os.environ, "OLLAMA_MODELS": str(tmp_path_factory.mktemp("models")), "OMP_NUM_THREADS": "1"}
    env.pop("OLLAMA_HOST", None)
    log = tmp_path_factory.mktemp("log") / "serve.log"
    with log.open("w") as sink:  # a file, not a pipe nobody reads, which could fill and block the server
        cmd = [sys.executable, "-m", "tp_ollama", "serve", "--port", str(port), "--tp", str(request.param)]
        proc = subprocess.Popen(cmd, env=env, stdout=sink, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + STARTUP_S
    while True:  # a separate process: its socket answering is the only readiness signal there is
        try:
            if httpx.get(url, timeout=1).text == "Ollama is running":
                break
        except httpx.TransportError:
            pass
        assert proc.poll() is None, log.read_text()
        assert time.monotonic() < deadline, "the server did not answer within the startup limit"
        time.sleep(0.1)
    yield url, proc
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=60)
    print(log.read_text()[-6000:])


def test_chat_answers_paris(server):
    url, _ = server
    with ollama.Client(host=url) as client:
        reply = client.chat(
            model="smollm2:135m",
            messages=[{"role": "user", "content": "What is the capital of France?"}],
            options={"temperature": 0, "num_predict": 32},
        )
        loaded = client.ps().models
    assert "Paris" in reply.message.content
    assert reply.done_reason == "stop"
    assert [m.model for m in loaded] == ["smollm2:135m"]


def test_greedy_generate_equals_the_unsharded_text(server):
    url, _ = server
    prompt = "def fibonacci(n):"
    options = {"temperature": 0, "num_predict": 24}
    with ollama.Client(host=url) as client:
        chunks = client.generate(model="smollm2:135m", prompt=prompt, raw=True, options=options, stream=True)
        streamed = "".join(chunk.response for chunk in chunks)
    loaded = load("smollm2:135m", torch.float32)
    ids = prompt_tokens(loaded.tokenizer, prompt)
    gen = GenerationOptions(sampling=SamplingOptions(temperature=0), num_predict=24)
    assert streamed == "".join(stream_text(loaded, ids, gen))


def test_openai_client_chat(server):
    url, _ = server
    with openai.OpenAI(base_url=f"{url}/v1", api_key="ollama") as client:
        reply = client.chat.completions.create(
            model="smollm2:135m",
            messages=[{"role": "user", "content": "What is the capital of France?"}],
            temperature=0,
            max_tokens=16,
        )
    assert "Paris" in reply.choices[0].message.content
    assert reply.usage.completion_tokens <= 16


@pytest.mark.parametrize("stop_signal", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_stopping_the_server_stops_every_rank(tmp_path, stop_signal):
    port = free_port()
    env = {**os.environ, "OLLAMA_MODELS": str(tmp_path), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "tp_ollama", "serve", "--port", str(port), "--tp", "2"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + STARTUP_S
    while True:
        try:
            with ollama.Client(host=url) as client:
                client.generate(model="smollm2:135m", prompt="")  # loads the model on both ranks
            break
        except (httpx.TransportError, ConnectionError):
            assert time.monotonic() < deadline
            time.sleep(0.1)
    ranks = psutil.Process(proc.pid).children(recursive=True)
    assert len([p for p in ranks if "python" in p.name()]) >= 3  # agent + two ranks
    proc.send_signal(stop_signal)
    proc.wait(timeout=60)
    _, alive = psutil.wait_procs(ranks, timeout=30)
    assert alive == []


def test_a_killed_engine_group_is_started_again(server):
    """Kill every rank while the server is up: the next request gets a fresh group and an answer."""
    url, proc = server
    with ollama.Client(host=url) as client:
        client.generate(model="smollm2:135m", prompt="Hi", options={"num_predict": 2})
        agent = next(p for p in psutil.Process(proc.pid).children() if "engine" in " ".join(p.cmdline()))
        ranks = agent.children(recursive=True)
        for p in ranks:
            p.kill()
        # torchrun's agent gives up once its ranks are gone (no restarts); it stays a zombie until the
        # server reaps it, which is what the next request does.
        deadline = time.monotonic() + 60
        while agent.is_running() and agent.status() != psutil.STATUS_ZOMBIE:
            assert time.monotonic() < deadline, "the agent outlived its ranks"
            time.sleep(0.1)
        reply = client.generate(model="smollm2:135m", prompt="The capital of France is", raw=True,
                                options={"temperature": 0, "num_predict": 8})  # fmt: skip
    assert "Paris" in reply.response
    assert psutil.Process(proc.pid).is_running()


def test_every_endpoint_through_the_engine_group(server):
    url, _ = server
    assert httpx.get(f"{url}/api/version").json()["version"].count(".") == 2
    with ollama.Client(host=url) as client:
        names = {m.model for m in client.list().models}
        assert {"gemma3:270m", "smollm2:135m"} <= names
        shown = client.show("smollm2:135m")
        assert shown.modelinfo["general.architecture"] == "llama" and shown.details.family == "llama"
        created = client.create(
            model="pirate", from_="smollm2:135m", stream=True, system="You are a pirate.", parameters={"num_predict": 5}
        )
        statuses = [s.status for s in created]
        assert statuses[-1] == "success"
        assert client.generate(model="pirate", prompt="Hello").eval_count == 5
        client.copy("pirate", "pirate2")
        assert client.chat(model="pirate2", messages=[{"role": "user", "content": "Hi"}]).eval_count == 5
        for name in ("pirate", "pirate2"):
            client.delete(name)
            with pytest.raises(ollama.ResponseError) as gone:
                client.show(name)
            assert gone.value.status_code == 404
        assert client.generate(model="smollm2:135m", prompt="").done_reason == "load"
        assert [m.model for m in client.ps().models] == ["smollm2:135m"]
        assert client.generate(model="smollm2:135m", prompt="", keep_alive=0).done_reason == "unload"
        assert client.ps().models == []
        greedy = {"temperature": 0, "num_predict": 16}
        served = client.generate(
            model="gemma3:270m", prompt="Water boils at a temperature of", raw=True, options=greedy
        )
    loaded = load("gemma3:270m", torch.float32)
    ids = prompt_tokens(loaded.tokenizer, "Water boils at a temperature of")
    expected = "".join(
        stream_text(loaded, ids, GenerationOptions(sampling=SamplingOptions(temperature=0), num_predict=16))
    )
    assert served.response == expected
    with openai.OpenAI(base_url=f"{url}/v1", api_key="ollama") as oai:
        assert "smollm2:135m" in {m.id for m in oai.models.list()}
        done = oai.completions.create(
            model="smollm2:135m", prompt="The capital of France is", max_tokens=8, temperature=0
        )
        assert done.choices[0].text and done.usage.completion_tokens <= 8
