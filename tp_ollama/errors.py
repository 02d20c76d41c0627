"""Errors that reach a user as one line: what is wrong, with the value and what was expected."""


class TpOllamaError(Exception):
    """A problem the user can fix (bad file, bad option, bad layout). The CLI prints it as one line."""


class CheckpointError(TpOllamaError):
    """A checkpoint that cannot be read: missing, truncated, corrupt or of an unsupported kind."""


class ConfigError(TpOllamaError):
    """A model or server configuration that is invalid or unsupported."""


class RequestError(TpOllamaError):
    """A generation request that cannot be served as asked (prompt longer than num_ctx, bad option)."""


class ModelNotFound(TpOllamaError):
    """No installed model has this name; HTTP 404 `model 'NAME' not found` as upstream says it."""

    def __init__(self, name: str, message: str | None = None) -> None:
        super().__init__(message or f"model '{name}' not found")
        self.name = name


class EngineUnavailable(TpOllamaError):
    """The engine group is not running or stopped answering (HTTP 503; the next request restarts it)."""


class ServerBusy(TpOllamaError):
    """More requests wait for the model than inference.max_queue (OLLAMA_MAX_QUEUE) allows: HTTP 503
    with upstream's words, two spaces included, so clients that match on them keep working."""

    def __init__(self) -> None:
        super().__init__("server busy, please try again.  maximum pending requests exceeded")


class Regrouped(EngineUnavailable):
    """The engine group was stopped on purpose (it grows: a node joined); its requests go on in the next."""
