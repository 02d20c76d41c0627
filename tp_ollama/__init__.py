"""tp-ollama: an Ollama-compatible LLM server with tensor-parallel engines."""

__version__ = "0.1.0"
