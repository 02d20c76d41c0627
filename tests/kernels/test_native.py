"""tp_ollama.kernels.native: its read loop, which the read-bandwidth probe times, sums every value once."""

from __future__ import annotations

import pytest
import torch

from tests.kernels.test_quant import needs_native
from tp_ollama.kernels import native


@needs_native
def test_native_read_sum_adds_every_value_once():
    torch.manual_seed(0)
    base = torch.rand(4096 + 16)
    x = base[(-base.data_ptr() % 64) // 4 :][:4096]
    assert native.read_sum(x) == pytest.approx(float(x.double().sum()), rel=1e-5)
    with pytest.raises(ValueError, match="multiple of 64"):
        native.read_sum(x[:100])


AVX512 = {"avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx2", "fma", "f16c"}


def test_the_best_variant_the_cpu_runs_is_chosen_and_a_forced_one_is_checked(monkeypatch):
    monkeypatch.delenv(native.VARIANT_ENV, raising=False)
    assert native.variant(AVX512) == "avx512"
    assert native.variant({"avx2", "fma", "f16c", "sse4_2"}) == "avx2"
    assert native.variant({"sse4_2", "avx"}) is None
    monkeypatch.setenv(native.VARIANT_ENV, "avx2")
    assert native.variant(AVX512) == "avx2"
    with pytest.raises(ValueError, match="this CPU lacks avx2, fma, f16c"):
        native.variant({"sse4_2"})
    monkeypatch.setenv(native.VARIANT_ENV, "neon")
    with pytest.raises(ValueError, match="'neon' is not a kernel variant; expected one of avx512, avx2"):
        native.variant(AVX512)


def test_the_package_build_compiled_every_variant_this_cpu_runs():
    flags = native.cpu_flags()
    for name, (needs, _) in native.VARIANTS.items():
        if all(f in flags for f in needs):
            assert native.built_library(name) is not None, f"the {name} kernels were not built with the package"


_VARIANT_CHECK = """
import json, torch
from tests.tiny import make_hf_model, save_hf
from tp_ollama.checkpoints.loader import load_model, open_checkpoint
from tp_ollama.engine.kv_cache import KVCache
from tp_ollama.kernels import native
from tp_ollama.kernels.quant import quantize_int4, quantize_int8
from tp_ollama.models.native_decode import native_decoder
torch.manual_seed(0)
out = {"variant": native.library().tpo_variant, "mm": {}}
packings = [("int4", lambda w: quantize_int4(w))]
packings += [(f"int8 group {g}", lambda w, g=g: quantize_int8(w, g)) for g in (16, 32, 64, 320)]
for kind, pack in packings:
    w = pack(torch.randn(256, 320))
    for m in (1, 3, 5, 16):
        x = torch.randn(m, 320)
        want = x @ w.dequantize(torch.float32).T
        got = w.native_matmul()(x)
        out["mm"][f"{kind} {m}"] = float(((got - want).norm() / want.norm()))
w8 = quantize_int8(torch.randn(64, 320) * 1e3, 16)  # both signs, values past bfloat16's int range
expanded = native.int8_to_bf16(w8.q, w8.scale, 16)
out["to_bf16_exact"] = torch.equal(expanded, w8.dequantize(torch.bfloat16))
path = save_hf(make_hf_model("gemma3_text"), __import__("pathlib").Path(DIR))
model = load_model(open_checkpoint(path), torch.float32, "cpu", quant="int4")
cache = KVCache.for_model(model, batch=1, max_len=16)
decoder = native_decoder(model)
logits = [decoder.step(t, i, cache).tolist() for i, t in enumerate([5, 9, 3, 7])]
out["logits"] = logits
print("@@" + json.dumps(out))
"""


@needs_native
@pytest.mark.parametrize("name", ["avx2", "avx512"])
def test_each_variant_computes_what_the_reference_does(name, tmp_path):
    """Each variant the CPU runs, forced in a process of its own: its int4 and int8 matmuls against
    the dequantized weights (activations are rounded to int8 per group: ~1% of the norm), its int8
    expansion to bfloat16 bit for bit, and the native decode step of a tiny Gemma 3 against the
    other variant's logits."""
    import json
    import os
    import subprocess
    import sys

    if not all(f in native.cpu_flags() for f in native.VARIANTS[name][0]):
        pytest.skip(f"this CPU does not run the {name} kernels")

    def run(variant: str) -> dict:
        env = {**os.environ, native.VARIANT_ENV: variant, "DIR": str(tmp_path / variant)}
        script = _VARIANT_CHECK.replace("DIR", repr(str(tmp_path / variant)))
        done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        return json.loads(next(line for line in done.stdout.splitlines() if line.startswith("@@"))[2:])

    got = run(name)
    assert got["variant"] == name
    assert got["to_bf16_exact"], f"{name}: int8_to_bf16 differs from the dequantized weight"
    for case, rel in got["mm"].items():
        assert rel < 0.02, f"{name} {case}: {rel:.3g} of the norm from the dequantized matmul"
    other = run("avx512" if name == "avx2" else name)
    a, b = torch.tensor(got["logits"]), torch.tensor(other["logits"])
    assert ((a - b).norm() / b.norm()).item() < 1e-3
