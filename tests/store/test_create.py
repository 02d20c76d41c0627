"""Creating models: from a GGUF file, an HF directory, uploaded blobs, an installed or embedded model,
and from Modelfile text (round trips of `show`'s modelfile included). Real tiny checkpoints written in
the test."""

from __future__ import annotations

import hashlib
import json

import pytest

from tests.store.helpers import FULL, TEMPLATE, blobs
from tp_ollama.checkpoints.loader import open_checkpoint
from tp_ollama.errors import CheckpointError, ModelNotFound, RequestError
from tp_ollama.store import manifests
from tp_ollama.store.embedded import EMBEDDED
from tp_ollama.store.inspect import human_number
from tp_ollama.store.modelfile import parse_modelfile
from tp_ollama.store.names import InvalidModelName


def tiny_size(model) -> str:
    return human_number(sum(p.numel() for p in model.parameters()))


def test_create_from_gguf_file(store, gguf_path, tiny_llama):
    statuses: list[str] = []
    entry = store.create("Me/Pirate:v1", gguf_path, progress=statuses.append, **FULL)
    weights = "sha256:" + hashlib.sha256(gguf_path.read_bytes()).hexdigest()
    assert statuses[:2] == ["gathering model components", "parsing GGUF"]
    assert f"creating new layer {weights}" in statuses
    assert statuses[-2:] == ["writing manifest", "success"]
    assert entry.name == "Me/Pirate:v1"
    assert entry.details.to_dict() == {
        "parent_model": "",
        "format": "gguf",
        "family": "llama",
        "families": ["llama"],
        "parameter_size": tiny_size(tiny_llama),
        "quantization_level": "F32",
    }
    manifest = (store.root / "manifests/registry.ollama.ai/Me/Pirate/v1").read_bytes()
    assert entry.digest == hashlib.sha256(manifest).hexdigest()
    body = json.loads(manifest)
    assert body["schemaVersion"] == 2
    assert body["mediaType"] == "application/vnd.docker.distribution.manifest.v2+json"
    assert body["config"]["mediaType"] == "application/vnd.docker.container.image.v1+json"
    kinds = [layer["mediaType"].rsplit(".", 1)[1] for layer in body["layers"]]
    assert kinds == ["model", "template", "system", "license", "params", "messages"]
    config = json.loads((store.blobs / body["config"]["digest"].replace(":", "-")).read_bytes())
    assert (config["model_format"], config["model_family"], config["model_type"], config["file_type"]) == (
        "gguf",
        "llama",
        tiny_size(tiny_llama),
        "F32",
    )
    assert entry.size == body["config"]["size"] + sum(layer["size"] for layer in body["layers"])

    r = store.resolve("me/pirate:V1")
    assert r.name == "Me/Pirate:v1"  # the installed casing wins
    assert r.path == store.blobs / weights.replace(":", "-")
    assert r.path.read_bytes() == gguf_path.read_bytes()
    assert (r.template, r.system, r.license) == (TEMPLATE, "You are terse.", ["MIT License"])
    assert r.params == {"temperature": 0.2, "stop": ["<|user|>", "###"], "num_ctx": 2048}
    assert r.messages == [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    assert r.digest == entry.digest
    assert store.list()[0].name == "Me/Pirate:v1"  # newest first


def test_create_from_hf_directory(store, hf_dir, tiny_llama):
    statuses: list[str] = []
    entry = store.create("tiny-hf", hf_dir, system="sys", progress=statuses.append)
    assert "parsing safetensors model" in statuses and statuses[-1] == "success"
    assert entry.details.format == "safetensors"
    assert entry.details.family == "llama"
    assert entry.details.quantization_level == "F32"
    assert entry.details.parameter_size == tiny_size(tiny_llama)
    r = store.resolve("tiny-hf")
    assert r.format == "safetensors" and r.system == "sys"
    assert sorted(p.name for p in r.path.iterdir()) == sorted(
        p.name for p in hf_dir.iterdir() if p.name != "pytorch_model.bin"
    )
    for file in r.path.iterdir():  # the store owns the bytes: links into its blobs
        assert file.is_symlink() and file.resolve().parent == store.blobs
        assert file.read_bytes() == (hf_dir / file.name).read_bytes()
    ckpt = open_checkpoint(r.path)
    assert ckpt.format == "safetensors" and ckpt.config.num_hidden_layers == 3
    show = store.show("tiny-hf")
    assert show["model_info"]["llama.embedding_length"] == 64
    assert "<|assistant|>" in show["template"]  # the directory's chat template


def test_create_from_an_existing_model(store, gguf_path):
    store.create("base", gguf_path, **FULL)
    before = blobs(store)
    entry = store.create(
        "derived",
        "base",
        system="New system.",
        parameters={"temperature": 0.9, "top_k": 5},
        license="Second license",
    )
    assert entry.details.parent_model == "base:latest"
    r = store.resolve("derived")
    assert r.path == store.resolve("base").path  # the weights layer is shared, not copied
    assert r.system == "New system." and r.template == TEMPLATE
    assert r.params == {"stop": ["<|user|>", "###"], "num_ctx": 2048, "temperature": 0.9, "top_k": 5}
    assert r.license == ["MIT License", "Second license"]
    assert r.messages == [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    new = blobs(store) - before
    assert all((store.blobs / b).stat().st_size < 4096 for b in new)  # only small layers and a config


def test_create_from_an_embedded_model_copies_no_weights(store):
    statuses: list[str] = []
    store.create("gemma-pirate", "gemma3:270m", system="Arr.", progress=statuses.append)
    r = store.resolve("gemma-pirate")
    assert r.path == EMBEDDED["gemma3:270m"]() and r.system == "Arr."
    assert r.details.parent_model == "gemma3:270m" and r.details.quantization_level == "Q4_K_M"
    assert all((store.blobs / b).stat().st_size < 4096 for b in blobs(store))
    assert statuses[-1] == "success"


def test_create_rejects_bad_requests(store, gguf_path):
    with pytest.raises(RequestError, match="neither 'from' or 'files' was specified"):
        store.create("x")
    with pytest.raises(RequestError, match="unknown parameter 'temprature'"):
        store.create("x", gguf_path, parameters={"temprature": 1})
    with pytest.raises(RequestError, match="role"):
        store.create("x", gguf_path, messages=[{"role": "tool", "content": "x"}])
    with pytest.raises(ModelNotFound, match="model 'nope:latest' not found"):
        store.create("x", "nope:latest")
    with pytest.raises(InvalidModelName):
        store.create("bad/name/with/parts", gguf_path)
    with pytest.raises(CheckpointError, match="no such file"):
        store.create("x", gguf_path.with_name("missing.gguf"))
    assert "x:latest" not in {e.name for e in store.list()}


def test_a_failed_create_leaves_no_blobs(store, tmp_path):
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf at all" * 100)
    with pytest.raises(CheckpointError, match="not a GGUF file"):
        store.create("junk", junk, system="s")
    assert blobs(store) == set()


def test_create_from_uploaded_blobs(store, gguf_path, hf_dir):
    data = gguf_path.read_bytes()
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    with gguf_path.open("rb") as f:
        store.add_blob(digest, f)
    store.create("from-files", files={"tiny.gguf": digest})
    store.create("from-at", f"@{digest}")
    assert store.resolve("from-files").path == store.resolve("from-at").path == store.blob_path(digest)

    files = {}
    for file in hf_dir.iterdir():
        if file.name.endswith((".json", ".safetensors")):
            files[file.name] = "sha256:" + hashlib.sha256(file.read_bytes()).hexdigest()
            store.add_blob(files[file.name], file.read_bytes())
    entry = store.create("hf-files", files=files)
    assert entry.details.format == "safetensors"
    assert open_checkpoint(store.resolve("hf-files").path).config.hidden_size == 64

    with pytest.raises(RequestError, match="not found"):
        store.create("x", files={"m.gguf": "sha256:" + "1" * 64})
    with pytest.raises(RequestError, match="must be relative"):
        store.create("x", files={"../m.gguf": digest})
    text = b"plain text"
    text_digest = "sha256:" + hashlib.sha256(text).hexdigest()
    store.add_blob(text_digest, text)
    with pytest.raises(RequestError, match="one GGUF file"):
        store.create("x", files={"notes.txt": text_digest})


@pytest.fixture
def written(monkeypatch) -> list[int]:
    """Sizes of the blobs the store writes from here on."""
    sizes: list[int] = []
    commit = manifests.BlobWriter.commit

    def recording(self, pin=False):
        sizes.append(self.size)
        return commit(self, pin)

    monkeypatch.setattr(manifests.BlobWriter, "commit", recording)
    return sizes


def test_show_modelfile_round_trips(store, gguf_path, written):
    store.create("orig", gguf_path, **{**FULL, "system": "  spaced\nand multi-line "})
    modelfile = store.show("orig")["modelfile"]
    assert modelfile.startswith('# Modelfile generated by "ollama show"')
    before = blobs(store)
    written.clear()
    store.create_from_modelfile("again", modelfile)
    assert blobs(store) == before  # every layer reused
    assert max(written) < 4096  # FROM names our own blob: the weights were not even copied
    a, b = store.resolve("orig"), store.resolve("again")
    assert (a.path, a.template, a.system, a.params, a.messages, a.license) == (
        b.path,
        b.template,
        b.system,
        b.params,
        b.messages,
        b.license,
    )
    assert store.show("again")["modelfile"].split("\n", 4)[4] == modelfile.split("\n", 4)[4]


def test_modelfile_with_a_relative_path(store, gguf_path):
    text = "FROM ./tiny.gguf\nPARAMETER stop <|user|>\nSYSTEM hi\n"
    store.create_from_modelfile("rel", text, base_dir=gguf_path.parent)
    assert store.resolve("rel").params == {"stop": ["<|user|>"]}
    assert parse_modelfile(store.show("rel")["modelfile"]).system == "hi"


def test_embedded_modelfile_round_trip_copies_no_weights(store, written):
    modelfile = store.show("smollm2:135m")["modelfile"]
    store.create_from_modelfile("smol-again", modelfile.replace("\n\nFROM", "\n\nSYSTEM hi\nFROM"))
    r = store.resolve("smol-again")
    assert r.path == EMBEDDED["smollm2:135m"]() and r.system == "hi"
    assert max(written) < 4096
