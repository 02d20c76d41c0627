"""Logging: the level resolved from flag, environment and OLLAMA_DEBUG, handed down to child
processes, and one line per record in Ollama's style."""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
from collections.abc import Iterator

import pytest

from tp_ollama.errors import ConfigError
from tp_ollama.logs import LEVEL_ENV, LineFormatter, StderrHandler, quote, resolve_level, setup_logging

LINE = re.compile(r"time=\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z level=(\w+) source=(\S+) msg=(.*)")


def fields(line: str) -> tuple[str, ...]:
    """(level, source, msg) of one log line, which must match the format as a whole."""
    match = LINE.fullmatch(line)
    assert match is not None, line
    return match.groups()


@pytest.fixture(autouse=True)
def clean_logging(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """No level in the environment to start with; the root logger and os.environ as they were after."""
    monkeypatch.delenv(LEVEL_ENV, raising=False)
    monkeypatch.delenv("OLLAMA_DEBUG", raising=False)
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    noisy = {name: logging.getLogger(name).level for name in ("httpx", "httpcore", "uvicorn.access")}
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    for name, was in noisy.items():
        logging.getLogger(name).setLevel(was)
    os.environ.pop(LEVEL_ENV, None)  # monkeypatch restores what was there before


@pytest.mark.parametrize(
    ("flag", "debug", "env", "expected"),
    [
        (None, False, {}, "info"),
        (None, True, {}, "debug"),
        ("warning", True, {}, "warning"),
        ("ERROR", False, {}, "error"),
        (None, False, {LEVEL_ENV: "warning"}, "warning"),
        ("debug", False, {LEVEL_ENV: "warning"}, "debug"),
        (None, True, {LEVEL_ENV: "error"}, "error"),
        (None, False, {"OLLAMA_DEBUG": "1"}, "debug"),
        (None, False, {"OLLAMA_DEBUG": "true"}, "debug"),
        (None, False, {"OLLAMA_DEBUG": "yes"}, "debug"),
        (None, False, {"OLLAMA_DEBUG": "2"}, "debug"),
        (None, False, {"OLLAMA_DEBUG": "0"}, "info"),
        (None, False, {"OLLAMA_DEBUG": "false"}, "info"),
        (None, False, {"OLLAMA_DEBUG": ""}, "info"),
        (None, True, {"OLLAMA_DEBUG": "0"}, "debug"),
        (None, False, {"OLLAMA_DEBUG": "1", LEVEL_ENV: "warning"}, "warning"),
        ("info", False, {"OLLAMA_DEBUG": "1"}, "info"),
    ],
)
def test_level_resolution(flag: str | None, debug: bool, env: dict[str, str], expected: str) -> None:
    assert resolve_level(flag, debug, env) == expected


def test_a_bad_level_names_it_and_the_allowed_ones() -> None:
    with pytest.raises(ConfigError) as flag:
        resolve_level("loud", False, {})
    assert str(flag.value) == "--log-level 'loud' is invalid: expected one of debug, info, warning, error"
    with pytest.raises(ConfigError) as env:
        resolve_level(None, False, {LEVEL_ENV: "verbose"})
    assert str(env.value) == f"{LEVEL_ENV} 'verbose' is invalid: expected one of debug, info, warning, error"


def test_setup_configures_the_root_once_and_hands_the_level_down(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OLLAMA_DEBUG", "1")
    assert setup_logging() == "debug"
    assert os.environ[LEVEL_ENV] == "debug"
    assert logging.getLogger().level == logging.DEBUG
    assert logging.getLogger("httpx").level == logging.NOTSET
    assert setup_logging("warning") == "warning"
    assert os.environ[LEVEL_ENV] == "warning"
    root = logging.getLogger()
    assert root.level == logging.WARNING
    assert sum(isinstance(h, StderrHandler) for h in root.handlers) == 1
    assert logging.getLogger("httpx").level == logging.WARNING
    assert logging.getLogger("uvicorn.access").level == logging.WARNING


def test_a_child_process_logs_at_the_parents_level() -> None:
    setup_logging("error")
    child = (
        "import logging; from tp_ollama.logs import setup_logging; print(setup_logging()); "
        "log = logging.getLogger('tp_ollama.engine.loop'); log.warning('hidden'); log.error('shown')"
    )
    done = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "error\n"  # logs go to stderr only
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    assert fields(lines[0]) == ("ERROR", "engine.loop", "shown")


def test_the_format_is_one_line_in_ollamas_style() -> None:
    formatter = LineFormatter()
    record = logging.LogRecord("tp_ollama.engine.loop", logging.INFO, __file__, 1, "loaded %s in %.1f s",
                               ("gemma3:270m", 1.25), None)  # fmt: skip
    record.created = 1796637600.1239  # 2026-12-07T10:00:00.123Z
    assert formatter.format(record) == (
        'time=2026-12-07T10:00:00.123Z level=INFO source=engine.loop msg="loaded gemma3:270m in 1.2 s"'
    )
    warn = logging.LogRecord("httpx", logging.WARNING, __file__, 1, 'two\nlines "quoted"', None, None)
    line = formatter.format(warn)
    assert "\n" not in line
    assert fields(line) == ("WARN", "httpx", '"two\\nlines \\"quoted\\""')


def test_quote_as_slog_does() -> None:
    assert quote("ready") == "ready"
    assert quote("") == '""'
    assert quote("a b") == '"a b"'
    assert quote("k=v") == '"k=v"'
    assert quote("µs") == "µs"


def test_records_go_to_the_current_stderr(capsys: pytest.CaptureFixture[str]) -> None:
    setup_logging("info")
    logging.getLogger("tp_ollama.server.serve").info("listening on %s", "127.0.0.1:11434")
    logging.getLogger("tp_ollama.server.serve").debug("not shown")
    out, err = capsys.readouterr()
    assert out == ""
    assert [fields(line) for line in err.splitlines()] == [("INFO", "server.serve", '"listening on 127.0.0.1:11434"')]
