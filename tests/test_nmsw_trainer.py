"""Unit tests of the NMSW-Net trainer: network, data sizes, loss, nnU-Net's own steps with the NMSW loss, and
the scoped predictor hook of the final validation. Tiny synthetic plans and tensors only; the predictor has
its own tests (test_nmsw_predictor.py), the stock commands theirs (test_nmsw_e2e.py)."""
import numpy as np
import pytest
import torch
from torch import nn

from nmsw_fixtures import NUM_CLASSES, tiny_conv, tiny_plans
from nnunet_moe.inference import nmsw_predictor
from nnunet_moe.inference.nmsw_predictor import K_ENV, NOISE_ENV, TTA_ENV
from nnunet_moe.networks.nmsw import NMSWNet
from nnunet_moe.training.nmsw_trainer import NMSWLoss, full_size_for, nnUNetTrainerNMSW
from trainer_fixtures import make_trainer


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture
def trainer(tmp_path, monkeypatch):
    torch.manual_seed(0)
    trainer = make_trainer(nnUNetTrainerNMSW, "3d_fullres", tmp_path, monkeypatch, plans=tiny_plans())
    trainer.network = nnUNetTrainerNMSW.build_network_architecture(trainer.plans_manager, trainer.configuration_manager,
                                                                   1, NUM_CLASSES, True)
    trainer.loss = trainer._build_loss()
    trainer.optimizer, trainer.lr_scheduler = trainer.configure_optimizers()
    return trainer


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
    # the trainer's NMSW options reach the network: objectness from the global U-Net's features (paper)
    assert (net.objectness_source, net.topk.straight_through, net.detach_global_in_aggregation) == \
        ("features", "standard", False)
    # nnU-Net's deep-supervision convention with one full-resolution scale (output[0] / target[0])
    assert trainer.enable_deep_supervision is True and trainer._get_deep_supervision_scales() == [[1.0] * 3]
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
    warmup = int(0.2 * trainer.num_epochs)
    trainer.lr_scheduler.step(warmup // 2)
    assert trainer.optimizer.param_groups[0]["lr"] < 3e-4
    trainer.lr_scheduler.step(warmup)  # peak after the 20 % warm-up, then cosine decay
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


def test_get_dataloaders_is_nnunets_with_whole_volume_samples(trainer, monkeypatch):
    """nnU-Net's get_dataloaders runs with the full size as its sample size; its rotation / dummy-2D rules
    still see the plans' patch; the trainer's configuration is restored afterwards, also after an error."""
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    seen = {}

    def nnunet_get_dataloaders(self):
        seen["sample"] = tuple(self.configuration_manager.patch_size)
        seen["augmentation"] = self.configure_rotation_dummyDA_mirroring_and_inital_patch_size()
        seen["scales"] = self._get_deep_supervision_scales()
        raise RuntimeError("no dataset here")

    monkeypatch.setattr(nnUNetTrainer, "get_dataloaders", nnunet_get_dataloaders)
    trainer._set_batch_size_and_oversample()  # nnU-Net's initialize does this before the loaders
    trainer.full_size = (8, 32, 32)  # anisotropic (32 / 8 > 3): nnU-Net's rule on it would pick dummy 2D
    with pytest.raises(RuntimeError, match="no dataset here"):
        trainer.get_dataloaders()
    rotation, dummy_2d, initial, mirror_axes = seen["augmentation"]
    assert seen["sample"] == (8, 32, 32) and seen["scales"] == [[1.0, 1.0, 1.0]]
    assert dummy_2d is False and mirror_axes == (0, 1, 2)  # decided on the plans' isotropic 8^3 patch
    assert rotation == pytest.approx((-np.pi / 6, np.pi / 6))
    # nnU-Net's rule for the pre-rotation crop, applied to the full size
    from nnunetv2.training.data_augmentation.compute_initial_patch_size import get_patch_size

    assert list(initial) == list(get_patch_size((8, 32, 32), rotation, rotation, rotation, (0.85, 1.25)))
    assert all(i > f for i, f in zip(initial, (8, 32, 32)))
    assert tuple(trainer.configuration_manager.patch_size) == (8, 8, 8)  # the network's patch again


def synthetic_batch(shape=(1, 1, 20, 16, 12), seed=0):
    """A whole-volume batch as nnU-Net's data pipeline delivers it with one deep-supervision scale: the target
    is a list holding the full-size segmentation."""
    generator = torch.Generator().manual_seed(seed)
    target = torch.zeros(shape[0], 1, *shape[2:], dtype=torch.int16)
    target[:, :, 4:12, 4:10, 2:8] = 1
    target[:, :, 12:16, 8:12, 4:10] = 2
    data = torch.randn(*shape, generator=generator) + target.float()
    return {"data": data, "target": [target], "keys": ["case"] * shape[0]}


def test_one_deep_supervision_scale_is_the_unchanged_full_size_target(trainer, tmp_path, monkeypatch):
    from batchgeneratorsv2.transforms.utils.deep_supervision_downsampling import DownsampleSegForDSTransform

    # the real hippocampus plans (4 poolings, nnU-Net's rule: 4 scales): still the one full-resolution scale
    planned = make_trainer(nnUNetTrainerNMSW, "3d_fullres", tmp_path / "real", monkeypatch)
    assert len(planned.configuration_manager.pool_op_kernel_sizes) > 2
    assert planned._get_deep_supervision_scales() == [[1.0, 1.0, 1.0]]
    seg = synthetic_batch()["target"][0][0]
    targets = DownsampleSegForDSTransform(ds_scales=trainer._get_deep_supervision_scales())(segmentation=seg)
    assert len(targets["segmentation"]) == 1 and torch.equal(targets["segmentation"][0], seg)


def test_loss_is_finite_and_reaches_objectness_head(trainer):
    assert isinstance(trainer.loss, NMSWLoss)
    net = trainer.network.train()
    batch = synthetic_batch()
    target = batch["target"][0]
    out = net(batch["data"])
    loss, parts = trainer.loss.terms(out, batch["target"])
    assert loss.ndim == 0 and torch.isfinite(loss)
    assert torch.equal(trainer.loss(out, target), loss)  # nnU-Net's target list or the tensor itself
    # total = high + low + local - lambda * H, with the three Dice+CE terms recomputed independently
    term = trainer.loss.term
    ref_high = term(out.logits, target)
    ref_low = term(out.global_logits_low, net.resize_to_global(target, is_label=True))
    assert parts["high"] == pytest.approx(float(ref_high.detach()), rel=1e-5)
    assert parts["low"] == pytest.approx(float(ref_low.detach()), rel=1e-5)
    assert float(loss) == pytest.approx(parts["high"] + parts["low"] + parts["local"] - 1e-4 * parts["entropy"],
                                        rel=1e-5)
    assert parts["entropy"] > 0  # 3x2x1 = 6 cells
    assert term.weight_dice == 0.8 and term.weight_ce == 0.2
    assert not list(trainer.loss.parameters())  # the network is not a submodule of the loss
    loss.backward()
    for name, module in (("objectness_head", net.objectness_head), ("global_net", net.global_net),
                         ("local_net", net.local_net)):
        grads = [p.grad for p in module.parameters()]
        assert all(g is not None and torch.isfinite(g).all() for g in grads), name
        assert sum(float(g.abs().sum()) for g in grads) > 0, name


def test_nnunets_train_step_and_validation_step_with_the_nmsw_loss(trainer):
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    for step in ("train_step", "validation_step"):  # nnU-Net's own, not copies
        assert getattr(nnUNetTrainerNMSW, step) is getattr(nnUNetTrainer, step)
    before = [p.detach().clone() for p in trainer.network.parameters()]
    trainer.network.train()
    result = trainer.train_step(synthetic_batch())
    assert np.isfinite(result["loss"]) and result["loss"].shape == ()
    changed = sum(not torch.equal(a, b) for a, b in zip(before, trainer.network.parameters()))
    assert changed > len(before) // 2
    trainer.network.eval()
    batch = synthetic_batch(seed=1)
    val = trainer.validation_step(batch)
    with torch.no_grad():
        out = trainer.network(batch["data"])
    assert val["loss"] == pytest.approx(float(trainer.loss(out, batch["target"])), rel=1e-6)
    assert val["tp_hard"].shape == val["fp_hard"].shape == val["fn_hard"].shape == (NUM_CLASSES - 1,)
    # online Dice of the aggregated output: tp + fn = reference voxels, tp + fp = predicted voxels per class
    target, predicted = batch["target"][0], out.logits.argmax(1, keepdim=True)
    assert (val["tp_hard"] + val["fn_hard"]).tolist() == [int((target == c).sum()) for c in (1, 2)]
    assert (val["tp_hard"] + val["fp_hard"]).tolist() == [int((predicted == c).sum()) for c in (1, 2)]


def test_final_validation_uses_nmsw_predictor_for_that_call_only(trainer, monkeypatch):
    """The trainer's perform_actual_validation is nnU-Net's with NMSWPredictor as the predictor it constructs,
    options from the environment; afterwards, also after an exception, nnU-Net's module names its own class."""
    from nnunetv2.inference import predict_from_raw_data
    from nnunetv2.training.nnUNetTrainer import nnUNetTrainer as module

    original = module.nnUNetPredictor
    made = []

    def nnunet_validation(self, save_probabilities=False):
        made.append(module.nnUNetPredictor(device=torch.device("cpu"), allow_tqdm=False))
        made.append(predict_from_raw_data.nnUNetPredictor(device=torch.device("cpu"), allow_tqdm=False))
        raise RuntimeError("validation failed")

    monkeypatch.setattr(module.nnUNetTrainer, "perform_actual_validation", nnunet_validation)
    monkeypatch.setenv(TTA_ENV, "0")
    monkeypatch.setenv(K_ENV, "3")
    with pytest.raises(RuntimeError, match="validation failed"):
        trainer.perform_actual_validation()
    assert type(made[0]) is nmsw_predictor.NMSWPredictor
    assert (made[0].nmsw_k, made[0].nmsw_mirroring, made[0].nmsw_test_noise) == (3, False, False)
    assert type(made[1]) is original  # another predictor made meanwhile: nnU-Net's class
    assert module.nnUNetPredictor is original
    monkeypatch.setenv(TTA_ENV, "2")  # a bad value stops before anything changes
    with pytest.raises(ValueError, match="NNUNET_MOE_NMSW_TTA='2' is not a switch; use 1 or 0"):
        trainer.perform_actual_validation()
    assert module.nnUNetPredictor is original and len(made) == 2


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


# ----------------------------------------------------------------------------- paper schedule and options
def test_paper_schedule_and_a_short_schedule_name_overrides_it(trainer, tmp_path, monkeypatch):
    from nnunet_moe.training import short_schedule

    assert (trainer.num_epochs, trainer.num_iterations_per_epoch, trainer.warmup_fraction) == (300, 300, 0.2)
    assert trainer.num_val_iterations_per_epoch == 50  # nnU-Net's
    short_cls = getattr(short_schedule, "nnUNetTrainerNMSW_2epochs_5iters")  # how nnU-Net's lookup gets it
    short = make_trainer(short_cls, "3d_fullres", tmp_path / "short", monkeypatch, plans=tiny_plans())
    assert (short.num_epochs, short.num_iterations_per_epoch, short.num_val_iterations_per_epoch) == (2, 5, 1)
    epochs_only = make_trainer(getattr(short_schedule, "nnUNetTrainerNMSW_4epochs"), "3d_fullres",
                               tmp_path / "epochs", monkeypatch, plans=tiny_plans())
    assert (epochs_only.num_epochs, epochs_only.num_iterations_per_epoch) == (4, 300)


def test_nmsw_options_are_class_attributes_passed_to_the_network(tmp_path, monkeypatch):
    class Options(nnUNetTrainerNMSW):
        objectness_from = "logits"
        straight_through = "scaled"
        detach_global_in_aggregation = True

    trainer = make_trainer(Options, "3d_fullres", tmp_path, monkeypatch, plans=tiny_plans())
    net = Options.build_network_architecture(trainer.plans_manager, trainer.configuration_manager, 1, NUM_CLASSES,
                                             False)
    assert (net.objectness_source, net.topk.straight_through, net.detach_global_in_aggregation) == \
        ("logits", "scaled", True)


# ----------------------------------------------------------------------------- backbones
def test_nmsw_swin_smt_variant_has_a_swin_local_net_on_a_patch_valid_for_it():
    from dynamic_network_architectures.architectures.unet import PlainConvUNet
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from nnunet_moe.networks.swin_smt import SwinSMT
    from nnunet_moe.training.nmsw_trainer import nnUNetTrainerNMSWSwinSMT
    from nnunet_moe.training.swin_smt_trainer import nnUNetTrainerSwinSMTSmall
    from trainer_fixtures import hippocampus_plans

    assert nmsw_predictor.is_nmsw_trainer_name("nnUNetTrainerNMSWSwinSMT_2epochs_4iters")
    # the NMSW patch follows the Swin trainer's rule (its prepare_plans): 40x56x40 -> multiples of 32
    plans, note = nnUNetTrainerNMSWSwinSMT.prepare_plans(hippocampus_plans(), "3d_fullres")
    assert plans["configurations"]["3d_fullres"]["patch_size"] == [32, 64, 32]
    assert plans == nnUNetTrainerSwinSMTSmall.prepare_plans(hippocampus_plans(), "3d_fullres")[0]
    assert "local network of nnUNetTrainerSwinSMTSmall" in note and "[40, 56, 40]" in note
    configuration = PlansManager(plans).get_configuration("3d_fullres")
    net = nnUNetTrainerNMSWSwinSMT.build_network_architecture(PlansManager(plans), configuration, 1, NUM_CLASSES,
                                                              False)
    assert isinstance(net.local_net, SwinSMT) and net.local_net.decoder.deep_supervision is False
    assert isinstance(net.global_net, PlainConvUNet) and net.objectness_source == "features"
    assert net.patch_size == (32, 64, 32) and all(p % SwinSMT.input_divisor() == 0 for p in net.patch_size)
    assert net.local_net.num_experts == 8 and net.local_net.decoder.heads[0].conv.conv.in_channels == 24  # Small
    # its unused deep-supervision heads are frozen (DDP), the rest trains
    assert not any(p.requires_grad for p in net.local_net.decoder.heads.parameters())
    assert all(p.requires_grad for p in net.local_net.swinViT.parameters())
    # plans that did not go through its prepare_plans: a patch the Swin network cannot take
    raw = PlansManager(hippocampus_plans())
    with pytest.raises(ValueError, match=r"patch size \[40, 56, 40\] is not valid for the local network of "
                                         r"nnUNetTrainerSwinSMTSmall: every axis must be a multiple of its input "
                                         r"divisor \(32, 32, 32\)"):
        nnUNetTrainerNMSWSwinSMT.build_network_architecture(raw, raw.get_configuration("3d_fullres"), 1,
                                                            NUM_CLASSES, False)


def test_global_backbone_divisor_rules_the_global_input_size(tmp_path, monkeypatch):
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    configuration = PlansManager(tiny_plans()).get_configuration("3d_fullres")

    class GlobalSwin(nnUNetTrainerNMSW):
        global_backbone = "nnUNetTrainerSwinSMTSmall"

    # automatic: full size (20, 16, 12) / 3 rounded up to Swin's divisor 32 (the CNN's stride 2 gave (8, 6, 4))
    assert GlobalSwin.nmsw_global_input_size(configuration) == (32, 32, 32)
    GlobalSwin.global_input_size = (8, 6, 4)
    with pytest.raises(ValueError, match=r"GlobalSwin.global_input_size \(8, 6, 4\) is not valid for the global "
                                         r"network of nnUNetTrainerSwinSMTSmall: every axis must be a multiple of its "
                                         r"input divisor \(32, 32, 32\)"):
        GlobalSwin.build_network_architecture(PlansManager(tiny_plans()), configuration, 1, NUM_CLASSES, False)

    class OddCNN(nnUNetTrainerNMSW):
        global_input_size = (9, 6, 4)

    with pytest.raises(ValueError, match=r"\(9, 6, 4\) is not valid for the global network of the plans' CNN "
                                         r"\(total stride\): every axis must be a multiple of its input divisor "
                                         r"\(2, 2, 2\)"):
        OddCNN.nmsw_global_input_size(configuration)

    class Unknown(nnUNetTrainerNMSW):
        local_backbone = "nnUNetTrainerNoSuchNet"

    with pytest.raises(ValueError, match=r"Unknown.local_backbone='nnUNetTrainerNoSuchNet' is not one of our "
                                         r"trainers \(Unknown.local_backbone names one of our trainers whose "
                                         r"build_network_architecture makes the local network"):
        make_trainer(Unknown, "3d_fullres", tmp_path, monkeypatch, plans=tiny_plans())

    class Nested(nnUNetTrainerNMSW):
        local_backbone = "nnUNetTrainerNMSW"

    with pytest.raises(ValueError, match="is an NMSW trainer"):
        Nested.prepare_plans(tiny_plans(), "3d_fullres")


def test_checkpoint_of_the_other_objectness_head_is_the_predictors_clear_error(tmp_path):
    """Objectness from features changed the keys under ``objectness_head.``: an NMSW checkpoint written with the
    logits head (before the change, or ``objectness_from = "logits"``) does not fit the trainer's network, and
    nnU-Net's predictor says so instead of loading it."""
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from nmsw_fixtures import write_model_folder

    class LogitsHead(nnUNetTrainerNMSW):
        objectness_from = "logits"

    plans_manager = PlansManager(tiny_plans())
    old = LogitsHead.build_network_architecture(plans_manager, plans_manager.get_configuration("3d_fullres"), 1,
                                                NUM_CLASSES, False)
    assert old.objectness_source == "logits"
    folder = write_model_folder(tmp_path, "nnUNetTrainerNMSW", "nnUNetTrainerNMSW", old.state_dict())
    predictor = nnUNetPredictor(device=torch.device("cpu"), allow_tqdm=False)
    with pytest.raises(ValueError, match=r"written by trainer 'nnUNetTrainerNMSW' \(an NMSW-Net trainer\) but its "
                                         r"weights do not fit the NMSW-Net network that trainer builds"):
        predictor.initialize_from_trained_model_folder(folder, (0,))
    assert not isinstance(predictor, nmsw_predictor.NMSWPredictor)
