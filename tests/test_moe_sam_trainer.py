"""MoE-SAM trainers' wiring: 2D only, loss, optimiser, deep supervision, gradients, weights, log."""
from __future__ import annotations

import glob

import pytest
import torch
from nnunetv2.training.loss.compound_losses import DC_and_CE_loss

from nnunet_moe.training.moe_sam_trainer import (WEIGHTS_ENV, nnUNetTrainerMoESAM, nnUNetTrainerMoESAMScratch,
                                                 nnUNetTrainerMoESAMSmall)
from trainer_fixtures import make_trainer


def _initialize(tr):
    """nnU-Net's initialize, which only needs the preprocessed folder's file type (no data is read here)."""
    import os

    os.makedirs(tr.preprocessed_dataset_folder, exist_ok=True)
    open(os.path.join(tr.preprocessed_dataset_folder, "case.b2nd"), "w").close()
    tr.initialize()


@pytest.mark.parametrize("configuration", ["3d_fullres", "3d_lowres"])
def test_3d_configurations_refused(configuration, tmp_path, monkeypatch):
    with pytest.raises(ValueError, match=rf"2D model .*{configuration!r} is not supported.* 2d FOLD"):
        make_trainer(nnUNetTrainerMoESAMSmall, configuration, tmp_path, monkeypatch)


def test_input_size_not_a_multiple_of_16_refused(tmp_path, monkeypatch):
    bad = type("nnUNetTrainerMoESAM100", (nnUNetTrainerMoESAMSmall,), {"image_size": 100})
    with pytest.raises(ValueError, match="S=100 must be a positive multiple of SAM's patch size 16"):
        make_trainer(bad, "2d", tmp_path, monkeypatch)


def test_more_input_channels_than_the_bridge_refused(tmp_path, monkeypatch):
    tr = make_trainer(nnUNetTrainerMoESAMSmall, "2d", tmp_path, monkeypatch)
    with pytest.raises(ValueError, match="1 to 3 input channels .*got 4"):
        tr.build_network_architecture(tr.plans_manager, tr.configuration_manager, 4, 3, False)


def test_small_trainer_step_loss_optimiser_and_gradients(tmp_path, monkeypatch):
    tr = make_trainer(nnUNetTrainerMoESAMSmall, "2d", tmp_path, monkeypatch)
    assert list(tr.configuration_manager.patch_size) == [56, 40]  # the plans' patch, resized inside the network
    tr.num_epochs = 20
    _initialize(tr)
    assert type(tr.loss) is DC_and_CE_loss  # one output: no deep-supervision wrapper
    assert (tr.loss.weight_ce, tr.loss.weight_dice) == (0.2, 0.8)
    group = tr.optimizer.param_groups[0]
    assert isinstance(tr.optimizer, torch.optim.AdamW)
    assert (group["weight_decay"], group["betas"]) == (0.1, (0.9, 0.999))
    tr.lr_scheduler.step(0)
    assert group["lr"] == pytest.approx(5e-4 / 3)  # warm-up: 10 % of 20 epochs
    tr.lr_scheduler.step(2)
    assert group["lr"] == pytest.approx(5e-4)

    tr.set_deep_supervision_enabled(True)
    assert tr.network.decoder.deep_supervision is True
    tr.set_deep_supervision_enabled(False)
    torch.manual_seed(0)
    target = torch.zeros(2, 1, 56, 40)
    target[:, :, 20:30, 10:20] = 1
    target[:, :, 30:40, 10:20] = 2
    tr.network.train()
    out = tr.train_step({"data": torch.randn(2, 1, 56, 40), "target": target})
    assert torch.isfinite(torch.tensor(out["loss"]))
    # DDP without unused-parameter detection needs every trainable parameter in the graph of every step.
    trainable = [(n, p) for n, p in tr.network.named_parameters() if p.requires_grad]
    assert [n for n, p in trainable if p.grad is None] == []
    assert not tr.network.mask_decoder.iou_prediction_head.layers[0].weight.requires_grad

    log = open(glob.glob(str(tmp_path / "nnUNet_results" / "**" / "training_log_*.txt"), recursive=True)[0]).read()
    assert "MoE-SAM (tiny) parameters at S=128, 3 classes: total 12,516,327; SAM parts 10,085,583" in log
    assert "trainable 12,377,752" in log  # from scratch the encoder trains too (not the prompt encoder, IoU head)
    assert all(p.requires_grad for p in tr.network.image_encoder.parameters())


def test_test_time_mirroring_off_only_for_the_small_variant(tmp_path, monkeypatch):
    small = make_trainer(nnUNetTrainerMoESAMSmall, "2d", tmp_path / "a", monkeypatch)
    small.configure_rotation_dummyDA_mirroring_and_inital_patch_size()
    assert small.inference_allowed_mirroring_axes is None
    full = make_trainer(nnUNetTrainerMoESAMScratch, "2d", tmp_path / "b", monkeypatch)
    full.configure_rotation_dummyDA_mirroring_and_inital_patch_size()
    assert full.inference_allowed_mirroring_axes == (0, 1)


def test_pretrained_trainer_loads_sam_and_logs_counts_and_report(tmp_path, monkeypatch):
    from segment_anything import build_sam_vit_b

    torch.manual_seed(0)
    path = tmp_path / "sam_vit_b_01ec64.pth"
    state = build_sam_vit_b().state_dict()
    torch.save(state, path)
    monkeypatch.setenv(WEIGHTS_ENV, str(path))
    small_s = type("nnUNetTrainerMoESAM64", (nnUNetTrainerMoESAM,), {"image_size": 64})
    tr = make_trainer(small_s, "2d", tmp_path, monkeypatch)
    _initialize(tr)
    assert torch.equal(tr.network.image_encoder.blocks[3].attn.qkv.weight, state["image_encoder.blocks.3.attn.qkv.weight"])
    log = open(glob.glob(str(tmp_path / "nnUNet_results" / "**" / "training_log_*.txt"), recursive=True)[0]).read()
    assert f"{WEIGHTS_ENV}={path}" in log and "SAM ViT-B layout" in log
    assert "MoE-SAM (vit_b) parameters at S=64, 3 classes" in log and "SAM ViT-B 90," in log and "trainable 32,942,808" in log
