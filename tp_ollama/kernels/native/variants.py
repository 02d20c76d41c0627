"""The builds of kernels/cpu_kernels.c, read by setup.py at install time (without importing the
package) and by the loader at run time: one per instruction set, the best one the CPU has wins.

avx512: AVX-512 with VNNI (vpdpbusd), the kernels as written. avx2: the same source on AVX2 and FMA,
each 512-bit operation done as two 256-bit ones (kernels/avx512_on_avx2.h, over the header-only SIMDe
library) and the byte dot products with vpmaddubsw / vpmaddwd. Names, the CPU flags each needs (as
/proc/cpuinfo spells them) and the compiler flags each is built with."""

from __future__ import annotations

COMMON_FLAGS = ("-O3", "-ffp-contract=off", "-fopenmp")  # a * b + c stays two roundings, as torch's
VARIANTS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "avx512": (
        ("avx512f", "avx512bw", "avx512vl", "avx512_vnni"),
        ("-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni"),
    ),
    "avx2": (("avx2", "fma", "f16c"), ("-mavx2", "-mfma", "-mf16c", "-DTPO_AVX2")),
}
PREFERENCE = ("avx512", "avx2")  # best first
MODULE_PREFIX = "_tpo_"  # tp_ollama/kernels/native/_tpo_<variant>.<ext suffix>
