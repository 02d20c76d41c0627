"""Ollama's client commands (`run`, `pull`, `push`, `list`/`ls`, `ps`, `show`, `rm`, `cp`, `create`, `stop`), talking
HTTP to the server at OLLAMA_HOST. `register(app)` adds them to the main command line.

Output follows the `ollama` CLI: the same tables, `show` sections, `--verbose` statistics and
one-line `Error: ...` messages (exit status 1); `pull` shows each layer's progress, and `run` pulls a
model the server lacks first, as upstream does. Differences: `--nowordwrap` is accepted but answers are
never wrapped, and `create` with FROM a directory sends the directory's path, which the server (node 0)
must be able to read.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import sys
from collections.abc import Callable, Iterable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import typer

from tp_ollama.cli_support import run_reporting_errors
from tp_ollama.client.chat import Chat, stream_answer
from tp_ollama.client.format import human_bytes, human_time, parse_time, processor, show_summary, stats, table

if TYPE_CHECKING:
    from tp_ollama.client.http import Client

T = TypeVar("T")

DebugOpt = Annotated[bool, typer.Option("--debug", help="Show tracebacks.")]
ModelArg = Annotated[str, typer.Argument(help="Model name, e.g. smollm2:135m.")]


def register(app: typer.Typer) -> None:
    """Add the client commands to `app`."""
    app.command("run")(run)
    app.command("pull")(pull)
    app.command("push")(push)
    app.command("list")(list_models)
    app.command("ls", hidden=True)(list_models)
    app.command("ps")(ps)
    app.command("show")(show)
    app.command("rm")(rm)
    app.command("cp")(cp)
    app.command("create")(create)
    app.command("stop")(stop)


def _with_client(debug: bool, fn: Callable[[Client], T]) -> T:
    from tp_ollama.client.http import Client, server_url

    def body() -> T:
        with Client(server_url(os.environ)) as client:
            return fn(client)

    return run_reporting_errors(debug, body)


# --- run ----------------------------------------------------------------------------------------------


def run(
    model: ModelArg,
    prompt: Annotated[list[str] | None, typer.Argument(help="The prompt; without one, an interactive chat.")] = None,
    verbose: Annotated[bool, typer.Option("--verbose", help="Print timings and token rates.")] = False,
    nowordwrap: Annotated[bool, typer.Option("--nowordwrap", help="Accepted; answers are never wrapped.")] = False,
    format: Annotated[str | None, typer.Option("--format", help="Response format (json: not supported yet).")] = None,
    keepalive: Annotated[str | None, typer.Option("--keepalive", help="How long the model stays loaded (5m).")] = None,
    debug: DebugOpt = False,
) -> None:
    """Run a model: answer PROMPT (or stdin), or chat interactively."""

    def body(client: Client) -> None:
        from tp_ollama.errors import RequestError

        if format is not None:
            raise RequestError(
                "--format json is not supported yet" if format == "json" else f"invalid format {format!r}"
            )
        base: dict[str, Any] = {"model": model}
        if keepalive is not None:
            from tp_ollama.config.values import parse_duration

            try:
                parse_duration(keepalive)
            except ValueError as e:
                raise RequestError(f"--keepalive {e}") from None
            base["keep_alive"] = keepalive
        _pull_if_missing(client, model)
        words = list(prompt or [])
        if not sys.stdin.isatty():  # piped input is prepended to the prompt, as ollama does
            piped = sys.stdin.read()
            words[:0] = [piped] if piped else []
        if words:
            _, final = stream_answer(
                client, {**base, "messages": [{"role": "user", "content": " ".join(words)}]}, sys.stdout
            )
            sys.stdout.write("\n")
            sys.stdout.flush()
            if verbose:
                typer.echo(stats(final), err=True)
        else:
            Chat(client, base, verbose).loop()

    _with_client(debug, body)


def _pull_if_missing(client: Client, model: str) -> None:
    from tp_ollama.client.http import ClientError

    try:
        client.show(model)
    except ClientError as e:
        if e.no_route:  # a server without /api/show: the answer will say whether the model is there
            return
        if e.status != 404:
            raise
        try:
            show_pull(client, model)
        except ClientError as pulling:
            if pulling.no_route:  # a server without /api/pull: the model is simply missing
                raise e from None
            raise


# --- pull ---------------------------------------------------------------------------------------------


def pull(
    model: ModelArg,
    insecure: Annotated[bool, typer.Option("--insecure", help="Allow a plain-http registry.")] = False,
    debug: DebugOpt = False,
) -> None:
    """Pull a model from a registry (registry.ollama.ai by default; HOST:PORT/NAMESPACE/MODEL:TAG for another)."""
    _with_client(debug, lambda client: show_pull(client, model, insecure))


def push(
    model: ModelArg,
    insecure: Annotated[bool, typer.Option("--insecure", help="Allow a plain-http registry.")] = False,
    debug: DebugOpt = False,
) -> None:
    """Push a model to the registry its name holds (HOST:PORT/NAMESPACE/MODEL:TAG)."""
    _with_client(debug, lambda client: show_progress(client.push(model, insecure)))


def show_pull(client: Client, model: str, insecure: bool = False) -> None:
    show_progress(client.pull(model, insecure))


def show_progress(parts: Iterable[dict[str, Any]]) -> None:
    """A pull's or push's progress as upstream's CLI shows it: one line per step, and for each layer a
    line of its progress (rewritten in place on a terminal, its final state elsewhere)."""
    tty = sys.stderr.isatty()
    current = ""
    for part in parts:
        status = str(part.get("status", ""))
        total = int(part.get("total") or 0)
        if total:
            done = int(part.get("completed") or 0)
            line = f"{status}: {done * 100 // total:3d}% ▕{_bar(done, total)}▏ {human_bytes(done)}/{human_bytes(total)}"
            if tty:
                sys.stderr.write(("\r" if status == current else "\n" if current else "") + line)
                sys.stderr.flush()
            elif done >= total:
                say(line)
            current = status
            continue
        if tty and current:
            sys.stderr.write("\n")
        current = ""
        say(status)


def _bar(done: int, total: int, width: int = 20) -> str:
    full = done * width // total if total else width
    return "█" * full + " " * (width - full)


# --- list, ps, show -----------------------------------------------------------------------------------


def list_models(
    prefix: Annotated[str | None, typer.Argument(help="Only names that start with this.")] = None,
    debug: DebugOpt = False,
) -> None:
    """List installed models."""

    def body(client: Client) -> None:
        now = datetime.now(UTC)
        rows = [
            [m["name"], str(m.get("digest", ""))[:12], human_bytes(int(m.get("size", 0))),
             human_time(parse_time(m.get("modified_at")), now)]
            for m in client.tags()
            if prefix is None or m["name"].startswith(prefix)
        ]  # fmt: skip
        typer.echo(table(["NAME", "ID", "SIZE", "MODIFIED"], rows))

    _with_client(debug, body)


def ps(debug: DebugOpt = False) -> None:
    """List running models."""

    def body(client: Client) -> None:
        now = datetime.now(UTC)
        rows = []
        for m in client.ps():
            size, vram = int(m.get("size", 0)), int(m.get("size_vram", 0))
            expires = parse_time(m.get("expires_at"))
            until = "Stopping..." if expires is not None and expires < now else human_time(expires, now, "Forever")
            context = str(m.get("context_length", ""))
            rows.append(
                [m["name"], str(m.get("digest", ""))[:12], human_bytes(size), processor(size, vram), context, until]
            )
        typer.echo(table(["NAME", "ID", "SIZE", "PROCESSOR", "CONTEXT", "UNTIL"], rows))

    _with_client(debug, body)


def show(
    model: ModelArg,
    modelfile: Annotated[bool, typer.Option("--modelfile", help="Show the Modelfile.")] = False,
    parameters: Annotated[bool, typer.Option("--parameters", help="Show the parameters.")] = False,
    template: Annotated[bool, typer.Option("--template", help="Show the template.")] = False,
    system: Annotated[bool, typer.Option("--system", help="Show the system message.")] = False,
    license: Annotated[bool, typer.Option("--license", help="Show the license.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Show all model metadata.")] = False,
    debug: DebugOpt = False,
) -> None:
    """Show information about a model."""

    def body(client: Client) -> None:
        from tp_ollama.errors import RequestError

        chosen = [k for k, on in [("license", license), ("modelfile", modelfile), ("parameters", parameters),
                                  ("system", system), ("template", template)] if on]  # fmt: skip
        if len(chosen) > 1:
            raise RequestError(
                "only one of '--license', '--modelfile', '--parameters', '--system', or '--template' can be specified"
            )
        info = client.show(model, verbose)
        typer.echo(str(info.get(chosen[0], "")) if chosen else show_summary(info, verbose))

    _with_client(debug, body)


# --- rm, cp, stop -------------------------------------------------------------------------------------


def rm(models: Annotated[list[str], typer.Argument(help="Models to delete.")], debug: DebugOpt = False) -> None:
    """Remove models."""

    def body(client: Client) -> None:
        from tp_ollama.client.http import ClientError

        for name in models:
            with contextlib.suppress(ClientError):  # unload first, as ollama does; it may not be loaded
                client.generate({"model": name, "keep_alive": 0})
            client.delete(name)
            typer.echo(f"deleted '{name}'")

    _with_client(debug, body)


def cp(
    source: Annotated[str, typer.Argument(help="Existing model.")],
    destination: Annotated[str, typer.Argument(help="New name.")],
    debug: DebugOpt = False,
) -> None:
    """Copy a model."""

    def body(client: Client) -> None:
        client.copy(source, destination)
        typer.echo(f"copied '{source}' to '{destination}'")

    _with_client(debug, body)


def stop(model: ModelArg, debug: DebugOpt = False) -> None:
    """Stop (unload) a running model."""

    def body(client: Client) -> None:
        from tp_ollama.client.http import ClientError

        try:
            client.generate({"model": model, "prompt": "", "keep_alive": 0})
        except ClientError as e:
            if e.status == 404:
                raise ClientError(f'couldn\'t find model "{model}" to stop', 404) from None
            raise

    _with_client(debug, body)


# --- create -------------------------------------------------------------------------------------------


def create(
    name: Annotated[str, typer.Argument(help="Name of the new model.")],
    file: Annotated[str, typer.Option("--file", "-f", help="The Modelfile.")] = "Modelfile",
    quantize: Annotated[str | None, typer.Option("--quantize", "-q", help="Quantize to this type.")] = None,
    debug: DebugOpt = False,
) -> None:
    """Create a model from a Modelfile.

    FROM may be a model, a GGUF file (uploaded to the server as a blob) or a Hugging Face directory
    (its path is sent: the server, on node 0, must be able to read it)."""

    def body(client: Client) -> None:
        from tp_ollama.errors import RequestError
        from tp_ollama.store.modelfile import parse_modelfile

        path = Path(file).expanduser().absolute()
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as e:
            raise RequestError(f"cannot read the Modelfile {path}: {e.strerror}") from None
        mf = parse_modelfile(text)
        say("gathering model components")
        request = {"model": name, **mf.create_request()}
        if quantize:
            request["quantize"] = quantize
        source = mf.resolve_from(path.parent)
        if isinstance(source, Path) and source.is_file():
            digest = upload_blob(client, source)
            if digest is None:  # no blobs endpoint: the server is on this machine, give it the path
                request["from"] = str(source.absolute())
            else:
                del request["from"]
                request["files"] = {source.name: digest}
        elif isinstance(source, Path):
            request["from"] = str(source.absolute())
        for status in client.create(request):
            if status.get("status"):
                say(str(status["status"]))

    _with_client(debug, body)


def say(text: str) -> None:
    typer.echo(text, err=True)


def upload_blob(client: Client, path: Path) -> str | None:
    """Upload `path` as blob sha256:<hex> unless the server has it; the digest, or None when the
    server has no blobs endpoint (404/405 on POST)."""
    from tp_ollama.client.http import ClientError

    hasher = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            hasher.update(block)
    digest = f"sha256:{hasher.hexdigest()}"
    try:
        if client.has_blob(digest):
            say(f"copying file {digest} 100%")
        else:
            client.push_blob(digest, _read_with_progress(path, digest))
            say(f"copying file {digest} 100%")
    except ClientError as e:
        if e.no_route:
            return None
        raise
    return digest


def _read_with_progress(path: Path, digest: str) -> Iterator[bytes]:
    total = path.stat().st_size
    sent = 0
    shown = -1
    tty = sys.stderr.isatty()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            sent += len(block)
            percent = sent * 100 // total if total else 100
            if tty and percent != shown:
                sys.stderr.write(f"\rcopying file {digest} {percent}%")
                sys.stderr.flush()
                shown = percent
            yield block
    if tty:
        sys.stderr.write("\r")
