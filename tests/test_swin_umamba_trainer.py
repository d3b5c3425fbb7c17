"""Swin-UMamba trainers' wiring: plans, deep supervision, optimiser, pretrained encoder and freezing."""
from __future__ import annotations

import pytest
import torch

from nnunet_moe.training.swin_umamba_trainer import (WEIGHTS_ENV, nnUNetTrainerSwinUMamba,
                                                     nnUNetTrainerSwinUMambaDScratch,
                                                     nnUNetTrainerSwinUMambaScratch)
from trainer_fixtures import make_trainer, network_for


@pytest.mark.parametrize("trainer_cls", [nnUNetTrainerSwinUMambaScratch, nnUNetTrainerSwinUMambaDScratch])
def test_2d_deep_supervision_outputs_match_nnunet_targets(trainer_cls, tmp_path, monkeypatch):
    tr = make_trainer(trainer_cls, "2d", tmp_path, monkeypatch)
    patch = list(tr.configuration_manager.patch_size)
    assert patch == [64, 32]  # planned 56x40, rounded to multiples of 32
    net = network_for(tr, deep_supervision=True)
    with torch.no_grad():
        outs = net(torch.zeros(1, 1, *patch))
    scales = tr._get_deep_supervision_scales()
    assert len(outs) == len(scales) == 4
    for out, scale in zip(outs, scales):
        assert list(out.shape) == [1, 3] + [round(p * s) for p, s in zip(patch, scale)]
    tr.network = net
    tr.set_deep_supervision_enabled(False)
    with torch.no_grad():
        assert net(torch.zeros(1, 1, *patch)).shape == (1, 3, *patch)


def test_optimiser_is_the_papers(tmp_path, monkeypatch):
    tr = make_trainer(nnUNetTrainerSwinUMambaScratch, "2d", tmp_path, monkeypatch)
    tr.num_epochs = 10
    tr.network = network_for(tr)
    opt, sched = tr.configure_optimizers()
    group = opt.param_groups[0]
    assert isinstance(opt, torch.optim.AdamW)
    assert (group["weight_decay"], group["eps"]) == (0.05, 1e-5)
    sched.step(0)
    assert group["lr"] == pytest.approx(1e-4)  # cosine from the first epoch, no warm-up
    sched.step(5)
    assert group["lr"] == pytest.approx(0.5e-4)


def test_pretrained_trainer_without_weights_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.delenv(WEIGHTS_ENV, raising=False)
    tr = make_trainer(nnUNetTrainerSwinUMamba, "2d", tmp_path, monkeypatch)
    with pytest.raises(RuntimeError, match=f"Set {WEIGHTS_ENV}=.*nnUNetTrainerSwinUMambaScratch"):
        tr.initialize()


def test_pretrained_encoder_loaded_and_frozen_for_ten_epochs(tmp_path, monkeypatch):
    tr = make_trainer(nnUNetTrainerSwinUMamba, "2d", tmp_path, monkeypatch)
    source = network_for(tr)
    checkpoint = {f"{k}": v.clone() for k, v in source.encoder.state_dict().items()}
    checkpoint.update({"head.weight": torch.zeros(1000, 768), "norm.weight": torch.ones(768)})
    path = tmp_path / "vssmtiny.pth"
    torch.save({"model": checkpoint}, path)
    monkeypatch.setenv(WEIGHTS_ENV, str(path))

    tr.network = network_for(tr)
    from nnunet_moe.pretrained.vmamba_weights import load_vmamba_encoder_weights

    report = load_vmamba_encoder_weights(tr.network, str(path))
    for k, v in source.encoder.state_dict().items():
        assert torch.equal(tr.network.encoder.state_dict()[k], v), k
    assert sorted(report.dropped) == ["head.weight", "norm.weight"]
    assert not report.missing and not report.unexpected
    tr.log_load_report(WEIGHTS_ENV, report)  # the trainer's log entry: variable, path and the whole report
    log = open(tr.log_file).read()
    assert f"{WEIGHTS_ENV}={path}\n" in log and report.summary(max_names=None) in log

    tr.optimizer, tr.lr_scheduler = tr.configure_optimizers()
    tr.num_epochs = 12
    enc = tr.network.encoder
    for epoch, frozen in ((0, True), (9, True), (10, False)):
        tr.current_epoch = epoch
        tr.on_train_epoch_start()
        assert all(p.requires_grad for p in enc.patch_embed.parameters())
        assert all(p.requires_grad != frozen for n, p in enc.named_parameters() if not n.startswith("patch_embed."))
        assert all(p.requires_grad for p in tr.network.decoder.parameters())
