"""Text <-> token ids for a checkpoint, with the same ids, text and chat prompts as transformers.

Run time uses only the `tokenizers` library. A Hugging Face directory has a `tokenizer.json`; a GGUF
holds its vocabulary as metadata, which transformers' `AutoTokenizer(..., gguf_file=...)` converts to
a `tokenizers.Tokenizer` (about 20 s for Gemma's 262,144 tokens, 6 s for SmolLM2). That conversion IS
the reference, so its backend is taken as is -- normalizer, pre-tokenizer, decoder, the post-processor
that adds BOS -- and cached under `<cache>/tokenizers/<key>/` as tokenizer.json plus tokenizer_meta.json
(BOS/EOS ids, named special tokens, the file's chat template). Later loads read the cache, never
transformers. The key comes from the file's path, size, mtime and first MiB, not a hash of all of it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from importlib import metadata as dist_metadata
from pathlib import Path
from types import MappingProxyType
from typing import Any

import tokenizers
from tokenizers import processors

from tp_ollama.checkpoints.chat_template import (
    BUILTIN_CHAT_TEMPLATES,
    TemplateFeatures,
    render_chat_template,
    template_features,
)
from tp_ollama.config.settings import default_cache_dir
from tp_ollama.errors import CheckpointError, RequestError

log = logging.getLogger(__name__)

CACHE_FORMAT = 1  # bump when the layout or meaning of a cache entry changes
_HEAD_BYTES = 1 << 20

# transformers' `SPECIAL_TOKENS_ATTRIBUTES`: the names templates see as variables (`bos_token`, ...).
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")

# Tokens that end a reply in some family's chat format. One counts only when the vocabulary has it as
# a special (control) token, so a plain-text "<|end|>" in some other vocabulary never stops generation.
END_OF_TURN_TOKENS = (
    "<end_of_turn>",  # Gemma
    "<|im_end|>",  # ChatML: Qwen, SmolLM
    "<|eot_id|>",  # Llama 3
    "<|eom_id|>",  # Llama 3 tool call
    "<|end_of_text|>",  # Llama 3 base
    "<|endoftext|>",  # GPT-2 family, SmolLM, Qwen base
    "<|end|>",  # Phi-3
    "<|return|>",  # gpt-oss
)
# GGUF keys that name further end-of-generation tokens, as llama.cpp reads them.
_GGUF_EOG_KEYS = ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id")


class Tokenizer:
    """A `tokenizers.Tokenizer` plus what serving needs around it: BOS/EOS ids and the chat template.

    `encode(text)` equals transformers' `tokenizer(text).input_ids` (BOS included when the model's
    settings add it); `decode` equals `tokenizer.decode(ids, skip_special_tokens=...)`.
    """

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        *,
        source: str,
        special_tokens: Mapping[str, str],
        eos_ids: Iterable[int] = (),
        chat_template: str | None = None,
        chat_templates: Mapping[str, str] | None = None,
    ) -> None:
        self._backend = backend
        self.source = source  # the file or directory this came from, for messages
        self.vocab_size: int = backend.get_vocab_size(with_added_tokens=True)
        self.special_ids: frozenset[int] = frozenset(
            i for i, token in backend.get_added_tokens_decoder().items() if token.special
        )
        self.special_tokens: Mapping[str, str] = MappingProxyType(dict(special_tokens))
        bos = self.special_tokens.get("bos_token")
        self.bos_id: int | None = backend.token_to_id(bos) if bos is not None else None
        # Read off the post-processor rather than a config flag: it is what actually adds the token.
        self.add_bos: bool = self.bos_id is not None and backend.encode("").ids[:1] == [self.bos_id]
        eos = self.special_tokens.get("eos_token")
        named = [backend.token_to_id(eos)] if eos is not None else []
        ends = [backend.token_to_id(t) for t in END_OF_TURN_TOKENS]
        self.eos_ids: frozenset[int] = frozenset(
            [i for i in [*named, *eos_ids] if i is not None and 0 <= i < self.vocab_size]
            + [i for i in ends if i is not None and i in self.special_ids]
        )
        self.chat_template: str | None = chat_template
        self.chat_templates: Mapping[str, str] = MappingProxyType(dict(chat_templates or {}))

    def to_json(self) -> str:
        """The backend in tokenizer.json form (for libraries that read that format)."""
        return str(self._backend.to_str())

    @classmethod
    def for_model(cls, path: Path) -> Tokenizer:
        """The tokenizer of a GGUF file or an HF directory."""
        return cls.from_hf_dir(path) if path.is_dir() else cls.from_gguf(path)

    def __repr__(self) -> str:
        return (
            f"Tokenizer({self.source!r}, vocab_size={self.vocab_size}, bos_id={self.bos_id}, "
            f"add_bos={self.add_bos}, eos_ids={sorted(self.eos_ids)})"
        )

    # --- loading ------------------------------------------------------------------------------

    @classmethod
    def from_hf_dir(cls, path: Path) -> Tokenizer:
        """A Hugging Face model directory: tokenizer.json, with tokenizer_config.json,
        special_tokens_map.json, chat_template.jinja/.json and generation_config.json when present."""
        path = Path(path)
        tokenizer_file = path / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise CheckpointError(
                f"{tokenizer_file}: not found; a model directory needs a fast-tokenizer tokenizer.json"
            )
        try:
            backend = tokenizers.Tokenizer.from_file(str(tokenizer_file))
        except Exception as e:  # tokenizers reports every parse failure as a bare Exception
            raise CheckpointError(f"{tokenizer_file}: cannot be read as a tokenizer ({e})") from e
        config = _read_json_object(path / "tokenizer_config.json")
        special_tokens = _special_tokens_from_config(path, config)
        _apply_bos_eos_flags(backend, config, special_tokens)
        templates = _chat_templates_from_dir(path, config)
        generation = _read_json_object(path / "generation_config.json")
        return cls(
            backend,
            source=str(path),
            special_tokens=special_tokens,
            eos_ids=_as_ids(generation.get("eos_token_id"), path / "generation_config.json"),
            chat_template=templates.get("default"),
            chat_templates=templates,
        )

    @classmethod
    def from_gguf(
        cls, path: Path, metadata: Mapping[str, Any] | None = None, cache_dir: Path | None = None
    ) -> Tokenizer:
        """The tokenizer a GGUF file describes, converted once by transformers and then read from the
        cache. `metadata` (the file's key/values, already read) saves re-reading the header on a
        first conversion; it is not needed once cached."""
        path = Path(path)
        if not path.is_file():
            raise CheckpointError(f"{path}: GGUF file not found")
        root = cache_dir if cache_dir is not None else default_cache_dir()
        entry = root / "tokenizers" / _cache_key(path)
        cached = _load_cached(entry)
        if cached is None:
            if metadata is None:
                from tp_ollama.checkpoints.gguf_file import GGUFFile

                with GGUFFile(path) as gguf:
                    metadata = dict(gguf.metadata)
            cached = _convert_gguf(path, metadata)
            _store(entry, *cached)
        backend, meta = cached
        return cls._from_meta(backend, meta, source=str(path))

    @classmethod
    def _from_meta(cls, backend: tokenizers.Tokenizer, meta: Mapping[str, Any], source: str) -> Tokenizer:
        template = meta["chat_template"] or BUILTIN_CHAT_TEMPLATES.get(meta["architecture"])
        return cls(
            backend,
            source=source,
            special_tokens=meta["special_tokens"],
            eos_ids=meta["eos_ids"],
            chat_template=template,
            chat_templates={"default": template} if template is not None else None,
        )

    # --- text ---------------------------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`. Special tokens written in the text (`<end_of_turn>`) stay whole, as in
        transformers. Encode a rendered chat prompt with `add_special_tokens=False`: the template
        writes BOS itself."""
        ids: list[int] = self._backend.encode(text, add_special_tokens=add_special_tokens).ids
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        text: str = self._backend.decode(list(ids), skip_special_tokens=skip_special_tokens)
        return text

    def token_to_id(self, token: str) -> int | None:
        """The id of one vocabulary entry spelled as the vocabulary spells it (`<0xE2>`, `▁the`)."""
        token_id: int | None = self._backend.token_to_id(token)
        return token_id

    def chat_features(self) -> TemplateFeatures:
        """What the chat templates can render: tools when the default or the `tool_use` template
        reads them (apply_chat_template picks the latter for tools), thinking from the default one."""
        default = template_features(self.chat_template) if self.chat_template is not None else TemplateFeatures()
        tool_use = self.chat_templates.get("tool_use")
        tools = default.tools or (tool_use is not None and template_features(tool_use).tools)
        return TemplateFeatures(tools=tools, thinking=default.thinking)

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = True,
        *,
        tools: Sequence[Mapping[str, Any]] | None = None,
        documents: Sequence[Mapping[str, Any]] | None = None,
        chat_template: str | None = None,
        **kwargs: Any,
    ) -> str:
        """The prompt text for `messages`, equal to transformers' `apply_chat_template(...,
        tokenize=False)`. `chat_template` is a template string or the name of one of the model's
        templates; with `tools` the model's `tool_use` template is preferred when it has one."""
        if chat_template is not None:
            template: str | None = self.chat_templates.get(chat_template, chat_template)
        elif tools is not None and "tool_use" in self.chat_templates:
            template = self.chat_templates["tool_use"]
        else:
            template = self.chat_template
        if template is None:
            raise RequestError(f"{self.source} has no chat template; send a raw prompt instead")
        return render_chat_template(
            template,
            messages,
            add_generation_prompt=add_generation_prompt,
            tools=tools,
            documents=documents,
            special_tokens=self.special_tokens,
            **kwargs,
        )


# --- GGUF conversion and cache ------------------------------------------------------------------


def _cache_key(path: Path) -> str:
    """Changes when the file is replaced or edited (size, mtime, first MiB) or moved, and when
    transformers -- whose conversion the entry holds -- is upgraded."""
    stat = path.stat()
    try:
        converter = dist_metadata.version("transformers")
    except dist_metadata.PackageNotFoundError:
        converter = "none"
    digest = hashlib.sha256()
    for part in (CACHE_FORMAT, converter, path.resolve(), stat.st_size, stat.st_mtime_ns):
        digest.update(f"{part}\0".encode())
    with path.open("rb") as f:
        digest.update(f.read(_HEAD_BYTES))
    return digest.hexdigest()[:32]


def _convert_gguf(path: Path, metadata: Mapping[str, Any]) -> tuple[tokenizers.Tokenizer, dict[str, Any]]:
    """transformers' own GGUF tokenizer, as `(backend, meta)` with meta as cached in tokenizer_meta.json."""
    missing = [k for k in ("tokenizer.ggml.model", "tokenizer.ggml.tokens") if k not in metadata]
    if missing:
        raise CheckpointError(f"{path}: the GGUF has no tokenizer (metadata lacks {', '.join(missing)})")
    # Imported here: it costs seconds and only a first load of each file needs it.
    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory(prefix="tp-ollama-gguf-") as folder:
        # A folder holding only the file, so a tokenizer_config.json that happens to sit beside the GGUF
        # cannot change what transformers builds.
        link = Path(folder) / "model.gguf"
        link.symlink_to(path.resolve())
        try:
            reference = AutoTokenizer.from_pretrained(folder, gguf_file=link.name, local_files_only=True)
        except Exception as e:  # ValueError, KeyError, OSError...: whatever the converter trips on
            raise CheckpointError(
                f"{path}: transformers cannot build a tokenizer from this GGUF ({type(e).__name__}: {e})"
            ) from e
    template = reference.chat_template
    eos_ids = {reference.eos_token_id, *(metadata.get(k) for k in _GGUF_EOG_KEYS)}
    meta = {
        "format": CACHE_FORMAT,
        "source": str(path),
        "architecture": str(metadata.get("general.architecture", "")),
        "special_tokens": dict(reference.special_tokens_map),
        "eos_ids": sorted(i for i in eos_ids if isinstance(i, int)),
        "chat_template": template if isinstance(template, str) else None,
    }
    return reference.backend_tokenizer, meta


def _store(entry: Path, backend: tokenizers.Tokenizer, meta: Mapping[str, Any]) -> None:
    """Write the entry beside its final place and rename it in, so a reader -- another rank converting
    the same file at the same time -- sees a whole entry or none. A cache that cannot be written
    only costs the next load another conversion."""
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        partial = Path(tempfile.mkdtemp(prefix=".partial-", dir=entry.parent))
        (partial / "tokenizer.json").write_text(_fast_loading_json(backend), encoding="utf-8")
        (partial / "tokenizer_meta.json").write_text(json.dumps(meta, indent=1), encoding="utf-8")
        try:
            partial.rename(entry)
        except OSError:  # another process stored the same entry first
            shutil.rmtree(partial, ignore_errors=True)
    except OSError as e:
        log.warning("cannot cache the tokenizer of %s in %s: %s", meta.get("source"), entry, e)


def _fast_loading_json(backend: tokenizers.Tokenizer) -> str:
    """tokenizer.json with BPE merges as "a b" strings rather than ["a", "b"] pairs when no piece holds
    a space (the one thing the string form cannot say). Same merges; tokenizers parses the strings
    about a fifth faster, which is 0.2 s of a cached Gemma load."""
    serialized = backend.to_str()
    tree = json.loads(serialized)
    merges = tree.get("model", {}).get("merges")
    if not merges or not all(isinstance(m, list) and " " not in m[0] + m[1] for m in merges):
        return serialized
    tree["model"]["merges"] = [f"{a} {b}" for a, b in merges]
    return json.dumps(tree, ensure_ascii=False)


def _load_cached(entry: Path) -> tuple[tokenizers.Tokenizer, dict[str, Any]] | None:
    meta_file, tokenizer_file = entry / "tokenizer_meta.json", entry / "tokenizer.json"
    if not meta_file.is_file():
        return None
    try:
        meta = json.loads(meta_file.read_text(encoding="utf-8"))
        if meta.get("format") != CACHE_FORMAT:
            raise ValueError(f"cache format {meta.get('format')}, expected {CACHE_FORMAT}")
        backend = tokenizers.Tokenizer.from_file(str(tokenizer_file))
    except Exception as e:  # a damaged entry (tokenizers raises bare Exception) is rebuilt, not fatal
        log.warning("discarding unreadable tokenizer cache %s: %s", entry, e)
        shutil.rmtree(entry, ignore_errors=True)
        return None
    return backend, meta


# --- Hugging Face directory ---------------------------------------------------------------------


def _read_json_object(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(value, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value


def _token_text(value: Any) -> str | None:
    """A special token as configs write it: a string, or an AddedToken dict with its `content`."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _special_tokens_from_config(path: Path, config: Mapping[str, Any]) -> dict[str, str]:
    """Named special tokens as transformers resolves them: tokenizer_config.json, overridden by the
    legacy special_tokens_map.json only when the config predates `added_tokens_decoder`."""
    values = {name: config.get(name) for name in SPECIAL_TOKEN_NAMES}
    if "added_tokens_decoder" not in config:
        legacy = _read_json_object(path / "special_tokens_map.json")
        values.update({name: legacy[name] for name in SPECIAL_TOKEN_NAMES if name in legacy})
    return {name: text for name, value in values.items() if (text := _token_text(value)) is not None}


def _apply_bos_eos_flags(
    backend: tokenizers.Tokenizer, config: Mapping[str, Any], special_tokens: Mapping[str, str]
) -> None:
    """transformers rebuilds the post-processor from `add_bos_token` / `add_eos_token` when the config
    states either, or when tokenizer.json has none; otherwise tokenizer.json's own is kept."""
    if "add_bos_token" not in config and "add_eos_token" not in config and backend.post_processor is not None:
        return
    single, pair, specials = "$A:0", "$B:1", []
    for name, flag in (("bos_token", "add_bos_token"), ("eos_token", "add_eos_token")):
        token = special_tokens.get(name)
        token_id = backend.token_to_id(token) if token is not None else None
        if not config.get(flag) or token is None or token_id is None:
            continue
        if name == "bos_token":
            single, pair = f"{token}:0 {single}", f"{token}:1 {pair}"
        else:
            single, pair = f"{single} {token}:0", f"{pair} {token}:1"
        specials.append((token, token_id))
    backend.post_processor = processors.TemplateProcessing(
        single=single, pair=f"{single} {pair}", special_tokens=specials
    )


def _chat_templates_from_dir(path: Path, config: Mapping[str, Any]) -> dict[str, str]:
    """Named templates, the model's own under "default": chat_template.jinja first (what
    save_pretrained writes today), then tokenizer_config.json, then a processor's chat_template.json,
    plus additional_chat_templates/<name>.jinja."""
    templates: dict[str, str] = {}
    configured = config.get("chat_template")
    if isinstance(configured, str):
        templates["default"] = configured
    elif isinstance(configured, list):  # [{"name": "default", "template": "..."}, {"name": "tool_use", ...}]
        templates.update({t["name"]: t["template"] for t in configured if isinstance(t, dict)})
    if "default" not in templates:
        processor = _read_json_object(path / "chat_template.json").get("chat_template")
        if isinstance(processor, str):
            templates["default"] = processor
    jinja = path / "chat_template.jinja"
    if jinja.is_file():
        templates["default"] = jinja.read_text(encoding="utf-8")
    extra = path / "additional_chat_templates"
    if extra.is_dir():
        templates.update({f.stem: f.read_text(encoding="utf-8") for f in sorted(extra.glob("*.jinja"))})
    return templates


def _as_ids(value: Any, where: Path) -> list[int]:
    if value is None:
        return []
    values = value if isinstance(value, list) else [value]
    if not all(isinstance(v, int) for v in values):
        raise CheckpointError(f"{where}: eos_token_id is {value!r}, expected an int or a list of ints")
    return values
