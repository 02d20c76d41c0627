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
