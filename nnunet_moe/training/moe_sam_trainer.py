"""MoE-SAM trainers (2D): SAM ViT-B with adapters, MoE feature enhancement and learned prompts.

Paper: Li, Wu, Gu et al., "MoE-SAM: Enhancing SAM for Medical Image Segmentation with
Mixture-of-Experts". Network: :mod:`nnunet_moe.networks.moe_sam` (nnU-Net's 2D patches are
mapped onto SAM's 3-channel, S x S input inside the network and the logits resized back).

What changes against nnU-Net's default trainer:

- configurations: ``2d`` only (SAM's encoder takes 2D images); 3D ones are refused;
- network: SAM's image encoder frozen except the adapters; MoE block, prompt generator and mask
  decoder (less its unused IoU head) trained; the parameter counts go to the training log. From
  scratch (``...Scratch``, ``...Small``) the encoder trains as well: frozen random weights would be a
  fixed random feature extractor;
- one output, no deep supervision (``enable_deep_supervision = False``; nnU-Net's
  ``set_deep_supervision_enabled`` still works, it sets ``network.decoder.deep_supervision``);
- loss: nnU-Net's Dice + CE with weights 0.8 / 0.2 (paper: ``0.2 CE + 0.8 Dice``);
- optimiser: AdamW lr 5e-4, betas 0.9/0.999, weight decay 0.1, linear warm-up (10 % of the epochs)
  then cosine decay (the paper: "a warm-up strategy", no decay schedule given).

Weights: ``nnUNetTrainerMoESAM`` (S = 256, the paper's size) needs
``NNUNET_MOE_SAM_WEIGHTS=/path/sam_vit_b_01ec64.pth`` (the official SAM ViT-B checkpoint; loaded by
:mod:`nnunet_moe.pretrained.sam_weights`, report in the log); without it it stops and says what
to do. ``nnUNetTrainerMoESAM224`` is the Synapse size. Training from random SAM weights needs the
explicit ``...Scratch`` variants. ``nnUNetTrainerMoESAMSmall`` is CPU-sized (tests, demos): the
same layout with a width-192 encoder (windows of 8) at S = 128, always from scratch (no SAM
checkpoint of that width exists), and no test-time mirroring (4x fewer forward passes in the
final validation).
"""
from __future__ import annotations

import torch

from nnunet_moe.networks.moe_sam import MoESAM, check_image_size, format_parameter_report
from nnunet_moe.networks.unwrap import unwrap_network
from nnunet_moe.training.base import nnUNetMoETrainerBase

WEIGHTS_ENV = "NNUNET_MOE_SAM_WEIGHTS"


class nnUNetTrainerMoESAM(nnUNetMoETrainerBase):
    paper = "MoE-SAM, SAM ViT-B + adapters + MoE feature enhancement + learned prompts, S=256 (Li, Wu, Gu et al.)"
    supported_configurations = ("2d",)
    network_class = MoESAM
    enable_deep_supervision = False
    initial_lr = 5e-4
    weight_decay = 0.1
    warmup_fraction = 0.1
    image_size = 256
    encoder = "vit_b"
    routing = "layers"
    pretrained = True
    weights_env = WEIGHTS_ENV
    weights_description = "the official SAM ViT-B checkpoint"
    weights_hint = "/path/to/sam_vit_b_01ec64.pth (nothing is downloaded)"
    scratch_phrase = "from random SAM weights"
    test_time_mirroring = True
    ce_weight, dice_weight = 0.2, 0.8

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        if configuration not in self.supported_configurations:
            raise ValueError(
                f"{type(self).__name__} is a 2D model (SAM's image encoder segments 2D images): configuration "
                f"{configuration!r} is not supported; run nnUNetv2_train DATASET 2d FOLD -tr {type(self).__name__}.")
        check_image_size(self.image_size)
        super().__init__(plans, configuration, fold, dataset_json, device)

    @classmethod
    def build_network_architecture(cls, plans_manager, configuration_manager, num_input_channels: int,
                                   num_output_channels: int, enable_deep_supervision: bool = True) -> torch.nn.Module:
        return MoESAM(num_input_channels, num_output_channels, image_size=cls.image_size, routing=cls.routing,
                      encoder=cls.encoder, deep_supervision=enable_deep_supervision, freeze_encoder=cls.pretrained)

    def initialize(self):
        path = self.pretrained_weights_path()
        super().initialize()
        network = unwrap_network(self.network)
        self.print_to_log_file(format_parameter_report(network), also_print_to_console=True)
        if path is not None:
            from nnunet_moe.pretrained.sam_weights import load_sam_weights

            self.load_weights_from_env(WEIGHTS_ENV, path, load_sam_weights)

    def _build_loss(self):
        loss = super()._build_loss()  # nnU-Net's DC_and_CE_loss (no deep-supervision wrapper: one output)
        loss.weight_ce, loss.weight_dice = self.ce_weight, self.dice_weight
        return loss

    def configure_rotation_dummyDA_mirroring_and_inital_patch_size(self):
        result = super().configure_rotation_dummyDA_mirroring_and_inital_patch_size()
        if not self.test_time_mirroring:
            self.inference_allowed_mirroring_axes = None  # training still mirrors (the returned axes)
        return result


class nnUNetTrainerMoESAMScratch(nnUNetTrainerMoESAM):
    """MoE-SAM from random SAM weights (no checkpoint)."""

    paper = "MoE-SAM from random SAM ViT-B weights, S=256 (Li, Wu, Gu et al.)"
    pretrained = False


class nnUNetTrainerMoESAM224(nnUNetTrainerMoESAM):
    """The paper's Synapse input size."""

    paper = "MoE-SAM, SAM ViT-B, S=224 (the paper's Synapse size) (Li, Wu, Gu et al.)"
    image_size = 224


class nnUNetTrainerMoESAMSmall(nnUNetTrainerMoESAM):
    """CPU-sized: width-192 encoder, S=128, from scratch, no test-time mirroring."""

    paper = "MoE-SAM layout, width-192 encoder at S=128, from scratch (CPU-sized; tests and demos)"
    image_size = 128
    encoder = "tiny"
    pretrained = False
    test_time_mirroring = False
