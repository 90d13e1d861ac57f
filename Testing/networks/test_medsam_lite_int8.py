"""Specification of LiteMedSAM's int8 linear layers (``AttentionSegLib/networks/medsam_lite/int8.py``):
an :class:`Int8Linear` answers as the float layer it was made from within the error of 8-bit quantisation,
for any leading shape; :func:`quantise_linears` replaces every linear layer of the real encoder, whose
embedding of a CT-like slice then stays close to float32's. Where this PyTorch lacks the x86 int8 kernels
the tests that need them are skipped with that reason, and the refusal is checked."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from AttentionSegLib import make_abdominal_phantom
from AttentionSegLib.networks.medsam_lite import int8, load_medsam_lite
from AttentionSegLib.networks.medsam_lite.int8 import Int8Linear, int8_available, quantise_linears

needs_int8 = pytest.mark.skipif(not int8_available(), reason="this PyTorch has no x86 int8 kernels (FBGEMM)")


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@needs_int8
@pytest.mark.parametrize("bias", [True, False])
def test_an_int8_linear_answers_as_its_float_layer_within_8_bit_error(bias: bool) -> None:
    generator = torch.Generator().manual_seed(0)
    layer = nn.Linear(96, 40, bias=bias)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(40, 96, generator=generator) * torch.linspace(0.01, 1.0, 40)[:, None])
    quantised = Int8Linear(layer)
    x = torch.randn(7, 96, generator=generator)
    with torch.no_grad():
        expected, got = layer(x), quantised(x)
    assert got.shape == expected.shape and got.dtype == torch.float32
    assert not torch.equal(got, expected)  # it really ran in int8
    assert relative_error(got, expected) < 0.03
    # one scale per output feature: the rows of small weights keep their relative precision
    assert relative_error(got[:, :4], expected[:, :4]) < 0.05
    assert "int8" in repr(quantised)


@needs_int8
def test_an_int8_linear_takes_any_leading_shape_and_strided_input() -> None:
    generator = torch.Generator().manual_seed(1)
    layer = nn.Linear(16, 8)
    quantised = Int8Linear(layer)
    x = torch.randn(2, 16, 5, 3, generator=generator).permute(0, 2, 3, 1)  # (2, 5, 3, 16), not contiguous
    with torch.no_grad():
        got = quantised(x)
        flat = quantised(x.reshape(-1, 16))
    assert got.shape == (2, 5, 3, 8)
    torch.testing.assert_close(got.reshape(-1, 8), flat)
    with pytest.raises(ValueError, match="float32 CPU tensors"):
        quantised(x.bfloat16())


@needs_int8
def test_quantise_linears_replaces_every_linear_layer_in_place() -> None:
    block = nn.Sequential(nn.Linear(4, 8), nn.GELU(), nn.Sequential(nn.LayerNorm(8), nn.Linear(8, 2)))
    assert quantise_linears(block) == 2
    assert isinstance(block[0], Int8Linear) and isinstance(block[2][1], Int8Linear)
    assert isinstance(block[2][0], nn.LayerNorm)
    assert not any(isinstance(m, nn.Linear) for m in block.modules())
    assert set(block.state_dict()) == {"2.0.weight", "2.0.bias"}  # the packed weights are not state


@needs_int8
def test_the_real_encoder_in_int8_gives_the_masks_of_float32(medsam_weights: Path) -> None:
    """All 40 linear layers of TinyViT in int8, on a CT phantom's slice (abdomen window, 256 x 256): the
    embedding moves by about a tenth (relative L2; 0.11-0.13 measured on slices of the example CT, bfloat16
    0.05), and the box of each organ decodes to the mask float32's embedding gives (Dice 0.95 or more on an
    AMD EPYC with VNNI; 0.91-1.00 on an Intel Xeon with AMX, where the embedding moved by 0.135 and organ 3,
    which float32 itself finds at Dice 0.84 against the phantom's label, came out at 0.75)."""
    model = load_medsam_lite(medsam_weights)
    encoder = model.image_encoder
    quantised = copy.deepcopy(encoder)
    assert quantise_linears(quantised) == sum(isinstance(m, nn.Linear) for m in encoder.modules()) == 40
    image, labels, _ = make_abdominal_phantom(shape=(8, 256, 256), seed=3)
    hu = torch.from_numpy(image.array[4]).float()
    x = ((hu.clamp(-160, 240) + 160) / 400)[None, None].expand(1, 3, 256, 256).contiguous()
    with torch.no_grad():
        expected, got = encoder(x), quantised(x)
        assert got.shape == expected.shape == (1, 256, 64, 64)
        assert 0 < relative_error(got, expected) < 0.2
        organs = [int(v) for v in np.unique(labels.array[4]) if v and (labels.array[4] == v).sum() >= 400]
        assert len(organs) >= 2
        for organ in organs:
            rows, cols = np.nonzero(labels.array[4] == organ)
            box = torch.tensor([[cols.min(), rows.min(), cols.max(), rows.max()]], dtype=torch.float32)
            masks = [model.decode(e, boxes=box).logits[0, 0] > 0 for e in (expected, got)]
            overlap = 2 * float((masks[0] & masks[1]).sum()) / float(masks[0].sum() + masks[1].sum())
            assert overlap >= 0.9, (organ, overlap)


def test_without_the_int8_kernels_quantising_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(int8, "int8_available", lambda: False)
    with pytest.raises(RuntimeError, match="no x86 int8 kernels"):
        quantise_linears(nn.Linear(2, 2))
