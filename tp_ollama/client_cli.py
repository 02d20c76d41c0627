"""Ollama's client commands (`run`, `list`/`ls`, `ps`, `show`, `rm`, `cp`, `create`, `stop`), talking
HTTP to the server at OLLAMA_HOST. `register(app)` adds them to the main command line.

Output follows the `ollama` CLI: the same tables, `show` sections, `--verbose` statistics and
one-line `Error: ...` messages (exit status 1). Differences: `run` never pulls (a missing model is
an error), `--nowordwrap` is accepted but answers are never wrapped, and `create` with FROM a
directory sends the directory's path, which the server (node 0) must be able to read.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import sys
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, TYPE_CHECKING, Annotated, Any, TypeVar

import typer

if TYPE_CHECKING:
    from tp_ollama.client import Client

T = TypeVar("T")

DebugOpt = Annotated[bool, typer.Option("--debug", help="Show tracebacks.")]
ModelArg = Annotated[str, typer.Argument(help="Model name, e.g. smollm2:135m.")]


def register(app: typer.Typer) -> None:
    """Add the client commands to `app`."""
    app.command("run")(run)
    app.command("list")(list_models)
    app.command("ls", hidden=True)(list_models)
    app.command("ps")(ps)
    app.command("show")(show)
    app.command("rm")(rm)
    app.command("cp")(cp)
    app.command("create")(create)
    app.command("stop")(stop)


def _with_client(debug: bool, fn: Callable[[Client], T]) -> T:
    from tp_ollama.cli import run_reporting_errors
    from tp_ollama.client import Client, server_url

    def body() -> T:
        with Client(server_url(os.environ)) as client:
            return fn(client)

    return run_reporting_errors(debug, body)


# --- formatting, as ollama's `format` package does it -------------------------------------------------


def human_bytes(n: int) -> str:
    """4.7 GB, 270 MB, 12 KB, 512 B (powers of 1000)."""
    for unit, scale in (("TB", 10**12), ("GB", 10**9), ("MB", 10**6), ("KB", 10**3)):
        if n >= scale:
            value = n / scale
            return f"{int(value)} {unit}" if value >= 10 or value.is_integer() else f"{value:.1f} {unit}"
    return f"{n} B"


def human_duration(seconds: float) -> str:
    s = int(seconds)
    if s < 1:
        return "Less than a second"
    if s < 60:
        return "1 second" if s == 1 else f"{s} seconds"
    minutes = s // 60
    if minutes < 60:
        return "About a minute" if minutes == 1 else f"{minutes} minutes"
    hours = round(seconds / 3600)
    if hours == 1:
        return "About an hour"
    if hours < 48:
        return f"{hours} hours"
    if hours < 24 * 7 * 2:
        return f"{hours // 24} days"
    if hours < 24 * 30 * 2:
        return f"{hours // 24 // 7} weeks"
    if hours < 24 * 365 * 2:
        return f"{hours // 24 // 30} months"
    return f"{int(seconds / 3600 / 24 / 365)} years"


def parse_time(text: str | None) -> datetime | None:
    """RFC 3339 with up to nanoseconds ("...29.110811123Z") -> an aware datetime; None when absent."""
    if not text or text.startswith("0001-01-01"):
        return None
    text = re.sub(r"(\.\d{6})\d+", r"\1", text.replace("Z", "+00:00"))
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def human_time(when: datetime | None, now: datetime, never: str = "Never") -> str:
    """ "2 minutes ago", "4 minutes from now", "Forever" (more than 20 years ahead)."""
    if when is None:
        return never
    delta = (now - when).total_seconds()
    if delta < -20 * 365 * 24 * 3600:
        return "Forever"
    if delta < 0:
        return human_duration(-delta) + " from now"
    return human_duration(delta) + " ago"


def go_duration(ns: int) -> str:
    """Go's time.Duration.String(): 1.234567s, 342.546ms, 953.997µs, 1m2.5s."""
    if ns == 0:
        return "0s"
    sign, ns = ("-", -ns) if ns < 0 else ("", ns)
    if ns < 1000:
        return f"{sign}{ns}ns"

    def decimal(whole: int, frac: int, digits: int) -> str:
        tail = str(frac).rjust(digits, "0").rstrip("0")
        return f"{whole}.{tail}" if tail else str(whole)

    if ns < 10**6:
        return f"{sign}{decimal(ns // 1000, ns % 1000, 3)}µs"
    if ns < 10**9:
        return f"{sign}{decimal(ns // 10**6, ns % 10**6, 6)}ms"
    hours, rest = divmod(ns, 3600 * 10**9)
    minutes, rest = divmod(rest, 60 * 10**9)
    seconds = decimal(rest // 10**9, rest % 10**9, 9) + "s"
    if hours:
        return f"{sign}{hours}h{minutes}m{seconds}"
    return f"{sign}{minutes}m{seconds}" if minutes else f"{sign}{seconds}"


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Left-aligned columns, no borders, as `ollama list` prints them."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = [
        "    ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in [header, *rows]
    ]
    return "\n".join(lines)


def processor(size: int, size_vram: int) -> str:
    if size_vram == 0:
        return "100% CPU"
    if size_vram == size:
        return "100% GPU"
    if size_vram > size or size == 0:
        return "Unknown"
    cpu = round((size - size_vram) / size * 100)
    return f"{cpu}%/{100 - cpu}% CPU/GPU"


def stats(final: dict[str, Any]) -> str:
    """The `--verbose` summary of a final chunk's metrics."""

    def rate(count: int, ns: int) -> str:
        return f"{count / (ns / 1e9):.2f} tokens/s" if ns else "n/a"

    pc, pd = int(final.get("prompt_eval_count", 0)), int(final.get("prompt_eval_duration", 0))
    ec, ed = int(final.get("eval_count", 0)), int(final.get("eval_duration", 0))
    lines = [
        f"total duration:       {go_duration(int(final.get('total_duration', 0)))}",
        f"load duration:        {go_duration(int(final.get('load_duration', 0)))}",
        f"prompt eval count:    {pc} token(s)",
        f"prompt eval duration: {go_duration(pd)}",
        f"prompt eval rate:     {rate(pc, pd)}",
        f"eval count:           {ec} token(s)",
        f"eval duration:        {go_duration(ed)}",
        f"eval rate:            {rate(ec, ed)}",
    ]
    return "\n".join(lines)


def show_summary(info: dict[str, Any], verbose: bool = False) -> str:
    """`ollama show MODEL`: the Model, Capabilities, Parameters, System and License sections."""
    model_info: dict[str, Any] = info.get("model_info") or {}
    details: dict[str, Any] = info.get("details") or {}
    arch = str(model_info.get("general.architecture") or details.get("family") or "")
    count = model_info.get("general.parameter_count")
    params = _human_number(int(count)) if isinstance(count, int | float) and count else details.get("parameter_size")
    rows = [
        ("architecture", arch),
        ("parameters", params),
        ("context length", model_info.get(f"{arch}.context_length") or details.get("context_length")),
        ("embedding length", model_info.get(f"{arch}.embedding_length") or details.get("embedding_length")),
        ("quantization", details.get("quantization_level")),
    ]
    sections = [("Model", [(k, str(v)) for k, v in rows if v not in (None, "")])]
    sections.append(("Capabilities", [(c, "") for c in info.get("capabilities") or []]))
    parameters = [line.split(None, 1) for line in (info.get("parameters") or "").splitlines() if line.strip()]
    sections.append(("Parameters", [(p[0], p[1] if len(p) > 1 else "") for p in parameters]))
    sections.append(("System", [(line, "") for line in _head(info.get("system") or "")]))
    sections.append(("License", [(line, "") for line in _head(info.get("license") or "")]))
    if verbose:
        sections.append(("Metadata", [(k, _short(v)) for k, v in sorted(model_info.items())]))
    out: list[str] = []
    for title, pairs in sections:
        if not pairs:
            continue
        width = max(len(k) for k, _ in pairs)
        out.append(f"  {title}")
        out.extend(f"    {k.ljust(width)}    {v}".rstrip() if v else f"    {k}" for k, v in pairs)
        out.append("")
    return "\n".join(out)


def _head(text: str, n: int = 2) -> list[str]:
    """The first n non-empty lines, and `...` when there are more (as ollama shows System and License)."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return [*lines[:n], "..."] if len(lines) > n else lines


def _short(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    return text if len(text) <= 60 else text[:57] + "..."


def _human_number(n: int) -> str:
    """134515008 -> 134.52M, 8030261248 -> 8.0B (ollama's format.HumanNumber)."""
    for unit, scale, digits in (("B", 10**9, 1), ("M", 10**6, 2), ("K", 10**3, 1)):
        if n >= scale:
            value = n / scale
            return f"{value:.0f}{unit}" if value.is_integer() else f"{value:.{digits}f}{unit}"
    return str(n)


# --- run ----------------------------------------------------------------------------------------------


def stream_answer(client: Client, body: dict[str, Any], out: IO[str]) -> tuple[str, dict[str, Any]]:
    """Print a chat answer as it arrives; (the answer, the final chunk). Ctrl-C closes the stream,
    which cancels the request on the server."""
    parts: list[str] = []
    final: dict[str, Any] = {}
    thinking = False
    with contextlib.closing(client.chat(body)) as chunks:
        for chunk in chunks:
            message = chunk.get("message") or {}
            if message.get("thinking"):
                if not thinking:
                    out.write("Thinking...\n")
                    thinking = True
                out.write(message["thinking"])
            if message.get("content"):
                if thinking:
                    out.write("\n...done thinking.\n\n")
                    thinking = False
                parts.append(message["content"])
                out.write(message["content"])
            out.flush()
            if chunk.get("done"):
                final = chunk
    return "".join(parts), final


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


HELP = """Available Commands:
  /set            Set session variables
  /show           Show model information
  /clear          Clear session context
  /bye            Exit
  /?, /help       Help for a command

Use \"\"\" to begin a multi-line message.
"""
SET_HELP = """Available Commands:
  /set parameter <name> <value>  Set a parameter (temperature, num_ctx, stop, ...)
  /set system <string>           Set the system message
  /set verbose                   Show statistics after each answer
  /set quiet                     Do not show statistics
"""
SHOW_HELP = """Available Commands:
  /show info         Show details for this model
  /show license      Show the model's license
  /show modelfile    Show the Modelfile for this model
  /show parameters   Show the parameters for this model
  /show system       Show the system message
  /show template     Show the prompt template
"""


class Chat:
    """The interactive `run`: a `>>> ` prompt; the conversation is sent again with every question."""

    def __init__(self, client: Client, base: dict[str, Any], verbose: bool) -> None:
        self.client, self.base, self.verbose = client, base, verbose
        self.messages: list[dict[str, str]] = []
        self.system: str | None = None
        self.options: dict[str, Any] = {}

    def loop(self) -> None:
        with contextlib.suppress(ImportError):
            import readline  # noqa: F401  (line editing and history for input())
        # Load the model first (an empty chat), so that a missing model fails before the first prompt.
        for _ in self.client.chat({**self.base, "messages": []}):
            pass
        while True:
            try:
                line = self.read()
            except EOFError:  # Ctrl-D
                typer.echo()
                return
            except KeyboardInterrupt:
                typer.echo("\nUse Ctrl + d or /bye to exit.")
                continue
            if not line.strip():
                continue
            if line.startswith("/"):
                if not self.command(line.strip()):
                    return
            else:
                self.ask(line)

    def read(self) -> str:
        line = input(">>> ")
        if not line.startswith('"""'):
            return line
        text = line[3:]
        if text.rstrip().endswith('"""'):
            return text.rstrip()[:-3]
        lines = [text]
        while True:
            more = input("... ")
            if more.rstrip().endswith('"""'):
                lines.append(more.rstrip()[:-3])
                return "\n".join(lines).strip("\n")
            lines.append(more)

    def ask(self, text: str) -> None:
        from tp_ollama.client import ClientError

        self.messages.append({"role": "user", "content": text})
        system = [{"role": "system", "content": self.system}] if self.system is not None else []
        body = {**self.base, "messages": system + self.messages}
        if self.options:
            body["options"] = self.options
        try:
            answer, final = stream_answer(self.client, body, sys.stdout)
        except KeyboardInterrupt:  # the stream is closed, which cancels the answer on the server
            self.messages.pop()
            typer.echo()
            return
        except ClientError as e:
            self.messages.pop()
            typer.echo(f"Error: {e}", err=True)
            return
        self.messages.append({"role": "assistant", "content": answer})
        typer.echo("\n")
        if self.verbose:
            typer.echo(stats(final) + "\n", err=True)

    def command(self, line: str) -> bool:
        """Run a /command; False to leave."""
        from tp_ollama.errors import TpOllamaError

        word, _, rest = line.partition(" ")
        try:
            if word in ("/bye", "/exit"):
                return False
            if word in ("/?", "/help"):
                typer.echo(HELP)
            elif word == "/clear":
                self.messages.clear()
                typer.echo("Cleared session context")
            elif word == "/set":
                self.set(rest.strip())
            elif word == "/show":
                self.show(rest.strip())
            else:
                typer.echo(f"Unknown command '{word}'. Type /? for help")
        except TpOllamaError as e:
            typer.echo(f"Error: {e}", err=True)
        return True

    def set(self, args: str) -> None:
        from tp_ollama.store.modelfile import coerce_parameters

        what, _, rest = args.partition(" ")
        if what in ("verbose", "quiet"):
            self.verbose = what == "verbose"
            typer.echo(f"Set '{what}' mode.")
        elif what == "system" and rest.strip():
            self.system = rest.strip().strip('"')
            typer.echo("Set system message.")
        elif what == "parameter" and len(rest.split(None, 1)) == 2:
            key, value = rest.split(None, 1)
            typed = coerce_parameters({key: value})
            if key == "stop":
                typed["stop"] = [*self.options.get("stop", []), *typed["stop"]]
            self.options.update(typed)
            typer.echo(f"Set parameter '{key}' to '{value}'")
        else:
            typer.echo(SET_HELP)

    def show(self, what: str) -> None:
        if what not in ("info", "license", "modelfile", "parameters", "system", "template"):
            typer.echo(SHOW_HELP)
            return
        info = self.client.show(self.base["model"])
        if what == "info":
            typer.echo(show_summary(info))
        elif what == "system" and self.system is not None:
            typer.echo(self.system)
        else:
            typer.echo(info.get(what) or f"No {what} was specified for this model.")


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
        from tp_ollama.client import ClientError

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
        from tp_ollama.client import ClientError

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
    from tp_ollama.client import ClientError

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
