"""The kernels of cpu_kernels.c. An int8 matmul on a blocked int8 layout (scales per group of inputs) for
decode and batches of decodes. An int4 matmul: weights in 16-row blocks of 4-bit codes, activations
quantized to int8 per group, dot products on AVX-512 VNNI (vpdpbusd). On gemma3 shapes with 2 threads
it reads weights 2-3x faster than torch's packed int4 kernel at one row, and runs 16 rows at once in
less than half the time torch needs, which reads one activation row at a time. An RMSNorm of bfloat16
rows: one call where torch runs a dozen operators. The decode step of whole models
(tp_ollama.models.native_decode) and the read loop of the bandwidth probe.

The source is kernels/cpu_kernels.c at the top of the repository. The package build compiles it
once per instruction set (variants.py: AVX-512 VNNI, and AVX2 for CPUs without AVX-512) into
tp_ollama/kernels/native/_tpo_<variant>*.so, and `library()` loads the best variant this CPU runs
(TP_OLLAMA_KERNELS_VARIANT names one to force, for tests and comparisons). In a source checkout whose
build left a variant out, or whose sources changed since the build, the variant is compiled from
them on first use into `$TP_OLLAMA_CACHE/kernels/` instead. Where no
variant runs (another architecture, TP_OLLAMA_NATIVE_KERNELS=0), `library()` is None and quantized
weights take torch's kernels.

The library links OpenMP; torch's libgomp (soname libgomp.so.1) is loaded first, so both share one
runtime and one thread pool.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import torch

from tp_ollama.config.settings import default_cache_dir
from tp_ollama.kernels.native.variants import COMMON_FLAGS, MODULE_PREFIX, PREFERENCE, VARIANTS

log = logging.getLogger(__name__)

# A source checkout's kernels/ (an installed wheel has the built variants instead).
SOURCE_DIR = Path(__file__).resolve().parents[3] / "kernels"
SOURCE = SOURCE_DIR / "cpu_kernels.c"
COMPILE_TIMEOUT_S = 120.0
BLOCK_ROWS = 16  # weight rows per block of the layout
GROUP_MULTIPLE = 16  # a group is a whole number of 16-float vectors
ENV_SWITCH = "TP_OLLAMA_NATIVE_KERNELS"
VARIANT_ENV = "TP_OLLAMA_KERNELS_VARIANT"


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> set[str]:
    """This CPU's instruction-set flags (Linux /proc/cpuinfo); empty where it cannot be read."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.partition(":")[2].split())
    return set()


def variant(flags: set[str] | None = None) -> str | None:
    """The variant to load: TP_OLLAMA_KERNELS_VARIANT when set (refused, with the reason, where the
    CPU lacks what it needs), else the best one whose CPU flags are all here; None for none."""
    flags = cpu_flags() if flags is None else flags
    forced = os.environ.get(VARIANT_ENV, "")
    if forced:
        if forced not in VARIANTS:
            raise ValueError(f"{VARIANT_ENV}={forced!r} is not a kernel variant; expected one of {', '.join(VARIANTS)}")
        missing = [f for f in VARIANTS[forced][0] if f not in flags]
        if missing:
            raise ValueError(f"{VARIANT_ENV}={forced}: this CPU lacks {', '.join(missing)}")
        return forced
    return next((name for name in PREFERENCE if all(f in flags for f in VARIANTS[name][0])), None)


def cpu_supports() -> bool:
    """Whether some variant of the kernels runs on this CPU."""
    try:
        return variant() is not None
    except ValueError:
        return False


def built_library(name: str) -> Path | None:
    """The variant the package build compiled, if it did."""
    found = sorted(Path(__file__).parent.glob(f"{MODULE_PREFIX}{name}.*so"))
    return found[0] if found else None


def _compiler() -> str:
    return os.environ.get("CC", "cc")


def _compile_flags(name: str) -> tuple[str, ...]:
    return (*COMMON_FLAGS, *VARIANTS[name][1], f"-I{SOURCE_DIR}", "-shared", "-fPIC", "-lm")


def _library_path(name: str) -> Path:
    sources = SOURCE.read_bytes() + (SOURCE_DIR / "avx512_on_avx2.h").read_bytes()
    digest = hashlib.sha256(sources + " ".join(_compile_flags(name)).encode()).hexdigest()
    return default_cache_dir() / "kernels" / f"cpu_kernels-{name}-{digest[:16]}.so"


def build(path: Path, cc: str, name: str = "avx512") -> None:
    """Compile variant `name` from the source checkout to `path`, atomically: a concurrent rank sees
    the whole file or none."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=path.parent)
    os.close(fd)
    try:
        done = subprocess.run(
            [cc, *_compile_flags(name), "-o", tmp, str(SOURCE)], capture_output=True, text=True,
            timeout=COMPILE_TIMEOUT_S,
        )  # fmt: skip
        if done.returncode != 0:
            raise OSError(f"{cc} failed: {done.stderr.strip()[-2000:]}")
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def _locate(name: str) -> Path:
    """The built variant, or one compiled from the source checkout on first use."""
    built = built_library(name)
    sources = [SOURCE, SOURCE_DIR / "avx512_on_avx2.h"]
    if built is not None and not (SOURCE.exists() and max(p.stat().st_mtime for p in sources) > built.stat().st_mtime):
        return built
    # a checkout whose sources changed since the build (or that the build left out): compile them
    if not SOURCE.exists():
        raise OSError(f"the {name} kernels were not built with the package and there is no source to build them")
    path = _library_path(name)
    if not path.exists():
        log.info("compiling the %s kernels from %s (not built with the package, or changed since)", name, SOURCE)
        build(path, _compiler(), name)
    return path


@functools.cache
def library() -> ctypes.CDLL | None:
    """The kernels for this CPU, or None where none runs here (the reason is logged)."""
    if os.environ.get(ENV_SWITCH, "1") == "0":
        return None
    try:
        name = variant()
    except ValueError as e:
        log.warning("native kernels off: %s", e)
        return None
    if name is None:
        log.info(
            "native kernels off: the CPU has none of %s",
            ", ".join(f"{v} ({', '.join(VARIANTS[v][0])})" for v in PREFERENCE),
        )
        return None
    try:
        lib = ctypes.CDLL(str(_locate(name)))
    except (OSError, subprocess.SubprocessError) as e:
        log.warning("native kernels unavailable (%s); using torch's kernels", e)
        return None
    lib.tpo_variant = name  # type: ignore[attr-defined]
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    lib.tpo_int4_mm.restype = ctypes.c_int
    lib.tpo_int4_mm.argtypes = [ptr, i64, i64, ptr, ptr, i64, i64, i64, ptr, ctypes.c_int]
    lib.tpo_int8_mm.restype = ctypes.c_int
    lib.tpo_int8_mm.argtypes = [ptr, i64, i64, ptr, ptr, i64, i64, ptr, ctypes.c_int]
    lib.tpo_int8_to_bf16.restype = ctypes.c_int
    lib.tpo_int8_to_bf16.argtypes = [ptr, ptr, i64, i64, i64, ptr, ctypes.c_int]
    lib.tpo_rms_norm_bf16.restype = None
    lib.tpo_rms_norm_bf16.argtypes = [ptr, i64, i64, i64, ptr, ctypes.c_int, ctypes.c_float, ptr, i64]
    lib.tpo_read_sum.restype = ctypes.c_float
    lib.tpo_read_sum.argtypes = [ptr, i64, ctypes.c_int]
    lib.tpo_argmax.restype = i64
    lib.tpo_argmax.argtypes = [ptr, i64]
    lib.tpo_decode.restype = ctypes.c_int
    lib.tpo_decode.argtypes = [ptr, ptr, i64, ctypes.c_int]  # see tp_ollama.models.native_decode
    lib.tpo_decode_paged.restype = ctypes.c_int
    lib.tpo_decode_paged.argtypes = [ptr, ptr, i64, ptr, ptr, i64, i64, ctypes.c_int]
    lib.tpo_decode_logits.restype = ctypes.c_int
    lib.tpo_decode_logits.argtypes = [ptr, i64, i64, ptr, ctypes.c_int]
    lib.tpo_struct_layout.restype = i64
    lib.tpo_struct_layout.argtypes = [ptr, i64]
    lib.tpo_decode_paged_logits.restype = ctypes.c_int
    lib.tpo_decode_paged_logits.argtypes = [ptr, ptr, i64, ptr, ptr, i64, i64, ptr, ctypes.c_int]
    return lib


def available() -> bool:
    return library() is not None


class _BoundMatmul:
    """A native matmul bound to one weight: its shapes checked and its pointers taken once (the
    tensors must outlive it and not move), so each call costs a ctypes call and an output tensor."""

    kind = ""
    n = k = 0
    _fn: Any
    _weight: tuple[int, ...]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x (M, K) on the CPU -> (M, N) float32."""
        if x.dtype != torch.float32 or not x.is_contiguous():
            x = x.to(torch.float32).contiguous()
        m = x.shape[0]
        if x.shape[1] != self.k:
            raise ValueError(f"activations {m}x{x.shape[1]} do not fit an {self.kind} weight of {self.n}x{self.k}")
        y = torch.empty(m, self.n, dtype=torch.float32)
        if self._fn(x.data_ptr(), m, self.k, *self._weight, y.data_ptr(), torch.get_num_threads()) != 0:
            raise MemoryError(f"the native {self.kind} kernel could not allocate {m}x{self.k} quantized activations")
        return y


class Int4Matmul(_BoundMatmul):
    """The native int4 matmul bound to one weight: packed (N, K/2) uint8 in the native layout,
    scale_zero (K/group, N, 2) bfloat16, maybe a view of some rows of a larger one."""

    kind = "int4"

    def __init__(self, packed: torch.Tensor, scale_zero: torch.Tensor, group: int) -> None:
        lib = library()
        if lib is None:
            raise RuntimeError("the native int4 kernel is not available on this machine")
        n, k = packed.shape[0], packed.shape[1] * 2
        pairs_contiguous = scale_zero.stride(2) == 1 and scale_zero.stride(1) == 2
        if not packed.is_contiguous() or not pairs_contiguous or tuple(scale_zero.shape) != (k // group, n, 2):
            raise ValueError(f"an int4 weight of {n}x{k} needs contiguous codes and (scale, zero) pairs")
        if n % BLOCK_ROWS or group % GROUP_MULTIPLE or k % group:
            raise ValueError(
                f"the native int4 kernel cannot take {n}x{k} in groups of {group}: rows must come in blocks "
                f"of {BLOCK_ROWS} and groups be multiples of {GROUP_MULTIPLE} dividing {k}"
            )
        self.n, self.k, self.group = n, k, group
        self._fn = lib.tpo_int4_mm
        self._weight = (packed.data_ptr(), scale_zero.data_ptr(), scale_zero.stride(0) // 2, n, group)


def int8_fits(n: int, k: int, group: int) -> bool:
    """Whether an (N, K) int8 weight in groups of `group` inputs can take the blocked layout of the int8
    kernel: rows in whole blocks, groups of whole 16-input activation steps."""
    return n % BLOCK_ROWS == 0 and k > 0 and group > 0 and group % GROUP_MULTIPLE == 0 and k % group == 0


def _check_int8(q: torch.Tensor, scale: torch.Tensor, group: int) -> tuple[int, int]:
    n, k = q.shape
    groups = k // group if group > 0 else 0
    if not int8_fits(n, k, group):
        raise ValueError(
            f"the native int8 kernel cannot take {n}x{k} in groups of {group}: rows must come in blocks of "
            f"{BLOCK_ROWS} and groups be multiples of {GROUP_MULTIPLE} dividing {k}"
        )
    if (
        not q.is_contiguous()
        or q.dtype != torch.int8
        or scale.dtype != torch.float32
        or tuple(scale.shape) != (n, groups)
        or not scale.is_contiguous()
    ):
        raise ValueError(f"an int8 weight of {n}x{k} needs contiguous int8 codes and float32 scales per group")
    return n, k


class Int8Matmul(_BoundMatmul):
    """The native int8 matmul bound to one weight in the blocked layout (see kernels/cpu_kernels.c,
    tpo_int8_mm): q (N, K) int8 and (N, K/group) float32 scales, contiguous, maybe a view of some
    whole blocks of a larger one."""

    kind = "int8"

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, group: int) -> None:
        lib = library()
        if lib is None:
            raise RuntimeError("the native int8 kernel is not available on this machine")
        n, k = _check_int8(q, scale, group)
        self.n, self.k = n, k
        self._fn = lib.tpo_int8_mm
        self._weight = (q.data_ptr(), scale.data_ptr(), group, n)


def int8_to_bf16(q: torch.Tensor, scale: torch.Tensor, group: int) -> torch.Tensor:
    """An int8 weight in the blocked layout (as Int8Matmul takes it) as a new (N, K) bfloat16 tensor of
    plain rows, rounded as torch rounds (Int8Weight.dequantize(bfloat16))."""
    lib = library()
    if lib is None:
        raise RuntimeError("the native kernels are not available on this machine")
    n, k = _check_int8(q, scale, group)
    out = torch.empty(n, k, dtype=torch.bfloat16)
    if lib.tpo_int8_to_bf16(q.data_ptr(), scale.data_ptr(), group, n, k, out.data_ptr(), torch.get_num_threads()):
        raise ValueError(f"the native kernels cannot expand an {n}x{k} int8 weight in groups of {group}")
    return out


def int4_mm(x: torch.Tensor, packed: torch.Tensor, scale_zero: torch.Tensor, group: int) -> torch.Tensor:
    """x (M, K) @ w.T -> (M, N) float32 for a weight in the native layout (see Int4Matmul)."""
    return Int4Matmul(packed, scale_zero, group)(x)


def read_sum(x: torch.Tensor) -> float:
    """The sum of a contiguous float32 CPU tensor whose size is a multiple of 64 and whose data is
    64-byte aligned, read with every thread as fast as the memory allows."""
    lib = library()
    if lib is None:
        raise RuntimeError("the native kernels are not available on this machine")
    if x.dtype != torch.float32 or not x.is_contiguous() or x.numel() % 64 or x.data_ptr() % 64:
        raise ValueError("read_sum takes a 64-byte aligned contiguous float32 tensor of a multiple of 64 values")
    return float(lib.tpo_read_sum(x.data_ptr(), x.numel(), torch.get_num_threads()))


def argmax(x: torch.Tensor) -> int | None:
    """The index of the first maximum of a 1-D float32 CPU tensor (NaN the largest), as torch.argmax
    gives it, in a twentieth of its time; None where the kernels are not available or x is not one."""
    lib = library()
    if lib is None or x.dtype != torch.float32 or x.dim() != 1 or x.device.type != "cpu" or x.numel() == 0:
        return None
    if not x.is_contiguous():
        x = x.contiguous()
    return int(lib.tpo_argmax(x.data_ptr(), x.numel()))


def rms_norm_bf16(x: torch.Tensor, scale: torch.Tensor, eps: float, scale_after_cast: bool) -> torch.Tensor:
    """RMSNorm over the last dim of a contiguous bfloat16 CPU tensor, in float32, times `scale` (float32,
    (D,)) before the cast back (scale_after_cast False: Gemma) or after it (True: Llama)."""
    lib = library()
    if lib is None:
        raise RuntimeError("the native kernels are not available on this machine")
    d = x.shape[-1]
    y = torch.empty_like(x)
    rows = x.numel() // d if d else 0
    lib.tpo_rms_norm_bf16(x.data_ptr(), rows, d, d, scale.data_ptr(), int(scale_after_cast), eps, y.data_ptr(), d)
    return y
