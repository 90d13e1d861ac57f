"""Devices and precisions: ``resolve_device`` is covered in ``test_inference.py``; here the precision a frozen
network runs in (``inference_precision``) and its autocast (``autocast_to``)."""

from __future__ import annotations

import pytest
import torch

from AttentionSegLib.devices import PRECISIONS, autocast_to, cpu_has_native_bfloat16, inference_precision

CPU = torch.device("cpu")


def test_explicit_precisions_are_taken_as_asked() -> None:
    assert inference_precision(CPU, "float32") == torch.float32
    assert inference_precision(CPU, "bfloat16") == torch.bfloat16
    with pytest.raises(ValueError, match="float16.*CUDA"):
        inference_precision(CPU, "float16")
    with pytest.raises(ValueError, match="precision must be one of"):
        inference_precision(CPU, "int8")
    assert set(PRECISIONS) == {"auto", "float32", "bfloat16", "float16"}


def test_auto_takes_bfloat16_on_a_cpu_only_where_the_hardware_has_it() -> None:
    expected = torch.bfloat16 if cpu_has_native_bfloat16() else torch.float32
    assert inference_precision(CPU, "auto") == expected
    assert inference_precision(torch.device("mps"), "auto") == torch.float32


def test_autocast_to_runs_a_linear_in_the_dtype_asked() -> None:
    layer = torch.nn.Linear(8, 4)
    x = torch.randn(2, 8)
    with torch.no_grad():
        with autocast_to(CPU, torch.bfloat16):
            low = layer(x)
        with autocast_to(CPU, torch.float32):
            full = layer(x)
    assert low.dtype == torch.bfloat16 and full.dtype == torch.float32
    assert torch.allclose(low.float(), full, atol=0.05)
    with autocast_to(torch.device("mps"), torch.bfloat16):  # no autocast off CPU and CUDA: full precision
        assert layer(x).dtype == torch.float32


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_auto_on_cuda_is_reduced_precision() -> None:
    dtype = inference_precision(torch.device("cuda"), "auto")
    assert dtype in {torch.bfloat16, torch.float16}
    layer = torch.nn.Linear(8, 4).cuda()
    with torch.no_grad(), autocast_to(torch.device("cuda"), dtype):
        assert layer(torch.randn(2, 8, device="cuda")).dtype == dtype
