"""Model names: the spellings of one name, its display form and manifest path, invalid names."""

from __future__ import annotations

import pytest

from tp_ollama.store.names import InvalidModelName, normalize_name, parse_name


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
