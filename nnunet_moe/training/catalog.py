"""The list of our trainers: name -> (module, paper, configurations).

One place that ``nnunet-moe list``, the nnU-Net trainer folder and the short-schedule
factory all read, so adding a trainer is one line here plus the class itself.
Modules are imported lazily: listing names needs no torch.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass


@dataclass(frozen=True)
class TrainerInfo:
    name: str
    module: str
    paper: str
    configurations: tuple

    def load(self):
        return getattr(importlib.import_module(self.module), self.name)


TRAINERS: tuple = (
    TrainerInfo("nnUNetTrainerSwinSMT", "nnunet_moe.training.swin_smt_trainer",
                "Swin SMT: SwinUNETR with Soft Mixture-of-Experts (Płotka et al., MICCAI 2024)",
                ("3d_fullres", "2d", "3d_lowres")),
    TrainerInfo("nnUNetTrainerSwinSMTSmall", "nnunet_moe.training.swin_smt_trainer",
                "Swin SMT, CPU-sized: feature size 24, 8 experts (demo and tests)",
                ("3d_fullres", "2d", "3d_lowres")),
    TrainerInfo("nnUNetTrainerSwinUMamba", "nnunet_moe.training.swin_umamba_trainer",
                "Swin-UMamba, ImageNet-pretrained VMamba encoder (Liu et al., MICCAI 2024)", ("2d", "3d_fullres")),
    TrainerInfo("nnUNetTrainerSwinUMambaScratch", "nnunet_moe.training.swin_umamba_trainer",
                "Swin-UMamba from scratch (Liu et al., MICCAI 2024)", ("2d", "3d_fullres")),
    TrainerInfo("nnUNetTrainerSwinUMambaD", "nnunet_moe.training.swin_umamba_trainer",
                "Swin-UMamba† (patch-4 encoder, VSS decoder), pretrained (Liu et al., MICCAI 2024)",
                ("2d", "3d_fullres")),
    TrainerInfo("nnUNetTrainerSwinUMambaDScratch", "nnunet_moe.training.swin_umamba_trainer",
                "Swin-UMamba† from scratch (Liu et al., MICCAI 2024)", ("2d", "3d_fullres")),
    TrainerInfo("nnUNetTrainerNMSW", "nnunet_moe.training.nmsw_trainer",
                "No More Sliding Window: differentiable top-K patch sampling (Jeon et al.)",
                ("3d_fullres",)),
)


def trainer_names() -> list:
    return [t.name for t in TRAINERS]


def our_trainer_class(name: str):
    """Our trainer class called ``name``, or None if it is not one of ours."""
    for info in TRAINERS:
        if info.name == name:
            return info.load()
    return None
