"""Build nnU-Net trainers in-process from the real hippocampus plans (no data, no training)."""
from __future__ import annotations

import copy
import json
import os

import torch

DATA = os.path.join(os.path.dirname(__file__), "data")


def hippocampus_plans() -> dict:
    """Plans written by the stock nnUNetv2_plan_and_preprocess for the bundled demo data."""
    with open(os.path.join(DATA, "hippocampus_nnUNetPlans.json")) as f:
        plans = json.load(f)
    plans["continue_training"] = False
    return plans


def hippocampus_dataset_json() -> dict:
    with open(os.path.join(DATA, "hippocampus_dataset.json")) as f:
        return json.load(f)


def make_trainer(trainer_cls, configuration: str, tmp_path, monkeypatch, plans: dict | None = None):
    """A trainer whose nnU-Net folders live in tmp_path (nnU-Net reads them from the environment)."""
    for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        monkeypatch.setenv(var, str(tmp_path / var))
        os.makedirs(tmp_path / var, exist_ok=True)
    plans = copy.deepcopy(plans or hippocampus_plans())
    return trainer_cls(plans, configuration, 0, hippocampus_dataset_json(), torch.device("cpu"))


def network_for(trainer, deep_supervision: bool = True):
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels

    n_in = determine_num_input_channels(trainer.plans_manager, trainer.configuration_manager, trainer.dataset_json)
    return trainer.build_network_architecture(trainer.plans_manager, trainer.configuration_manager, n_in,
                                              trainer.label_manager.num_segmentation_heads, deep_supervision)
