"""The model store: names, the embedded models, create / copy / delete / show, blobs. Real tiny GGUF
files and HF directories written in the test; the embedded GGUFs are hashed once per session."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pytest

from tests.tiny import make_hf_model, save_hf, save_tiny_tokenizer, write_gguf
from tp_ollama.checkpoints.loader import open_checkpoint
from tp_ollama.errors import CheckpointError, ModelNotFound, RequestError
from tp_ollama.store import registry
from tp_ollama.store.embedded import EMBEDDED, normalize_name
from tp_ollama.store.modelfile import parse_modelfile
from tp_ollama.store.names import InvalidModelName, parse_name
from tp_ollama.store.registry import ModelStore, human_number

HEX64 = re.compile(r"[0-9a-f]{64}")
TEMPLATE = "{{ if .System }}<|system|>{{ .System }}{{ end }}<|user|>{{ .Prompt }}<|assistant|>"


@pytest.fixture(scope="session")
def facts(tmp_path_factory) -> Path:
    """One file-facts cache for the session, so the embedded GGUFs are hashed once, not per store."""
    return tmp_path_factory.mktemp("facts") / "files.json"


@pytest.fixture
def store(tmp_path, facts) -> ModelStore:
    return ModelStore(tmp_path / "models", facts_path=facts)


@pytest.fixture(scope="session")
def tiny_llama():
    return make_hf_model("llama")


@pytest.fixture(scope="session")
def gguf_path(tmp_path_factory, tiny_llama) -> Path:
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    write_gguf(tiny_llama, path, "llama", "F32")
    return path


@pytest.fixture(scope="session")
def hf_dir(tmp_path_factory, tiny_llama) -> Path:
    directory = tmp_path_factory.mktemp("hf") / "tiny"
    save_hf(tiny_llama, directory)
    save_tiny_tokenizer(directory)
    (directory / "pytorch_model.bin").write_bytes(b"not stored")  # other weight formats are left out
    return directory


def blobs(store: ModelStore) -> set[str]:
    return {p.name for p in store.blobs.iterdir()} if store.blobs.is_dir() else set()


def tiny_size(model) -> str:
    return human_number(sum(p.numel() for p in model.parameters()))


# --- names -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "spelling", ["m", "m:latest", "library/m:latest", "registry.ollama.ai/library/m:latest", "M:LATEST", "Library/M"]
)
def test_name_spellings_are_one_name(spelling):
    assert parse_name(spelling) == parse_name("m")
    assert hash(parse_name(spelling)) == hash(parse_name("m"))
    assert parse_name(spelling).display.lower() == "m:latest"


@pytest.mark.parametrize(
    ("name", "display", "path"),
    [
        ("gemma3:270m", "gemma3:270m", "manifests/registry.ollama.ai/library/gemma3/270m"),
        ("me/pirate", "me/pirate:latest", "manifests/registry.ollama.ai/me/pirate/latest"),
        ("hf.co/org/repo:Q4_K_M", "hf.co/org/repo:Q4_K_M", "manifests/hf.co/org/repo/Q4_K_M"),
        ("localhost:5000/ns/m", "localhost:5000/ns/m:latest", "manifests/localhost:5000/ns/m/latest"),
    ],
)
def test_display_form_and_manifest_path(name, display, path):
    parsed = parse_name(name)
    assert parsed.display == display
    assert str(parsed.manifest_path) == path


@pytest.mark.parametrize(
    "name", ["", "./model.gguf", "a/b/c/d", "m:", ":tag", "m:a/b", ".hidden", "ns.dot/m", "m@sha256:00", "m" * 81]
)
def test_invalid_names(name, store):
    with pytest.raises(InvalidModelName) as e:
        parse_name(name)
    assert str(e.value) == "invalid model name"
    with pytest.raises(InvalidModelName):
        store.resolve(name)


def test_normalize_name_is_lenient():
    assert normalize_name(" library/gemma3:270m ") == "gemma3:270m"
    assert normalize_name("smollm2") == "smollm2:latest"
    assert normalize_name("./x.gguf") == "./x.gguf"  # not a name: unchanged, so a lookup misses


# --- the embedded models -------------------------------------------------------------------------------


def test_embedded_models_are_listed_without_a_pull(store):
    entries = {e.name: e for e in store.list()}
    assert set(EMBEDDED) <= set(entries)
    gemma, smol = entries["gemma3:270m"], entries["smollm2:135m"]
    assert (gemma.details.format, gemma.details.family, gemma.details.families) == ("gguf", "gemma3", ("gemma3",))
    assert (smol.details.format, smol.details.family, smol.details.families) == ("gguf", "llama", ("llama",))
    assert (gemma.details.quantization_level, smol.details.quantization_level) == ("Q4_K_M", "Q4_1")
    assert gemma.details.parameter_size == "268.10M"
    assert smol.details.parameter_size == "134.52M"
    for entry in (gemma, smol):
        assert HEX64.fullmatch(entry.digest)
        assert entry.model == entry.name
        assert entry.size > EMBEDDED[entry.name]().stat().st_size  # the weights plus the config blob
    assert not store.manifests.exists() and not store.blobs.exists()  # nothing was copied


def test_embedded_model_resolves_to_the_package_file(store):
    resolved = store.resolve("registry.ollama.ai/library/SmolLM2:135m")
    assert resolved.path == EMBEDDED["smollm2:135m"]()
    assert resolved.format == "gguf" and resolved.template is None and resolved.params == {}
    assert resolved.digest == {e.name: e for e in store.list()}["smollm2:135m"].digest


def test_embedded_digests_are_cached_by_path_size_and_mtime(tmp_path, facts, monkeypatch):
    first = ModelStore(tmp_path / "a", facts_path=facts).list()

    def no_hashing(path):
        raise AssertionError(f"hashed {path} again")

    monkeypatch.setattr(registry, "_hash_file", no_hashing)
    monkeypatch.setattr(registry, "inspect_checkpoint", no_hashing)
    again = ModelStore(tmp_path / "b", facts_path=facts).list()
    assert [(e.name, e.digest) for e in again] == [(e.name, e.digest) for e in first]


def test_deleting_an_embedded_model_hides_it_until_restored(store, facts):
    store.delete("gemma3:270m")
    assert "gemma3:270m" not in {e.name for e in store.list()}
    with pytest.raises(ModelNotFound, match="model 'gemma3:270m' not found"):
        store.resolve("gemma3:270m")
    with pytest.raises(ModelNotFound):
        store.delete("gemma3:270m")
    assert ModelStore(store.root, facts_path=facts).resolve("smollm2:135m").path.is_file()  # the other is untouched
    assert store.restore_embedded("GEMMA3:270M")
    assert store.resolve("gemma3:270m").path == EMBEDDED["gemma3:270m"]()
    assert not store.restore_embedded("llama3.2")


def test_show_embedded_model(store):
    show = store.show("smollm2:135m")
    info = show["model_info"]
    assert info["general.architecture"] == "llama"
    assert info["general.parameter_count"] == 134515008
    assert info["llama.context_length"] == 8192
    assert "general.name" not in info and "tokenizer.chat_template" not in info
    assert info["tokenizer.ggml.tokens"] == []  # long arrays only with verbose
    assert "<|im_start|>" in show["template"]  # the GGUF's own chat template
    assert show["details"]["quantization_level"] == "Q4_1"
    assert show["capabilities"][0] == "completion"
    assert f"FROM {EMBEDDED['smollm2:135m']()}\n" in show["modelfile"]
    assert "TEMPLATE" not in show["modelfile"]  # no TEMPLATE layer: the checkpoint's template applies


# --- create --------------------------------------------------------------------------------------------

FULL = dict(
    system="You are terse.",
    template=TEMPLATE,
    parameters={"temperature": 0.2, "stop": ["<|user|>", "###"], "num_ctx": "2048"},
    messages=[{"role": "user", "content": "hi"}, {"role": "Assistant", "content": "hello"}],
    license="MIT License",
)


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


def test_show_reflects_a_created_model(store, gguf_path):
    store.create("pirate", gguf_path, **FULL)
    show = store.show("pirate")
    assert show["template"] == TEMPLATE and show["system"] == "You are terse."
    assert show["license"] == "MIT License"
    assert show["parameters"].splitlines() == [
        "temperature                    0.2",
        'stop                           "<|user|>"',
        'stop                           "###"',
        "num_ctx                        2048",
    ]
    assert show["messages"][1] == {"role": "assistant", "content": "hello"}
    assert show["model_info"]["general.parameter_count"] == sum(p.numel() for p in make_hf_model("llama").parameters())
    assert show["model_info"]["llama.block_count"] == 3
    assert show["capabilities"] == ["completion"]
    assert show["details"]["format"] == "gguf"
    assert "modified_at" in show


def test_capabilities_follow_the_template(store, gguf_path):
    store.create("tools", gguf_path, template="{{ if .Tools }}{{ .Tools }}{{ end }}{{ .Prompt }}")
    store.create("fim", gguf_path, template="<PRE>{{ .Prompt }}<SUF>{{ .Suffix }}<MID>")
    assert store.show("tools")["capabilities"] == ["completion", "tools"]
    assert store.show("fim")["capabilities"] == ["completion", "insert"]


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


def test_create_replaces_a_model_and_prunes_its_old_layers(store, gguf_path):
    store.create("m", gguf_path, system="first")
    first = blobs(store)
    store.create("m", gguf_path, system="second")
    assert store.resolve("m").system == "second"
    old_system = "sha256-" + hashlib.sha256(b"first").hexdigest()
    assert old_system in first and old_system not in blobs(store)
    assert len([e for e in store.list() if e.name == "m:latest"]) == 1


# --- copy and delete -----------------------------------------------------------------------------------


def test_copy(store, gguf_path):
    store.create("src", gguf_path, system="s")
    store.copy("SRC", "other/dst:tag")
    entries = {e.name: e for e in store.list()}
    assert entries["other/dst:tag"].digest == entries["src:latest"].digest
    assert store.resolve("other/dst:tag").system == "s"
    with pytest.raises(ModelNotFound, match='model "missing" not found'):
        store.copy("missing", "x")
    with pytest.raises(InvalidModelName):
        store.copy("src", "bad name")


def test_copy_an_embedded_model(store, facts):
    store.copy("smollm2:135m", "smol-copy")
    fresh = ModelStore(store.root, facts_path=facts)  # as in a new process: learns the embedded digests
    assert fresh.resolve("smol-copy").path == EMBEDDED["smollm2:135m"]()
    digests = {e.name: e.digest for e in store.list()}
    assert digests["smol-copy:latest"] == digests["smollm2:135m"]
    store.delete("smol-copy")
    assert "smollm2:135m" in {e.name for e in store.list()}


def test_delete_removes_only_unreferenced_blobs(store, gguf_path):
    store.create("a", gguf_path, system="only in a")
    store.copy("a", "b")
    store.create("c", "a", system="only in c")
    uploaded = b"an upload not used by any model yet"
    store.add_blob("sha256:" + hashlib.sha256(uploaded).hexdigest(), uploaded)
    weights = store.resolve("a").path.name
    all_blobs = blobs(store)

    store.delete("a")
    assert blobs(store) == all_blobs  # b still holds everything a had
    assert not (store.root / "manifests/registry.ollama.ai/library/a").exists()  # empty dirs pruned
    store.delete("b")
    a_system = "sha256-" + hashlib.sha256(b"only in a").hexdigest()
    assert a_system not in blobs(store) and weights in blobs(store)  # c still uses the weights
    store.delete("c")
    assert blobs(store) == {"sha256-" + hashlib.sha256(uploaded).hexdigest()}
    with pytest.raises(ModelNotFound, match="model 'a' not found"):
        store.delete("a")


def test_delete_an_hf_model_removes_its_view(store, hf_dir):
    store.create("hf", hf_dir)
    view = store.resolve("hf").path
    store.delete("hf")
    assert not view.exists() and blobs(store) == set()


# --- blobs ---------------------------------------------------------------------------------------------


def test_blobs_with_good_and_bad_digests(store):
    data = b"some bytes"
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    assert not store.has_blob(digest)
    assert store.add_blob(digest, data) is True
    assert store.has_blob(digest) and store.has_blob(digest.replace(":", "-"))
    assert store.add_blob(digest, iter([b"some ", b"bytes"])) is False  # already there
    wrong = "sha256:" + "0" * 64
    with pytest.raises(RequestError, match=f'digest mismatch, expected "{wrong}", got "{digest}"'):
        store.add_blob(wrong, data)
    assert not store.has_blob(wrong)
    assert blobs(store) == {digest.replace(":", "-")}  # no partial file left behind
    for bad in ("sha256:abc", "md5:" + "0" * 64, "sha256:" + "G" * 64):
        with pytest.raises(RequestError, match="invalid digest format"):
            store.has_blob(bad)


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


# --- the Modelfile round trip --------------------------------------------------------------------------


@pytest.fixture
def written(monkeypatch) -> list[int]:
    """Sizes of the blobs the store writes from here on."""
    sizes: list[int] = []
    commit = registry.BlobWriter.commit

    def recording(self, pin=False):
        sizes.append(self.size)
        return commit(self, pin)

    monkeypatch.setattr(registry.BlobWriter, "commit", recording)
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
