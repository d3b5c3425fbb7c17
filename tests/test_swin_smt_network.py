"""Swin SMT network: exact parameter counts, equivalence with MONAI's SwinUNETR, shapes, deep supervision."""
import pytest
import torch
from monai.networks.nets import SwinUNETR

from nnunet_moe.layers.soft_moe import SoftMoE
from nnunet_moe.networks.swin_smt import (
    SwinSMT,
    smallest_valid_swin_shape,
    swin_input_divisor,
    swin_smt_parameter_count,
    validate_swin_input_shape,
)

# Parameter counts of the authors' model (their released configuration): 1 input channel, 118 classes,
# feature size 48, Soft MoE in the last three stages.
PAPER_COUNTS = {
    (False, 0): 62_192_392,
    (False, 4): 73_053_256,
    (False, 8): 87_014_728,
    (False, 16): 114_937_672,
    (False, 32): 170_783_560,
    (True, 0): 72_767_752,
    (True, 4): 83_628_616,
    (True, 8): 97_590_088,
    (True, 16): 125_513_032,
    (True, 32): 181_358_920,
}


@pytest.mark.parametrize("use_v2,experts", sorted(PAPER_COUNTS))
def test_exact_parameter_counts(use_v2, experts):
    count = swin_smt_parameter_count(in_channels=1, out_channels=118, feature_size=48, use_v2=use_v2, num_experts=experts)
    assert count == PAPER_COUNTS[(use_v2, experts)]


def test_meta_count_equals_real_count_and_moe_placement():
    kwargs = dict(in_channels=1, out_channels=3, feature_size=12, num_experts=4)
    net = SwinSMT(**kwargs)
    assert sum(p.numel() for p in net.parameters()) == swin_smt_parameter_count(**kwargs)
    moe = net.moe_layers()
    assert sorted(moe) == [f"swinViT.layers{s}.0.blocks.{b}.mlp" for s in (2, 3, 4) for b in (0, 1)]
    assert [m.dim for m in moe.values()] == [24, 24, 48, 48, 96, 96]
    assert not isinstance(net.swinViT.layers1[0].blocks[0].mlp, SoftMoE)


@pytest.mark.parametrize("spatial_dims,size", [(3, (32, 32, 64)), (2, (32, 64))])
def test_no_moe_loads_monai_state_dict_strictly_and_matches(spatial_dims, size):
    torch.manual_seed(0)
    monai_net = SwinUNETR(in_channels=2, out_channels=3, feature_size=12, spatial_dims=spatial_dims).eval()
    net = SwinSMT(in_channels=2, out_channels=3, feature_size=12, spatial_dims=spatial_dims, num_experts=0).eval()
    result = net.load_state_dict(monai_net.state_dict(), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert set(net.state_dict()) == set(monai_net.state_dict())
    x = torch.randn(1, 2, *size)
    with torch.no_grad():
        torch.testing.assert_close(net(x), monai_net(x), rtol=0, atol=0)


@pytest.mark.parametrize("slots", ["dynamic", "learned"])
def test_forward_backward_2d_with_moe_and_v2(slots):
    torch.manual_seed(0)
    net = SwinSMT(in_channels=3, out_channels=4, feature_size=12, num_experts=2, slots=slots, spatial_dims=2,
                  use_v2=True, slots_per_expert=1 if slots == "learned" else None)
    assert len(net.moe_layers()) == 6
    out = net(torch.randn(1, 3, 64, 32))
    assert out.shape == (1, 4, 64, 32)
    # every expert parameter takes part (Soft MoE gives every slot a weighted input)
    out.square().mean().backward()
    for name, p in net.named_parameters():
        if ".experts." in name:
            assert p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("spatial_dims,size", [(3, (32, 64, 32)), (2, (32, 64))])
def test_deep_supervision_outputs_with_moe(spatial_dims, size):
    torch.manual_seed(0)
    net = SwinSMT(in_channels=1, out_channels=3, feature_size=12, num_experts=2, spatial_dims=spatial_dims,
                  deep_supervision=True).eval()
    x = torch.randn(1, 1, *size)
    with torch.no_grad():
        outs = net(x)
        assert isinstance(outs, list) and len(outs) == 5
        for i, o in enumerate(outs):
            assert o.shape == (1, 3, *(s // 2**i for s in size))
            assert torch.isfinite(o).all()
        assert [[1.0 / f] * spatial_dims for f in SwinSMT.deep_supervision_factors()] == \
            [[1.0 / 2**i] * spatial_dims for i in range(5)]
        net.decoder.deep_supervision = False
        single = net(x)
    assert isinstance(single, torch.Tensor)
    torch.testing.assert_close(single, outs[0], rtol=0, atol=0)
    net.decoder.deep_supervision = True
    assert net.decoder.deep_supervision is True


def test_deep_supervision_heads_not_counted_and_checkpoint_round_trip():
    kwargs = dict(in_channels=1, out_channels=3, feature_size=12, num_experts=2)
    with_heads = SwinSMT(deep_supervision=True, **kwargs)
    without = SwinSMT(deep_supervision=False, **kwargs)
    head_params = sum(p.numel() for p in with_heads.decoder.heads.parameters())
    assert head_params == (12 + 24 + 48 + 96) * 3 + 4 * 3
    assert sum(p.numel() for p in with_heads.parameters()) == sum(p.numel() for p in without.parameters()) + head_params
    # a checkpoint trained with deep supervision loads strictly into an inference network without heads
    result = without.load_state_dict(with_heads.state_dict(), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    torch.testing.assert_close(without.out.conv.conv.weight, with_heads.out.conv.conv.weight, rtol=0, atol=0)
    with pytest.raises(ValueError, match="deep_supervision=True"):
        without.decoder.deep_supervision = True


def test_input_size_rule():
    assert swin_input_divisor(2, 4) == 32
    assert swin_input_divisor(4, 4) == 64
    assert smallest_valid_swin_shape((40, 56, 40)) == (64, 64, 64)
    validate_swin_input_shape((64, 32, 96))
    with pytest.raises(ValueError, match=r"\(40, 56, 40\).*multiple of patch_size \* 2\*\*4 = 2 \* 16 = 32"):
        validate_swin_input_shape((40, 56, 40))


def test_forward_with_bad_size_raises_clear_error():
    net = SwinSMT(in_channels=1, out_channels=2, feature_size=12, num_experts=2)
    with pytest.raises(ValueError, match=r"\(40, 56, 40\).*sizes \[40, 56, 40\] are not.*\(64, 64, 64\)"):
        net(torch.randn(1, 1, 40, 56, 40))
    with pytest.raises(ValueError, match="single bottleneck voxel.*>= 64"):
        net(torch.randn(1, 1, 32, 32, 32))
    with pytest.raises(ValueError, match="expects a 5D input"):
        net(torch.randn(1, 32, 32, 32))
    with pytest.raises(ValueError, match="in_channels=1.*3 channels"):
        net(torch.randn(1, 3, 32, 32, 32))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"num_experts": -1}, "num_experts"),
        ({"moe_stages": (1, 4)}, "moe_stages"),
        ({"moe_stages": (1, 1)}, "moe_stages"),
        ({"depths": (2, 2, 2)}, "four stages"),
        ({"spatial_dims": 1}, "spatial_dims"),
        ({"slots": "top1"}, "slots"),
        ({"patch_size": 0}, "patch_size"),
        ({"img_size": (96, 96, 96)}, "img_size"),
        ({"feature_size": 16}, "divisible by 12"),
    ],
)
def test_bad_construction_raises(kwargs, match):
    base = dict(in_channels=1, out_channels=2, feature_size=12, num_experts=2)
    base.update(kwargs)
    with pytest.raises(ValueError, match=match):
        SwinSMT(**base)


def test_state_dict_with_the_heads_old_names_loads():
    # before the heads moved under ``decoder`` they were saved as ``deep_supervision_heads.*``
    kwargs = dict(in_channels=1, out_channels=3, feature_size=12, num_experts=2)
    trained = SwinSMT(deep_supervision=True, **kwargs)
    old = {k.replace("decoder.heads.", "deep_supervision_heads."): v for k, v in trained.state_dict().items()}
    assert sum(k.startswith("deep_supervision_heads.") for k in old) == 8
    net = SwinSMT(deep_supervision=True, **kwargs)
    result = net.load_state_dict(old, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    for mine, theirs in zip(net.decoder.heads.parameters(), trained.decoder.heads.parameters()):
        torch.testing.assert_close(mine, theirs, rtol=0, atol=0)
    SwinSMT(deep_supervision=False, **kwargs).load_state_dict(old, strict=True)
