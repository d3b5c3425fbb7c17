"""Loading SAM checkpoints into MoE-SAM: the official layout, resized to S; other sizes and models refused.

The checkpoints are written here from a randomly initialised ``segment_anything`` ViT-B (1024²);
the ViT-L one has the right key shapes only (instantiating ViT-L is heavy).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from segment_anything import build_sam_vit_b

from nnunet_moe.networks.moe_sam import MoESAM
from nnunet_moe.pretrained.sam_weights import load_sam_weights


@pytest.fixture(scope="module")
def sam_checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    sam = build_sam_vit_b()
    state = sam.state_dict()
    for key, value in state.items():  # SAM zero-initialises pos_embed and the rel-pos tables: make them visible
        if key.endswith(("pos_embed", "rel_pos_h", "rel_pos_w")):
            state[key] = torch.randn_like(value)
    path = tmp_path_factory.mktemp("sam") / "sam_vit_b_random.pth"
    torch.save(state, path)
    return path, state


def test_loads_official_layout_resized_to_s(sam_checkpoint):
    path, state = sam_checkpoint
    net = MoESAM(1, 3, image_size=128)
    report = load_sam_weights(net, path)
    ours = net.state_dict()
    # Everything of SAM but the IoU head's last layer (3 tokens here, 4 in SAM) and the 4th token's MLP.
    assert set(report.skipped) == {"mask_decoder.iou_prediction_head.layers.2.weight",
                                   "mask_decoder.iou_prediction_head.layers.2.bias"}
    assert sorted(report.dropped) == [f"mask_decoder.output_hypernetworks_mlps.3.layers.{i}.{p}"
                                      for i in range(3) for p in ("bias", "weight")]
    assert report.unexpected == []
    assert len(report.loaded) == len(state) - 2 - 6
    for key in report.loaded:
        if key not in report.adapted:
            assert torch.equal(ours[key], state[key]), key
    # Position embedding 64x64 -> 8x8, global blocks' rel-pos tables 127 -> 15; windowed ones unchanged.
    assert ours["image_encoder.pos_embed"].shape == (1, 8, 8, 768)
    expected = F.interpolate(state["image_encoder.pos_embed"].permute(0, 3, 1, 2), size=(8, 8), mode="bicubic",
                             antialias=True).permute(0, 2, 3, 1)
    torch.testing.assert_close(ours["image_encoder.pos_embed"], expected)
    resized = {k for k in report.adapted if "rel_pos" in k}
    assert resized == {f"image_encoder.blocks.{b}.attn.rel_pos_{a}" for b in (2, 5, 8, 11) for a in "hw"}
    assert ours["image_encoder.blocks.2.attn.rel_pos_h"].shape == (15, 64)
    assert ours["image_encoder.blocks.0.attn.rel_pos_h"].shape == (27, 64)
    torch.testing.assert_close(ours["mask_decoder.mask_tokens.weight"], state["mask_decoder.mask_tokens.weight"][:3])
    # What MoE-SAM adds starts from its initialisation.
    assert {k.split(".")[0] for k in report.missing} == {"image_encoder", "moe", "prompt_generator"}
    assert all("_adapter." in k for k in report.missing if k.startswith("image_encoder."))
    assert "SAM ViT-B layout" in report.summary()


def test_more_classes_than_sam_tokens_keep_their_initialisation(sam_checkpoint):
    path, state = sam_checkpoint
    net = MoESAM(1, 6, image_size=64, moe=False)
    init = net.mask_decoder.mask_tokens.weight.detach().clone()
    report = load_sam_weights(net, path)
    tokens = net.mask_decoder.mask_tokens.weight.detach()
    torch.testing.assert_close(tokens[:4], state["mask_decoder.mask_tokens.weight"])
    torch.testing.assert_close(tokens[4:], init[4:])
    assert "mask_decoder.output_hypernetworks_mlps.5.layers.0.weight" in report.missing
    assert report.dropped == []


def test_at_1024_the_network_holds_sams_own_weights(sam_checkpoint):
    path, state = sam_checkpoint
    net = MoESAM(3, 4, image_size=1024, adapters=False, moe=False, prompt_generator=False)
    report = load_sam_weights(net, path)
    assert report.adapted == {} and report.skipped == {} and report.missing == []
    assert all(torch.equal(v, state[k]) for k, v in net.state_dict().items())


def test_vit_l_checkpoint_refused_by_name(tmp_path):
    fake = {"image_encoder.patch_embed.proj.weight": torch.zeros(1024, 3, 16, 16),
            "mask_decoder.mask_tokens.weight": torch.zeros(4, 256)}
    fake.update({f"image_encoder.blocks.{i}.norm1.weight": torch.zeros(1024) for i in range(24)})
    path = tmp_path / "sam_vit_l.pth"
    torch.save(fake, path)
    with pytest.raises(ValueError, match=r"SAM ViT-L checkpoint \(image encoder embed dim 1024, 24 blocks\).*ViT-B"):
        load_sam_weights(MoESAM(1, 2, image_size=32, moe=False), path)


def test_other_model_refused(tmp_path):
    path = tmp_path / "unet.pth"
    torch.save({"network_weights": {"encoder.stages.0.conv.weight": torch.zeros(8, 1, 3, 3)}}, path)
    with pytest.raises(ValueError, match=r"not a Segment Anything checkpoint.*image_encoder\.\*"):
        load_sam_weights(MoESAM(1, 2, image_size=32, moe=False), path)


def test_tiny_encoder_refuses_sam_weights(sam_checkpoint):
    with pytest.raises(ValueError, match="'tiny' encoder"):
        load_sam_weights(MoESAM(1, 2, image_size=32, encoder="tiny"), sam_checkpoint[0])
