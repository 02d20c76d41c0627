"""The Ollama-style client commands as a user runs them: real processes talking HTTP to a real
server (uvicorn in a thread, LocalEngine, the embedded smollm2:135m), real pseudo-terminals."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from starlette.types import ASGIApp, Receive, Scope, Send

from tests.server.doubles import Details, EmbeddedModel, EmbeddedModels
from tp_ollama import __version__
from tp_ollama.client_cli import go_duration, human_bytes, human_time, processor, show_summary, table
from tp_ollama.server.app import create_app
from tp_ollama.server.local_engine import LocalEngine
from tp_ollama.store.embedded import smollm2_135m

SMOL = "smollm2:135m"
FRANCE = "What is the capital of France?"
# Until tp_ollama/cli.py calls register(app), the tests run this stand-in for `python -m tp_ollama`.
STANDALONE = "import typer; from tp_ollama.client_cli import register; app = typer.Typer(); register(app); app()"


# --- servers -------------------------------------------------------------------------------------


class ChatRecorder:
    """Keeps every /api/chat request body, to check what the CLI sent (history, /clear)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.bodies: list[dict[str, Any]] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] != "/api/chat":
            await self.app(scope, receive, send)
            return
        parts: list[bytes] = []

        async def recording_receive() -> Any:
            message = await receive()
            if message["type"] == "http.request":
                parts.append(message.get("body", b""))
                if not message.get("more_body"):
                    self.bodies.append(json.loads(b"".join(parts)))
            return message

        await self.app(scope, recording_receive, send)


@contextmanager
def serving(app: ASGIApp) -> Iterator[str]:
    # The socket listens before the thread starts, so clients can connect at once: no polling.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on", http="h11", loop="asyncio"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()


@dataclass
class Live:
    host: str  # for OLLAMA_HOST
    recorder: ChatRecorder | None = None
    store: Any = None


@pytest.fixture(scope="module")
def chat_server() -> Iterator[Live]:
    """smollm2:135m made greedy and short (model PARAMETERs), so answers are the same every run."""
    path = smollm2_135m()
    greedy = {"temperature": 0, "seed": 1, "num_predict": 40}
    models = EmbeddedModels(
        {
            SMOL: EmbeddedModel(SMOL, path, params=greedy, digest="ab" * 32, details=Details("gguf", "llama")),
            "smol-long:latest": EmbeddedModel("smol-long:latest", path, params={**greedy, "num_predict": 4000}),
        }
    )
    recorder = ChatRecorder(create_app(LocalEngine(), models, version=__version__))
    with serving(recorder) as host:
        yield Live(host, recorder)


@pytest.fixture(scope="module")
def store_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    from tp_ollama.store.registry import ModelStore

    store = ModelStore(tmp_path_factory.mktemp("models"))
    app = create_app(LocalEngine(), store=store, version=__version__)
    with serving(app) as host:
        yield Live(host, store=store)


# --- running the CLI -----------------------------------------------------------------------------


def _registered() -> bool:
    done = subprocess.run([sys.executable, "-m", "tp_ollama", "run", "--help"], capture_output=True, timeout=60)
    return done.returncode == 0


@pytest.fixture(scope="session")
def command() -> list[str]:
    return [sys.executable, "-m", "tp_ollama"] if _registered() else [sys.executable, "-c", STANDALONE]


def env_for(host: str) -> dict[str, str]:
    return {**os.environ, "OLLAMA_HOST": host, "PYTHONUNBUFFERED": "1"}


def cli(command: list[str], host: str, *args: str, stdin: str = "", cwd: Path | None = None):
    return subprocess.run(
        [*command, *args], input=stdin, capture_output=True, text=True, env=env_for(host), cwd=cwd, timeout=120
    )


def assert_one_line_error(done: subprocess.CompletedProcess[str], message: str) -> None:
    assert done.returncode == 1, (done.stdout, done.stderr)
    assert done.stdout == ""
    assert done.stderr.splitlines() == [f"Error: {message}"], done.stderr


def test_tp_ollama_has_the_client_commands():
    if not _registered():
        pytest.skip("tp_ollama/cli.py does not call client_cli.register(app) yet (its owner adds that line)")
    done = subprocess.run([sys.executable, "-m", "tp_ollama", "--help"], capture_output=True, text=True, timeout=60)
    for name in ("run", "list", "ps", "show", "rm", "cp", "create", "stop"):
        assert f" {name} " in done.stdout


# --- run -----------------------------------------------------------------------------------------


def test_run_streams_the_answer(command, chat_server):
    done = cli(command, chat_server.host, "run", SMOL, FRANCE)
    assert done.returncode == 0, done.stderr
    assert "Paris" in done.stdout and done.stdout.endswith("\n")
    assert chat_server.recorder.bodies[-1]["messages"] == [{"role": "user", "content": FRANCE}]


def test_run_reads_the_prompt_from_stdin(command, chat_server):
    done = cli(command, chat_server.host, "run", SMOL, "--verbose", stdin=FRANCE)
    assert done.returncode == 0, done.stderr
    assert "Paris" in done.stdout
    assert chat_server.recorder.bodies[-1]["messages"] == [{"role": "user", "content": FRANCE}]
    assert "eval rate:" in done.stderr and "prompt eval count:" in done.stderr


def test_run_missing_model(command, chat_server):
    assert_one_line_error(cli(command, chat_server.host, "run", "nosuch:1b", "hi"), "model 'nosuch:1b' not found")


def test_run_format_json_is_not_supported(command, chat_server):
    assert_one_line_error(cli(command, chat_server.host, "run", SMOL, "hi", "--format", "json"),
                          "--format json is not supported yet")  # fmt: skip


def test_no_server(command):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    host = f"127.0.0.1:{port}"
    for args in (["run", SMOL, "hi"], ["list"], ["ps"]):
        message = f"could not connect to tp-ollama server at http://{host} (is 'tp-ollama serve' running?)"
        assert_one_line_error(cli(command, host, *args), message)


def test_interactive_chat_keeps_history(command, chat_server):
    pexpect = pytest.importorskip("pexpect")
    child = pexpect.spawn(command[0], [*command[1:], "run", SMOL], env=env_for(chat_server.host),
                          encoding="utf-8", timeout=60)  # fmt: skip
    try:
        child.expect_exact(">>> ")
        child.sendline(FRANCE)
        child.expect_exact("Paris")
        child.expect_exact(">>> ")
        child.sendline("And of Italy?")
        child.expect_exact(">>> ")
        turn2 = chat_server.recorder.bodies[-1]["messages"]
        assert [m["role"] for m in turn2] == ["user", "assistant", "user"]
        assert (
            turn2[0]["content"] == FRANCE and "Paris" in turn2[1]["content"] and turn2[2]["content"] == "And of Italy?"
        )
        child.sendline("/clear")
        child.expect_exact("Cleared session context")
        child.expect_exact(">>> ")
        child.sendline("/?")
        child.expect_exact("/bye")
        child.expect_exact(">>> ")
        child.sendline(FRANCE)
        child.expect_exact(">>> ")
        assert chat_server.recorder.bodies[-1]["messages"] == [{"role": "user", "content": FRANCE}]
        child.sendline("/bye")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0


def test_interactive_ctrl_c_stops_the_answer_and_ctrl_d_leaves(command, chat_server):
    pexpect = pytest.importorskip("pexpect")
    child = pexpect.spawn(command[0], [*command[1:], "run", "smol-long"], env=env_for(chat_server.host),
                          encoding="utf-8", timeout=60)  # fmt: skip
    try:
        child.expect_exact(">>> ")
        child.sendline("Count from 1 to 1000, one number per line.")
        child.expect(r"\d")  # the answer has started; up to 4000 tokens are allowed
        child.sendintr()
        child.expect_exact(">>> ")
        # The server stopped that answer: a new question is answered at once, not after it.
        child.sendline(FRANCE)
        child.expect_exact("Paris")
        child.expect_exact(">>> ")
        assert [m["role"] for m in chat_server.recorder.bodies[-1]["messages"]] == ["user"]
        child.sendeof()
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0


def test_ps_and_stop(command, chat_server):
    assert cli(command, chat_server.host, "run", SMOL, "hi").returncode == 0
    done = cli(command, chat_server.host, "ps")
    assert done.returncode == 0, done.stderr
    header, row = done.stdout.splitlines()
    assert header.split() == ["NAME", "ID", "SIZE", "PROCESSOR", "CONTEXT", "UNTIL"]
    assert row.startswith(SMOL) and "ab" * 6 in row and "100% CPU" in row and "from now" in row
    assert cli(command, chat_server.host, "stop", SMOL).returncode == 0
    assert cli(command, chat_server.host, "ps").stdout.splitlines()[1:] == []
    assert_one_line_error(
        cli(command, chat_server.host, "stop", "nosuch:1b"), 'couldn\'t find model "nosuch:1b" to stop'
    )


# --- list, show, cp, rm, create ------------------------------------------------------------------


def test_list_and_show(command, store_server):
    done = cli(command, store_server.host, "list")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].split() == ["NAME", "ID", "SIZE", "MODIFIED"]
    assert any(line.startswith(SMOL) and " MB " in line for line in lines[1:]), done.stdout
    done = cli(command, store_server.host, "show", SMOL)
    assert done.returncode == 0, done.stderr
    assert "  Model\n" in done.stdout and "architecture" in done.stdout and "llama" in done.stdout
    assert "context length" in done.stdout and "quantization" in done.stdout
    assert_one_line_error(cli(command, store_server.host, "show", "nosuch:1b"), "model 'nosuch:1b' not found")


def test_create_from_a_model_with_system_and_parameters(command, store_server, tmp_path):
    (tmp_path / "Modelfile").write_text(
        f'FROM {SMOL}\nSYSTEM """You are a pirate."""\nPARAMETER temperature 0.3\nPARAMETER stop "<end>"\n'
    )
    done = cli(command, store_server.host, "create", "pirate", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stderr.splitlines()[0] == "gathering model components"
    assert done.stderr.splitlines()[-1] == "success"
    assert cli(command, store_server.host, "show", "pirate", "--system").stdout == "You are a pirate.\n"
    params = cli(command, store_server.host, "show", "pirate", "--parameters").stdout
    assert "temperature" in params and "0.3" in params and '"<end>"' in params
    summary = cli(command, store_server.host, "show", "pirate").stdout
    assert "  System\n    You are a pirate." in summary and "  Parameters\n" in summary

    assert cli(command, store_server.host, "cp", "pirate", "pirate2").stdout == "copied 'pirate' to 'pirate2'\n"
    assert "pirate2:latest" in cli(command, store_server.host, "ls").stdout
    done = cli(command, store_server.host, "rm", "pirate", "pirate2")
    assert done.stdout == "deleted 'pirate'\ndeleted 'pirate2'\n", done.stderr
    assert "pirate" not in cli(command, store_server.host, "list").stdout


def test_create_uploads_a_local_gguf(command, store_server, tmp_path):
    from tests.tiny import make_hf_model, write_gguf

    write_gguf(make_hf_model("llama"), tmp_path / "tiny.gguf", "llama", "F32")
    (tmp_path / "Modelfile").write_text("FROM ./tiny.gguf\n")
    done = cli(command, store_server.host, "create", "tiny", "-f", str(tmp_path / "Modelfile"))
    assert done.returncode == 0, done.stderr
    copied = [line for line in done.stderr.splitlines() if line.startswith("copying file sha256:")]
    assert copied and copied[-1].endswith(" 100%")
    digest = copied[-1].split()[2]
    assert store_server.store.has_blob(digest)
    assert done.stderr.splitlines()[-1] == "success"
    assert "tiny:latest" in cli(command, store_server.host, "list").stdout


def test_create_sends_the_path_when_the_server_has_no_blobs_endpoint(command, tmp_path):
    from tests.tiny import make_hf_model, write_gguf
    from tp_ollama.store.registry import ModelStore

    store = ModelStore(tmp_path / "models")
    app = create_app(LocalEngine(), store=store, version=__version__)
    app.router.routes[:] = [r for r in app.router.routes if "/api/blobs" not in getattr(r, "path", "")]
    write_gguf(make_hf_model("llama"), tmp_path / "tiny.gguf", "llama", "F32")
    (tmp_path / "Modelfile").write_text("FROM tiny.gguf\n")
    with serving(app) as host:
        done = cli(command, host, "create", "tiny-local", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "copying file" not in done.stderr and done.stderr.splitlines()[-1] == "success"
    assert [e.name for e in store.list() if e.name.startswith("tiny")] == ["tiny-local:latest"]


def test_create_errors(command, store_server, tmp_path):
    assert_one_line_error(cli(command, store_server.host, "create", "x", cwd=tmp_path),
                          f"cannot read the Modelfile {tmp_path / 'Modelfile'}: No such file or directory")  # fmt: skip
    (tmp_path / "Modelfile").write_text("PARAMETER temperature 1\n")
    assert_one_line_error(cli(command, store_server.host, "create", "x", cwd=tmp_path), "no FROM line")


# --- formatting ----------------------------------------------------------------------------------


def test_formats_match_ollama():
    assert [human_bytes(n) for n in (512, 4_700_000_000, 2_019_393_189, 270_000_000, 91_000_000)] == [
        "512 B", "4.7 GB", "2.0 GB", "270 MB", "91 MB",
    ]  # fmt: skip
    now = datetime(2025, 1, 1, tzinfo=UTC)
    assert human_time(now - timedelta(minutes=2, seconds=5), now) == "2 minutes ago"
    assert human_time(now - timedelta(days=15), now) == "2 weeks ago"
    assert human_time(now + timedelta(minutes=4, seconds=30), now) == "4 minutes from now"
    assert human_time(now + timedelta(days=365 * 290), now) == "Forever"
    assert [go_duration(n) for n in (0, 953_997, 342_546_000, 1_162_761_250, 62_500_000_000)] == [
        "0s", "953.997µs", "342.546ms", "1.16276125s", "1m2.5s",
    ]  # fmt: skip
    assert [processor(100, 0), processor(100, 100), processor(100, 52)] == ["100% CPU", "100% GPU", "48%/52% CPU/GPU"]
    assert table(["NAME", "ID"], [["a:latest", "123"]]) == "NAME        ID\na:latest    123"


def test_show_summary_sections():
    info = {
        "model_info": {"general.architecture": "llama", "general.parameter_count": 134515008,
                       "llama.context_length": 8192, "llama.embedding_length": 576},
        "details": {"quantization_level": "Q4_1"},
        "capabilities": ["completion"],
        "parameters": 'stop                           "<|im_end|>"\ntemperature                    0.3',
        "system": "Be brief.",
        "license": "Apache 2.0\nline 2\nline 3",
    }  # fmt: skip
    text = show_summary(info)
    assert "    architecture        llama\n    parameters          134.52M\n" in text
    assert "    context length      8192\n    embedding length    576\n    quantization        Q4_1\n" in text
    assert "  Capabilities\n    completion\n" in text
    assert '    stop           "<|im_end|>"\n    temperature    0.3\n' in text
    assert "  System\n    Be brief.\n" in text
    assert "  License\n    Apache 2.0\n    line 2\n    ...\n" in text
