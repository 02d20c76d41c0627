"""What a checkpoint says about itself: its details (format, family, size, quantization), its /api/show
model_info and chat template, the capabilities a template gives, and the facts about outside files
(hashes and details) remembered across runs."""

from __future__ import annotations

import json
import logging
import re
import threading
from collections import Counter
from collections.abc import Mapping
from math import isfinite, prod
from pathlib import Path
from typing import Any

from tp_ollama.errors import CheckpointError
from tp_ollama.store.manifests import ModelDetails, atomic_write, hash_file

log = logging.getLogger(__name__)


def human_number(n: int) -> str:
    """Upstream's format.HumanNumber: 268098176 -> 268.10M, 3212749888 -> 3.2B, 8e9 -> 8B."""
    if n >= 1_000_000_000:
        v = n / 1e9
        return f"{v:.0f}B" if v.is_integer() else f"{v:.1f}B"
    if n >= 1_000_000:
        v = n / 1e6
        return f"{v:.0f}M" if v.is_integer() else f"{v:.2f}M"
    if n >= 1_000:
        return f"{n / 1e3:.0f}K"
    return str(n)


def _gguf_arch_names() -> dict[str, str]:
    """HF model_type -> GGUF architecture, so that a safetensors Gemma 3 is family `gemma3` too."""
    from tp_ollama.checkpoints.gguf_checkpoint import ARCHITECTURES

    return {hf: arch for arch, hf in ARCHITECTURES.items()}


_HF_DTYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}


def inspect_checkpoint(path: Path) -> ModelDetails:
    """format, family, parameter size and quantization of a GGUF file or HF directory."""
    from tp_ollama.checkpoints.gguf_checkpoint import GGUFCheckpoint
    from tp_ollama.checkpoints.loader import open_checkpoint
    from tp_ollama.checkpoints.safetensors_dir import SafetensorsCheckpoint

    ckpt = open_checkpoint(path)
    try:
        if isinstance(ckpt, GGUFCheckpoint):
            family = str(ckpt.arch)
            tensors = ckpt.file.tensors.values()
            count = sum(prod(t.shape) for t in tensors)
            file_type = ckpt.file.metadata.get("general.file_type")
            if isinstance(file_type, int):
                quant = _file_type_name(file_type)
            else:  # no general.file_type: name the type that holds most of the weights
                by_type: Counter[str] = Counter()
                for t in tensors:
                    by_type[t.ggml_type] += prod(t.shape)
                quant = by_type.most_common(1)[0][0] if by_type else "unknown"
        elif isinstance(ckpt, SafetensorsCheckpoint):
            model_type = ckpt.config.model_type
            family = _gguf_arch_names().get(model_type, model_type)
            count = sum(prod(ckpt.shape(n)) for n in ckpt.names())
            quant = _hf_quantization(ckpt.hf_config)
        else:
            raise CheckpointError(f"{path}: unsupported checkpoint kind {type(ckpt).__name__}")
        return ModelDetails(
            format=ckpt.format,
            family=family,
            families=(family,),
            parameter_size=human_number(count),
            quantization_level=quant,
        )
    finally:
        ckpt.close()


def _file_type_name(value: int) -> str:
    """GGUF general.file_type -> Ollama's name: 15 -> Q4_K_M, 1 -> F16, 0 -> F32."""
    from gguf import LlamaFileType

    try:
        return LlamaFileType(value).name.removeprefix("MOSTLY_").removeprefix("ALL_")
    except ValueError:
        return "unknown"


def _hf_quantization(config: Mapping[str, Any]) -> str:
    quant = config.get("quantization_config")
    if isinstance(quant, dict) and quant.get("quant_method"):
        return str(quant["quant_method"]).upper()
    dtype = config.get("torch_dtype") or config.get("dtype") or "float32"
    return _HF_DTYPES.get(str(dtype), str(dtype).upper())


def checkpoint_info(path: Path, verbose: bool = False) -> tuple[dict[str, Any], str | None]:
    """(/api/show model_info, the checkpoint's own chat template or None).

    GGUF: the metadata minus general.name and tokenizer.chat_template, arrays longer than 5 shown as
    [] unless `verbose`, plus general.parameter_count. HF: the config mapped onto the same keys."""
    from tp_ollama.checkpoints.chat_template import BUILTIN_CHAT_TEMPLATES
    from tp_ollama.checkpoints.gguf_checkpoint import CONFIG_KEYS, GGUFCheckpoint
    from tp_ollama.checkpoints.gguf_file import GGUFArray
    from tp_ollama.checkpoints.loader import open_checkpoint
    from tp_ollama.checkpoints.safetensors_dir import SafetensorsCheckpoint
    from tp_ollama.checkpoints.tokenizer import Tokenizer

    ckpt = open_checkpoint(path)
    try:
        info: dict[str, Any] = {}
        template: str | None = None
        if isinstance(ckpt, GGUFCheckpoint):
            meta = ckpt.file.metadata
            for key, value in meta.items():
                if key in ("general.name", "tokenizer.chat_template"):
                    continue
                if isinstance(value, GGUFArray | list) and (verbose or len(value) <= 5):
                    value = ckpt.file.array(key) if isinstance(value, GGUFArray) else value
                    value = value.tolist() if hasattr(value, "tolist") else list(value)
                elif isinstance(value, GGUFArray | list):
                    value = []
                info[key] = value
            info["general.parameter_count"] = sum(prod(t.shape) for t in ckpt.file.tensors.values())
            template = meta.get("tokenizer.chat_template") or BUILTIN_CHAT_TEMPLATES.get(str(ckpt.arch))
        elif isinstance(ckpt, SafetensorsCheckpoint):
            arch = _gguf_arch_names().get(ckpt.config.model_type, ckpt.config.model_type)
            info["general.architecture"] = arch
            info["general.parameter_count"] = sum(prod(ckpt.shape(n)) for n in ckpt.names())
            for suffix, hf_key in CONFIG_KEYS.items():
                value = ckpt.hf_config.get(hf_key)
                if isinstance(value, int | float) and not isinstance(value, bool) and isfinite(value):
                    info[f"{arch}.{suffix}"] = value
            try:
                template = Tokenizer.from_hf_dir(path).chat_template
            except CheckpointError:
                template = None
        return info, template
    finally:
        ckpt.close()


def capabilities(template: str | None) -> list[str]:
    """`completion`, plus `tools` / `insert` when the template reads tools / a suffix (upstream looks
    at the template's variables the same way), and `thinking` when it reads `.Think` (Go) or
    `enable_thinking`, or writes `<think>` (Jinja)."""
    from tp_ollama.checkpoints.chat_template import template_features

    names: set[str] = set()
    for block in re.findall(r"\{\{.*?\}\}|\{%.*?%\}", template or "", flags=re.S):
        names.update(w.lower() for w in re.findall(r"[A-Za-z_]\w*", block))
    caps = ["completion"]
    if "tools" in names:
        caps.append("tools")
    if "suffix" in names:
        caps.append("insert")
    if "think" in names or (template is not None and template_features(template).thinking):
        caps.append("thinking")
    return caps


class FileFacts:
    """sha256 and details of outside files (the embedded GGUFs, FROM paths) keyed by path, size and
    mtime, so that a listing never hashes 250 MB again. A cache: unreadable or stale entries are
    recomputed, and a store root that is not writable just means no persistence."""

    FORMAT = 1

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._entries: dict[str, dict[str, Any]] | None = None

    def _load(self) -> dict[str, dict[str, Any]]:
        if self._entries is None:
            try:
                body = json.loads(self.path.read_text())
                ok = isinstance(body, dict) and body.get("format") == self.FORMAT
                self._entries = body["files"] if ok else {}
            except (OSError, ValueError, KeyError):
                self._entries = {}
        return self._entries

    def _entry(self, file: Path) -> dict[str, Any]:
        """The entry for `file`; a fresh one when the file changed or was never seen."""
        st = file.stat()
        key = str(file.resolve())
        entry = self._load().get(key)
        if entry is None or entry.get("size") != st.st_size or entry.get("mtime_ns") != st.st_mtime_ns:
            entry = {"size": st.st_size, "mtime_ns": st.st_mtime_ns}
            self._load()[key] = entry
        return entry

    def known_sha256(self, file: Path) -> str | None:
        with self._lock:
            entry = self._entry(file)
            return entry.get("sha256")

    def remember_sha256(self, file: Path, hex_digest: str) -> None:
        with self._lock:
            entry = self._entry(file)
            entry["sha256"] = hex_digest
            self._save()

    def describe(self, file: Path) -> tuple[str, ModelDetails]:
        """(sha256 hex, details) of a checkpoint file, computed once."""
        with self._lock:
            entry = self._entry(file)
            if "sha256" not in entry or "details" not in entry:
                entry["sha256"] = hash_file(file)
                entry["details"] = inspect_checkpoint(file).to_dict()
                self._save()
            d = entry["details"]
            return entry["sha256"], ModelDetails(**{**d, "families": tuple(d["families"])})

    def _save(self) -> None:
        try:
            atomic_write(self.path, json.dumps({"format": self.FORMAT, "files": self._load()}).encode())
        except OSError as e:
            log.warning("cannot save %s (%s); file hashes will be recomputed next run", self.path, e)
