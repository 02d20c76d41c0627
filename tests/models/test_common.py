"""tp_ollama.models.common's RMSNorm: the native path for bfloat16 rows against torch's, in both of transformers'
orders (the layers of every family against transformers: test_llama.py, test_gemma3.py)."""

from __future__ import annotations

import pytest
import torch

from tests.kernels.test_quant import needs_native
from tp_ollama.kernels import native
from tp_ollama.models.common import RMSNorm


def _norm(unit_offset: bool, dim: int = 640) -> RMSNorm:
    norm = RMSNorm(dim, 1e-6, unit_offset=unit_offset)
    norm.weight.data = (torch.randn(dim) * 0.5).to(torch.bfloat16)
    return norm


def _torch_path(norm: RMSNorm, x: torch.Tensor) -> torch.Tensor:
    """What RMSNorm computes without the native kernels (transformers' arithmetic)."""
    shape = (x.shape[-1],)
    if norm.unit_offset:
        return torch.nn.functional.rms_norm(x.float(), shape, 1.0 + norm.weight.float(), norm.eps).type_as(x)
    return norm.weight * torch.nn.functional.rms_norm(x.float(), shape, None, norm.eps).to(x.dtype)


@needs_native
@pytest.mark.parametrize("unit_offset", [True, False], ids=["gemma", "llama"])
@pytest.mark.parametrize("shape", [(1, 1, 640), (3, 5, 640), (1, 4, 1, 256)], ids=str)
def test_native_norm_equals_torch_within_one_bf16_step(unit_offset, shape):
    torch.manual_seed(0)
    norm = _norm(unit_offset, shape[-1])
    x = (torch.randn(*shape) * torch.logspace(-2, 2, shape[-1])).to(torch.bfloat16)  # outlier channels
    with torch.inference_mode():
        got = norm(x)
    want = _torch_path(norm, x)
    assert got.dtype == torch.bfloat16 and got.shape == x.shape
    # The same float32 arithmetic; only the sum of squares is added in another order, which moves a
    # result across a bfloat16 rounding boundary now and then: one step (2**-8 relative) at most.
    step = want.float().abs() * 2.0**-7
    assert bool(((got.float() - want.float()).abs() <= step).all())
    assert (got == want).float().mean() > 0.99


@needs_native
def test_the_native_norm_is_not_the_identity():
    """A wrong scale or a missing normalisation would still be 'close' to a copy of x: rule it out."""
    torch.manual_seed(0)
    norm = _norm(True)
    norm.weight.data.zero_()  # Gemma's scale (1 + w) = 1: the output is x / rms(x)
    x = (torch.randn(2, 640) * 30).to(torch.bfloat16)
    with torch.inference_mode():
        got = norm(x).float()
    assert torch.allclose(got.pow(2).mean(dim=-1).sqrt(), torch.ones(2), rtol=1e-2)
    doubled = _norm(True)
    doubled.weight.data = torch.ones(640, dtype=torch.bfloat16)  # scale (1 + 1) = 2
    with torch.inference_mode():
        assert torch.allclose(doubled(x).float(), 2 * got, rtol=1e-2)


def test_float32_and_strided_inputs_take_torchs_path(monkeypatch):
    calls = []
    monkeypatch.setattr(native, "rms_norm_bf16", lambda *a, **k: calls.append(1))
    norm = _norm(True)
    x = torch.randn(4, 640)
    with torch.inference_mode():
        norm(x)  # float32: the path whose results tests hold equal to transformers'
        norm(x.to(torch.bfloat16).t().contiguous().t())  # not contiguous
    assert calls == []
