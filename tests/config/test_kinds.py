"""Kinds of setting values: what each takes from a file and from text (env, flags), and what it refuses."""

from __future__ import annotations

from pathlib import Path

import pytest

from tp_ollama.config.kinds import Bool, Directory, Duration, Given, Host, Int, List, Size, Str
from tp_ollama.config.values import InvalidValue


def from_file(value: object) -> Given:
    return Given(value, "in test.yaml", base=Path("/etc/tp-ollama"))


def from_text(value: str) -> Given:
    return Given(value, "from --test", text=True)


def test_int_reads_text_only_from_env_and_flags():
    kind = Int(0, 10)
    assert kind.parse(from_file(7)) == 7
    assert kind.parse(from_text(" +7 ")) == 7
    for bad in (from_file("7"), from_file(True), from_file(11), from_text("-1"), from_text("7.5")):
        with pytest.raises(InvalidValue, match=r"expected an integer 0\.\.10"):
            kind.parse(bad)
    assert Int(1, note="1: one").expected == "an integer >= 1 (1: one)"


def test_bool_reads_words_only_from_env_and_flags():
    kind = Bool()
    assert (kind.parse(from_file(True)), kind.parse(from_text("Off")), kind.parse(from_text("yes"))) == (
        True,
        False,
        True,
    )
    with pytest.raises(InvalidValue, match="expected true or false"):
        kind.parse(from_file("yes"))
    assert (kind.show(True), kind.show(False)) == ("true", "false")


def test_str_choices_and_planned_values():
    kind = Str(("tensor",), {"layerwise": "pipeline partitioning"})
    assert kind.parse(from_file(" tensor ")) == "tensor"
    with pytest.raises(InvalidValue, match='expected one of "tensor"'):
        kind.parse(from_file("rows"))
    with pytest.raises(InvalidValue, match="is not implemented yet: pipeline partitioning"):
        kind.parse(from_file("layerwise"))
    with pytest.raises(InvalidValue, match="a non-empty string"):
        Str().parse(from_file(""))


def test_host_drops_ipv6_brackets_and_refuses_urls():
    assert (Host().parse(from_file("[::1]")), Host().parse(from_file("::1"))) == ("::1", "::1")
    for bad in ("http://x", "a b", "", 5):
        with pytest.raises(InvalidValue, match="expected a host name"):
            Host().parse(from_file(bad))


def test_duration_bounds_and_spelling():
    assert Duration(0).parse(from_file("1h30m")) == 5400.0
    assert Duration(0).parse(from_file(0)) == 0.0
    with pytest.raises(InvalidValue, match=r"> 0s"):
        Duration(0, strict=True).parse(from_file(0))
    with pytest.raises(InvalidValue, match=r">= 0s \(0: no limit\)"):
        Duration(0, note="0: no limit").parse(from_file("-1s"))
    assert Duration().parse(from_file(-1)) == -1.0
    assert Duration().show(300.0) == "5m"


def test_size_lower_bound_and_spelling():
    assert Size(lo=1024).parse(from_file("64MiB")) == 64 * 2**20
    with pytest.raises(InvalidValue, match="of at least 1024 bytes"):
        Size(lo=1024).parse(from_file(1000))
    assert Size().show(64 * 2**20) == "64MiB"


def test_list_from_yaml_or_comma_separated_text():
    kind = List(float, "numbers")
    assert kind.parse(from_file([2, 1])) == (2.0, 1.0)
    assert kind.parse(from_text("2, 1,,1")) == (2.0, 1.0, 1.0)
    for bad in (from_file("2,1"), from_file(["x"])):
        with pytest.raises(InvalidValue, match="expected numbers"):
            kind.parse(bad)


def test_directory_is_relative_to_the_file_and_expands_home():
    assert Directory().parse(from_file("models")) == Path("/etc/tp-ollama/models")
    assert Directory().parse(from_text("/srv/models")) == Path("/srv/models")
    assert Directory().parse(from_file("~/m")) == Path.home() / "m"
    with pytest.raises(InvalidValue, match="expected a directory path"):
        Directory().parse(from_file(" "))
