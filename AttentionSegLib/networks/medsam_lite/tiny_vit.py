"""TinyViT image encoder of LiteMedSAM, with SAM's neck.

TinyViT: Wu et al., "TinyViT: Fast Pretraining Distillation for Small Vision Transformers", ECCV 2022.
LiteMedSAM (Ma et al., "Segment anything in medical images", Nat. Commun. 2024, efficient variant) distils
the MedSAM ViT-B encoder into a 5M-parameter TinyViT working on 256x256 inputs. Compared with the ImageNet
TinyViT it keeps full resolution in the stem (two 1x1 Conv-BN, no stride) and its last patch merging
(to 320 channels) has stride 1, so a 256x256 image gives a 64x64 embedding:

    stem 64@256² → MBConv ×2 → merge 128@128² → TinyViT ×2 → merge 160@64²
    → TinyViT ×6 → merge (stride 1) 320@64² → TinyViT ×2 → neck 256@64²

Every stage here works on (B, C, H, W) maps held channels-last in memory (``torch.channels_last``): oneDNN's
convolutions run 2-5x faster on that layout on a CPU than on the contiguous one (the 256² stage with its 256
hidden channels most), and the attention blocks, which work on (B, H, W, C) tokens, then permute without
copying. The activations (when no gradient is recorded, :class:`TemporaryGELU`) and the MBConv and MLP
residual sums overwrite the fresh outputs they act on: the values are the same, the large maps are not
allocated twice; in bfloat16 on a CPU a convolution and the GELU after it run as one oneDNN call
(:meth:`Conv2dBN.gelu`). The embedding comes back contiguous. Submodule names follow the published state
dict so the released weights load strictly.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cache

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class LayerNorm2d(nn.Module):
    """Layer norm over the channels of a (B, C, H, W) map (SAM, Kirillov et al., ICCV 2023; eps 1e-6)."""

    def __init__(self, num_channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() == 4 and x.shape[1] > 1 and x.is_contiguous(memory_format=torch.channels_last):
            # Channels last: (B, H, W, C) without a copy, PyTorch's fused layer norm over C in one pass (the
            # decoder's upscaled map: 13x faster than the eight passes below on a CPU).
            out = F.layer_norm(x.permute(0, 2, 3, 1), (x.shape[1],), self.weight, self.bias, self.eps)
            return out.permute(0, 3, 1, 2)
        mean = x.mean(1, keepdim=True)
        var = (x - mean).pow(2).mean(1, keepdim=True)
        x = (x - mean) / torch.sqrt(var + self.eps)
        return self.weight[:, None, None] * x + self.bias[:, None, None]


def temporary_gelu(x: Tensor) -> Tensor:
    """Exact GELU that overwrites its input when no gradient is recorded through it: for the temporaries
    (a convolution's or a linear layer's fresh output) the encoder passes it. A new map of the 256² stage
    (256 channels) costs a CPU more to allocate than GELU costs to compute: in place 3x faster there, with
    the same values."""
    if torch.is_grad_enabled() and x.requires_grad:
        return F.gelu(x)
    return torch.ops.aten.gelu_(x)


class TemporaryGELU(nn.GELU):
    """:func:`temporary_gelu` as a module."""

    def forward(self, x: Tensor) -> Tensor:
        return temporary_gelu(x)


@cache
def fused_gelu_available() -> bool:
    """Whether oneDNN's convolution with GELU as its post-op runs here in bfloat16
    (``torch.ops.mkldnn._convolution_pointwise``, the kernel ``torch.compile``'s CPU backend emits for a
    convolution followed by GELU); probed once. Where a PyTorch build lacks it, :meth:`Conv2dBN.gelu` runs the
    two apart."""
    try:
        x = torch.ones(1, 2, 3, 3, dtype=torch.bfloat16)
        w = torch.ones(2, 2, 1, 1, dtype=torch.bfloat16)
        fused = torch.ops.mkldnn._convolution_pointwise
        y = fused(x, w, None, [0, 0], [1, 1], [1, 1], 1, "gelu", [], "none")
    except (AttributeError, RuntimeError, NotImplementedError):
        return False
    return bool(torch.allclose(y.float(), F.gelu(torch.full((1, 2, 3, 3), 2.0)), atol=0.02))


class Conv2dBN(nn.Sequential):
    """Bias-free convolution followed by batch norm (TinyViT's ``Conv2d_BN``; children ``c`` and ``bn``)."""

    def __init__(
        self, in_ch: int, out_ch: int, kernel_size: int = 1, stride: int = 1, groups: int = 1
    ) -> None:
        super().__init__()
        self.c = nn.Conv2d(in_ch, out_ch, kernel_size, stride, kernel_size // 2, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(out_ch)
        self._folded: tuple[tuple[int, ...], Tensor, Tensor] | None = None
        self._bfloat16: tuple[Tensor, Tensor, Tensor] | None = None  # (folded weight, its bf16 copies)

    def _folded_weights(self) -> tuple[Tensor, Tensor]:
        """The batch norm folded into the convolution (eval mode): w·γ/σ and β − μ·γ/σ, cached per version."""
        bn = self.bn
        key = (
            self.c.weight._version,
            bn.weight._version,
            bn.bias._version,
            bn.running_mean._version,
            bn.running_var._version,
            id(self.c.weight.data),
            id(bn.running_var.data),
        )
        if self._folded is None or self._folded[0] != key:
            scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
            weight = (self.c.weight * scale[:, None, None, None]).detach()
            bias = (bn.bias - bn.running_mean * scale).detach()
            self._folded = (key, weight, bias)
        return self._folded[1], self._folded[2]

    def forward(self, x: Tensor) -> Tensor:
        """Conv then BN; in eval mode without gradients one folded convolution (same result, one pass
        less)."""
        if self.training or (torch.is_grad_enabled() and self.c.weight.requires_grad):
            return super().forward(x)
        weight, bias = self._folded_weights()
        return F.conv2d(x, weight, bias, self.c.stride, self.c.padding, self.c.dilation, self.c.groups)

    def gelu(self, x: Tensor) -> Tensor:
        """GELU of this layer's output. Without gradients, in eval mode, under CPU autocast to bfloat16 (the
        encoder's precision on a CPU with bfloat16 in hardware), one oneDNN convolution with GELU as its
        post-op (:func:`fused_gelu_available`): GELU acts on the float32 accumulator before the one rounding
        to bfloat16, and the large maps of the 256² stage are not read and written a second time. Measured
        on 2 cores with AVX512-BF16, 5 slices of the example CT, fused and apart in turn 6 times: the encoder
        1.09x faster (0.354 against 0.387 s per slice), its embedding a little nearer float32's (relative
        error 3.9 % against 4.2 %). Elsewhere the convolution, then :func:`temporary_gelu`."""
        if not self._fuses(x):
            return temporary_gelu(self(x))
        weight, bias = self._bfloat16_weights()
        c = self.c
        return torch.ops.mkldnn._convolution_pointwise(
            x.to(torch.bfloat16), weight, bias, list(c.padding), list(c.stride), list(c.dilation), c.groups,
            "gelu", [], "none",
        )

    def _fuses(self, x: Tensor) -> bool:
        return (
            not self.training
            and not torch.is_grad_enabled()
            and x.device.type == "cpu"
            and torch.is_autocast_enabled("cpu")
            and torch.get_autocast_dtype("cpu") == torch.bfloat16
            and fused_gelu_available()
        )

    def _bfloat16_weights(self) -> tuple[Tensor, Tensor]:
        """The folded weights in bfloat16 (channels-last), cast once per folding."""
        weight, bias = self._folded_weights()
        if self._bfloat16 is None or self._bfloat16[0] is not weight:
            cast = weight.to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
            self._bfloat16 = (weight, cast, bias.to(torch.bfloat16))
        return self._bfloat16[1], self._bfloat16[2]


class PatchEmbed(nn.Module):
    """LiteMedSAM stem: Conv-BN 1x1 → GELU → Conv-BN 1x1, keeping the input resolution."""

    def __init__(self, in_ch: int, embed_dim: int) -> None:
        super().__init__()
        self.seq = nn.Sequential(
            Conv2dBN(in_ch, embed_dim // 2), TemporaryGELU(), Conv2dBN(embed_dim // 2, embed_dim)
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.seq[2](self.seq[0].gelu(x))  # seq[1], the GELU, runs inside seq[0].gelu


#: Largest hidden map (bytes) an MBConv makes at once without gradients. glibc serves a larger block with
#: fresh pages that are faulted in on every slice (in a worker thread's arena even within
#: :func:`~AttentionSegLib.heap.reuse_freed_memory`); the 256-channel maps of the 256² stage in float32 are
#: 64 MiB, so that stage runs in two strips of 128 rows (same values: the depthwise 3x3 gets one row more on
#: each side).
MAX_HIDDEN_BYTES = 32 * 1024 * 1024


class MBConv(nn.Module):
    """Inverted residual (TinyViT stage 1): 1x1 expand, depthwise 3x3, 1x1 project; GELU after the sum.

    Without gradients a map whose hidden expansion would exceed :data:`MAX_HIDDEN_BYTES` runs in strips of
    rows."""

    def __init__(self, dim: int, expand_ratio: float = 4.0) -> None:
        super().__init__()
        hidden = int(dim * expand_ratio)
        self.conv1 = Conv2dBN(dim, hidden)
        self.conv2 = Conv2dBN(hidden, hidden, 3, groups=hidden)
        self.conv3 = Conv2dBN(hidden, dim)
        self.act = TemporaryGELU()

    def forward(self, x: Tensor) -> Tensor:
        rows = self.strip_rows(x)
        if rows >= x.shape[-2]:
            return self._block(x)
        out = torch.empty_like(x)  # channels-last as x
        h = x.shape[-2]
        for r0 in range(0, h, rows):
            r1 = min(h, r0 + rows)
            a0, a1 = max(0, r0 - 1), min(h, r1 + 1)  # one row more on each side for the depthwise 3x3
            y = self.conv2.gelu(self.conv1.gelu(x[:, :, a0:a1]))[:, :, r0 - a0 : r1 - a0]
            out[:, :, r0:r1] = self.act(self.conv3(y).add_(x[:, :, r0:r1]))
        return out

    def _block(self, x: Tensor) -> Tensor:
        y = self.conv2.gelu(self.conv1.gelu(x))
        return self.act(self.conv3(y).add_(x))  # the residual added to the fresh output, in place

    def strip_rows(self, x: Tensor) -> int:
        """Rows of ``x`` per strip, so that a hidden map stays within :data:`MAX_HIDDEN_BYTES` on a CPU (all
        of them when a gradient is recorded, training keeps the plain graph, and on other devices)."""
        if self.training or torch.is_grad_enabled() or x.device.type != "cpu":
            return x.shape[-2]
        hidden = self.conv1.c.out_channels
        dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else x.dtype
        row_bytes = x.shape[0] * x.shape[-1] * hidden * torch.finfo(dtype).bits // 8
        return max(1, MAX_HIDDEN_BYTES // row_bytes)


class PatchMerging(nn.Module):
    """TinyViT downsampling: 1x1 Conv-BN, GELU, depthwise 3x3 Conv-BN (stride), GELU, 1x1 Conv-BN."""

    def __init__(self, dim: int, out_dim: int, stride: int = 2) -> None:
        super().__init__()
        self.conv1 = Conv2dBN(dim, out_dim)
        self.conv2 = Conv2dBN(out_dim, out_dim, 3, stride=stride, groups=out_dim)
        self.conv3 = Conv2dBN(out_dim, out_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv3(self.conv2.gelu(self.conv1.gelu(x)))


def relative_offset_index(window: int) -> Tensor:
    """(window², window²) index of |Δrow|·window + |Δcol| for every pair of window positions.

    This is exactly TinyViT's ``attention_bias_idxs``: its offsets (|Δrow|, |Δcol|) are numbered in order of
    first appearance while scanning pairs row-major, and the first query (0, 0) meets them in that order.
    """
    rows, cols = torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")
    rows, cols = rows.flatten(), cols.flatten()
    return (rows[:, None] - rows[None, :]).abs() * window + (cols[:, None] - cols[None, :]).abs()


class WindowAttention(nn.Module):
    """TinyViT attention in one window: pre-norm, fused qkv, learnt bias per head and relative offset.

    The qkv projection is laid out per head as [q | k | v] (key dim = value dim = dim / heads), the
    scale is key_dim^-0.5 and the bias table has one entry per absolute offset (|Δrow|, |Δcol|).
    """

    def __init__(self, dim: int, num_heads: int, window: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.key_dim = dim // num_heads
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.attention_biases = nn.Parameter(torch.zeros(num_heads, window * window))
        self.register_buffer("attention_bias_idxs", relative_offset_index(window), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, N, C) tokens of N = window² positions."""
        b, n, c = x.shape
        qkv = self.qkv(self.norm(x)).view(b, n, self.num_heads, 3 * self.key_dim).transpose(1, 2)
        q, k, v = qkv.split(self.key_dim, dim=-1)
        bias = self.attention_biases[:, self.attention_bias_idxs].to(q.dtype)
        return self.proj(window_attention(q, k, v, bias).transpose(1, 2).reshape(b, n, c))


def window_attention(q: Tensor, k: Tensor, v: Tensor, bias: Tensor) -> Tensor:
    """softmax(q kᵀ / √d + bias) v for (B, heads, N, d) windows and a (heads, N, N) bias.

    On a CPU in bfloat16 as two matrix products: PyTorch's fused kernel (flash attention) took twice as long
    for these short windows (N = 49 and 196; 10 against 5 ms for the 25 windows of 14x14 tokens of stage 3,
    13 against 7 ms for the 361 windows of 7x7 of stage 2). One attention is a little further from float32's
    (relative error 0.7-0.8 % against the kernel's 0.4 %), the encoder's embedding is not (4.1 % both ways on
    real CT slices: bfloat16's rounding elsewhere dominates). Elsewhere (float32 on a CPU, where the fused
    kernel wins on the 7x7 windows; a GPU) the fused kernel, its mask at the full (B, heads, N, N) shape: a
    broadcast mask fell back to PyTorch's unfused path (2.1x slower on stage 3).
    """
    if q.dtype == torch.bfloat16 and q.device.type == "cpu":
        scores = torch.matmul(q * q.shape[-1] ** -0.5, k.transpose(-1, -2)).add_(bias)
        return torch.matmul(scores.softmax(-1), v)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias.expand(q.shape[0], -1, -1, -1))


class Mlp(nn.Module):
    """TinyViT feed-forward: pre-norm, Linear, GELU, Linear."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.act = TemporaryGELU()

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(self.norm(x))))


class TinyViTBlock(nn.Module):
    """Window attention (residual), depthwise 3x3 Conv-BN ``local_conv`` (no residual), MLP (residual).

    Maps that are not a multiple of the window are zero-padded at the bottom/right before the (pre-norm)
    attention and cropped after it; as in TinyViT the padded tokens take part as keys, unmasked.
    """

    def __init__(self, dim: int, num_heads: int, window: int, mlp_ratio: float = 4.0, local_conv: int = 3):
        super().__init__()
        self.window = window
        self.attn = WindowAttention(dim, num_heads, window)
        self.local_conv = Conv2dBN(dim, dim, local_conv, groups=dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def _windowed_attention(self, x: Tensor) -> Tensor:
        """x: (B, H, W, C) channels-last map."""
        b, h, w, c = x.shape
        ws = self.window
        pad_b, pad_r = (-h) % ws, (-w) % ws
        if pad_b or pad_r:
            x = F.pad(x, (0, 0, 0, pad_r, 0, pad_b))
        ph, pw = h + pad_b, w + pad_r
        nh, nw = ph // ws, pw // ws
        windows = x.view(b, nh, ws, nw, ws, c).transpose(2, 3).reshape(b * nh * nw, ws * ws, c)
        windows = self.attn(windows)
        x = windows.view(b, nh, nw, ws, ws, c).transpose(2, 3).reshape(b, ph, pw, c)
        return x[:, :h, :w] if (pad_b or pad_r) else x

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, C, H, W) → (B, C, H, W)."""
        t = x.permute(0, 2, 3, 1)
        t = t + self._windowed_attention(t)  # a new map: the attention's is cropped from its padded windows
        t = self.local_conv(t.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        t = self.mlp(t).add_(t)  # the residual added to the MLP's fresh output, in place
        return t.permute(0, 3, 1, 2)  # channels-last (B, C, H, W), no copy


class ConvLayer(nn.Module):
    """First TinyViT stage: MBConv blocks, then patch merging."""

    def __init__(self, dim: int, depth: int, out_dim: int, stride: int, expand_ratio: float = 4.0) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(MBConv(dim, expand_ratio) for _ in range(depth))
        self.downsample = PatchMerging(dim, out_dim, stride)

    def forward(self, x: Tensor) -> Tensor:
        for block in self.blocks:
            x = block(x)
        return self.downsample(x)


class BasicLayer(nn.Module):
    """Transformer TinyViT stage: TinyViT blocks, then patch merging (none after the last stage)."""

    def __init__(
        self,
        dim: int,
        depth: int,
        num_heads: int,
        window: int,
        mlp_ratio: float,
        out_dim: int | None,
        stride: int = 2,
    ) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(TinyViTBlock(dim, num_heads, window, mlp_ratio) for _ in range(depth))
        self.downsample = PatchMerging(dim, out_dim, stride) if out_dim is not None else None

    def forward(self, x: Tensor) -> Tensor:
        for block in self.blocks:
            x = block(x)
        return self.downsample(x) if self.downsample is not None else x


class TinyViT(nn.Module):
    """LiteMedSAM image encoder: (B, 3, 256, 256) in [0, 1] → (B, 256, 64, 64) image embedding."""

    def __init__(
        self,
        in_ch: int = 3,
        embed_dims: Sequence[int] = (64, 128, 160, 320),
        depths: Sequence[int] = (2, 2, 6, 2),
        num_heads: Sequence[int] = (2, 4, 5, 10),
        window_sizes: Sequence[int] = (7, 7, 14, 7),
        merge_strides: Sequence[int] = (2, 2, 1),
        mlp_ratio: float = 4.0,
        mbconv_expand_ratio: float = 4.0,
        out_ch: int = 256,
    ) -> None:
        super().__init__()
        self.patch_embed = PatchEmbed(in_ch, embed_dims[0])
        last = len(embed_dims) - 1
        layers: list[nn.Module] = [
            ConvLayer(embed_dims[0], depths[0], embed_dims[1], merge_strides[0], mbconv_expand_ratio)
        ]
        for i in range(1, len(embed_dims)):
            layers.append(
                BasicLayer(
                    embed_dims[i],
                    depths[i],
                    num_heads[i],
                    window_sizes[i],
                    mlp_ratio,
                    out_dim=embed_dims[i + 1] if i < last else None,
                    stride=merge_strides[i] if i < last else 1,
                )
            )
        self.layers = nn.ModuleList(layers)
        self.neck = nn.Sequential(
            nn.Conv2d(embed_dims[-1], out_ch, kernel_size=1, bias=False),
            LayerNorm2d(out_ch),
            nn.Conv2d(out_ch, out_ch, kernel_size=3, padding=1, bias=False),
            LayerNorm2d(out_ch),
        )

    def forward(self, x: Tensor) -> Tensor:
        x = self.patch_embed(x.contiguous(memory_format=torch.channels_last))
        for layer in self.layers:
            x = layer(x)
        return self.neck(x).contiguous()
