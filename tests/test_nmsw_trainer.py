"""Unit tests of the NMSW-Net nnU-Net integration: trainer (network, data sizes, loss, steps) and the
predictor override (dispatch, K option, mirroring, checkpoint mismatches). Tiny synthetic plans and
tensors only; no stock commands (see test_nmsw_e2e.py for those)."""
import copy
import json
import os

import numpy as np
import pytest
import torch
from torch import nn

from nnunet_moe.inference import nmsw_predictor
from nnunet_moe.inference.nmsw_predictor import CALLS, K_ENV, NOISE_ENV, TTA_ENV, nmsw_k_from_env, tta_from_env
from nnunet_moe.inference.nmsw_predictor import test_noise_from_env as noise_from_env
from nnunet_moe.networks.nmsw import NMSWNet
from nnunet_moe.training.nmsw_trainer import full_size_for, nnUNetTrainerNMSW
from trainer_fixtures import hippocampus_dataset_json, hippocampus_plans, make_trainer

NUM_CLASSES = 3  # hippocampus: background, anterior, posterior
PATCH = [8, 8, 8]


# ----------------------------------------------------------------------------- fixtures
def tiny_plans(patch=PATCH, median=(20.0, 16.0, 12.0)) -> dict:
    """The real hippocampus plans with a 2-stage, 4/8-feature PlainConvUNet and an 8^3 patch."""
    plans = hippocampus_plans()
    config = plans["configurations"]["3d_fullres"]
    config["patch_size"] = list(patch)
    config["median_image_size_in_voxels"] = list(median)
    config["batch_size"] = 2
    arch = config["architecture"]["arch_kwargs"]
    arch.update(n_stages=2, features_per_stage=[4, 8], kernel_sizes=[[3, 3, 3]] * 2, strides=[[1, 1, 1], [2, 2, 2]],
                n_conv_per_stage=[1, 1], n_conv_per_stage_decoder=[1])
    return plans


@pytest.fixture
def trainer(tmp_path, monkeypatch):
    torch.manual_seed(0)
    trainer = make_trainer(nnUNetTrainerNMSW, "3d_fullres", tmp_path, monkeypatch, plans=tiny_plans())
    trainer.network = nnUNetTrainerNMSW.build_network_architecture(trainer.plans_manager, trainer.configuration_manager,
                                                                   1, NUM_CLASSES, True)
    trainer.loss = trainer._build_loss()
    trainer.optimizer, trainer.lr_scheduler = trainer.configure_optimizers()
    return trainer


def make_predictor(network, patch=PATCH, mirroring=False, axes=(0, 1, 2)):
    """A real nnUNetPredictor set up with manual_initialization (as the trainer's final validation does)."""
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=mirroring,
                                perform_everything_on_device=False, device=torch.device("cpu"), allow_tqdm=False)
    plans_manager = PlansManager(tiny_plans(patch))
    predictor.manual_initialization(network, plans_manager, plans_manager.get_configuration("3d_fullres"), None,
                                    hippocampus_dataset_json(), "nnUNetTrainerNMSW", axes)
    return predictor


def tiny_conv(seed, in_channels=1, num_classes=NUM_CLASSES):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv3d(in_channels, 4, 3, padding=1), nn.LeakyReLU(0.01), nn.Conv3d(4, num_classes, 1))


def tiny_nmsw(**kwargs):
    options = dict(num_classes=NUM_CLASSES, in_channels=1, patch_size=PATCH, global_input_size=PATCH, k_infer=5)
    options.update(kwargs)
    return NMSWNet(tiny_conv(0), tiny_conv(1), **options).eval()


class CountCalls(nn.Module):
    """Wraps a net and records the batch size of every call."""

    def __init__(self, net):
        super().__init__()
        self.net = net
        self.batches = []

    def forward(self, x):
        self.batches.append(x.shape[0])
        return self.net(x)


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    monkeypatch.delenv(K_ENV, raising=False)
    monkeypatch.delenv(NOISE_ENV, raising=False)
    monkeypatch.delenv(TTA_ENV, raising=False)


# ----------------------------------------------------------------------------- network / trainer
def test_build_network_architecture_is_nmsw_of_the_planned_cnn(trainer):
    from dynamic_network_architectures.architectures.unet import PlainConvUNet

    net = trainer.network
    assert isinstance(net, NMSWNet)
    assert isinstance(net.global_net, PlainConvUNet) and isinstance(net.local_net, PlainConvUNet)
    # deep supervision off in both nets even though nnU-Net asked for it (True above)
    assert net.global_net.decoder.deep_supervision is False and net.local_net.decoder.deep_supervision is False
    # global input: full size (20, 16, 12) / 3 rounded up to the CNN's stride 2 (paper: x3 downsampling)
    assert net.patch_size == (8, 8, 8) and net.global_input_size == (8, 6, 4)
    assert (net.topk.k, net.topk.k_random, net.k_infer) == (3, 1, 5)
    assert trainer.enable_deep_supervision is False and trainer._get_deep_supervision_scales() is None
    # the two nets are separate modules with identical architecture
    n_global = sum(p.numel() for p in net.global_net.parameters())
    assert n_global == sum(p.numel() for p in net.local_net.parameters())
    assert net.global_net.decoder.seg_layers[-1].out_channels == NUM_CLASSES
    # nnU-Net toggles deep supervision around validation: must not break or change anything
    trainer.set_deep_supervision_enabled(True)
    trainer.set_deep_supervision_enabled(False)
    assert net.global_net.decoder.deep_supervision is False


def test_optimizer_is_adamw_with_paper_settings(trainer):
    assert isinstance(trainer.optimizer, torch.optim.AdamW)
    assert trainer.initial_lr == pytest.approx(3e-4)
    assert trainer.optimizer.param_groups[0]["weight_decay"] == pytest.approx(1e-5)
    warmup = int(0.1 * trainer.num_epochs)
    trainer.lr_scheduler.step(warmup // 2)
    assert trainer.optimizer.param_groups[0]["lr"] < 3e-4
    trainer.lr_scheduler.step(warmup)  # peak after the 10 % warm-up, then cosine decay
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(3e-4)
    trainer.lr_scheduler.step(trainer.num_epochs - 1)
    assert trainer.optimizer.param_groups[0]["lr"] < 3e-5


def test_local_network_hook(tmp_path, monkeypatch):
    class WithTinyLocal(nnUNetTrainerNMSW):
        @classmethod
        def build_local_network(cls, plans_manager, configuration_manager, num_input_channels, num_output_channels):
            return tiny_conv(3, num_input_channels, num_output_channels)

    pm_trainer = make_trainer(WithTinyLocal, "3d_fullres", tmp_path, monkeypatch, plans=tiny_plans())
    net = WithTinyLocal.build_network_architecture(pm_trainer.plans_manager, pm_trainer.configuration_manager, 1,
                                                   NUM_CLASSES, False)
    assert isinstance(net.local_net, nn.Sequential)
    out = net.train()(torch.randn(1, 1, 16, 16, 8))
    assert out.local_logits.shape == (1, 4, NUM_CLASSES, 8, 8, 8)
    assert nmsw_predictor.is_nmsw_trainer_name("WithTinyLocal_2epochs_10iters")  # subclasses register themselves
    # every short-schedule name of an NMSW trainer, batch-size suffix included, is recognised
    assert nmsw_predictor.is_nmsw_trainer_name("nnUNetTrainerNMSW_2epochs_4iters_bs2")
    assert not nmsw_predictor.is_nmsw_trainer_name("nnUNetTrainer_2epochs_4iters_bs2")


def test_full_size_rounds_median_up_to_the_patch_grid():
    assert full_size_for([300, 100, 36], [128, 128, 40]) == (320, 128, 40)
    assert full_size_for([20, 16, 12], [8, 8, 8]) == (20, 16, 12)
    assert full_size_for([21, 9, 3], [8, 8, 8]) == (24, 12, 8)
    with pytest.raises(ValueError, match="overlap"):
        full_size_for([20, 20, 20], [8, 8, 8], overlap=1.0)


def test_trainer_full_size_and_initial_crop(trainer):
    assert trainer.nmsw_full_size() == (20, 16, 12)
    _, _, initial, _ = trainer.configure_rotation_dummyDA_mirroring_and_inital_patch_size()
    assert all(i >= f for i, f in zip(initial, (20, 16, 12)))  # pre-rotation crop at least the full size
    trainer.full_size = (4, 16, 16)
    with pytest.raises(ValueError, match="at least the patch size"):
        trainer.nmsw_full_size()
    trainer._set_batch_size_and_oversample()
    assert trainer.batch_size == 1  # one whole volume per batch (paper), not the plans' 2 patches


def synthetic_batch(shape=(1, 1, 20, 16, 12), seed=0):
    generator = torch.Generator().manual_seed(seed)
    target = torch.zeros(shape[0], 1, *shape[2:], dtype=torch.int16)
    target[:, :, 4:12, 4:10, 2:8] = 1
    target[:, :, 12:16, 8:12, 4:10] = 2
    data = torch.randn(*shape, generator=generator) + target.float()
    return {"data": data, "target": target, "keys": ["case"] * shape[0]}


def test_loss_is_finite_and_reaches_objectness_head(trainer):
    net = trainer.network.train()
    batch = synthetic_batch()
    out = net(batch["data"])
    loss, parts = trainer.nmsw_loss(out, batch["target"])
    assert loss.ndim == 0 and torch.isfinite(loss)
    # total = high + low + local - lambda * H, with the three Dice+CE terms recomputed independently
    ref_high = trainer.loss(out.logits, batch["target"])
    ref_low = trainer.loss(out.global_logits_low, net.resize_to_global(batch["target"], is_label=True))
    assert parts["high"] == pytest.approx(float(ref_high.detach()), rel=1e-5)
    assert parts["low"] == pytest.approx(float(ref_low.detach()), rel=1e-5)
    assert float(loss) == pytest.approx(parts["high"] + parts["low"] + parts["local"] - 1e-4 * parts["entropy"],
                                        rel=1e-5)
    assert parts["entropy"] > 0  # 3x2x1 = 6 cells
    assert trainer.loss.weight_dice == 0.8 and trainer.loss.weight_ce == 0.2
    loss.backward()
    for name, module in (("objectness_head", net.objectness_head), ("global_net", net.global_net),
                         ("local_net", net.local_net)):
        grads = [p.grad for p in module.parameters()]
        assert all(g is not None and torch.isfinite(g).all() for g in grads), name
        assert sum(float(g.abs().sum()) for g in grads) > 0, name


def test_train_step_updates_weights_and_validation_step_returns_dice_counts(trainer):
    before = [p.detach().clone() for p in trainer.network.parameters()]
    trainer.network.train()
    result = trainer.train_step(synthetic_batch())
    assert np.isfinite(result["loss"]) and result["loss"].shape == ()
    changed = sum(not torch.equal(a, b) for a, b in zip(before, trainer.network.parameters()))
    assert changed > len(before) // 2
    trainer.network.eval()
    batch = synthetic_batch(seed=1)
    val = trainer.validation_step(batch)
    assert np.isfinite(val["loss"])
    assert val["tp_hard"].shape == val["fp_hard"].shape == val["fn_hard"].shape == (NUM_CLASSES - 1,)
    # tp + fn = number of reference voxels per foreground class
    ref = [int((batch["target"] == c).sum()) for c in (1, 2)]
    assert (val["tp_hard"] + val["fn_hard"]).tolist() == ref


# ----------------------------------------------------------------------------- predictor override
def test_k_env_parsing(monkeypatch):
    assert nmsw_k_from_env() == 5
    monkeypatch.setenv(K_ENV, " 30 ")
    assert nmsw_k_from_env() == 30
    for bad, match in (("0", ">= 1"), ("-3", ">= 1"), ("five", "not an integer"), ("2.5", "not an integer")):
        monkeypatch.setenv(K_ENV, bad)
        with pytest.raises(ValueError, match=match):
            nmsw_k_from_env()
    assert noise_from_env() is False
    monkeypatch.setenv(NOISE_ENV, "1")
    assert noise_from_env() is True
    monkeypatch.setenv(NOISE_ENV, "maybe")
    with pytest.raises(ValueError, match=NOISE_ENV):
        noise_from_env()
    assert tta_from_env() is True
    monkeypatch.setenv(TTA_ENV, "0")
    assert tta_from_env() is False


def test_install_is_idempotent():
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    method = nnUNetPredictor.predict_sliding_window_return_logits
    nmsw_predictor.install()
    nmsw_predictor.install()
    assert nnUNetPredictor.predict_sliding_window_return_logits is method
    assert nmsw_predictor.is_installed()
    assert not getattr(method.__wrapped__, "_nnunet_moe_nmsw", False)  # wraps nnU-Net's original, once


def test_override_dispatches_nmsw_network_to_predict(monkeypatch):
    network = tiny_nmsw(infer_only_foreground=False)
    network.local_net = CountCalls(network.local_net)
    predictor = make_predictor(network)
    monkeypatch.setattr(predictor, "_internal_predict_sliding_window_return_logits",
                        lambda *a, **k: pytest.fail("sliding window used for an NMSW network"))
    volume = torch.randn(1, 20, 16, 12)  # grid 4 x 3 x 2 = 24 cells
    before = CALLS["nmsw"]
    monkeypatch.setenv(K_ENV, "3")
    logits = predictor.predict_sliding_window_return_logits(volume)
    assert CALLS["nmsw"] == before + 1
    assert network.local_net.batches == [1, 1, 1]  # exactly K local patches, one per pass, nothing else
    assert logits.shape == (NUM_CLASSES, 20, 16, 12) and torch.isfinite(logits).all()
    assert torch.allclose(logits, network.predict(volume, k=3))
    # K larger than the grid is clamped to it
    monkeypatch.setenv(K_ENV, "1000")
    network.local_net.batches.clear()
    assert torch.isfinite(predictor.predict_sliding_window_return_logits(volume)).all()
    assert network.local_net.batches == [1] * 24
    monkeypatch.setenv(K_ENV, "0")
    with pytest.raises(ValueError, match=K_ENV):
        predictor.predict_sliding_window_return_logits(volume)


def test_override_keeps_sliding_window_for_plain_unet(trainer, monkeypatch):
    from dynamic_network_architectures.architectures.unet import PlainConvUNet

    plain = trainer.network.local_net.eval()
    assert isinstance(plain, PlainConvUNet)
    predictor = make_predictor(plain)
    volume = torch.randn(1, 12, 10, 9)
    before = dict(CALLS)
    logits = predictor.predict_sliding_window_return_logits(volume)
    original = type(predictor).predict_sliding_window_return_logits.__wrapped__(predictor, volume)
    assert torch.equal(logits, original)
    assert CALLS["sliding_window"] == before.get("sliding_window", 0) + 1
    assert CALLS["nmsw"] == before.get("nmsw", 0)


def test_override_respects_mirroring_and_test_noise(monkeypatch):
    network = tiny_nmsw(infer_only_foreground=False)
    predictor = make_predictor(network, mirroring=True, axes=(0, 2))
    volume = torch.randn(1, 16, 12, 10)
    logits = predictor.predict_sliding_window_return_logits(volume)
    expected = torch.zeros_like(logits)
    for dims in ([], [1], [3], [1, 3]):
        flipped = torch.flip(volume, dims) if dims else volume
        out = network.predict(flipped, k=5)
        expected += torch.flip(out, dims) if dims else out
    assert torch.allclose(logits, expected / 4, atol=1e-6)
    monkeypatch.setenv(TTA_ENV, "0")  # mirroring off for NMSW even though the predictor asks for it
    assert torch.allclose(predictor.predict_sliding_window_return_logits(volume), network.predict(volume, k=5))
    monkeypatch.delenv(TTA_ENV)
    # deterministic by default; NNUNET_MOE_NMSW_TEST_NOISE=1 samples (and is switched off again afterwards)
    predictor.use_mirroring = False
    monkeypatch.setenv(K_ENV, "2")
    clean = predictor.predict_sliding_window_return_logits(volume)
    assert torch.equal(clean, predictor.predict_sliding_window_return_logits(volume))
    monkeypatch.setenv(NOISE_ENV, "1")
    torch.manual_seed(0)
    noisy = [predictor.predict_sliding_window_return_logits(volume) for _ in range(6)]
    assert any(not torch.equal(n, clean) for n in noisy)
    assert network.topk.noise_at_eval is False


def test_volume_smaller_than_one_patch(trainer):
    """Documented: padded to the patch (nnU-Net's rule), one cell, padding removed; every voxel finite."""
    network = tiny_nmsw(infer_only_foreground=False)
    predictor = make_predictor(network)
    volume = torch.randn(1, 5, 6, 7)
    logits = predictor.predict_sliding_window_return_logits(volume)
    assert logits.shape == (NUM_CLASSES, 5, 6, 7) and torch.isfinite(logits).all()
    # training forward on a sample smaller than the patch: same padding, full-size outputs
    out = trainer.network.train()(torch.randn(1, 1, 5, 6, 7))
    assert out.logits.shape == (1, NUM_CLASSES, 5, 6, 7) and out.grid.num_cells == 1


# ----------------------------------------------------------------------------- checkpoint mismatches
def write_model_folder(root, trainer_name_in_folder, trainer_name_in_checkpoint, weights):
    folder = root / f"{trainer_name_in_folder}__nnUNetPlans__3d_fullres"
    os.makedirs(folder / "fold_0")
    with open(folder / "plans.json", "w") as f:
        json.dump(tiny_plans(), f)
    with open(folder / "dataset.json", "w") as f:
        json.dump(hippocampus_dataset_json(), f)
    torch.save({"trainer_name": trainer_name_in_checkpoint, "init_args": {"configuration": "3d_fullres"},
                "network_weights": weights, "inference_allowed_mirroring_axes": (0, 1, 2)},
               folder / "fold_0" / "checkpoint_final.pth")
    return str(folder)


def test_plain_checkpoint_under_nmsw_trainer_is_a_clear_error(trainer, tmp_path):
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    plain_weights = copy.deepcopy(trainer.network.local_net.state_dict())
    # 1) checkpoint claims NMSW but holds plain nnU-Net weights
    folder = write_model_folder(tmp_path / "a", "nnUNetTrainerNMSW", "nnUNetTrainerNMSW", plain_weights)
    predictor = nnUNetPredictor(device=torch.device("cpu"), allow_tqdm=False)
    with pytest.raises(ValueError, match=r"checkpoint .*checkpoint_final\.pth was written by trainer "
                                         r"'nnUNetTrainerNMSW'.*do not fit"):
        predictor.initialize_from_trained_model_folder(folder, (0,))
    # 2) NMSW results folder holding a checkpoint written by nnU-Net's default trainer
    folder = write_model_folder(tmp_path / "b", "nnUNetTrainerNMSW_1epochs_5iters", "nnUNetTrainer", plain_weights)
    with pytest.raises(ValueError, match=r"belongs to NMSW trainer .*written by trainer 'nnUNetTrainer'"):
        nnUNetPredictor(device=torch.device("cpu"), allow_tqdm=False).initialize_from_trained_model_folder(folder, (0,))
    # 3) a matching NMSW checkpoint loads and predicts with NMSW
    folder = write_model_folder(tmp_path / "c", "nnUNetTrainerNMSW", "nnUNetTrainerNMSW",
                                trainer.network.state_dict())
    predictor = nnUNetPredictor(device=torch.device("cpu"), allow_tqdm=False, use_mirroring=False)
    predictor.initialize_from_trained_model_folder(folder, (0,))
    assert isinstance(predictor.network, NMSWNet)
    before = CALLS["nmsw"]
    logits = predictor.predict_logits_from_preprocessed_data(torch.randn(1, 20, 16, 12))
    assert logits.shape == (NUM_CLASSES, 20, 16, 12) and CALLS["nmsw"] == before + 1


@pytest.mark.parametrize("size,factor,divisor,expected", [
    ((320, 320, 320), 3, (32, 32, 32), (128, 128, 128)),  # paper: 128^3 patches, x3 global downsampling
    ((40, 56, 40), 3, (8, 8, 8), (16, 24, 16)),  # hippocampus plans
    ((10, 10, 10), 3, (16, 16, 16), (16, 16, 16)),  # never below one stride
    ((20, 16, 12), 3, None, (7, 6, 4)),
])
def test_global_input_size_is_full_size_over_three_rounded_to_the_stride(size, factor, divisor, expected):
    from nnunet_moe.networks.nmsw_plans import downsampled_size

    assert downsampled_size(size, factor, divisor) == expected


def test_global_input_size_class_attribute_overrides_the_rule(tmp_path, monkeypatch):
    class Fixed(nnUNetTrainerNMSW):
        global_input_size = (8, 8, 8)

    trainer = make_trainer(Fixed, "3d_fullres", tmp_path, monkeypatch, plans=tiny_plans())
    net = Fixed.build_network_architecture(trainer.plans_manager, trainer.configuration_manager, 1, NUM_CLASSES, True)
    assert net.global_input_size == (8, 8, 8)
