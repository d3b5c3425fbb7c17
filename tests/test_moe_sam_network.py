"""MoE-SAM network: exact parameter counts, equivalence with SAM's encoder, batching, bridge, bad input."""
from __future__ import annotations

from functools import partial

import pytest
import torch
from segment_anything import build_sam_vit_b
from segment_anything.modeling import ImageEncoderViT

from nnunet_moe.networks.moe_sam import MoESAM, parameter_report


def _count(m):
    return sum(p.numel() for p in m.parameters())


@pytest.fixture(scope="module")
def vit_b_256():
    torch.manual_seed(0)
    return MoESAM(1, 3, image_size=256)


def test_sam_vit_b_counts_by_instantiation():
    sam = build_sam_vit_b()
    assert _count(sam) == 93_735_472
    assert _count(sam.image_encoder) == 89_670_912
    assert _count(sam.prompt_encoder) == 6_220 and _count(sam.mask_decoder) == 4_058_340
    ours = MoESAM(1, 4, image_size=1024, adapters=False, moe=False, prompt_generator=False)  # 4 tokens, as SAM
    assert set(ours.state_dict()) == set(sam.state_dict())
    assert parameter_report(ours)["sam"] == 93_735_472


def test_parameter_report_at_256(vit_b_256):
    report = parameter_report(vit_b_256)
    assert report == {"image_encoder": 86_672_640, "prompt_encoder": 6_220,
                      "mask_decoder": 4_058_340 - 140_321,  # 3 classes: one mask token fewer than SAM's 4
                      "sam": 90_596_879, "adapters": 7_100_928, "moe_block": 22_047_240, "prompt_generator": 8_976,
                      "total": 119_754_023, "trainable": 32_942_808}
    assert report["adapters"] == 24 * 295_872
    trainable = {n.split(".")[0] for n, p in vit_b_256.named_parameters() if p.requires_grad}
    assert trainable == {"image_encoder", "mask_decoder", "moe", "prompt_generator"}
    assert all(("_adapter." in n) == p.requires_grad for n, p in vit_b_256.image_encoder.named_parameters())
    assert not any(p.requires_grad for p in vit_b_256.mask_decoder.iou_prediction_head.parameters())
    scratch = MoESAM(1, 3, image_size=256, freeze_encoder=False)
    assert parameter_report(scratch)["trainable"] == 32_942_808 + 86_672_640
    assert not any(p.requires_grad for p in scratch.prompt_encoder.parameters())


def _sam_encoder(size):
    """segment_anything's ViT-B image encoder as build_sam_vit_b makes it, at ``size``."""
    return ImageEncoderViT(img_size=size, depth=12, embed_dim=768, mlp_ratio=4, num_heads=12, patch_size=16,
                           qkv_bias=True, norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), use_rel_pos=True,
                           global_attn_indexes=[2, 5, 8, 11], window_size=14, out_chans=256)


def test_encoder_equals_segment_anything_with_adapters_and_moe_off():
    torch.manual_seed(0)
    ours = MoESAM(3, 2, image_size=64, adapters=False, moe=False).eval()
    sam = _sam_encoder(64).eval()
    state = {k: torch.randn_like(v) * 0.05 for k, v in sam.state_dict().items()}  # rel-pos tables non-zero too
    sam.load_state_dict(state)
    ours.image_encoder.load_state_dict(state)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        expected = sam(x)
        torch.testing.assert_close(ours.encode(x)[0], expected, rtol=1e-5, atol=1e-5)
        # A 64 x 64 single-channel nnU-Net patch reaches the encoder as grey RGB, unresized.
        grey = x[:, :1]
        sam_grey = sam(grey.expand(-1, 3, -1, -1))
        one = MoESAM(1, 2, image_size=64, adapters=False, moe=False).eval()
        one.image_encoder.load_state_dict(state)
        torch.testing.assert_close(one.encode(one.to_sam_input(grey))[0], sam_grey, rtol=1e-5, atol=1e-5)
        # With adapters (fresh: zero up projections) the encoder is still SAM's; trained ones change it.
        adapted = MoESAM(3, 2, image_size=64, moe=False).eval()
        adapted.image_encoder.load_state_dict(state, strict=False)
        torch.testing.assert_close(adapted.encode(x)[0], expected, rtol=1e-5, atol=1e-5)
        torch.nn.init.normal_(adapted.image_encoder.blocks[5].mlp_adapter.up.weight, std=0.1)
        assert not torch.allclose(adapted.encode(x)[0], expected, atol=1e-3)


def test_batch_of_images_equals_images_one_by_one_and_all_trainable_parameters_get_gradients():
    torch.manual_seed(0)
    net = MoESAM(2, 3, image_size=64, encoder="tiny").eval()
    for block in net.image_encoder.blocks:  # non-zero adapters, so their down projections get gradients too
        torch.nn.init.normal_(block.attn_adapter.up.weight, std=0.02)
        torch.nn.init.normal_(block.mlp_adapter.up.weight, std=0.02)
    x = torch.randn(3, 2, 40, 56)
    with torch.no_grad():
        batched = net(x)
        single = torch.cat([net(x[i:i + 1]) for i in range(3)])
    assert batched.shape == (3, 3, 40, 56)
    torch.testing.assert_close(batched, single, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(batched[0], batched[1])
    net.train()
    net(x).logsumexp(1).mean().backward()
    trainable = [(n, p) for n, p in net.named_parameters() if p.requires_grad]
    assert trainable and all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in trainable), \
        [n for n, p in trainable if p.grad is None or p.grad.abs().sum() == 0]
    assert all(p.grad is None for p in net.parameters() if not p.requires_grad)


def test_deep_supervision_switch_and_routing_variants():
    net = MoESAM(1, 2, image_size=32, encoder="tiny", routing="tokens").eval()
    x = torch.randn(2, 1, 20, 24)
    with torch.no_grad():
        assert net(x).shape == (2, 2, 20, 24)
        net.decoder.deep_supervision = True  # what nnU-Net's set_deep_supervision_enabled does
        out = net(x)
    assert isinstance(out, list) and len(out) == 1 and out[0].shape == (2, 2, 20, 24)
    assert net.decoder is net.mask_decoder
    assert MoESAM.deep_supervision_factors() == (1,) and MoESAM.input_divisor() == 1


@pytest.mark.parametrize("kwargs,match", [
    ({"num_input_channels": 4}, r"1 to 3 input channels .*got 4"),
    ({"image_size": 100}, r"S=100 must be a positive multiple of SAM's patch size 16"),
    ({"image_size": 0}, r"S=0 must be a positive multiple"),
    ({"num_classes": 1}, r">= 2 output classes"),
    ({"encoder": "vit_l"}, r"encoder must be one of"),
])
def test_bad_construction(kwargs, match):
    args = {"num_input_channels": 1, "num_classes": 3, "image_size": 32, "encoder": "tiny", **kwargs}
    with pytest.raises(ValueError, match=match):
        MoESAM(**args)


def test_bad_input_shapes():
    net = MoESAM(2, 2, image_size=32, encoder="tiny")
    with pytest.raises(ValueError, match="2D network"):
        net(torch.randn(1, 2, 8, 8, 8))
    with pytest.raises(ValueError, match="built for 2 input channels, got 3"):
        net(torch.randn(1, 3, 8, 8))
