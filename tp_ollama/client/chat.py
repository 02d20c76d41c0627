"""The interactive `run`: a `>>> ` prompt with Ollama's /commands, and streaming an answer as it arrives."""

from __future__ import annotations

import contextlib
import sys
from typing import IO, TYPE_CHECKING, Any

import typer

from tp_ollama.client.format import show_summary, stats

if TYPE_CHECKING:
    from tp_ollama.client.http import Client


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
        from tp_ollama.client.http import ClientError

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
