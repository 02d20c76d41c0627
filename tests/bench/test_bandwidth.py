"""The read-bandwidth probe that decode's roofline fraction is measured against."""

from __future__ import annotations

import pytest
import torch

from tests.kernels.test_quant import needs_native
from tp_ollama.bench.bandwidth import read_bandwidth_gbs
from tp_ollama.kernels import native


@needs_native
def test_native_read_sum_adds_every_value_once():
    torch.manual_seed(0)
    base = torch.rand(4096 + 16)
    x = base[(-base.data_ptr() % 64) // 4 :][:4096]
    assert native.read_sum(x) == pytest.approx(float(x.double().sum()), rel=1e-5)
    with pytest.raises(ValueError, match="multiple of 64"):
        native.read_sum(x[:100])


def test_read_bandwidth_is_a_rate_and_checks_its_arguments():
    gbs = read_bandwidth_gbs(threads=1, nbytes=1 << 20, tries=2)
    assert 0.1 < gbs < 10_000
    with pytest.raises(ValueError, match="nbytes >= 256"):
        read_bandwidth_gbs(nbytes=8)
