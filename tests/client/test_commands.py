"""The Ollama-style client commands as a user runs them: real processes talking HTTP to a real server
(uvicorn in a thread, LocalEngine, the embedded smollm2:135m; see tests/client/conftest.py)."""

from __future__ import annotations

import subprocess
import sys

from tests.client.live import FRANCE, SMOL, assert_one_line_error, cli, serving
from tests.local_engine import LocalEngine
from tp_ollama import __version__
from tp_ollama.server.app import create_app
from tp_ollama.store.embedded import smollm2_135m


def test_tp_ollama_has_the_client_commands():
    done = subprocess.run([sys.executable, "-m", "tp_ollama", "--help"], capture_output=True, text=True, timeout=60)
    for name in ("run", "pull", "push", "list", "ps", "show", "rm", "cp", "create", "stop"):
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
    from tp_ollama.store.model_store import ModelStore

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


# --- pull --------------------------------------------------------------------------------------------


def test_pull_shows_each_step_and_run_pulls_what_the_server_lacks(command, store_server):
    """A registry double on a loopback port serves the embedded SmolLM2 GGUF under two names."""
    from pathlib import Path

    from tests.store.registry_double import RegistryDouble

    weights = Path(smollm2_135m()).read_bytes()
    double = RegistryDouble()
    double.add_model("library", "smol", "a", weights)
    double.add_model("library", "smol", "b", weights)
    with serving(double.app()) as url:
        registry = url.removeprefix("http://")
        done = cli(command, store_server.host, "pull", f"{registry}/library/smol:a", "--insecure")
        assert done.returncode == 0, done.stderr
        lines = done.stderr.splitlines()
        assert lines[0] == "pulling manifest" and lines[-3:] == [
            "verifying sha256 digest",
            "writing manifest",
            "success",
        ]
        assert any(line.startswith("pulling ") and "100% ▕" in line for line in lines), lines
        assert f"{registry}/library/smol:a" in cli(command, store_server.host, "list").stdout
        assert (
            cli(command, store_server.host, "cp", f"{registry}/library/smol:a", f"{registry}/me/smol:c").returncode == 0
        )
        done = cli(command, store_server.host, "push", f"{registry}/me/smol:c", "--insecure")
        assert done.returncode == 0, done.stderr
        assert done.stderr.splitlines()[-2:] == ["pushing manifest", "success"]
        assert ("me", "smol", "c") in double.manifests
        # run: a model the server lacks is pulled first (its registry must speak https, or be told
        # otherwise: a plain-http one is refused without --insecure, as upstream).
        done = cli(command, store_server.host, "run", f"{registry}/library/smol:b", "hi")
        assert done.returncode == 1 and "pulling manifest" in done.stderr
    done = cli(command, store_server.host, "pull", "127.0.0.1:9/library/none:1", "--insecure")
    assert done.returncode == 1 and done.stderr.splitlines()[0] == "pulling manifest"
    assert done.stderr.splitlines()[-1].startswith(
        "Error: pulling 127.0.0.1:9/library/none:1: cannot reach 127.0.0.1:9"
    )
