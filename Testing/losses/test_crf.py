"""Specification of the masked (gated) CRF loss (``AttentionSegLib/losses/crf.py``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from AttentionSegLib.losses import masked_crf_loss


def dense_reference(
    probs: torch.Tensor,
    image: torch.Tensor,
    gate: torch.Tensor,
    receive: torch.Tensor,
    *,
    sigma_xy: float,
    sigma_rgb: float,
    radius: int,
    step: tuple[float, ...],
) -> torch.Tensor:
    """The loss written as its definition: all pairs, explicit kernel matrix (only for tiny inputs)."""
    batch, classes, *spatial = probs.shape
    axes = [torch.arange(n, dtype=torch.float64) for n in spatial]
    coords = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, len(spatial))
    positions = coords * torch.tensor(step, dtype=torch.float64)
    chebyshev = (coords[:, None] - coords[None]).abs().amax(dim=-1)
    in_window = (chebyshev <= radius) & (chebyshev > 0)
    energy = torch.zeros((), dtype=torch.float64)
    receivers = torch.zeros((), dtype=torch.float64)
    for b in range(batch):
        y = probs[b].reshape(classes, -1).double()
        intensity = image[b].reshape(image.shape[1], -1).double()
        s = gate[b].reshape(-1).double()
        d = receive[b].reshape(-1).double() * s
        kernel = torch.exp(
            -(positions[:, None] - positions[None]).square().sum(-1) / (2 * sigma_xy**2)
            - (intensity[:, :, None] - intensity[:, None, :]).square().sum(0) / (2 * sigma_rgb**2)
        )
        weights = kernel * in_window * d[:, None] * s[:, None] * s[None, :]
        energy = energy + (weights * (1.0 - y.T @ y)).sum()
        receivers = receivers + d.sum()
    return energy / receivers


def _two_region_image(spatial: tuple[int, ...]) -> torch.Tensor:
    """Intensity 0 on the first half of the last axis, 1 on the second half."""
    image = torch.zeros(1, 1, *spatial)
    image[..., spatial[-1] // 2 :] = 1.0
    return image


def _probs_from_mask(foreground: torch.Tensor) -> torch.Tensor:
    fg = foreground.float()
    return torch.stack([1.0 - fg, fg], dim=1)


@pytest.mark.parametrize(
    ("spatial", "spacing"), [((7, 6), None), ((4, 5, 6), (0.5, 1.0, 2.0))], ids=["2d", "3d_anisotropic"]
)
def test_matches_the_dense_definition(spatial: tuple[int, ...], spacing: tuple[float, ...] | None) -> None:
    generator = torch.Generator().manual_seed(0)
    probs = torch.softmax(torch.randn(2, 3, *spatial, generator=generator), dim=1)
    image = torch.rand(2, 2, *spatial, generator=generator)
    gate = (torch.rand(2, 1, *spatial, generator=generator) > 0.2).float()
    receive = (torch.rand(2, 1, *spatial, generator=generator) > 0.3).float()
    step = (1.0,) * len(spatial) if spacing is None else tuple(reversed(spacing))
    loss = masked_crf_loss(
        probs, image, mask=gate, receive_mask=receive, sigma_xy=2.0, sigma_rgb=0.5, radius=2, spacing=spacing
    )
    expected = dense_reference(
        probs, image, gate, receive, sigma_xy=2.0, sigma_rgb=0.5, radius=2, step=step
    )
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_gradient_matches_the_dense_definition() -> None:
    generator = torch.Generator().manual_seed(1)
    probs = torch.softmax(torch.randn(1, 2, 6, 5, generator=generator), dim=1).requires_grad_(True)
    image = torch.rand(1, 1, 6, 5, generator=generator)
    receive = (torch.rand(1, 1, 6, 5, generator=generator) > 0.5).float()
    kwargs = {"sigma_xy": 3.0, "sigma_rgb": 0.3, "radius": 2}
    (ours,) = torch.autograd.grad(masked_crf_loss(probs, image, receive_mask=receive, **kwargs), probs)
    reference = dense_reference(probs, image, torch.ones_like(receive), receive, step=(1.0, 1.0), **kwargs)
    (expected,) = torch.autograd.grad(reference, probs)
    torch.testing.assert_close(ours, expected.float(), atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("spatial", [(32, 32), (12, 12, 12)], ids=["2d", "3d"])
def test_prediction_following_edges_beats_one_cutting_a_homogeneous_region(spatial: tuple[int, ...]) -> None:
    image = _two_region_image(spatial)
    along_edge = torch.zeros(1, *spatial, dtype=torch.bool)
    along_edge[..., spatial[-1] // 2 :] = True
    across_region = torch.zeros(1, *spatial, dtype=torch.bool)
    across_region[:, spatial[0] // 2 :] = True
    follows = masked_crf_loss(_probs_from_mask(along_edge), image, radius=3)
    cuts = masked_crf_loss(_probs_from_mask(across_region), image, radius=3)
    assert follows.item() < 1e-3 * cuts.item()
    assert cuts.item() > 0.1


def test_constant_prediction_costs_nothing() -> None:
    probs = torch.zeros(1, 3, 16, 16)
    probs[:, 1] = 1.0
    assert masked_crf_loss(probs, torch.rand(1, 1, 16, 16)).item() == pytest.approx(0.0, abs=1e-7)


def test_masked_out_voxels_contribute_nothing() -> None:
    generator = torch.Generator().manual_seed(2)
    image = torch.rand(1, 1, 20, 20, generator=generator)
    gate = torch.ones(1, 1, 20, 20)
    gate[..., 5:12, 3:15] = 0.0
    outside = gate[:, 0] == 0
    logits = torch.randn(1, 2, 20, 20, generator=generator, requires_grad=True)
    loss = masked_crf_loss(torch.softmax(logits, dim=1), image, mask=gate, radius=3, sigma_rgb=0.5)
    loss.backward()
    assert logits.grad is not None
    assert torch.all(logits.grad[:, :, outside[0]] == 0)
    assert torch.any(logits.grad[:, :, ~outside[0]] != 0)

    changed = logits.detach().clone()
    changed[:, :, outside[0]] = torch.randn(2, int(outside.sum()), generator=generator) * 5
    changed_loss = masked_crf_loss(torch.softmax(changed, dim=1), image, mask=gate, radius=3, sigma_rgb=0.5)
    assert changed_loss.item() == pytest.approx(loss.item(), rel=1e-6)


def test_nothing_receiving_gives_zero_with_gradient() -> None:
    probs = torch.softmax(torch.randn(1, 2, 8, 8), dim=1).requires_grad_(True)
    loss = masked_crf_loss(probs, torch.rand(1, 1, 8, 8), receive_mask=torch.zeros(1, 8, 8))
    loss.backward()
    assert loss.item() == 0.0
    assert probs.grad is not None and torch.all(probs.grad == 0)


def test_spacing_is_in_itk_order_and_weakens_coupling_along_coarse_axes() -> None:
    # A label change across the slice axis (k, tensor dim 0) costs less when slices are 5 mm apart.
    spatial = (8, 8, 8)
    image = torch.zeros(1, 1, *spatial)
    split_across_slices = torch.zeros(1, *spatial, dtype=torch.bool)
    split_across_slices[:, 4:] = True
    split_within_slices = torch.zeros(1, *spatial, dtype=torch.bool)
    split_within_slices[..., 4:] = True
    spacing_xyz = (1.0, 1.0, 5.0)
    across = masked_crf_loss(_probs_from_mask(split_across_slices), image, spacing=spacing_xyz, sigma_xy=2.0)
    within = masked_crf_loss(_probs_from_mask(split_within_slices), image, spacing=spacing_xyz, sigma_xy=2.0)
    assert across.item() < 0.1 * within.item()


def test_downsampling_equals_the_loss_on_the_coarse_grid() -> None:
    generator = torch.Generator().manual_seed(3)
    coarse_probs = torch.softmax(torch.randn(1, 2, 8, 8, generator=generator), dim=1)
    coarse_image = torch.rand(1, 1, 8, 8, generator=generator)
    fine_probs = F.interpolate(coarse_probs, scale_factor=2, mode="nearest")
    fine_image = F.interpolate(coarse_image, scale_factor=2, mode="nearest")
    fine = masked_crf_loss(fine_probs, fine_image, downsample=2, sigma_xy=4.0, radius=2)
    coarse = masked_crf_loss(coarse_probs, coarse_image, sigma_xy=2.0, radius=2)
    assert fine.item() == pytest.approx(coarse.item(), rel=1e-5)


def test_low_precision_input_is_computed_in_float32() -> None:
    probs = torch.softmax(torch.randn(1, 2, 16, 16), dim=1)
    image = torch.rand(1, 1, 16, 16)
    low = masked_crf_loss(probs.bfloat16(), image.bfloat16())
    assert low.dtype == torch.float32
    reference = masked_crf_loss(probs.bfloat16().float(), image.bfloat16().float())
    assert low.item() == pytest.approx(reference.item(), rel=1e-5)


def _saved_bytes_of_graph(run: object) -> int:
    """Bytes of the tensors autograd keeps for backward while ``run()`` builds the graph."""
    saved: list[int] = []

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        saved.append(tensor.numel() * tensor.element_size())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        run()  # type: ignore[operator]
    return sum(saved)


@pytest.mark.parametrize(
    ("shape", "radius", "window"),
    [((1, 4, 256, 256), 5, 11**2), ((1, 2, 48, 48, 48), 3, 7**3)],
    ids=["2d", "3d"],
)
def test_memory_stays_proportional_to_the_input_not_the_window(
    shape: tuple[int, ...], radius: int, window: int
) -> None:
    probs = torch.softmax(torch.randn(*shape), dim=1).requires_grad_(True)
    image = torch.rand(shape[0], 1, *shape[2:])
    input_bytes = probs.numel() * probs.element_size()
    saved = _saved_bytes_of_graph(lambda: masked_crf_loss(probs, image, radius=radius))
    # An unfolded window would keep `window` copies of the probabilities; we keep a handful.
    assert saved < 8 * input_bytes < window * input_bytes


def test_inconsistent_inputs_are_clear_errors() -> None:
    probs = torch.softmax(torch.randn(1, 2, 8, 8), dim=1)
    with pytest.raises(ValueError, match="image must be"):
        masked_crf_loss(probs, torch.rand(1, 1, 8, 9))
    with pytest.raises(ValueError, match="mask must have shape"):
        masked_crf_loss(probs, torch.rand(1, 1, 8, 8), mask=torch.ones(1, 1, 4, 4))
    with pytest.raises(ValueError, match="radius"):
        masked_crf_loss(probs, torch.rand(1, 1, 8, 8), radius=0)
    with pytest.raises(ValueError, match="spacing"):
        masked_crf_loss(probs, torch.rand(1, 1, 8, 8), spacing=(1.0, 1.0, 1.0))


@pytest.mark.shared_data
def test_real_acdc_expert_labels_follow_image_edges_better_than_shifted_ones(acdc_dir: Path) -> None:
    sitk = pytest.importorskip("SimpleITK")
    case = "patient021_frame01.nii.gz"
    image = sitk.GetArrayFromImage(sitk.ReadImage(str(acdc_dir / "imagesTr" / case))).astype(np.float32)
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(acdc_dir / "labelsTr" / case))).astype(np.int64)
    z = int(np.argmax((labels > 0).sum(axis=(1, 2))))
    image_slice = torch.from_numpy(image[z])[None, None]
    label_slice = torch.from_numpy(labels[z])[None]
    expert = F.one_hot(label_slice, 4).movedim(-1, 1).float()
    shifted = torch.roll(expert, shifts=(6, 6), dims=(2, 3))
    assert masked_crf_loss(expert, image_slice).item() < masked_crf_loss(shifted, image_slice).item()
