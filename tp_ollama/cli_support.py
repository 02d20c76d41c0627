"""What every tp-ollama command shares: running its body with logging set up, a user-facing error
reported as one line on stderr (exit status 1), Ctrl-C as exit status 130."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TypeVar

import typer

T = TypeVar("T")


def run_reporting_errors(
    debug: bool, fn: Callable[[], T], log_level: str | None = None, default_level: str = "info"
) -> T:
    """Run a command body; a user-facing error becomes one line on stderr and exit status 1. `debug`
    shows tracebacks; `log_level` (--log-level) is resolved with `debug` by tp_ollama.logs, and
    `default_level` applies when nothing asks for one."""
    from tp_ollama.errors import TpOllamaError
    from tp_ollama.launch import ReportedError
    from tp_ollama.logs import setup_logging

    try:
        if setup_logging(log_level, debug, default_level) != "debug":
            # torchrun's agent and c10d log every worker exit and store shutdown at WARNING/ERROR;
            # our error line says what matters once. Set before torch.distributed is imported.
            os.environ.setdefault("LOGLEVEL", "CRITICAL")
            os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "FATAL")
        return fn()
    except ReportedError:
        raise typer.Exit(1) from None
    except TpOllamaError as e:
        if debug:
            raise
        typer.echo(f"Error: {e}", err=True)
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        raise typer.Exit(130) from None
    except Exception as e:
        if debug:
            raise
        typer.echo(f"Error: {type(e).__name__}: {e} (run with --debug for the traceback)", err=True)
        raise typer.Exit(1) from None
