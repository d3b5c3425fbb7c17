"""nnUNetTrainerSwinSMT wiring: plans, deep supervision, optimiser, pretrained weights (no training)."""
from __future__ import annotations

import math

import pytest
import torch

from nnunet_moe.training.swin_smt_trainer import WEIGHTS_ENV, nnUNetTrainerSwinSMT, nnUNetTrainerSwinSMTSmall
from trainer_fixtures import make_trainer, network_for


@pytest.mark.parametrize("configuration,planned,expected", [("3d_fullres", [40, 56, 40], [32, 64, 32]),
                                                            ("2d", [56, 40], [64, 32])])
def test_patch_size_made_valid_and_saved_in_plans(configuration, planned, expected, tmp_path, monkeypatch):
    tr = make_trainer(nnUNetTrainerSwinSMTSmall, configuration, tmp_path, monkeypatch)
    assert tr.plans_manager.plans["configurations"][configuration]["patch_size"] == expected
    assert list(tr.configuration_manager.patch_size) == expected
    assert f"patch size {planned} from the plans -> {expected}" in open(tr.log_file).read()


def test_deep_supervision_outputs_match_nnunet_targets(tmp_path, monkeypatch):
    tr = make_trainer(nnUNetTrainerSwinSMTSmall, "3d_fullres", tmp_path, monkeypatch)
    net = network_for(tr, deep_supervision=True)
    patch = tr.configuration_manager.patch_size
    with torch.no_grad():
        outs = net(torch.zeros(1, 1, *patch))
    scales = tr._get_deep_supervision_scales()
    assert len(outs) == len(scales) == 5
    # nnU-Net downsamples the targets to round(patch * scale) per output; the loss needs equal shapes.
    for out, scale in zip(outs, scales):
        assert list(out.shape[2:]) == [round(p * s) for p, s in zip(patch, scale)]
        assert out.shape[1] == 3
    tr.network = net
    tr.set_deep_supervision_enabled(False)
    with torch.no_grad():
        single = net(torch.zeros(1, 1, *patch))
    assert torch.is_tensor(single) and single.shape == (1, 3, *patch)


def test_full_model_is_the_papers_size(tmp_path, monkeypatch):
    # 1 input channel, 3 classes, feature size 48, 32 experts in the last three stages
    # (the 118-class count 170,783,560 is asserted in test_swin_smt_network.py).
    tr = make_trainer(nnUNetTrainerSwinSMT, "3d_fullres", tmp_path, monkeypatch)
    net = network_for(tr, deep_supervision=False)
    n_moe = sum(1 for name, _ in net.named_modules() if type(_).__name__ == "SoftMoE")
    assert n_moe == 6  # two blocks in each of stages 2-4
    assert sum(p.numel() for p in net.parameters()) > 150e6


def test_optimiser_and_schedule_follow_the_paper(tmp_path, monkeypatch):
    tr = make_trainer(nnUNetTrainerSwinSMTSmall, "3d_fullres", tmp_path, monkeypatch)
    tr.num_epochs = 20
    tr.network = network_for(tr)
    opt, sched = tr.configure_optimizers()
    assert isinstance(opt, torch.optim.AdamW)
    assert opt.param_groups[0]["weight_decay"] == 1e-5
    lrs = []
    for epoch in range(20):
        sched.step(epoch)
        lrs.append(opt.param_groups[0]["lr"])
    assert lrs[0] == pytest.approx(1e-4 / 3)  # 2 warm-up epochs (10 %)
    assert lrs[2] == pytest.approx(1e-4)
    assert lrs[11] == pytest.approx(0.5e-4 * (1 + math.cos(math.pi * 9 / 18)))
    assert all(a >= b for a, b in zip(lrs[2:], lrs[3:]))


def test_unsupported_configuration_is_refused(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="supports the configurations 3d_fullres, 2d, 3d_lowres, not '3d_cascade_fullres'"):
        make_trainer(nnUNetTrainerSwinSMTSmall, "3d_cascade_fullres", tmp_path, monkeypatch)


def test_pretrained_weights_from_env_upcycle_experts(tmp_path, monkeypatch):
    from monai.networks.nets import SwinUNETR

    dense = SwinUNETR(in_channels=1, out_channels=3, feature_size=24, spatial_dims=3)
    ckpt = tmp_path / "swinunetr.pt"
    torch.save({"state_dict": dense.state_dict()}, ckpt)
    monkeypatch.setenv(WEIGHTS_ENV, str(ckpt))
    tr = make_trainer(nnUNetTrainerSwinSMTSmall, "3d_fullres", tmp_path, monkeypatch)
    tr.network = net = network_for(tr)
    tr.load_pretrained_from_env()
    src = dense.state_dict()["swinViT.layers1.0.blocks.0.attn.qkv.weight"]
    assert torch.equal(net.state_dict()["swinViT.layers1.0.blocks.0.attn.qkv.weight"], src)
    log = open(tr.log_file).read()
    assert "upcycled" in log and str(ckpt) in log


def test_corrupt_pretrained_file_is_a_clear_error(tmp_path, monkeypatch):
    bad = tmp_path / "broken.pt"
    bad.write_bytes(b"not a checkpoint at all")
    monkeypatch.setenv(WEIGHTS_ENV, str(bad))
    tr = make_trainer(nnUNetTrainerSwinSMTSmall, "3d_fullres", tmp_path, monkeypatch)
    tr.network = network_for(tr)
    with pytest.raises(ValueError, match="broken.pt"):
        tr.load_pretrained_from_env()
