"""``nnUNetTrainerSwinSMT``: Swin SMT (SwinUNETR + Soft MoE) inside nnU-Net.

Paper: Płotka, Chrabaszcz, Biecek, "Swin SMT: Global Sequential Modeling for Enhancing
3D Medical Image Segmentation", MICCAI 2024. Network: :class:`nnunet_moe.networks.swin_smt.SwinSMT`.

What changes against nnU-Net's default trainer (everything else is nnU-Net's):

- network: Swin SMT from the plans' input channels and classes; feature size 48, depths
  2,2,2,2, heads 3,6,12,24, window 7, Soft MoE with 32 experts in the last three stages
  (the paper's headline model, 170.8 M parameters at 118 classes); 2D for ``2d``;
- patch size: the plans' patch size with each axis rounded to the nearest multiple of 32
  (patch embedding 2 x four 2x merges), e.g. 40x56x40 -> 32x64x32 (see ``patch_size.py``);
- deep supervision: one output per decoder scale (1, 1/2, 1/4, 1/8, 1/16), nnU-Net's
  weighted Dice+CE on each;
- optimiser: AdamW lr 1e-4, weight decay 1e-5, 10 % linear warm-up then cosine (paper);
  nnU-Net's gradient clipping stays.

Pretrained weights: ``NNUNET_MOE_SWIN_WEIGHTS=/path/to/checkpoint`` loads MONAI's
self-supervised Swin encoder (``model_swinvit.pt``) or a full SwinUNETR/Swin SMT state
dict when the network is built for training; MoE blocks are upcycled from the dense MLP
weights and a load report is written to the training log.

Variants change class attributes only, e.g. ``nnUNetTrainerSwinSMTSmall`` (feature size 24,
8 experts: about 12x fewer parameters, for CPUs, tests and the demo).
"""
from __future__ import annotations

import os

import torch

from nnunet_moe.networks.swin_smt import SwinSMT
from nnunet_moe.training.base import nnUNetMoETrainerBase

WEIGHTS_ENV = "NNUNET_MOE_SWIN_WEIGHTS"


class nnUNetTrainerSwinSMT(nnUNetMoETrainerBase):
    paper = "Swin SMT: SwinUNETR with Soft Mixture-of-Experts (Płotka et al., MICCAI 2024)"
    supported_configurations = ("3d_fullres", "2d", "3d_lowres")
    network_class = SwinSMT
    initial_lr = 1e-4
    weight_decay = 1e-5

    feature_size = 48
    num_experts = 32
    moe_stages = (1, 2, 3)
    slots = "dynamic"
    use_v2 = False
    window_size = 7

    @classmethod
    def build_network_architecture(cls, plans_manager, configuration_manager, num_input_channels: int,
                                   num_output_channels: int, enable_deep_supervision: bool = True) -> torch.nn.Module:
        # The deep-supervision heads always exist, so training and inference checkpoints have the same keys.
        net = cls.network_class(in_channels=num_input_channels, out_channels=num_output_channels,
                                feature_size=cls.feature_size, num_experts=cls.num_experts,
                                moe_stages=cls.moe_stages, slots=cls.slots, use_v2=cls.use_v2,
                                window_size=cls.window_size, spatial_dims=len(configuration_manager.patch_size),
                                deep_supervision=True)
        net.decoder.deep_supervision = enable_deep_supervision
        return net

    def initialize(self):
        super().initialize()
        self.load_pretrained_from_env()

    def load_pretrained_from_env(self):
        """Load ``$NNUNET_MOE_SWIN_WEIGHTS`` into the network, if set; the report goes to the log."""
        path = os.environ.get(WEIGHTS_ENV)
        if path:
            from nnunet_moe.pretrained.swin_unetr_weights import load_swin_unetr_weights

            self.load_weights_from_env(WEIGHTS_ENV, path, lambda net, p: load_swin_unetr_weights(net, p, verbose=False))


class nnUNetTrainerSwinSMTSmall(nnUNetTrainerSwinSMT):
    """Swin SMT at feature size 24 with 8 experts: a CPU-sized variant (demo, tests)."""

    paper = "Swin SMT, CPU-sized: feature size 24, 8 experts (demo and tests)"
    feature_size = 24
    num_experts = 8
