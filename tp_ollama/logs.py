"""Logging for every tp-ollama process: one line per record on stderr, in the style of Ollama's server
logs (`time=... level=INFO source=engine.loop msg="..."`), at one level resolved once and handed down.

The level: an explicit `--log-level` > env TP_OLLAMA_LOG_LEVEL > OLLAMA_DEBUG (as upstream) > `--debug`
> info. The resolved level is written back into TP_OLLAMA_LOG_LEVEL, so the processes this one starts
(the engine group, torchrun's workers) log at the same level by calling `setup_logging()` themselves.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import TextIO

from tp_ollama.errors import ConfigError

LEVEL_ENV = "TP_OLLAMA_LOG_LEVEL"
LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}
# Ollama's OLLAMA_DEBUG is a Go bool (1, t, true, ...); upstream's 2 (trace) is our debug as well.
OLLAMA_DEBUG_ON = frozenset({"1", "t", "true", "y", "yes", "on"})
# Third-party loggers that say something for every request: kept at WARNING unless the level is debug.
NOISY = ("httpx", "httpcore", "uvicorn.access")
# slog's short names; CRITICAL keeps its own.
LEVEL_NAMES = {logging.DEBUG: "DEBUG", logging.INFO: "INFO", logging.WARNING: "WARN", logging.ERROR: "ERROR"}


def resolve_level(level: str | None, debug: bool, environ: Mapping[str, str], default: str = "info") -> str:
    """The level name (a key of LEVELS) for these flags and this environment."""
    return _resolve(level, debug, environ, default)[0]


def _resolve(level: str | None, debug: bool, environ: Mapping[str, str], default: str) -> tuple[str, str]:
    """(the level name, where it came from)."""
    if level is not None:
        return _checked(level, "--log-level"), "--log-level"
    if environ.get(LEVEL_ENV):
        return _checked(environ[LEVEL_ENV], LEVEL_ENV), LEVEL_ENV
    if _ollama_debug(environ.get("OLLAMA_DEBUG", "")):
        return "debug", "OLLAMA_DEBUG"
    return ("debug", "--debug") if debug else (_checked(default, "the default level"), "the default")


def _checked(value: str, where: str) -> str:
    name = value.strip().lower()
    if name not in LEVELS:
        raise ConfigError(f"{where} {value!r} is invalid: expected one of {', '.join(LEVELS)}")
    return name


def _ollama_debug(value: str) -> bool:
    text = value.strip().lower()
    return text in OLLAMA_DEBUG_ON or (text.isdigit() and int(text) > 0)


class LineFormatter(logging.Formatter):
    """`time=2026-12-07T10:00:00.123Z level=INFO source=engine.loop msg="loaded gemma3:270m"`: UTC time to
    the millisecond, the logger's name without the package prefix, the message quoted when it needs it
    (as Go's slog does), so one record is one line; a traceback, if any, follows on its own lines."""

    def format(self, record: logging.LogRecord) -> str:
        when = datetime.fromtimestamp(record.created, UTC)
        stamp = when.strftime("%Y-%m-%dT%H:%M:%S.") + f"{when.microsecond // 1000:03d}Z"
        level = LEVEL_NAMES.get(record.levelno, record.levelname)
        source = record.name.removeprefix("tp_ollama.")
        line = f"time={stamp} level={level} source={source} msg={quote(record.getMessage())}"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def quote(text: str) -> str:
    """The text as is when it is one plain word, else a double-quoted string with escapes."""
    plain = text and all(c.isprintable() and c not in ' ="\\' for c in text)
    return text if plain else json.dumps(text, ensure_ascii=False)


class StderrHandler(logging.StreamHandler[TextIO]):
    """Writes to whatever sys.stderr is when a record comes (test capture, a replaced stream)."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stderr
        super().emit(record)


def setup_logging(level: str | None = None, debug: bool = False, default: str = "info") -> str:
    """Configure the root logger once (calling again only changes the level); the resolved level name,
    also left in os.environ[TP_OLLAMA_LOG_LEVEL] for child processes. `default` applies when nothing
    asks for a level (a one-shot command that prints only its answer passes "warning")."""
    name, source = _resolve(level, debug, os.environ, default)
    root = logging.getLogger()
    handler = next((h for h in root.handlers if isinstance(h, StderrHandler)), None)
    if handler is None:
        handler = StderrHandler()
        root.addHandler(handler)
    handler.setFormatter(LineFormatter())
    root.setLevel(LEVELS[name])
    for noisy in NOISY:
        logging.getLogger(noisy).setLevel(logging.NOTSET if name == "debug" else logging.WARNING)
    os.environ[LEVEL_ENV] = name
    logging.getLogger(__name__).debug("logging at %s (from %s)", name, source)
    return name
