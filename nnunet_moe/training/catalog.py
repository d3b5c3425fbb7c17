"""Which trainers nnunet-moe has and where they live: class name -> module.

Everything else about a trainer (its paper, its configurations) is a class attribute of the
trainer itself; ``nnunet-moe list`` reads it from there. nnU-Net's trainer folder
(``trainers/nnunet_moe_trainers.py``) and the short-schedule factory resolve names through
this table, importing only the module of the trainer asked for.
"""
from __future__ import annotations

import importlib

TRAINER_MODULES: dict[str, str] = {
    "nnUNetTrainerSwinSMT": "nnunet_moe.training.swin_smt_trainer",
    "nnUNetTrainerSwinSMTSmall": "nnunet_moe.training.swin_smt_trainer",
    "nnUNetTrainerSwinUMamba": "nnunet_moe.training.swin_umamba_trainer",
    "nnUNetTrainerSwinUMambaScratch": "nnunet_moe.training.swin_umamba_trainer",
    "nnUNetTrainerSwinUMambaD": "nnunet_moe.training.swin_umamba_trainer",
    "nnUNetTrainerSwinUMambaDScratch": "nnunet_moe.training.swin_umamba_trainer",
    "nnUNetTrainerNMSW": "nnunet_moe.training.nmsw_trainer",
    "nnUNetTrainerNMSWSwinSMT": "nnunet_moe.training.nmsw_trainer",
    "nnUNetTrainerNMSWLogitsObjectness": "nnunet_moe.training.nmsw_trainer",
    "nnUNetTrainerNMSWScaledST": "nnunet_moe.training.nmsw_trainer",
    "nnUNetTrainerNMSWDetachGlobal": "nnunet_moe.training.nmsw_trainer",
    "nnUNetTrainerMoESAM": "nnunet_moe.training.moe_sam_trainer",
    "nnUNetTrainerMoESAMScratch": "nnunet_moe.training.moe_sam_trainer",
    "nnUNetTrainerMoESAM224": "nnunet_moe.training.moe_sam_trainer",
    "nnUNetTrainerMoESAMSmall": "nnunet_moe.training.moe_sam_trainer",
    "nnUNetTrainerM4oE": "nnunet_moe.training.m4oe_trainer",
    "nnUNetTrainerM4oESelect": "nnunet_moe.training.m4oe_trainer",
    "nnUNetTrainerM4oEModalityGate": "nnunet_moe.training.m4oe_trainer",
    "nnUNetTrainerM4oESmall": "nnunet_moe.training.m4oe_trainer",
    "nnUNetTrainerM4oESelectSmall": "nnunet_moe.training.m4oe_trainer",
    "nnUNetTrainerM4oEPretrain": "nnunet_moe.training.m4oe_pretrain_trainer",
    "nnUNetTrainerM4oEPretrainSmall": "nnunet_moe.training.m4oe_pretrain_trainer",
}


def trainer_names() -> list[str]:
    return list(TRAINER_MODULES)


def our_trainer_class(name: str):
    """Our trainer class called ``name``, or None if it is not one of ours."""
    module = TRAINER_MODULES.get(name)
    return None if module is None else getattr(importlib.import_module(module), name)


def trainer_classes() -> list:
    """Every trainer class of ours, in catalogue order (imports their modules)."""
    return [our_trainer_class(name) for name in TRAINER_MODULES]
