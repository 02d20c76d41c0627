"""Durations, sizes and OLLAMA_HOST: parsing, the errors, and spellings that read back."""

from __future__ import annotations

import pytest

from tp_ollama.config.values import (
    OllamaHost,
    format_duration,
    format_size,
    parse_duration,
    parse_ollama_host,
    parse_size,
)
from tp_ollama.errors import ConfigError

# ---- durations and sizes -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("30s", 30.0),
        ("5m", 300.0),
        ("1h", 3600.0),
        ("1h30m", 5400.0),
        ("500ms", 0.5),
        ("1.5h", 5400.0),
        ("2m30.5s", 150.5),
        ("250us", 0.00025),
        ("0", 0.0),
        ("300", 300.0),
        (" 45 ", 45.0),
        (300, 300.0),
        (1.5, 1.5),
        ("-1", -1.0),
        ("-5m", -300.0),
        (-1, -1.0),
    ],
)
def test_durations(text, seconds):
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("bad", ["5 minutes", "", "1d", "5m3", "m", "1h-30m", "--5m", "five", True, None, [5], ".inf"])
def test_bad_durations_say_what_is_expected(bad):
    with pytest.raises(ConfigError, match=r'expected a duration such as "30s", "5m", "1h30m"'):
        parse_duration(bad)


@pytest.mark.parametrize("seconds", [0.0, 0.5, 30.0, 300.0, 5400.0, 3600.0, 150.5, -1.0, -300.0])
def test_formatted_durations_read_back(seconds):
    assert parse_duration(format_duration(seconds)) == seconds


def test_duration_spellings():
    assert [format_duration(s) for s in (300, 5400, 0.5, 0, -1)] == ["5m", "1h30m", "500ms", "0s", "-1s"]


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("1GB", 10**9),
        ("1G", 10**9),
        ("1.5G", 1_500_000_000),
        ("512MiB", 512 * 2**20),
        ("512Mi", 512 * 2**20),
        ("64mib", 64 * 2**20),
        ("1KB", 1000),
        ("1 KiB", 1024),
        ("100B", 100),
        ("100", 100),
        (4096, 4096),
        (0, 0),
    ],
)
def test_sizes(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("bad", ["1 gigabyte", "GB", "", "-1GB", "1.5B", "0.1KiB", "1XB", "1iB", True, None, -5, 1.5])
def test_bad_sizes_say_what_is_expected(bad):
    with pytest.raises(ConfigError, match=r'expected a size such as "1GB", "512MiB", "1.5G"'):
        parse_size(bad)


def test_size_spellings_read_back():
    for n in (64 * 2**20, 10**9, 1000, 1024, 1500, 7):
        assert parse_size(format_size(n)) == n
    assert [format_size(n) for n in (64 * 2**20, 10**9, 1_500_000_000)] == ["64MiB", "1GB", "1500MB"]


# ---- OLLAMA_HOST ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("", ("http", "127.0.0.1", 11434)),
        ("1.2.3.4", ("http", "1.2.3.4", 11434)),
        ("1.2.3.4:1234", ("http", "1.2.3.4", 1234)),
        (":1234", ("http", "127.0.0.1", 1234)),  # NOTE: Ollama would bind every interface
        (":0", ("http", "127.0.0.1", 0)),
        ("example.com", ("http", "example.com", 11434)),
        ("example.com:1234", ("http", "example.com", 1234)),
        ("example.com/", ("http", "example.com", 11434)),
        ("0.0.0.0", ("http", "0.0.0.0", 11434)),
        ("[::1]", ("http", "::1", 11434)),
        ("[::]", ("http", "::", 11434)),
        ("::1", ("http", "::1", 11434)),
        ("[::1]:1337", ("http", "::1", 1337)),
        (" 1.2.3.4 ", ("http", "1.2.3.4", 11434)),
        ('"1.2.3.4"', ("http", "1.2.3.4", 11434)),
        (' " 1.2.3.4 " ', ("http", "1.2.3.4", 11434)),
        ("'1.2.3.4'", ("http", "1.2.3.4", 11434)),
        ("http://1.2.3.4", ("http", "1.2.3.4", 80)),
        ("http://1.2.3.4:4321", ("http", "1.2.3.4", 4321)),
        ("https://1.2.3.4", ("https", "1.2.3.4", 443)),
        ("https://1.2.3.4:4321", ("https", "1.2.3.4", 4321)),
    ],
)
def test_ollama_host(value, expected):
    assert parse_ollama_host(value)[:3] == expected


def test_ollama_host_keeps_a_proxy_path_for_clients():
    host = parse_ollama_host("https://example.com/ollama")
    assert host == OllamaHost("https", "example.com", 443, "/ollama")
    assert host.client_url() == "https://example.com:443/ollama"


@pytest.mark.parametrize(
    ("value", "url"),
    [
        ("0.0.0.0", "http://127.0.0.1:11434"),
        ("0.0.0.0:8080", "http://127.0.0.1:8080"),
        ("[::]:8080", "http://[::1]:8080"),
        ("[::1]:1337", "http://[::1]:1337"),
        ("1.2.3.4", "http://1.2.3.4:11434"),
    ],
)
def test_clients_connect_to_loopback_instead_of_a_wildcard(value, url):
    assert parse_ollama_host(value).client_url() == url


@pytest.mark.parametrize("value", [":66000", ":-1", "1.2.3.4:abc", "ftp://1.2.3.4", "[::1"])
def test_bad_ollama_host(value):
    with pytest.raises(ConfigError, match="OLLAMA_HOST"):
        parse_ollama_host(value)
