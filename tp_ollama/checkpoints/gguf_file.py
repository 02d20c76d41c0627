"""A memory-mapped GGUF (v2/v3) file: metadata, tensor infos, and tensors read whole or as a slice.

Layout (little-endian): magic "GGUF", u32 version, u64 tensor_count, u64 kv_count; kv_count
(string key, u32 value type, value); tensor_count (string name, u32 n_dims, u64 ne[n_dims], u32 ggml
type, u64 offset); padding to `general.alignment`; the data section that tensor offsets count from.
A string is u64 length + UTF-8 bytes; an array is u32 item type + u64 count + items.

The parser walks the map with struct instead of using gguf.GGUFReader, which builds numpy objects for
every string and takes seconds on a 262,144-token vocabulary. Large arrays are only skipped at open
and decoded by `array()` when asked for.
"""

from __future__ import annotations

import mmap
import os
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from math import prod
from pathlib import Path
from types import MappingProxyType, TracebackType
from typing import Any

import numpy as np
import torch
from gguf import GGMLQuantizationType

from tp_ollama.checkpoints.base import Ensure
from tp_ollama.errors import CheckpointError
from tp_ollama.kernels import gguf_quants

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
LAZY_ARRAY_MIN = 1025  # arrays this long stay undecoded in `metadata` until `array()` is called
# Raw bytes dequantized per step of `read`: the float32 temporaries stay cache-sized. Not smaller,
# because every torch op on a chunk is an OpenMP region, and on an oversubscribed CPU each region
# can wait a scheduler tick (measured: 256 KiB chunks 4x slower than 1 MiB with a busy core).
READ_CHUNK_BYTES = 1 << 20
HEADER_PROBE_BYTES = 1 << 20  # the first prefix of a partial file fetched for its header

_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_STRING, _ARRAY = 8, 9
# GGUF value type -> struct format / numpy dtype of a fixed-size scalar.
_SCALAR_FORMATS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_SCALARS = {code: struct.Struct(fmt) for code, fmt in _SCALAR_FORMATS.items()}
_NUMPY_DTYPES = {code: np.dtype(fmt.replace("?", "b1")) for code, fmt in _SCALAR_FORMATS.items()}
_TYPE_NAMES = {
    0: "UINT8",
    1: "INT8",
    2: "UINT16",
    3: "INT16",
    4: "UINT32",
    5: "INT32",
    6: "FLOAT32",
    7: "BOOL",
    8: "STRING",
    10: "UINT64",
    11: "INT64",
    12: "FLOAT64",
}  # of array items; nested arrays are handled apart
_TYPE_CODES = {name: code for code, name in _TYPE_NAMES.items()}


@dataclass(frozen=True)
class GGUFTensorInfo:
    name: str
    ggml_type: str  # gguf.GGMLQuantizationType name: "F32", "Q4_K", ...
    shape: tuple[int, ...]  # torch order: GGUF ne reversed, ne=[640, 262144] -> (262144, 640)
    offset: int  # absolute byte offset in the file
    nbytes: int


@dataclass(frozen=True)
class GGUFArray:
    """A metadata array left undecoded at open; `GGUFFile.array(key)` decodes it."""

    item_type: str  # "STRING", "FLOAT32", "INT32", ...
    length: int
    offset: int  # absolute offset of the first item

    def __len__(self) -> int:
        return self.length


class _Cursor:
    """Sequential reads over the map; a read past the end raises struct.error."""

    def __init__(self, buf: bytes | mmap.mmap, pos: int) -> None:
        self.buf = buf
        self.pos = pos

    def u32(self) -> int:
        value: int = _U32.unpack_from(self.buf, self.pos)[0]
        self.pos += 4
        return value

    def u64(self) -> int:
        value: int = _U64.unpack_from(self.buf, self.pos)[0]
        self.pos += 8
        return value

    def string(self) -> str:
        n = self.u64()
        end = self.pos + n
        if end > len(self.buf):
            raise struct.error(f"string of {n} bytes at {self.pos} runs past the end")
        # NOTE: "replace" so one malformed token cannot make the whole file unreadable.
        text = str(self.buf[self.pos : end], "utf-8", "replace")
        self.pos = end
        return text

    def skip_strings(self, count: int) -> None:
        # The hot loop of open (262,144 tokens for Gemma 3): lengths are all that must be read.
        unpack, buf, pos = _U64.unpack_from, self.buf, self.pos
        for _ in range(count):
            pos += 8 + unpack(buf, pos)[0]
        if pos > len(buf):
            raise struct.error("string array runs past the end")
        self.pos = pos

    def value(self, vtype: int) -> Any:
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            return self.array()
        scalar = _SCALARS.get(vtype)
        if scalar is None:
            raise ValueError(f"unknown metadata value type {vtype}")
        value = scalar.unpack_from(self.buf, self.pos)[0]
        self.pos += scalar.size
        return value

    def array(self) -> GGUFArray | list[Any]:
        """A flat array as a reference the cursor has skipped past; a nested one (rare) as lists."""
        item_type, count = self.u32(), self.u64()
        if item_type == _ARRAY:
            return [self.as_list(self.array()) for _ in range(count)]
        if item_type not in _TYPE_NAMES:
            raise ValueError(f"unknown array item type {item_type}")
        ref = GGUFArray(_TYPE_NAMES[item_type], count, self.pos)
        if item_type == _STRING:
            self.skip_strings(count)
        else:
            self.pos += count * _NUMPY_DTYPES[item_type].itemsize
            if self.pos > len(self.buf):
                raise struct.error("array runs past the end")
        return ref

    def decode(self, ref: GGUFArray) -> np.ndarray | list[str]:
        """Numbers as a numpy array (a copy, so it does not pin the map), strings as a list of str."""
        if ref.item_type == "STRING":
            self.pos = ref.offset
            return [self.string() for _ in range(ref.length)]
        dtype = _NUMPY_DTYPES[_TYPE_CODES[ref.item_type]]
        return np.frombuffer(self.buf, dtype, ref.length, ref.offset).copy()

    def as_list(self, value: GGUFArray | list[Any]) -> list[Any]:
        if isinstance(value, list):
            return value
        decoded = self.decode(value)
        return decoded if isinstance(decoded, list) else decoded.tolist()


class _Truncated(CheckpointError):
    """The header runs past the bytes parsed (all of a file, or the part of a partial one fetched)."""


class GGUFFile:
    """A GGUF file mapped read-only. `read` copies and dequantizes only the requested rows / blocks.

    `ensure`, when given, is called with the byte ranges about to be read before each read (a file
    of which only some ranges are on this node: tp_ollama.store.partial)."""

    def __init__(self, path: str | os.PathLike[str], ensure: Ensure | None = None) -> None:
        self.path = Path(path)
        self._ensure = ensure
        if not self.path.is_file():
            raise CheckpointError(f"{self.path}: GGUF file not found")
        size = self.path.stat().st_size
        if size < 24:
            raise CheckpointError(f"{self.path}: not a GGUF file ({size} bytes, a GGUF header needs 24)")
        self._arrays: dict[str, GGUFArray] = {}  # every flat metadata array, for `array()`
        with open(self.path, "rb") as f:
            self._map: mmap.mmap | None = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        try:
            self.version, metadata, tensors = self._parse_fetching(size) if ensure else self._parse(self._map, size)
        except BaseException:
            self._map.close()
            raise
        self.metadata: Mapping[str, Any] = MappingProxyType(metadata)
        self.tensors: Mapping[str, GGUFTensorInfo] = MappingProxyType(tensors)
        self._bytes: np.ndarray | None = np.frombuffer(self._map, np.uint8)  # read-only view, no copy

    def _parse_fetching(self, size: int) -> tuple[int, dict[str, Any], dict[str, GGUFTensorInfo]]:
        """Parse a header of unknown length from a partial file: a prefix is fetched, and a longer
        one while the header runs past it."""
        assert self._ensure is not None and self._map is not None
        n = min(size, HEADER_PROBE_BYTES)
        while True:
            self._ensure([(0, n)])
            self._arrays.clear()
            try:
                return self._parse(self._map[:n], size)
            except _Truncated:
                if n >= size:
                    raise
                n = min(size, n * 4)

    def _parse(self, buf: bytes | mmap.mmap, size: int) -> tuple[int, dict[str, Any], dict[str, GGUFTensorInfo]]:
        if buf[:4] != GGUF_MAGIC:
            # The file's own bytes are not echoed: an error may reach a remote client.
            raise CheckpointError(f"{self.path}: not a GGUF file (it does not begin with {GGUF_MAGIC!r})")
        cur = _Cursor(buf, 4)
        version = cur.u32()
        if version & 0xFFFF == 0 and version >> 16 != 0:
            raise CheckpointError(f"{self.path}: big-endian GGUF is not supported (little-endian only)")
        if version not in SUPPORTED_VERSIONS:
            supported = ", ".join(map(str, SUPPORTED_VERSIONS))
            raise CheckpointError(f"{self.path}: unsupported GGUF version {version} (supported: {supported})")
        try:
            metadata, raw_infos = self._parse_header(cur)
            data_start = cur.pos
        except struct.error as e:
            raise _Truncated(
                f"{self.path}: truncated file: the GGUF header runs past its {len(buf)} bytes ({e})"
            ) from e
        except ValueError as e:
            raise CheckpointError(f"{self.path}: corrupt GGUF header ({e})") from e
        alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
        if not isinstance(alignment, int) or alignment <= 0:
            raise CheckpointError(f"{self.path}: general.alignment is {alignment!r}, expected a positive int")
        data_start += -data_start % alignment
        tensors = {}
        for name, ne, type_code, rel_offset in raw_infos:
            info = self._tensor_info(name, ne, type_code, data_start + rel_offset)
            if info.offset + info.nbytes > size:
                raise CheckpointError(
                    f"{self.path}: truncated file: tensor {name} needs bytes {info.offset}:"
                    f"{info.offset + info.nbytes} but the file has {size}"
                )
            tensors[name] = info
        return version, metadata, tensors

    def _parse_header(self, cur: _Cursor) -> tuple[dict[str, Any], list[tuple[str, list[int], int, int]]]:
        tensor_count, kv_count = cur.u64(), cur.u64()
        metadata: dict[str, Any] = {}
        for _ in range(kv_count):
            key = cur.string()
            value = cur.value(cur.u32())
            if isinstance(value, GGUFArray):
                self._arrays[key] = value
                if value.length < LAZY_ARRAY_MIN:
                    value = cur.as_list(value)
            metadata[key] = value
        raw_infos = []
        for _ in range(tensor_count):
            name = cur.string()
            n_dims = cur.u32()
            ne = [cur.u64() for _ in range(n_dims)]
            raw_infos.append((name, ne, cur.u32(), cur.u64()))
        return metadata, raw_infos

    def _tensor_info(self, name: str, ne: list[int], type_code: int, offset: int) -> GGUFTensorInfo:
        try:
            ggml_type = GGMLQuantizationType(type_code).name
            block_size, type_size = gguf_quants.block_layout(ggml_type)
        except (ValueError, KeyError) as e:
            raise CheckpointError(f"{self.path}: tensor {name} has unknown ggml type {type_code}") from e
        shape = tuple(reversed(ne))
        if not shape or shape[-1] % block_size:
            raise CheckpointError(
                f"{self.path}: tensor {name} of shape {shape} has a last dim that is not a multiple "
                f"of the {ggml_type} block size {block_size}"
            )
        return GGUFTensorInfo(name, ggml_type, shape, offset, prod(shape) // block_size * type_size)

    # --- metadata -----------------------------------------------------------------------------

    def array(self, key: str) -> np.ndarray | list[str]:
        """A flat metadata array decoded: numbers as a numpy array of the file's item type, strings
        as a list of str. Each call decodes again (0.2 s for Gemma 3's 262,144 tokens)."""
        ref = self._arrays.get(key)
        if ref is None:
            if key not in self.metadata:
                raise CheckpointError(f"{self.path}: no metadata key {key!r}")
            value = self.metadata[key]
            what = "a nested array" if isinstance(value, list) else type(value).__name__
            raise CheckpointError(f"{self.path}: metadata {key} is {what}, not a flat array")
        cur = _Cursor(self._mapped(), ref.offset)
        return cur.decode(ref)

    # --- tensors ------------------------------------------------------------------------------

    def info(self, name: str) -> GGUFTensorInfo:
        info = self.tensors.get(name)
        if info is None:
            raise CheckpointError(f"{self.path}: no tensor named {name!r} ({len(self.tensors)} tensors in the file)")
        return info

    def check_types(self, names: Iterable[str] | None = None) -> None:
        """Raise if any of `names` (default: all tensors) has a type `read` cannot dequantize."""
        infos = [self.info(n) for n in (self.tensors if names is None else names)]
        bad = [f"{i.name} ({i.ggml_type})" for i in infos if i.ggml_type not in gguf_quants.SUPPORTED_TYPES]
        if bad:
            shown = ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
            raise CheckpointError(
                f"{self.path}: unsupported tensor type for {shown}; supported: {', '.join(gguf_quants.SUPPORTED_TYPES)}"
            )

    def read(
        self,
        name: str,
        rows: tuple[int, int] | None = None,
        cols: tuple[int, int] | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> torch.Tensor:
        """The tensor, or rows a..b-1 of dim 0 (elements of a 1-D tensor) and/or columns a..b-1 of a
        2-D tensor, dequantized to `dtype`. Only the selected rows / blocks are copied from the map."""
        info = self.info(name)
        self.check_types([name])
        block_size, type_size = gguf_quants.block_layout(info.ggml_type)
        shape = info.shape
        if cols is not None and len(shape) != 2:
            raise CheckpointError(f"{self.path}: cols given for tensor {name} of shape {shape}; only 2-D")
        if len(shape) == 1:
            # One row of blocks; `rows` picks elements, so it must be block-aligned like cols.
            r0, r1 = 0, 1
            c0, c1 = self._checked(name, "elements", rows, shape[0], block_size)
            out_shape: tuple[int, ...] = (c1 - c0,)
        else:
            a, b = self._checked(name, "rows", rows, shape[0], 1)
            c0, c1 = self._checked(name, "cols", cols, shape[-1], block_size)
            inner = prod(shape[1:-1])  # rows of the (lead, blocks) view per index of dim 0
            r0, r1 = a * inner, b * inner
            out_shape = (b - a, *shape[1:-1], c1 - c0)
        # (lead, blocks per row, type_size) view of the map; the slice below still copies nothing.
        lead, per_row = prod(shape[:-1]), shape[-1] // block_size
        self._need(info, r0, r1, c0 // block_size * type_size, c1 // block_size * type_size, per_row * type_size)
        blocks = self._mapped_bytes()[info.offset : info.offset + info.nbytes]
        blocks = blocks.reshape(lead, per_row, type_size)
        selected = blocks[r0:r1, c0 // block_size : c1 // block_size]
        out = self._dequantize(selected, info.ggml_type, dtype).view(out_shape)
        self._release(info.offset, info.nbytes)
        return out

    def read_raw(
        self, name: str, rows: tuple[int, int] | None = None, cols: tuple[int, int] | None = None
    ) -> torch.Tensor:
        """The blocks of rows a..b-1 and (block-aligned) columns a..b-1 of a 2-D tensor, undecoded:
        a uint8 copy of shape (rows, blocks, type_size) of only the selected bytes, of any ggml type."""
        info = self.info(name)
        shape = info.shape
        if len(shape) != 2:
            raise CheckpointError(f"{self.path}: raw blocks of tensor {name} of shape {shape}; only 2-D")
        block_size, type_size = gguf_quants.block_layout(info.ggml_type)
        a, b = self._checked(name, "rows", rows, shape[0], 1)
        c0, c1 = self._checked(name, "cols", cols, shape[1], block_size)
        per_row = shape[1] // block_size
        self._need(info, a, b, c0 // block_size * type_size, c1 // block_size * type_size, per_row * type_size)
        blocks = self._mapped_bytes()[info.offset : info.offset + info.nbytes]
        blocks = blocks.reshape(shape[0], per_row, type_size)
        out = torch.from_numpy(np.array(blocks[a:b, c0 // block_size : c1 // block_size]))
        self._release(info.offset, info.nbytes)
        return out

    def _need(self, info: GGUFTensorInfo, r0: int, r1: int, b0: int, b1: int, row_bytes: int) -> None:
        """Tell `ensure` of the bytes b0..b1 of rows r0..r1 of a tensor (one range when whole rows)."""
        if self._ensure is None:
            return
        start = info.offset + r0 * row_bytes
        if b1 - b0 == row_bytes:
            self._ensure([(start, start + (r1 - r0) * row_bytes)])
        else:
            self._ensure([(start + r * row_bytes + b0, start + r * row_bytes + b1) for r in range(r1 - r0)])

    def _release(self, offset: int, nbytes: int) -> None:
        """Drop the file pages just read from this process's resident set. They stay in the page
        cache, so a warm reload is still fast, but a rank's RSS holds its weights, not the file."""
        page = mmap.PAGESIZE
        start = offset // page * page
        self._mapped().madvise(mmap.MADV_DONTNEED, start, offset + nbytes - start)

    def _checked(self, name: str, what: str, r: tuple[int, int] | None, size: int, block: int) -> tuple[int, int]:
        if r is None:
            return 0, size
        a, b = r
        if not 0 <= a < b <= size:
            raise CheckpointError(f"{self.path}: {what} {a}:{b} of tensor {name} is outside 0:{size}")
        if a % block or b % block:
            raise CheckpointError(
                f"{self.path}: {what} {a}:{b} of tensor {name} must be multiples of its block size {block}"
            )
        return a, b

    def _dequantize(self, selected: np.ndarray, ggml_type: str, dtype: torch.dtype) -> torch.Tensor:
        """(rows, blocks, type_size) byte view -> (rows, blocks * block_size) of `dtype`, chunk by chunk.

        Each chunk's raw bytes are copied out of the read-only map (torch cannot wrap it), dequantized
        in float32 while still in cache, and cast into the output, so no full float32 temporary exists.
        """
        n_rows, n_blocks, type_size = selected.shape
        block_size, _ = gguf_quants.block_layout(ggml_type)
        out = torch.empty((n_rows, n_blocks * block_size), dtype=dtype)
        # Chunk over whole rows, or over the blocks of a single huge row (a big 1-D tensor).
        flat = selected.reshape(n_rows * n_blocks, type_size) if n_rows == 1 else selected
        target = out.view(n_blocks, block_size) if n_rows == 1 else out
        per_item = type_size * (1 if n_rows == 1 else n_blocks)
        step = max(1, READ_CHUNK_BYTES // per_item)
        for i in range(0, flat.shape[0], step):
            raw = torch.from_numpy(np.array(flat[i : i + step]))
            values = gguf_quants.dequantize(raw, ggml_type)  # (step, [blocks,] block_size) float32
            target[i : i + step].copy_(values.reshape(target[i : i + step].shape))
        return out

    # --- lifetime -----------------------------------------------------------------------------

    def _mapped(self) -> mmap.mmap:
        if self._map is None:
            raise CheckpointError(f"{self.path}: GGUF file is closed")
        return self._map

    def _mapped_bytes(self) -> np.ndarray:
        if self._bytes is None:
            raise CheckpointError(f"{self.path}: GGUF file is closed")
        return self._bytes

    def close(self) -> None:
        self._bytes = None
        if self._map is not None:
            try:
                self._map.close()
            except BufferError:
                # A numpy view a caller still holds pins the map; it unmaps when that view is freed.
                pass
            self._map = None

    def __enter__(self) -> GGUFFile:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
