"""SS2D/SS3D and VSS block layout, and the Swin-UMamba / Swin-UMamba-dagger networks (counts, shapes, errors)."""
import math

import pytest
import torch
import torch.nn.functional as F

from nnunet_moe.layers.ss2d import SS2D, SS3D, scan_orders
from nnunet_moe.layers.vss_block import VSSBlock
from nnunet_moe.networks.swin_umamba import PatchExpand, SwinUMamba, SwinUMambaD, check_spatial_shape

TINY = dict(dims=(8, 16, 32, 64), depths=(1, 1, 1, 1))
TINY_3D = dict(dims=(4, 8, 16, 32), depths=(1, 1, 1, 1))  # keeps the 32^3 forward passes quick on CPU


def tiny(spatial):
    return TINY if len(spatial) == 2 else TINY_3D


def n_params(module):
    return sum(p.numel() for p in module.parameters())


def test_ss2d_parameter_layout_matches_vmamba_tiny():
    ss = SS2D(96)
    shapes = {k: tuple(v.shape) for k, v in ss.state_dict().items()}
    assert shapes == {
        "x_proj_weight": (4, 6 + 32, 192), "dt_projs_weight": (4, 192, 6), "dt_projs_bias": (4, 192),
        "A_logs": (768, 16), "Ds": (768,), "in_proj.weight": (384, 96), "conv2d.weight": (192, 1, 3, 3),
        "conv2d.bias": (192,), "out_norm.weight": (192,), "out_norm.bias": (192,), "out_proj.weight": (96, 192),
    }
    # Mamba initialisation: A = -(1..N), D = 1, softplus(dt bias) log-uniform in [1e-3, 0.1]
    torch.testing.assert_close(ss.A_logs, torch.log(torch.arange(1, 17.0)).repeat(768, 1))
    assert torch.equal(ss.Ds, torch.ones(768))
    dt = F.softplus(ss.dt_projs_bias)
    assert dt.min() >= 1e-3 * (1 - 1e-4) and dt.max() <= 0.1 * (1 + 1e-4)


def test_ss3d_has_six_directions_and_conv3d():
    ss = SS3D(32)
    assert ss.num_directions == 6 and ss.dt_rank == 2
    assert tuple(ss.x_proj_weight.shape) == (6, 2 + 32, 64)
    assert tuple(ss.conv3d.weight.shape) == (64, 1, 3, 3, 3)
    assert scan_orders(3) == [(0, 1, 2), (1, 2, 0), (2, 0, 1)]


def test_cross_scan_orders_and_merge_inverse_2d():
    ss = SS2D(4)
    x = torch.randn(2, 8, 3, 5)  # (B, d, H, W) with H != W
    xs = ss._cross_scan(x)
    row_major = x.flatten(2)
    col_major = x.transpose(2, 3).flatten(2)
    for k, expected in enumerate([row_major, col_major, row_major.flip(-1), col_major.flip(-1)]):
        assert torch.equal(xs[:, k], expected)
    assert torch.allclose(ss._cross_merge(xs, (3, 5)), 4 * x)


def test_cross_merge_inverts_cross_scan_3d():
    ss = SS3D(4)
    x = torch.randn(1, 8, 2, 3, 4)
    xs = ss._cross_scan(x)
    assert xs.shape == (1, 6, 8, 24)
    assert torch.equal(xs[:, 1], x.permute(0, 1, 3, 4, 2).flatten(2))  # D fastest
    assert torch.allclose(ss._cross_merge(xs, (2, 3, 4)), 6 * x)


@pytest.mark.parametrize("spatial", [(4, 6), (2, 3, 4)])
def test_vss_block_shape_and_residual(spatial):
    block = VSSBlock(8, spatial_dims=len(spatial))
    x = torch.randn(2, *spatial, 8)
    y = block(x)
    assert y.shape == x.shape
    torch.nn.init.zeros_(block.self_attention.out_proj.weight)  # mixer output 0 -> identity block
    assert torch.equal(block(x), x)
    with pytest.raises(ValueError, match="channels-last"):
        block(x.movedim(-1, 1))


def test_vss_block_mixes_along_the_whole_image():
    # a change in one corner must reach the opposite corner (global receptive field of the scans)
    torch.manual_seed(0)
    block = VSSBlock(8, spatial_dims=2).eval()
    x = torch.randn(1, 8, 8, 8)
    x2 = x.clone()
    x2[0, 0, 0, 0] += 1.0  # one channel: LayerNorm would cancel a shift of all channels
    assert (block(x2) - block(x))[0, 7, 7].abs().max() > 0


def test_patch_expand_shapes():
    assert PatchExpand(16, 8, 2, 2)(torch.randn(1, 3, 5, 16)).shape == (1, 6, 10, 8)
    assert PatchExpand(16, 16, 4, 3)(torch.randn(1, 2, 1, 3, 16)).shape == (1, 8, 4, 12, 16)


def test_patch_expand_places_channels_into_their_pixels():
    pe = PatchExpand(1, 1, 2, 2)
    with torch.no_grad():
        pe.expand.weight.copy_(torch.tensor([[1.0], [2.0], [3.0], [4.0]]))
    pe.norm = torch.nn.Identity()
    y = pe(torch.ones(1, 1, 1, 1))
    assert torch.equal(y[0, :, :, 0], torch.tensor([[1.0, 2.0], [3.0, 4.0]]))


def test_exact_parameter_counts_of_the_authors_models():
    model = SwinUMamba(in_channels=1, num_classes=14, spatial_dims=2, deep_supervision=True)
    assert n_params(model) == 59_889_368
    assert n_params(model.encoder) == 22_136_736
    dagger = SwinUMambaD(in_channels=1, num_classes=14, spatial_dims=2, deep_supervision=True)
    assert n_params(dagger) == 27_497_720
    assert n_params(dagger.encoder) == 22_119_840
    assert n_params(model.encoder) - n_params(dagger.encoder) == 16_896  # patch embed 2x2 from 48 vs 4x4 from 1


@pytest.mark.parametrize("spatial", [(64, 64), (32, 32, 32)])
def test_swin_umamba_forward_shapes_and_deep_supervision(spatial):
    torch.manual_seed(0)
    model = SwinUMamba(2, 3, spatial_dims=len(spatial), stem_channels=4, **tiny(spatial)).eval()  # eval: no drop path
    x = torch.randn(1, 2, *spatial)
    outs = model(x)
    assert [tuple(o.shape) for o in outs] == [(1, 3, *(s // f for s in spatial)) for f in (1, 2, 4, 8)]
    model.decoder.deep_supervision = False
    assert model.decoder.deep_supervision is False
    single = model(x)
    assert isinstance(single, torch.Tensor) and single.shape == (1, 3, *spatial)
    torch.testing.assert_close(single, outs[0])


@pytest.mark.parametrize("spatial", [(64, 64), (32, 32, 32)])
def test_swin_umamba_dagger_forward_shapes_and_deep_supervision(spatial):
    torch.manual_seed(0)
    model = SwinUMambaD(2, 3, spatial_dims=len(spatial), decoder_depths=(1, 1, 1), **tiny(spatial))
    x = torch.randn(1, 2, *spatial)
    outs = model(x)
    assert [tuple(o.shape) for o in outs] == [(1, 3, *(s // f for s in spatial)) for f in (1, 4, 8, 16)]
    model.decoder.deep_supervision = False
    assert model(x).shape == (1, 3, *spatial)


def test_backward_reaches_encoder_and_decoder():
    model = SwinUMambaD(1, 2, spatial_dims=2, decoder_depths=(1, 1, 1), **TINY)
    sum(o.sum() for o in model(torch.randn(1, 1, 32, 32))).backward()
    assert model.encoder.layers[2].blocks[0].self_attention.A_logs.grad.abs().sum() > 0
    assert model.decoder.stages[0][0].self_attention.x_proj_weight.grad.abs().sum() > 0


@pytest.mark.parametrize("cls", [SwinUMamba, SwinUMambaD])
def test_bad_input_size_raises(cls):
    model = cls(1, 2, spatial_dims=2, **TINY)
    assert model.total_downsampling == 32
    with pytest.raises(ValueError, match=r"\(40, 64\).*divisible by 32"):
        model(torch.randn(1, 1, 40, 64))
    with pytest.raises(ValueError, match="expects"):
        model(torch.randn(1, 1, 32, 32, 32))


def test_check_spatial_shape_rule():
    check_spatial_shape((64, 96), 32)
    with pytest.raises(ValueError, match=r"\(40, 56, 40\).*divisible by 32"):
        check_spatial_shape((40, 56, 40), 32, "SwinUMamba")


def test_bad_configuration_raises():
    with pytest.raises(ValueError, match="double"):
        SwinUMamba(1, 2, dims=(8, 12, 32, 64), depths=(1, 1, 1, 1))
    with pytest.raises(ValueError, match="spatial_dims"):
        SwinUMambaD(1, 2, spatial_dims=1)
    with pytest.raises(ValueError, match="decoder_depths"):
        SwinUMambaD(1, 2, decoder_depths=(2, 2), **TINY)
    assert math.ceil(96 / 16) == SS2D(96).dt_rank
