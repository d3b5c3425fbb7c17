"""Swin-UMamba trainers' wiring: plans, deep supervision, optimiser, pretrained encoder and freezing."""
from __future__ import annotations

import pytest
import torch

from nnunet_moe.training.swin_umamba_trainer import (WEIGHTS_ENV, nnUNetTrainerSwinUMamba,
                                                     nnUNetTrainerSwinUMambaD, nnUNetTrainerSwinUMambaDScratch,
                                                     nnUNetTrainerSwinUMambaScratch)
from nnunet_moe.training.freezing import FreezableAdamW, summarise_names
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


def test_pretrained_encoder_loaded_and_its_report_logged(tmp_path, monkeypatch):
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


# ------------------------------------------------------------------ freezing (3D: only part of VMamba-Tiny fits)
def _fake_initialize(self):
    """nnU-Net's initialize without preprocessed data (network, optimiser, loss; no DDP, no data loaders)."""
    self.network = network_for(self)
    self.optimizer, self.lr_scheduler = self.configure_optimizers()
    self.loss = self._build_loss()
    self.was_initialized = True


@pytest.fixture(scope="module")
def vmamba_tiny(tmp_path_factory):
    """A VMamba-Tiny-layout checkpoint (the release's key names and shapes, random values)."""
    from nnunet_moe.networks.swin_umamba import VSSEncoder

    torch.manual_seed(0)
    state = VSSEncoder(in_channels=3, patch_size=4, spatial_dims=2).state_dict()
    path = tmp_path_factory.mktemp("vmamba") / "vssmtiny.pth"
    torch.save({"model": {**state, "head.weight": torch.zeros(1000, 768)}}, path)
    return str(path), state


def _pretrained_3d(tmp_path, monkeypatch, vmamba_tiny, resume=False):
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    from trainer_fixtures import hippocampus_plans

    monkeypatch.setattr(nnUNetTrainer, "initialize", _fake_initialize)
    monkeypatch.setenv(WEIGHTS_ENV, vmamba_tiny[0])
    if resume:  # a resumed run must not need the weights: they come from its checkpoint
        monkeypatch.delenv(WEIGHTS_ENV)
    plans = hippocampus_plans()
    plans["configurations"]["3d_fullres"]["patch_size"] = [32, 32, 32]
    plans["continue_training"] = resume
    return make_trainer(nnUNetTrainerSwinUMambaD, "3d_fullres", tmp_path, monkeypatch, plans=plans)


def _from_checkpoint(tr, state) -> set:
    """Encoder parameters holding the checkpoint's values now, less the patch embedding (the paper trains it)."""
    return {f"encoder.{n}" for n, p in tr.network.encoder.named_parameters() if not n.startswith("patch_embed.")
            and n in state and state[n].shape == p.shape and torch.equal(state[n], p.detach())}


def _unchanged_by_a_step(tr) -> set:
    """nnU-Net's own train_step on one random 3D sample: the parameters it left bitwise unchanged."""
    torch.manual_seed(1)
    patch = list(tr.configuration_manager.patch_size)
    target = torch.randint(0, 3, (1, 1, *patch)).float()
    targets = [torch.nn.functional.interpolate(target, scale_factor=s, mode="nearest")
               for s in tr._get_deep_supervision_scales()]
    before = {n: p.detach().clone() for n, p in tr.network.named_parameters()}
    tr.train_step({"data": torch.randn(1, 1, *patch), "target": targets})
    return {n for n, p in tr.network.named_parameters() if torch.equal(before[n], p.detach())}


def test_3d_pretrained_freezes_exactly_what_was_loaded(tmp_path, monkeypatch, vmamba_tiny):
    tr = _pretrained_3d(tmp_path, monkeypatch, vmamba_tiny)
    tr.initialize()
    tr.current_epoch = 0
    tr.on_train_epoch_start()
    loaded = _from_checkpoint(tr, vmamba_tiny[1])
    assert len(loaded) == 90  # of 208 encoder tensors (the issue: 15.6 M of 26.3 M values)
    # frozen: exactly the loaded ones; every other encoder parameter trains (outside the encoder a few do not
    # move for other reasons: the 1/16 head has loss weight 0 in nnU-Net's deep supervision)
    assert {n for n in _unchanged_by_a_step(tr) if n.startswith("encoder.")} == loaded
    assert all(p.requires_grad for p in tr.network.parameters())  # DDP-safe: requires_grad is never switched off
    summary = tr.frozen_parameters_summary()
    assert summary.startswith("VSS encoder frozen until epoch 10: 90 of 208 parameter tensors (15.63 M of 26.29 M")
    assert "layers.*.blocks.*.self_attention.in_proj.weight x15" in summary  # frozen
    assert "trained from the start: the other 118 encoder tensors" in summary
    assert "layers.*.blocks.*.self_attention.x_proj_weight x15" in summary.split("trained from the start")[1]


def test_names_summary_groups_by_pattern():
    names = [f"layers.{i}.blocks.{j}.ln_1.weight" for i in range(2) for j in range(3)] + ["patch_embed.norm.bias"]
    assert summarise_names(names) == "layers.*.blocks.*.ln_1.weight x6, patch_embed.norm.bias"
    assert summarise_names([f"p{i}.w" for i in range(4)], limit=2) == "p0.w, p1.w, ... 2 more patterns"


def test_resume_restores_the_frozen_set_and_unfreezes_on_time(tmp_path, monkeypatch, vmamba_tiny):
    tr = _pretrained_3d(tmp_path, monkeypatch, vmamba_tiny)
    tr.initialize()
    frozen = [n for n, p in tr.network.named_parameters() if any(p is f for f in tr.optimizer.frozen)]
    assert len(frozen) == 90
    path = tmp_path / "checkpoint_latest.pth"
    tr.save_checkpoint(str(path))  # nnU-Net's checkpoint of epoch 0 (resumes at epoch 1)

    resumed = _pretrained_3d(tmp_path, monkeypatch, vmamba_tiny, resume=True)
    resumed.load_checkpoint(str(path))  # what nnUNetv2_train --c does; no weights variable needed
    assert resumed.current_epoch == 1
    resumed.on_train_epoch_start()
    assert [n for n, p in resumed.network.named_parameters() if any(p is f for f in resumed.optimizer.frozen)] \
        == frozen
    resumed.current_epoch = resumed.freeze_encoder_epochs
    resumed.on_train_epoch_start()
    assert resumed.optimizer.frozen == []
    assert "VSS encoder unfrozen at epoch 10" in open(resumed.log_file).read()


# ------------------------------------------------------------------ FreezableAdamW
def _toy(frozen_by: str):
    """Two linear layers, the first one frozen by ``frozen_by``: "optimizer" (ours) or "requires_grad"."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))
    optimizer = FreezableAdamW(net.parameters(), lr=1e-2, weight_decay=0.05)
    if frozen_by == "optimizer":
        optimizer.freeze(net[0].parameters())
    else:
        net[0].requires_grad_(False)
    return net, optimizer


def _toy_step(net, optimizer, seed: int) -> float:
    """nnU-Net's order: zero_grad, backward, clip (norm 12; a small one here so it acts), step."""
    torch.manual_seed(seed)
    optimizer.zero_grad(set_to_none=True)
    (net(torch.randn(8, 6)) * 100).pow(2).mean().backward()
    norm = float(torch.nn.utils.clip_grad_norm_(net.parameters(), 0.5))
    optimizer.step()
    return norm


def test_freezable_adamw_equals_requires_grad_false_and_unfreezes():
    ours, ours_opt = _toy("optimizer")
    ref, ref_opt = _toy("requires_grad")
    start = [p.detach().clone() for p in ours[0].parameters()]
    for seed in range(3):
        assert _toy_step(ours, ours_opt, seed) == pytest.approx(_toy_step(ref, ref_opt, seed))  # clipping alike
        assert all(torch.equal(a, b) for a, b in zip(ours.parameters(), ref.parameters()))
    assert all(torch.equal(p, s) for p, s in zip(ours[0].parameters(), start))  # no weight decay either
    assert all(not ours_opt.state[p] for p in ours[0].parameters())  # no moments: as if it had no gradient
    assert all(p.requires_grad for p in ours.parameters())
    ours_opt.unfreeze()
    ref[0].requires_grad_(True)
    _toy_step(ours, ours_opt, 3), _toy_step(ref, ref_opt, 3)
    assert all(torch.equal(a, b) for a, b in zip(ours.parameters(), ref.parameters()))
    assert not any(torch.equal(p, s) for p, s in zip(ours[0].parameters(), start))


def test_freezable_adamw_state_dict_keeps_the_frozen_set():
    net, optimizer = _toy("optimizer")
    _toy_step(net, optimizer, 0)
    other, other_opt = _toy("requires_grad")
    other[0].requires_grad_(True)
    other_opt.load_state_dict(optimizer.state_dict())
    assert [id(p) for p in other_opt.frozen] == [id(p) for p in other[0].parameters()]
    plain = torch.optim.AdamW(net.parameters())  # a state without the key (e.g. an older checkpoint): none frozen
    other_opt.load_state_dict(plain.state_dict())
    assert other_opt.frozen == []
    with pytest.raises(ValueError, match="only parameters this optimizer updates"):
        optimizer.freeze([torch.nn.Parameter(torch.zeros(1))])
