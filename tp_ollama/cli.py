"""The tp-ollama command line. It parses and calls; nothing heavy is imported until a command runs."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from typing import Annotated, TypeVar

import typer

from tp_ollama import __version__

app = typer.Typer(
    name="tp-ollama",
    help="An Ollama-compatible LLM server whose model is split across processes, GPUs or machines.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

T = TypeVar("T")

DebugOpt = Annotated[bool, typer.Option("--debug", help="Show tracebacks and debug logs.")]


def run_reporting_errors(debug: bool, fn: Callable[[], T]) -> T:
    """Run a command body; a user-facing error becomes one line on stderr and exit status 1."""
    logging.basicConfig(
        level=logging.DEBUG if debug else logging.WARNING,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    from tp_ollama.errors import TpOllamaError

    try:
        return fn()
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


@app.command()
def version() -> None:
    """Print the version."""
    typer.echo(__version__)


@app.command()
def generate(
    model: Annotated[str, typer.Argument(help="gemma3:270m, smollm2:135m, a GGUF file or an HF directory.")],
    prompt: Annotated[str, typer.Argument(help="The prompt (completed as is unless --chat).")],
    chat: Annotated[bool, typer.Option("--chat", help="Send the prompt as a user message.")] = False,
    system: Annotated[str | None, typer.Option(help="System message (with --chat).")] = None,
    temperature: Annotated[float, typer.Option(help="0 is greedy.")] = 0.8,
    seed: Annotated[int | None, typer.Option(help="Seed for reproducible sampling.")] = None,
    num_predict: Annotated[int, typer.Option(help="Maximum tokens to generate (-1: until EOS).")] = -1,
    top_k: Annotated[int, typer.Option(help="Keep the k most likely tokens (0: off).")] = 40,
    top_p: Annotated[float, typer.Option(help="Nucleus sampling threshold (1: off).")] = 0.9,
    min_p: Annotated[float, typer.Option(help="Drop tokens below min_p x the top probability.")] = 0.0,
    repeat_penalty: Annotated[float, typer.Option(help="Penalty for recent tokens (1: off).")] = 1.0,
    repeat_last_n: Annotated[int, typer.Option(help="How many recent tokens the penalties see.")] = 64,
    stop: Annotated[list[str] | None, typer.Option(help="Stop string; repeat for several.")] = None,
    num_ctx: Annotated[int, typer.Option(help="Context window in tokens.")] = 4096,
    dtype: Annotated[str, typer.Option(help="float32 or bfloat16.")] = "float32",
    debug: DebugOpt = False,
) -> None:
    """Generate text for one prompt and write only the generated text to stdout."""

    def body() -> None:
        from tp_ollama.checkpoints.loader import parse_dtype
        from tp_ollama.completion import load, prompt_tokens, stream_text
        from tp_ollama.engine.options import GenerationOptions, SamplingOptions

        options = GenerationOptions(
            sampling=SamplingOptions(
                temperature=temperature,
                seed=seed,
                top_k=top_k,
                top_p=top_p,
                min_p=min_p,
                repeat_penalty=repeat_penalty,
                repeat_last_n=repeat_last_n,
            ),
            num_predict=num_predict,
            num_ctx=num_ctx,
            stop=tuple(stop or ()),
        )
        loaded = load(model, parse_dtype(dtype))
        ids = prompt_tokens(loaded.tokenizer, prompt, chat=chat, system=system)
        for piece in stream_text(loaded, ids, options):
            sys.stdout.write(piece)
            sys.stdout.flush()
        if sys.stdout.isatty():  # keep the shell prompt off the last line; pipes get the text exactly
            sys.stdout.write("\n")

    run_reporting_errors(debug, body)


def main() -> None:
    app()
