"""tp_ollama.server.store_schemas: the model-store routes' bodies parsed without a server. `from` told apart as a
blob, a path on the server or a model name; the legacy `modelfile` merged under the explicit fields; upstream's
400s; and the reply lines (the routes end to end: test_store_routes.py, test_pull_push.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tp_ollama.errors import RequestError
from tp_ollama.server.schemas import ApiError
from tp_ollama.server.store_schemas import (
    blob_digest,
    create_source,
    display_name,
    layer_line,
    parse_copy,
    parse_create,
    parse_show,
    parse_transfer,
)

HEX = "ab" * 32


def test_from_is_a_blob_a_path_on_the_server_or_a_model_name():
    assert create_source(f"sha256:{HEX}") == create_source(f"@sha256:{HEX}") == f"@sha256:{HEX}"
    assert create_source("/models/m.gguf") == Path("/models/m.gguf")
    assert create_source("./m.gguf") == Path("./m.gguf")
    assert create_source("~/m.gguf") == Path.home() / "m.gguf"
    assert create_source("llama3.2:1b") == "llama3.2:1b"
    with pytest.raises(ApiError, match="invalid model name in 'from'") as e:
        create_source("bad name!")
    assert e.value.status == 400
    assert display_name("smollm2") == "smollm2:latest"


def test_explicit_fields_win_over_the_legacy_modelfile():
    req = parse_create(
        {
            "model": "pirate",
            "modelfile": "FROM smollm2:135m\nSYSTEM from the modelfile\nPARAMETER temperature 0.5\nLICENSE MIT\n",
            "system": "You are a pirate.",
            "stream": False,
        }
    )
    assert (req.model, req.from_, req.system, req.stream) == ("pirate", "smollm2:135m", "You are a pirate.", False)
    assert req.parameters == {"temperature": 0.5} and req.license == ["MIT"]
    files = parse_create({"model": "m", "files": {"m.gguf": f"sha256:{HEX}"}, "from": "ignored", "license": "MIT"})
    assert files.from_ is None and files.files == {"m.gguf": f"sha256:{HEX}"} and files.license == ["MIT"]


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"model": "m"}, "neither 'from' or 'files' was specified"),
        ({"model": "m", "from": "x", "quantize": "q4_K_M"}, "quantize is not supported by tp-ollama"),
        ({"model": "m", "from": "x", "adapters": {"a": f"sha256:{HEX}"}}, "LoRA adapters are not supported"),
        ({"model": "m", "files": {"m.gguf": 3}}, "field 'files' must map file names to blob digests; 'm.gguf'"),
        ({"model": "m", "from": "x", "messages": ["hi"]}, "field 'messages' must be an array of objects"),
        ({"model": "m", "from": "x", "license": ["a", 1]}, "field 'license' must be a string or an array of strings"),
        ({"from": "x"}, "model is required"),
    ],
)
def test_a_create_that_cannot_be_done_is_400(body: dict[str, Any], message: str):
    with pytest.raises(ApiError, match=message) as e:
        parse_create(body)
    assert e.value.status == 400


def test_show_copy_and_transfer_bodies():
    assert parse_show({"model": "m", "verbose": True}).verbose is True
    assert parse_show({"name": "m"}).model == "m"  # the legacy field
    assert parse_copy({"source": "a", "destination": "b:2"}) == ("a", "b:2")
    with pytest.raises(ApiError, match='destination "bad name" is invalid'):
        parse_copy({"source": "a", "destination": "bad name"})
    transfer = parse_transfer({"model": "m", "insecure": True, "stream": False, "username": "ignored"})
    assert (transfer.model, transfer.insecure, transfer.stream) == ("m", True, False)
    with pytest.raises(ApiError, match="field 'insecure' must be"):
        parse_transfer({"model": "m", "insecure": "yes"})


def test_blob_digests_and_reply_lines():
    assert blob_digest(f"sha256-{HEX}") == blob_digest(f"sha256:{HEX}") == f"sha256:{HEX}"
    with pytest.raises(RequestError, match="invalid digest format"):
        blob_digest("md5:abc")
    line = layer_line("pulling", f"sha256:{HEX}", 1234)
    assert line == {"status": f"pulling {HEX[:12]}", "digest": f"sha256:{HEX}", "total": 1234, "completed": 1234}
    assert layer_line("pulling", f"sha256:{HEX}", 1234, 1000)["completed"] == 1000
