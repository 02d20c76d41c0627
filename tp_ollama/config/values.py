"""Values as people write them: Go-style durations, sizes with units, and OLLAMA_HOST addresses.

Each parser reads what a config file, an environment variable or a flag may hold and raises one
`InvalidValue` (a ConfigError) saying what was expected; each formatter writes the spelling its parser
reads back.
"""

from __future__ import annotations

import math
import re
from decimal import Decimal, InvalidOperation
from typing import Any, NamedTuple

from tp_ollama.errors import ConfigError

DEFAULT_PORT = 11434


class InvalidValue(ConfigError):
    """A value that does not parse. The settings loader adds the key and where the value came from."""

    def __init__(self, value: Any, expected: str, reason: str | None = None) -> None:
        self.reason = reason or f"is invalid: expected {expected}"
        super().__init__(f"{value!r} {self.reason}")


# ---- durations -------------------------------------------------------------------------------------

DURATION_EXPECTED = 'a duration such as "30s", "5m", "1h30m", "500ms" or a number of seconds'
_DURATION_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "μs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_NUMBER = r"(?:\d+(?:\.\d*)?|\.\d+)"
_DURATION_PART = re.compile(rf"({_NUMBER})(ns|us|µs|μs|ms|s|m|h)")


def parse_duration(value: Any) -> float:
    """Go's time.ParseDuration ("1h30m", "-5m", "500ms") or a number of seconds (int, float or text)."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise InvalidValue(value, DURATION_EXPECTED)
    if isinstance(value, str):
        text = value.strip()
        sign, body = (-1.0, text[1:]) if text[:1] == "-" else (1.0, text.removeprefix("+"))
        if re.fullmatch(_NUMBER, body):
            seconds = float(body)
        elif re.fullmatch(rf"(?:{_DURATION_PART.pattern})+", body):
            seconds = sum(float(n) * _DURATION_UNITS[u] for n, u in _DURATION_PART.findall(body))
        else:
            raise InvalidValue(value, DURATION_EXPECTED)
        value = sign * seconds
    if not math.isfinite(value):
        raise InvalidValue(value, DURATION_EXPECTED)
    return float(value)


def format_duration(seconds: float) -> str:
    """The Go-style spelling parse_duration reads back: 300 -> "5m", 5400 -> "1h30m", 0.5 -> "500ms"."""
    if seconds < 0:
        return "-" + format_duration(-seconds)
    if seconds == 0 or seconds >= 1:
        h, rest = divmod(seconds, 3600)
        m, s = divmod(rest, 60)
        text = (f"{h:.0f}h" if h else "") + (f"{m:.0f}m" if m else "") + (f"{s:g}s" if s else "")
        return text or "0s"
    return f"{seconds * 1000:g}ms"


# ---- sizes -----------------------------------------------------------------------------------------

SIZE_EXPECTED = 'a size such as "1GB", "512MiB", "1.5G" or a number of bytes'
_SIZE = re.compile(rf"({_NUMBER})\s*(?:([kmgtp])(i?))?b?", re.IGNORECASE)
_SIZE_POWERS = {"k": 1, "m": 2, "g": 3, "t": 4, "p": 5}


def parse_size(value: Any) -> int:
    """Bytes from "1GB" / "1.5G" (powers of 1000), "512MiB" / "512Mi" (powers of 1024) or an int."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise InvalidValue(value, SIZE_EXPECTED)
    if isinstance(value, str):
        m = _SIZE.fullmatch(value.strip())
        if m is None:
            raise InvalidValue(value, SIZE_EXPECTED)
        number, prefix, binary = m.groups()
        power = _SIZE_POWERS[prefix.lower()] if prefix else 0
        size = Decimal(number) * (1024 if binary else 1000) ** power
    else:
        try:
            size = Decimal(value)
        except InvalidOperation:
            raise InvalidValue(value, SIZE_EXPECTED) from None
    if not size.is_finite() or size < 0 or size != size.to_integral_value():
        raise InvalidValue(value, SIZE_EXPECTED + " (a whole, non-negative number of bytes)")
    return int(size)


def format_size(n: int) -> str:
    """The shortest exact spelling: 67108864 -> "64MiB", 10**9 -> "1GB", 1000 -> "1KB"."""
    for power in range(4, 0, -1):
        for unit, base in (("iB", 1024), ("B", 1000)):
            if n and n % base**power == 0:
                return f"{n // base**power}{'KMGT'[power - 1]}{unit}"
    return f"{n}B"


# ---- hosts -----------------------------------------------------------------------------------------


class OllamaHost(NamedTuple):
    scheme: str
    host: str  # without brackets; "" never (the default host is filled in)
    port: int
    path: str = ""  # "/ollama" for a proxy path, else ""

    def client_url(self) -> str:
        return client_url(self.host, self.port, self.scheme, self.path)


def strip_env(value: str) -> str:
    """Ollama trims spaces and quotes around every variable's value: ` " 1.2.3.4 " ` -> 1.2.3.4."""
    return value.strip().strip("\"'").strip()


def parse_ollama_host(value: str) -> OllamaHost:
    """OLLAMA_HOST as Ollama reads it: `host`, `host:port`, `:port`, `scheme://host:port/path`, `[::1]:1337`.

    Without a port: http -> 80, https -> 443, no scheme -> 11434. NOTE: `:port` binds 127.0.0.1 here,
    where Ollama binds every interface; listening beyond loopback must be asked for (0.0.0.0), for safety.
    A bad port is an error here (Ollama logs a warning and uses the default port).
    """
    text = strip_env(value)
    scheme, sep, hostport = text.partition("://")
    if not sep:
        scheme, hostport = "http", text
    if scheme not in ("http", "https"):
        raise ConfigError(f"OLLAMA_HOST {value!r} is invalid: expected the scheme http or https, got {scheme!r}")
    hostport, _, path = hostport.partition("/")
    if hostport.startswith("["):
        host, bracket, rest = hostport[1:].partition("]")
        if not bracket or rest[:1] not in ("", ":"):
            raise ConfigError(f"OLLAMA_HOST {value!r} is invalid: expected [IPv6] or [IPv6]:PORT")
        port_text = rest[1:]
    elif hostport.count(":") == 1:
        host, port_text = hostport.split(":")
    else:  # a name, an IPv4 address or a bare IPv6 address such as ::1
        host, port_text = hostport, ""
    port = {"http": 80, "https": 443}[scheme] if sep else DEFAULT_PORT
    if port_text:
        if not port_text.isdigit() or int(port_text) > 65535:
            raise ConfigError(f"OLLAMA_HOST {value!r} has an invalid port {port_text!r}: expected 0..65535")
        port = int(port_text)
    return OllamaHost(scheme, host or "127.0.0.1", port, f"/{path}" if path else "")


def client_url(host: str, port: int, scheme: str = "http", path: str = "") -> str:
    """Where a client connects to a server bound to host:port: a wildcard address becomes loopback."""
    host = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}.get(host, host)
    return f"{scheme}://{host_port(host, port)}{path}"


def host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
