"""Build the native kernels (kernels/cpu_kernels.c) at install time, once per instruction-set variant
(tp_ollama/kernels/native/variants.py), into the package: no compiler is needed at run time. A
variant that cannot be built here (no compiler, no SIMDe headers for the AVX2 one) is left out with
a message, and the package falls back to torch's kernels where no variant runs."""

from __future__ import annotations

import runpy
from pathlib import Path

from setuptools import Extension, setup

ROOT = Path(__file__).parent
variants = runpy.run_path(str(ROOT / "tp_ollama" / "kernels" / "native" / "variants.py"))


def kernel(name: str, flags: tuple[str, ...]) -> Extension:
    compile_flags = [*variants["COMMON_FLAGS"], *flags]
    return Extension(
        f"tp_ollama.kernels.native.{variants['MODULE_PREFIX']}{name}",
        sources=["kernels/cpu_kernels.c"],
        include_dirs=["kernels"],
        extra_compile_args=compile_flags,
        extra_link_args=["-fopenmp", "-lm"],
        depends=["kernels/avx512_on_avx2.h"],
        optional=True,  # a variant that fails to build is reported and skipped, not fatal
    )


setup(ext_modules=[kernel(name, flags) for name, (_, flags) in variants["VARIANTS"].items()])
