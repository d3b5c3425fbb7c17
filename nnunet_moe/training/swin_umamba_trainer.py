"""Swin-UMamba and Swin-UMamba† trainers, ImageNet-pretrained or from scratch, 2D and 3D.

Paper: Liu, Yang, Zhou et al., "Swin-UMamba: Mamba-based UNet with ImageNet-based
pretraining", MICCAI 2024. Networks: :mod:`nnunet_moe.networks.swin_umamba` (pure-PyTorch
selective scan; mamba-ssm's CUDA kernel is used when installed and the tensors are on CUDA).

What changes against nnU-Net's default trainer:

- network: ``SwinUMamba`` (stem + VSS encoder + UNETR-style decoder, deep supervision at
  1, 1/2, 1/4, 1/8) or ``SwinUMambaD`` (patch-4 encoder, VSS decoder, deep supervision at
  1, 1/4, 1/8, 1/16); 2D as in the paper, 3D with six scan directions;
- patch size: each axis rounded to the nearest multiple of 32 (the total downsampling);
- optimiser: AdamW lr 1e-4, weight decay 0.05, eps 1e-5, cosine decay (paper);
- pretrained (``nnUNetTrainerSwinUMamba``, ``nnUNetTrainerSwinUMambaD``): the VMamba-Tiny
  ImageNet checkpoint given by ``NNUNET_MOE_VMAMBA_WEIGHTS=/path/to/vssmtiny.pth`` is
  loaded into the encoder; the encoder parameters it loaded, less the patch embedding, are frozen for
  the first ``freeze_encoder_epochs`` (10) epochs, and the training log lists them. In 3D only part of
  VMamba-Tiny fits (six scan directions, 3D convolutions and patch mergings have other shapes): the rest
  trains from the start instead of staying frozen at its random initialisation. Freezing keeps
  ``requires_grad`` and works under DDP (:mod:`nnunet_moe.training.freezing` says why); ``--c`` restores
  the frozen set from the checkpoint. Without the variable these trainers stop with a message saying
  what to do; the ``...Scratch`` variants train from random weights.
"""
from __future__ import annotations


import torch

from nnunet_moe.networks.swin_umamba import SwinUMamba, SwinUMambaD
from nnunet_moe.networks.unwrap import unwrap_network
from nnunet_moe.training.base import nnUNetMoETrainerBase
from nnunet_moe.training.freezing import FreezableAdamW, summarise_names

WEIGHTS_ENV = "NNUNET_MOE_VMAMBA_WEIGHTS"


class nnUNetTrainerSwinUMamba(nnUNetMoETrainerBase):
    paper = "Swin-UMamba, ImageNet-pretrained VMamba encoder (Liu et al., MICCAI 2024)"
    supported_configurations = ("2d", "3d_fullres")
    network_class = SwinUMamba
    initial_lr = 1e-4
    weight_decay = 0.05
    adam_eps = 1e-5
    warmup_fraction = 0.0  # the paper uses a plain cosine schedule
    pretrained = True
    weights_env = WEIGHTS_ENV
    weights_description = "the ImageNet-pretrained VMamba-Tiny encoder"
    weights_hint = "/path/to/vssmtiny checkpoint (the VMamba-Tiny release, dict key 'model')"
    freeze_encoder_epochs = 10
    optimizer_class = FreezableAdamW

    @classmethod
    def build_network_architecture(cls, plans_manager, configuration_manager, num_input_channels: int,
                                   num_output_channels: int, enable_deep_supervision: bool = True) -> torch.nn.Module:
        return cls.network_class(num_input_channels, num_output_channels,
                                 spatial_dims=len(configuration_manager.patch_size),
                                 deep_supervision=enable_deep_supervision)

    def initialize(self):
        path = self.pretrained_weights_path()
        super().initialize()
        if path is not None:
            from nnunet_moe.pretrained.vmamba_weights import load_vmamba_encoder_weights, loaded_encoder_parameters

            network = unwrap_network(self.network)
            report = self.load_weights_from_env(WEIGHTS_ENV, path, load_vmamba_encoder_weights)
            if self.freeze_encoder_epochs > 0:  # a resumed run gets its frozen set from the checkpoint instead
                self.optimizer.freeze(loaded_encoder_parameters(network, report).values())

    def on_train_start(self):
        super().on_train_start()
        if self.pretrained:
            self.print_to_log_file(self.frozen_parameters_summary(), also_print_to_console=True)

    def on_train_epoch_start(self):
        if self.optimizer.frozen and self.current_epoch >= self.freeze_encoder_epochs:
            self.optimizer.unfreeze()
            self.print_to_log_file(f"VSS encoder unfrozen at epoch {self.current_epoch}: every parameter trains")
        super().on_train_epoch_start()

    def frozen_parameters_summary(self) -> str:
        """What is frozen now, for the training log: counts, then the names grouped by pattern."""
        encoder = dict(unwrap_network(self.network).encoder.named_parameters())
        frozen_ids = {id(p) for p in self.optimizer.frozen}
        frozen = [name for name, p in encoder.items() if id(p) in frozen_ids]
        trained = [name for name, p in encoder.items() if id(p) not in frozen_ids]
        if not frozen:
            return f"VSS encoder: no parameter frozen (epoch {self.current_epoch}, freeze_encoder_epochs=" \
                   f"{self.freeze_encoder_epochs})"
        millions = sum(encoder[name].numel() for name in frozen) / 1e6
        total = sum(p.numel() for p in encoder.values()) / 1e6
        return (f"VSS encoder frozen until epoch {self.freeze_encoder_epochs}: {len(frozen)} of {len(encoder)} "
                f"parameter tensors ({millions:.2f} M of {total:.2f} M values), the ones loaded from the checkpoint: "
                f"[{summarise_names(frozen)}]\n"
                f"  trained from the start: the other {len(trained)} encoder tensors (patch embedding; not in the "
                f"checkpoint or another shape there) [{summarise_names(trained)}] and everything outside the encoder")


class nnUNetTrainerSwinUMambaScratch(nnUNetTrainerSwinUMamba):
    """Swin-UMamba from random initialisation."""

    paper = "Swin-UMamba from scratch (Liu et al., MICCAI 2024)"
    pretrained = False


class nnUNetTrainerSwinUMambaD(nnUNetTrainerSwinUMamba):
    """Swin-UMamba†: patch-4 VSS encoder and VSS decoder (fewer parameters)."""

    paper = "Swin-UMamba† (patch-4 encoder, VSS decoder), pretrained (Liu et al., MICCAI 2024)"
    network_class = SwinUMambaD


class nnUNetTrainerSwinUMambaDScratch(nnUNetTrainerSwinUMambaD):
    """Swin-UMamba† from random initialisation."""

    paper = "Swin-UMamba† from scratch (Liu et al., MICCAI 2024)"
    pretrained = False
