"""The model store, in Ollama's on-disk layout so that either server can read it:

    manifests/<host>/<namespace>/<model>/<tag>   Docker v2 manifest JSON (its sha256 is the model's digest)
    blobs/sha256-<hex>                           content-addressed layers and config blobs
    tp-ollama/                                   ours: HF directory views, file facts, hidden names

Decisions beyond what upstream does:
* A Hugging Face directory is stored like everything else: each file (config.json, tokenizer files,
  *.safetensors) becomes a blob, listed in the manifest as a layer of our own media type
  `application/vnd.tp-ollama.hf.file` that carries its relative `name`. Loading needs a directory,
  so `resolve` builds `tp-ollama/hf/<id>/` once: relative symlinks to the blobs, as the HF hub cache
  does. The store owns the bytes, /api/blobs uploads work for HF models as for GGUF, and an upstream
  reader sharing the directory skips a layer type it does not know.
* The embedded models (tp_ollama.store.embedded) are listed without a pull as virtual entries
  (tp_ollama.store.embedded_entries). A copy of one, or a model created FROM one, costs a manifest
  and a config blob, never the weights.
* Deleting an embedded model hides it, as `ollama rm` users expect (it leaves the list);
  `restore_embedded(name)` brings it back, which is what pulling that name should call.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import IO, Any

from tp_ollama.errors import CheckpointError, ModelNotFound, RequestError, TpOllamaError
from tp_ollama.store.create import Draft, Progress, check_messages
from tp_ollama.store.hf import HubError, drop_cached, fetch, is_hub
from tp_ollama.store.inspect import capabilities, checkpoint_info
from tp_ollama.store.layout import Layout
from tp_ollama.store.manifests import (
    COPY_CHUNK,
    HF_FILE,
    LICENSE,
    MESSAGES,
    MODEL,
    PARAMS,
    PROMPT,
    SYSTEM,
    TEMPLATE,
    BlobWriter,
    Found,
    Layer,
    Manifest,
    ModelDetails,
)
from tp_ollama.store.modelfile import coerce_parameters, format_parameters, parse_modelfile, render_modelfile
from tp_ollama.store.names import ModelName, parse_name
from tp_ollama.store.registry import Registry

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelEntry:
    """One /api/tags row. `digest` is the sha256 hex of the manifest bytes."""

    name: str
    model: str
    modified_at: datetime
    size: int
    digest: str
    details: ModelDetails

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "model": self.model,
            "modified_at": self.modified_at.isoformat(),
            "size": self.size,
            "digest": self.digest,
            "details": self.details.to_dict(),
        }


@dataclass(frozen=True)
class ResolvedModel:
    """Everything needed to serve a model. `path` is a GGUF file or an HF directory; `template` is the
    TEMPLATE layer (None: use the checkpoint's own chat template)."""

    name: str
    path: Path
    format: str
    template: str | None
    system: str | None
    params: dict[str, Any]
    messages: list[dict[str, str]]
    license: list[str]
    details: ModelDetails
    digest: str
    modified_at: datetime
    files: tuple[tuple[str, str, int], ...] = ()  # (name in the HF directory or "", blob digest, size)


class ModelStore:
    """Models under `root` ($OLLAMA_MODELS, `~/.ollama/models` by default; the caller resolves it).

    Thread-safe for one server process (see tp_ollama.store.layout): changes hold a lock for their
    short critical sections only; reads need none."""

    def __init__(self, root: Path, *, facts_path: Path | None = None, extra_roots: Sequence[Path] = ()) -> None:
        self._layout = Layout(root, facts_path, extra_roots)
        self.root = self._layout.root
        self.blobs = self._layout.blobs
        self.manifests = self._layout.manifests
        self.own = self._layout.own

    # --- blobs -----------------------------------------------------------------------------------

    def blob_path(self, digest: str) -> Path:
        return self._layout.blob_path(digest)

    def has_blob(self, digest: str) -> bool:
        return self._layout.has_blob(digest)

    def blob_writer(self, digest: str | None = None) -> BlobWriter:
        """A writer for a blob whose digest is `digest` (checked on commit), or any content if None."""
        return self._layout.blob_writer(digest)

    def add_blob(self, digest: str, data: bytes | IO[bytes] | Iterable[bytes]) -> bool:
        """Store `data` as blob `digest` (/api/blobs POST); True when it is new (201), False when it was
        there (200); RequestError on a malformed digest or a mismatch (400)."""
        with self.blob_writer(digest) as w:
            if isinstance(data, bytes | bytearray | memoryview):
                w.write(bytes(data))
            elif hasattr(data, "read"):
                while chunk := data.read(COPY_CHUNK):
                    w.write(chunk)
            else:
                for chunk in data:
                    w.write(chunk)
            return w.commit()

    # --- reading ---------------------------------------------------------------------------------

    def names(self) -> list[str]:
        """Display names of the listed models (the front end's ModelResolver, for /v1/models)."""
        return [entry.name for entry in self.list()]

    def list(self) -> list[ModelEntry]:
        """Installed models and the visible embedded ones, newest first (/api/tags)."""
        layout = self._layout
        entries: dict[ModelName, ModelEntry] = {}
        for name, path in layout.walk():
            try:
                entries[name] = self._entry(layout.read_found(name, path))
            except FileNotFoundError:
                continue
            except (TpOllamaError, ValueError) as e:
                log.warning("skipping %s: %s", path, e)
        hidden = layout.embedded.hidden()
        for found in layout.embedded.all():
            if found.name not in entries and found.name.display not in hidden:
                entries[found.name] = self._entry(found)
        return sorted(entries.values(), key=lambda e: e.modified_at, reverse=True)

    def resolve(self, name: str) -> ResolvedModel:
        """What serving `name` needs; ModelNotFound (`model 'NAME' not found`) when it is not here."""
        layout = self._layout
        found = layout.lookup(name)
        model: Layer | None = None
        hf: list[Layer] = []
        texts: dict[str, str] = {}
        params: dict[str, Any] = {}
        messages: list[dict[str, str]] = []
        licenses: list[str] = []
        for layer in found.manifest.layers:
            kind = layer.media_type
            if kind == MODEL:
                model = layer
            elif kind == HF_FILE:
                hf.append(layer)
            elif kind in (TEMPLATE, PROMPT, SYSTEM):
                texts[SYSTEM if kind == SYSTEM else TEMPLATE] = layout.read_blob(layer.digest).decode()
            elif kind == PARAMS:
                params = json.loads(layout.read_blob(layer.digest))
            elif kind == MESSAGES:
                messages = json.loads(layout.read_blob(layer.digest))
            elif kind == LICENSE:
                licenses.append(layout.read_blob(layer.digest).decode())
        if hf:
            path, fmt = layout.hf_view(hf), "safetensors"
            files = tuple((layer.name, layer.digest, layer.size) for layer in hf)
        elif model is not None:
            path, fmt = layout.layer_file(model), "gguf"
            files = (("", model.digest, model.size),)
        else:
            raise CheckpointError(f"model '{found.name.display}' has no weights layer")
        return ResolvedModel(
            name=found.name.display,
            path=path,
            format=fmt,
            template=texts.get(TEMPLATE),
            system=texts.get(SYSTEM),
            params=params,
            messages=messages,
            license=licenses,
            details=layout.details(found),
            digest=found.digest,
            modified_at=found.modified_at,
            files=files,
        )

    def manifest(self, name: str, message: str | None = None) -> Manifest:
        """The manifest `name` resolves to (layers with digests and sizes; read-only, for /api/pull and
        /api/push); ModelNotFound with `message` (default `model 'NAME' not found`) when it is not here."""
        return self._layout.lookup(name, message).manifest

    def show(self, name: str, verbose: bool = False) -> dict[str, Any]:
        """The /api/show body. `template` falls back to the checkpoint's own chat template when the
        model has no TEMPLATE layer (the modelfile then has no TEMPLATE line)."""
        r = self.resolve(name)
        model_info, chat_template = checkpoint_info(r.path, verbose)
        template = r.template if r.template is not None else chat_template
        show: dict[str, Any] = {
            "modelfile": render_modelfile(
                name=r.name,
                from_=str(r.path),
                template=r.template,
                system=r.system,
                parameters=r.params,
                license=r.license,
                messages=r.messages,
            ),
            "parameters": format_parameters(r.params),
            "template": template or "",
            "system": r.system or "",
            "license": "\n".join(r.license),
            "details": r.details.to_dict(),
            "messages": r.messages,
            "model_info": model_info,
            "capabilities": capabilities(template),
            "modified_at": r.modified_at.isoformat(),
        }
        # upstream omits empty fields (omitempty); model_info is always there
        return {k: v for k, v in show.items() if v or k == "model_info"}

    def _entry(self, found: Found) -> ModelEntry:
        m = found.manifest
        return ModelEntry(
            name=found.name.display,
            model=found.name.display,
            modified_at=found.modified_at,
            size=m.config.size + sum(layer.size for layer in m.layers),
            digest=found.digest,
            details=self._layout.details(found),
        )

    # --- changing ------------------------------------------------------------------------------

    def create(
        self,
        name: str,
        from_: str | Path | None = None,
        *,
        files: Mapping[str, str] | None = None,
        system: str | None = None,
        template: str | None = None,
        parameters: Mapping[str, Any] | None = None,
        messages: Sequence[Mapping[str, Any]] | None = None,
        license: str | Sequence[str] | None = None,
        progress: Progress | None = None,
    ) -> ModelEntry:
        """Create (or replace) model `name`, as /api/create does.

        The weights come from `files` ({relative name: blob digest}: one GGUF, or an HF directory's
        files), or `from_`: a Path (a GGUF file, copied into the blobs, or an HF directory, whose files
        are), `@sha256:<hex>` (an uploaded GGUF blob), or a model name (its layers are reused). Then
        `template` and `system` replace the base's, `license` texts are added to its, `parameters` are
        merged over its (new keys win) and non-empty `messages` replace its. `progress` receives
        upstream's status lines, ending with "success"."""
        layout = self._layout
        say = progress or (lambda status: None)
        target = parse_name(name)
        params = coerce_parameters(parameters or {})
        msgs = check_messages(messages or [])
        licenses = [license] if isinstance(license, str) else list(license or [])
        if from_ is None and not files:
            raise RequestError("neither 'from' or 'files' was specified")
        say("gathering model components")
        draft = Draft(layout, say)
        done = False
        try:
            draft.add_weights(from_, files)
            draft.apply(template, system, licenses, params, msgs)
            manifest = draft.manifest()
            say("writing manifest")
            layout.write_manifest(target, manifest.to_bytes())
            done = True
        finally:
            with layout.lock:
                layout.unpin(draft.pinned)
                if not done:
                    layout.prune(set(draft.created))
        say("success")
        return self._entry(layout.lookup(target.full))

    def create_from_modelfile(
        self, name: str, text: str, base_dir: Path | None = None, progress: Progress | None = None
    ) -> ModelEntry:
        """Create from Modelfile text (the legacy /api/create `modelfile` field, or `ollama create -f`).
        FROM is a path when it names an existing file or directory (relative to `base_dir`)."""
        mf = parse_modelfile(text)
        return self.create(
            name,
            mf.resolve_from(base_dir),
            system=mf.system,
            template=mf.template,
            parameters=mf.parameters,
            messages=mf.messages,
            license=mf.license,
            progress=progress,
        )

    def copy(self, source: str, destination: str) -> None:
        """A second name for a model: a new manifest with the same bytes (so the same digest)."""
        layout = self._layout
        dst = parse_name(destination)
        with layout.lock:
            found = layout.lookup(source, f'model "{source}" not found')
            layout.materialise(found)
            layout.write_manifest(dst, found.manifest.to_bytes())

    def delete(self, name: str) -> None:
        """Remove a model and the blobs no other manifest references. Deleting an embedded model
        hides it (see `restore_embedded`); ModelNotFound when there is nothing to delete."""
        layout = self._layout
        target = parse_name(name)
        with layout.lock:
            found = layout.find_manifest(target)
            embedded = layout.embedded.name_of(target)
            hidden = layout.embedded.hidden()
            if found is None and (embedded is None or embedded in hidden):
                raise ModelNotFound(name)
            if embedded is not None:
                layout.embedded.set_hidden(hidden | {embedded})
            if found is not None:
                layout.remove_manifest(found[1])

    def pull(
        self, name: str, *, insecure: bool = False, status: Callable[[str], None] = lambda s: None,
        layer: Callable[[str, int, int], None] = lambda d, t, c: None, registry: Registry | None = None,
    ) -> None:  # fmt: skip
        """Fetch `name` from its registry (`host/namespace/model:tag`, registry.ollama.ai/library by
        default; plain http with `insecure`; `hf.co/org/repo:quant` from Hugging Face, see
        tp_ollama.store.hf) unless it is here already: the manifest, then every layer
        not in the store (verified against its digest), then the manifest written. `status` hears
        upstream's steps, `layer` each layer's (digest, total, completed). A failed pull lists nothing
        new and leaves only verified blobs."""
        self.restore_embedded(name)  # a deleted embedded model comes back: its weights ship with us
        status("pulling manifest")
        try:
            here = self._layout.lookup(name).manifest
        except ModelNotFound:
            here = None
        if here is not None:
            for x in (*here.layers, here.config):  # upstream reports the config blob last
                layer(x.digest, x.size, x.size)
        elif is_hub(parse_name(name)):
            self._pull_hub(name, status, layer)
            return
        else:
            parsed = parse_name(name)
            reg = registry if registry is not None else Registry(insecure=insecure)
            pinned: list[str] = []
            try:
                data, manifest = reg.manifest(parsed)
                for x in (*manifest.layers, manifest.config):
                    self._layout.pin(x.digest)  # no delete prunes it before the manifest holds it
                    pinned.append(x.digest)
                    reg.pull_blob(parsed, x, self.has_blob, self.blob_writer, layer)
                status("verifying sha256 digest")  # every layer was checked as it arrived
                status("writing manifest")
                self._layout.write_manifest(parsed, data)
            finally:
                self._layout.unpin(pinned)
                if registry is None:
                    reg.close()
            status("success")
            return
        for step in ("verifying sha256 digest", "writing manifest", "success"):
            status(step)

    def push(
        self, name: str, *, insecure: bool = False, status: Callable[[str], None] = lambda s: None,
        layer: Callable[[str, int, int], None] = lambda d, t, c: None, registry: Registry | None = None,
    ) -> None:  # fmt: skip
        """Upload model `name` to the registry its name holds (`host/namespace/model:tag`): every layer
        the registry lacks, then the manifest. ModelNotFound (`model "NAME" not found`) when it is not
        here; `status` and `layer` hear upstream's steps and each layer's progress."""
        layout = self._layout
        status("retrieving manifest")
        found = layout.lookup(name, f'model "{name}" not found')
        parsed = parse_name(name)
        reg = registry if registry is not None else Registry(insecure=insecure)
        try:
            for x in (*found.manifest.layers, found.manifest.config):
                config = layout.embedded.config_blob(x.digest)
                if config is not None and not layout.find_blob(x.digest).is_file():
                    reg.push_blob(parsed, x, None, config, layer)
                else:
                    reg.push_blob(parsed, x, layout.layer_file(x), None, layer)
            status("pushing manifest")
            reg.push_manifest(parsed, found.manifest.to_bytes())
        finally:
            if registry is None:
                reg.close()
        status("success")

    def _pull_hub(self, name: str, status: Callable[[str], None], layer: Callable[[str, int, int], None]) -> None:
        """hf.co/org/repo[:quant]: the files from the Hub (tp_ollama.store.hf), copied into the blobs in
        one pass that checks each against the Hub's sha256, then the model made from those blobs."""
        files: dict[str, str] = {}
        created: set[str] = set()  # blobs new to the store, removed again if the pull fails
        done = False
        try:
            for rel, (path, expected) in fetch(parse_name(name), layer).items():
                with path.open("rb") as f, self.blob_writer(expected or None) as w:
                    while chunk := f.read(COPY_CHUNK):
                        w.write(chunk)
                    try:
                        new = w.commit(pin=True)  # kept from pruning until the manifest holds it
                    except RequestError as e:
                        drop_cached(path)
                        raise HubError(
                            f"pulling {name}: {rel} does not match its sha256 on the Hub ({e}); "
                            "it was dropped from the Hugging Face cache"
                        ) from None
                files[rel] = w.digest
                if new:
                    created.add(w.digest)
            status("verifying sha256 digest")
            status("writing manifest")
            self.create(name, files=files)
            done = True
        finally:
            with self._layout.lock:
                self._layout.unpin(files.values())
                if not done:
                    self._layout.prune(created)
        status("success")

    def restore_embedded(self, name: str) -> bool:
        """Undo the deletion of an embedded model (call it when that name is pulled); False when the
        name is not an embedded model."""
        embedded = self._layout.embedded.name_of(parse_name(name))
        if embedded is None:
            return False
        with self._layout.lock:
            hidden = self._layout.embedded.hidden()
            if embedded in hidden:
                self._layout.embedded.set_hidden(hidden - {embedded})
        return True
