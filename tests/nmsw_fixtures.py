"""Tiny NMSW-Net models, predictors and results folders shared by the NMSW tests (synthetic plans from the
real hippocampus plans, seconds on a CPU)."""
from __future__ import annotations

import json
import os

import torch
from torch import nn

from nnunet_moe.networks.nmsw import NMSWNet
from trainer_fixtures import hippocampus_dataset_json, hippocampus_plans

NUM_CLASSES = 3  # hippocampus: background, anterior, posterior
PATCH = [8, 8, 8]


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


def tiny_conv(seed, in_channels=1, num_classes=NUM_CLASSES):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv3d(in_channels, 4, 3, padding=1), nn.LeakyReLU(0.01), nn.Conv3d(4, num_classes, 1))


def tiny_nmsw(**kwargs) -> NMSWNet:
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


def make_predictor(network, patch=PATCH, mirroring=False, axes=(0, 1, 2), cls=None, **kwargs):
    """A predictor (default nnU-Net's own class) set up with manual_initialization, as the final validation does."""
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    predictor = (cls or nnUNetPredictor)(tile_step_size=kwargs.pop("tile_step_size", 0.5), use_gaussian=True,
                                         use_mirroring=mirroring, perform_everything_on_device=False,
                                         device=torch.device("cpu"), allow_tqdm=False, **kwargs)
    plans_manager = PlansManager(tiny_plans(patch))
    predictor.manual_initialization(network, plans_manager, plans_manager.get_configuration("3d_fullres"), None,
                                    hippocampus_dataset_json(), "nnUNetTrainerNMSW", axes)
    return predictor


def write_model_folder(root, trainer_name_in_folder, trainer_name_in_checkpoint, weights, plans=None) -> str:
    """An nnU-Net results folder ``<root>/<trainer>__nnUNetPlans__3d_fullres`` with a fold-0 checkpoint."""
    folder = os.path.join(str(root), f"{trainer_name_in_folder}__nnUNetPlans__3d_fullres")
    os.makedirs(os.path.join(folder, "fold_0"))
    with open(os.path.join(folder, "plans.json"), "w") as f:
        json.dump(plans or tiny_plans(), f)
    with open(os.path.join(folder, "dataset.json"), "w") as f:
        json.dump(hippocampus_dataset_json(), f)
    torch.save({"trainer_name": trainer_name_in_checkpoint, "init_args": {"configuration": "3d_fullres"},
                "network_weights": weights, "inference_allowed_mirroring_axes": (0, 1, 2)},
               os.path.join(folder, "fold_0", "checkpoint_final.pth"))
    return folder


def planned_nmsw(trainer_cls=None):
    """``nnUNetTrainerNMSW``'s network for ``tiny_plans()`` (seeded weights) whose global prediction is foreground
    everywhere (bias of its last head), so that every cell is a candidate and K local passes run."""
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from nnunet_moe.training.nmsw_trainer import nnUNetTrainerNMSW

    plans_manager = PlansManager(tiny_plans())
    torch.manual_seed(0)
    network = (trainer_cls or nnUNetTrainerNMSW).build_network_architecture(
        plans_manager, plans_manager.get_configuration("3d_fullres"), 1, NUM_CLASSES, False)
    with torch.no_grad():
        network.global_net.decoder.seg_layers[-1].bias.copy_(torch.tensor([-5.0, 5.0, 0.0]))
    return network
