"""A command body's errors as the user sees them: one line on stderr and an exit status."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator

import pytest
import typer

from tp_ollama.cli_support import run_reporting_errors
from tp_ollama.errors import ConfigError
from tp_ollama.logs import LEVEL_ENV


@pytest.fixture(autouse=True)
def restored() -> Iterator[None]:
    """The environment and the root logger as they were: run_reporting_errors sets up both."""
    environ, root = dict(os.environ), logging.getLogger()
    handlers, level = list(root.handlers), root.level
    os.environ.pop(LEVEL_ENV, None)
    yield
    os.environ.clear()
    os.environ.update(environ)
    root.handlers[:] = handlers
    root.setLevel(level)


def fails(error: BaseException) -> None:
    raise error


def test_the_body_runs_and_its_value_comes_back() -> None:
    assert run_reporting_errors(False, lambda: 42) == 42


def test_a_user_error_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(typer.Exit) as done:
        run_reporting_errors(False, lambda: fails(ConfigError("--tp 0 is invalid")))
    assert done.value.exit_code == 1
    assert capsys.readouterr().err == "Error: --tp 0 is invalid\n"


def test_an_unexpected_error_names_its_type_and_debug(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(typer.Exit) as done:
        run_reporting_errors(False, lambda: fails(ValueError("boom")))
    assert done.value.exit_code == 1
    assert capsys.readouterr().err == "Error: ValueError: boom (run with --debug for the traceback)\n"


def test_debug_lets_the_error_through() -> None:
    with pytest.raises(ValueError, match="boom"):
        run_reporting_errors(True, lambda: fails(ValueError("boom")))


def test_ctrl_c_exits_130() -> None:
    with pytest.raises(typer.Exit) as done:
        run_reporting_errors(False, lambda: fails(KeyboardInterrupt()))
    assert done.value.exit_code == 130


def test_a_bad_log_level_is_one_line_and_the_body_does_not_run(capsys: pytest.CaptureFixture[str]) -> None:
    ran = []
    with pytest.raises(typer.Exit) as done:
        run_reporting_errors(False, lambda: ran.append(1), "loud")
    assert done.value.exit_code == 1 and ran == []
    assert capsys.readouterr().err == (
        "Error: --log-level 'loud' is invalid: expected one of debug, info, warning, error\n"
    )


def test_the_level_is_handed_down() -> None:
    run_reporting_errors(False, lambda: None, "warning")
    assert os.environ[LEVEL_ENV] == "warning"
    assert logging.getLogger().level == logging.WARNING
