"""Int8 linear layers for LiteMedSAM's frozen image encoder on a CPU (dynamic quantisation).

The encoder's fully connected layers (the TinyViT attention and MLP blocks, ~80 % of its arithmetic) run as
int8 matrix products: the weights quantised once per output feature (symmetric, scale = max |w| / 127), the
activations quantised on each call over the range they show (Jacob et al., "Quantization and training of
neural networks for efficient integer-arithmetic-only inference", CVPR 2018; PyTorch's dynamic quantisation
on its FBGEMM kernels). Convolutions stay in float32 (with the 1x1 ones in int8 too, the embedding of a
random input moved 6x further, 0.079 against 0.013, and no faster). The embedding moves by about a tenth
(relative L2 0.11-0.13 on slices of the example CT; bfloat16 0.05), the masks hardly:
``benchmarks/medsam_precision.py`` (the reference box on every slice of the 10 CT organ crops;
``results/medsam_precision_int8.md``) gave 3D Dice 0.827 against 0.824 in float32, the masks agreeing at
Dice 0.976 (bfloat16: 0.826, 0.988). Speed on 2 cores of an AMD EPYC: with AVX512-VNNI and AVX512-BF16, 0.51
s per slice against 0.68 s in float32 and 0.43 s in bfloat16; limited to AVX2
(``FBGEMM_ENABLE_INSTRUCTIONS=AVX2 ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2
MKL_ENABLE_INSTRUCTIONS=AVX2``), 0.61 s against 0.71 s in float32 and 5.4 s in (emulated) bfloat16.

PyTorch has deprecated its quantised tensors (they will go in a future release): :func:`int8_available`
probes for the kernels, and without them ``encoder_precision="int8"`` is refused with that reason.
"""

from __future__ import annotations

import warnings
from functools import cache

import torch
from torch import Tensor, nn

#: Quantised activations keep 7 bits on x86: FBGEMM's AVX2 kernels add pairs of uint8 x int8 products
#: in int16, which 8-bit activations can overflow.
REDUCE_RANGE = True


@cache
def int8_available() -> bool:
    """Whether this PyTorch has the x86 int8 kernels a dynamic int8 linear layer needs (FBGEMM or x86
    engine, and the ops themselves), checked once by running one tiny layer."""
    engines = set(torch.backends.quantized.supported_engines)
    if not engines & {"fbgemm", "x86"}:
        return False
    try:
        layer = Int8Linear(nn.Linear(4, 2))
        out = layer(torch.ones(3, 4))
    except (AttributeError, RuntimeError, NotImplementedError):
        return False
    return tuple(out.shape) == (3, 2)


class Int8Linear(nn.Module):
    """A frozen :class:`torch.nn.Linear` computed in int8 (see the module's docstring); inference only.

    The packed weights are not in ``state_dict``: the float layer it was made from is the source of truth.
    """

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        weight = linear.weight.detach().float().cpu()
        scale = (weight.abs().amax(dim=1) / 127.0).clamp_min(1e-12).double()
        zero = torch.zeros(weight.shape[0], dtype=torch.long)
        bias = linear.bias.detach().float().cpu() if linear.bias is not None else None
        with warnings.catch_warnings():  # the deprecation is handled by int8_available, not the user's
            warnings.filterwarnings("ignore", message=".*quantized tensor creation functions.*")
            quantised = torch.quantize_per_channel(weight, scale, zero, 0, torch.qint8)
            self._packed = torch.ops.quantized.linear_prepack(quantised, bias)

    def forward(self, x: Tensor) -> Tensor:
        if x.dtype != torch.float32 or x.device.type != "cpu":
            raise ValueError(f"Int8Linear runs on float32 CPU tensors, got {x.dtype} on {x.device.type}")
        return torch.ops.quantized.linear_dynamic(x, self._packed, REDUCE_RANGE)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8"


def quantise_linears(module: nn.Module) -> int:
    """Replace every :class:`torch.nn.Linear` inside ``module`` (in place) by an :class:`Int8Linear`;
    returns how many. Refused where :func:`int8_available` is false."""
    if not int8_available():
        raise RuntimeError(
            "int8 encoder: this PyTorch build has no x86 int8 kernels (FBGEMM); use encoder_precision "
            "'float32' or 'auto'"
        )
    replaced = 0
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear):
                setattr(parent, name, Int8Linear(child))
                replaced += 1
    return replaced
