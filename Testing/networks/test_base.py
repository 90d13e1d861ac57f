"""The contract every network keeps (``AttentionSegLib/networks/base.py``, ``docs/engine-api.md`` networks/).

Each test runs for every registered network, in 2D and in 3D, with small filters so the suite stays fast.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch

from AttentionSegLib.networks import (
    LogitsOnly,
    NetworkOutput,
    SegmentationNetwork,
    SelfAttentionOutput,
    build_network,
    network_names,
)

SMALL_FILTERS = [4, 8, 16, 32]
# 16 per axis is the smallest size at which the 2**3 pooled bottleneck still has 2 voxels per axis
# (instance norm needs more than one voxel).
INPUT_SHAPES = {2: (2, 1, 16, 16), 3: (1, 1, 16, 16, 16)}
CASES = [(name, dims) for name in network_names() for dims in (2, 3)]
CASE_IDS = [f"{name}-{dims}d" for name, dims in CASES]


def small_network(name: str, spatial_dims: int, **config: object) -> SegmentationNetwork:
    torch.manual_seed(0)
    return build_network(name, spatial_dims=spatial_dims, filters=SMALL_FILTERS, **config)


def test_there_are_three_networks() -> None:
    assert network_names() == ["attention_unet", "joint_attention_unet", "mistake_attention_unet"]


@pytest.mark.parametrize(("name", "dims"), CASES, ids=CASE_IDS)
def test_logits_have_the_input_size_and_out_channels(name: str, dims: int) -> None:
    net = small_network(name, dims, out_channels=3).eval()
    x = torch.randn(INPUT_SHAPES[dims])
    with torch.no_grad():
        output = net(x)
    assert isinstance(output, NetworkOutput)
    logits = output.logits
    assert isinstance(logits, torch.Tensor)
    assert logits.shape == (x.shape[0], 3, *x.shape[2:])
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize(("name", "dims"), CASES, ids=CASE_IDS)
def test_attention_maps_are_single_channel_and_lie_in_unit_interval(name: str, dims: int) -> None:
    net = small_network(name, dims).eval()
    x = torch.randn(INPUT_SHAPES[dims])
    with torch.no_grad():
        output = net(x)
    logits, maps = output.logits, output.attention
    assert logits.shape[2:] == x.shape[2:]
    assert maps, "every network reports at least one attention map"
    for map_name, attention in maps.items():
        assert attention.dim() == dims + 2, map_name
        assert attention.shape[:2] == (x.shape[0], 1), map_name
        # Every map lives on the grid of some encoder level: the input size divided by a power of two.
        factor = x.shape[2] // attention.shape[2]
        assert tuple(attention.shape[2:]) == tuple(s // factor for s in x.shape[2:]), map_name
        assert float(attention.min()) >= 0.0 and float(attention.max()) <= 1.0, map_name


@pytest.mark.parametrize(("name", "dims"), CASES, ids=CASE_IDS)
def test_gradient_reaches_every_parameter_through_logits_and_auxiliary_outputs(name: str, dims: int) -> None:
    net = small_network(name, dims, deep_supervision=True, self_attention_level=2).train()
    x = torch.randn(INPUT_SHAPES[dims])
    output = net(x)
    logits = output.logits
    assert output.aux_logits, "deep supervision gives auxiliary outputs in training mode"
    for aux_name, aux in output.aux_logits.items():
        assert aux.shape == logits.shape, aux_name
    # What the trainer does: a loss on the logits, on every auxiliary output and on the attention affinity.
    loss = logits.square().mean() + sum(aux.square().mean() for aux in output.aux_logits.values())
    loss = loss + output.self_attention.affinity.square().mean()
    loss.backward()
    without_grad = [n for n, p in net.named_parameters() if p.requires_grad and p.grad is None]
    assert without_grad == []


@pytest.mark.parametrize(("name", "dims"), CASES, ids=CASE_IDS)
def test_auxiliary_logits_are_empty_in_eval_mode(name: str, dims: int) -> None:
    net = small_network(name, dims, deep_supervision=True)
    x = torch.randn(INPUT_SHAPES[dims])
    net.train()
    assert net(x).aux_logits
    net.eval()
    with torch.no_grad():
        assert net(x).aux_logits == {}


@pytest.mark.parametrize(("name", "dims"), CASES, ids=CASE_IDS)
def test_config_round_trip_rebuilds_the_same_architecture(name: str, dims: int) -> None:
    config = {"out_channels": 4, "deep_supervision": True, "self_attention_level": 1, "dropout": 0.1}
    net = small_network(name, dims, **config)
    stored = json.loads(json.dumps(net.config))  # what a checkpoint stores
    rebuilt = build_network(net.name, **stored)
    assert rebuilt.config == net.config
    assert type(rebuilt) is type(net)
    original = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in rebuilt.state_dict().items()} == original
    rebuilt.load_state_dict(net.state_dict(), strict=True)
    x = torch.randn(INPUT_SHAPES[dims])
    with torch.no_grad():
        assert torch.equal(net.eval()(x).logits, rebuilt.eval()(x).logits)


@pytest.mark.parametrize("name", network_names())
def test_config_holds_every_key_with_defaults_filled_in(name: str) -> None:
    net = build_network(name, spatial_dims=2, filters=[4, 8])
    assert net.name == name
    assert (net.config["spatial_dims"], net.config["in_channels"], net.config["out_channels"]) == (2, 1, 2)
    assert net.config["filters"] == [4, 8]
    assert net.config["norm"] == "instance"
    assert net.config["deep_supervision"] is False
    assert net.config["self_attention_level"] is None
    assert (net.spatial_dims, net.in_channels, net.out_channels) == (2, 1, 2)


@pytest.mark.parametrize("name", network_names())
def test_default_architecture_is_the_papers_five_level_3d_one(name: str) -> None:
    net = build_network(name)
    assert net.config["filters"] == [16, 32, 64, 128, 256]
    assert net.spatial_dims == 3
    assert net.required_divisor == 16


@pytest.mark.parametrize("name", network_names())
def test_spatial_sizes_not_divisible_by_required_divisor_are_rejected(name: str) -> None:
    net = build_network(name, spatial_dims=2, filters=[4, 8, 16])
    assert net.required_divisor == 4
    with pytest.raises(ValueError, match="divisible by required_divisor=4"):
        net(torch.randn(1, 1, 16, 14))
    with pytest.raises(ValueError, match="channels"):
        net(torch.randn(1, 2, 16, 16))
    with pytest.raises(ValueError, match="shape"):
        net(torch.randn(1, 1, 16, 16, 16))


@pytest.mark.parametrize("name", network_names())
def test_attaching_self_attention_does_not_change_an_untrained_network(name: str) -> None:
    plain = small_network(name, 2).eval()
    attached = small_network(name, 2, self_attention_level=1).eval()
    missing, unexpected = attached.load_state_dict(plain.state_dict(), strict=False)
    assert unexpected == [] and missing and all(key.startswith("self_attention.") for key in missing)
    x = torch.randn(INPUT_SHAPES[2])
    with torch.no_grad():
        output = attached(x)
        torch.testing.assert_close(output.logits, plain(x).logits)
    assert attached.self_attention is not None and plain.self_attention is None
    assert plain(x).self_attention is None
    # Level 1 of a 16×16 input is 8×8: 64 tokens, each sample's affinity is 64×64.
    assert output.self_attention.shape == (8, 8)
    assert output.self_attention.affinity.shape == (2, 64, 64)


@pytest.mark.parametrize(("name", "dims"), CASES, ids=CASE_IDS)
def test_mixed_precision_forward_and_backward_work(name: str, dims: int) -> None:
    torch.manual_seed(0)
    # Three levels, so the bottleneck is 4 voxels wide: torch's CPU bfloat16 Conv3d weight gradient
    # is intermittently non-finite on 2×2×2 inputs (an upstream kernel issue, not this network's).
    net = build_network(name, spatial_dims=dims, filters=[4, 8, 16], self_attention_level=1).train()
    x = torch.randn(INPUT_SHAPES[dims])
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        output = net(x)
        logits, maps = output.logits, output.attention
        loss = logits.float().square().mean()
    loss.backward()
    assert logits.dtype == torch.bfloat16  # autocast really was active
    assert torch.isfinite(logits.float()).all()
    for attention in maps.values():
        assert float(attention.detach().min()) >= 0.0 and float(attention.detach().max()) <= 1.0
    affinity = output.self_attention.affinity
    assert affinity.dtype == torch.float32
    torch.testing.assert_close(affinity.sum(-1), torch.ones(affinity.shape[:2]))
    assert all(torch.isfinite(p.grad).all() for p in net.parameters() if p.grad is not None)


@pytest.mark.parametrize("name", network_names())
def test_a_trained_step_network_can_be_deep_copied_for_undo_snapshots(name: str) -> None:
    net = small_network(name, 2, deep_supervision=True, self_attention_level=1).train()
    x = torch.randn(INPUT_SHAPES[2])
    output = net(x)
    assert output.aux_logits and output.self_attention is not None  # the outputs go to the caller ...
    output.logits.square().mean().backward()
    # ... and nothing of the pass stays on the network: no tensor with an autograd graph to trip deepcopy
    def holds_a_graph(value: object) -> bool:
        if isinstance(value, dict):
            return any(holds_a_graph(v) for v in value.values())
        return isinstance(value, (NetworkOutput, SelfAttentionOutput)) or (
            isinstance(value, torch.Tensor) and value.grad_fn is not None)

    kept = [name for module in net.modules() for name, value in vars(module).items() if holds_a_graph(value)]
    assert kept == []
    snapshot = copy.deepcopy(net)
    for (key, original), (_, copied) in zip(net.state_dict().items(), snapshot.state_dict().items()):
        assert torch.equal(original, copied), key


@pytest.mark.parametrize("name", network_names())
def test_logits_only_serves_callers_that_expect_a_plain_tensor(name: str) -> None:
    net = small_network(name, 2).eval()
    x = torch.randn(INPUT_SHAPES[2])
    with torch.no_grad():
        assert torch.equal(LogitsOnly(net)(x), net(x).logits)
    assert list(LogitsOnly(net).parameters()) == list(net.parameters())
