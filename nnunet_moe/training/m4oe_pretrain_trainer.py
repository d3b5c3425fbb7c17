"""``nnUNetTrainerM4oEPretrain``: M4oE stage 1, Swin-MAE pretraining of the encoder and its experts, 2D.

Papers: Jiang et al., "M4oE", MICCAI 2024 ("Two-phase Training Strategy": the experts are pretrained per
modality with an MAE, without the gate); Xu et al., "Swin MAE", Comput. Biol. Med. 161 (2023) (the
settings). Network: :class:`nnunet_moe.networks.m4oe_mae.M4oEMAE`.

What changes against nnU-Net's default trainer (data, sampling, augmentation, checkpoints are nnU-Net's):

- configurations: ``2d`` only (M4oE is 2D); the patch size is rounded to multiples of 32 as for M4oE;
- network: M4oE's Swin-Unet encoder (embed 96, depths 2/2/2/2, heads 3/6/12/24, window 7, patch 4) with
  one expert per modality of the merge record (expert ``i`` = ``modality_order(record)[i]``, as
  ``nnUNetTrainerM4oE``), each sample's tokens through its own modality's expert (looked up from
  ``batch['keys']``); a plain dataset is one modality (dense MLPs). Light decoder without skips;
- task: 75 % of the 4x4-token windows replaced by a learned mask token, loss = MSE of the pixel patches,
  on the masked patches only (``norm_pix_loss`` off: module docstring of the network). The labels nnU-Net
  loads with the images are not used; nnU-Net's Dice+CE and deep supervision do not apply;
- steps: nnU-Net's own ``train_step`` (AMP, gradient clipping at norm 12) with the reconstruction loss as
  its ``self.loss`` (:class:`MaskedReconstructionLoss`, which ignores the labels), each batch's modality
  handed to the network by :class:`~nnunet_moe.networks.modality_keyword.ModalityKeyword`;
- optimiser: AdamW lr 1e-3, betas 0.9/0.95, weight decay 0.05 (Swin-MAE) except on biases and norm
  weights (MAE's parameter groups, timm's ``param_groups_weight_decay``), linear warm-up over 10/400 of the
  epochs (Swin-MAE: 10 of 400), then cosine; nnU-Net's epochs (1000 x 250 iterations unless a short
  schedule says otherwise);
- validation: the reconstruction loss on nnU-Net's validation batches, with the same masks every epoch
  (seeded) so epochs compare; no pseudo Dice, no ``checkpoint_best.pth`` (there is no Dice to rank by);
  the final validation (segmentation export) is skipped with a log line, and ``nnUNetv2_predict`` with a
  model of this trainer refuses: it reconstructs images, it does not segment them.

Output: with every checkpoint, ``m4oe_mae_encoder.pth`` in the fold's output folder
(:mod:`nnunet_moe.pretrained.m4oe_mae_weights`): encoder + expert tensors, the modalities in expert order
and the architecture. Stage 2: ``NNUNET_MOE_M4OE_MAE_WEIGHTS=<that file> nnUNetv2_train DATASET 2d FOLD
-tr nnUNetTrainerM4oE`` (the path and the command are logged at the end of training).
"""
from __future__ import annotations

import contextlib
import os

import numpy as np
import torch
from torch import distributed as dist
from torch import autocast

from nnunet_moe.networks.m4oe_mae import M4oEMAE
from nnunet_moe.networks.modality_keyword import ModalityKeyword
from nnunet_moe.networks.unwrap import unwrap_network
from nnunet_moe.pretrained.m4oe_mae_weights import WEIGHTS_ENV as MAE_WEIGHTS_ENV
from nnunet_moe.training.base import nnUNetMoETrainerBase
from nnunet_moe.training.lr_schedules import WarmupCosineLRScheduler
from nnunet_moe.datasets.metadata import expert_modalities
from nnunet_moe.training.partial_labels import CaseAnnotations

VALIDATION_SEED = 0


class MaskedReconstructionLoss(torch.nn.Module):
    """``self.loss(output, target)`` of nnU-Net's ``train_step`` for the MAE: the network's own MSE over the
    masked patches (``MAEOutput.loss``, Xu et al. 2023); ``target`` (nnU-Net's labels) is not used."""

    def forward(self, output, target=None) -> torch.Tensor:
        return output.loss


class nnUNetTrainerM4oEPretrain(nnUNetMoETrainerBase):
    paper = "M4oE stage 1: Swin-MAE pretraining of the encoder, one expert per modality (Jiang et al.; Xu et al.)"
    supported_configurations = ("2d",)
    network_class = M4oEMAE
    enable_deep_supervision = False
    initial_lr = 1e-3
    weight_decay = 0.05
    betas = (0.9, 0.95)
    warmup_fraction = 10 / 400
    embed_dim, num_heads = 96, (3, 6, 12, 24)  # Swin-Unet's; nnUNetTrainerM4oE builds the same encoder
    mask_ratio = 0.75
    mask_window = 4
    decoder_depth = 1
    norm_pix_loss = False
    # tests/test_learning.py: this trainer learns to reconstruct (its loss falls), it has no Dice to rise
    learning_check = "reconstruction"

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        self.cases = CaseAnnotations(dataset_json)
        plans = self.cases.plans_with_experts(plans)
        super().__init__(plans, configuration, fold, dataset_json, device)
        # nnU-Net keeps a "best" checkpoint by EMA pseudo Dice; NaN never compares greater, so none is written
        self._best_ema = float("nan")
        self._val_generator = None
        self._modality = None  # networks.modality_keyword.ModalityKeyword, made with the network
        self.print_to_log_file(self._describe(), also_print_to_console=True)

    def _describe(self) -> str:
        name = type(self).__name__
        experts = (f"{self.cases.num_modalities} experts, one per modality ({', '.join(self.cases.modalities)}), "
                   f"each sample's tokens through its own modality's expert" if self.cases.merged else
                   "not a merged dataset: one modality, dense MLPs (merge datasets with `nnunet-moe merge-datasets` "
                   "to pretrain one expert per modality)")
        return (f"{name}: masked-autoencoder pretraining (mask ratio {self.mask_ratio}, {self.mask_window}x"
                f"{self.mask_window}-token windows, MSE on masked patches); {experts}. Labels are not used.")

    @property
    def weights_path(self) -> str:
        from nnunet_moe.pretrained.m4oe_mae_weights import WEIGHTS_NAME

        return os.path.join(self.output_folder, WEIGHTS_NAME)

    @classmethod
    def build_network_architecture(cls, plans_manager, configuration_manager, num_input_channels: int,
                                   num_output_channels: int, enable_deep_supervision: bool = True) -> torch.nn.Module:
        from nnunet_moe.inference.loading import loading_locals

        if loading_locals() is not None:  # nnU-Net's predictor is loading a model of this trainer
            raise RuntimeError(
                f"{cls.__name__} is M4oE's stage-1 masked-autoencoder pretraining: its model reconstructs masked "
                f"images and cannot segment, so nnUNetv2_predict cannot use it. Fine-tune it first: "
                f"{MAE_WEIGHTS_ENV}=<its output folder>/m4oe_mae_encoder.pth nnUNetv2_train DATASET 2d FOLD -tr "
                f"nnUNetTrainerM4oE, then predict with -tr nnUNetTrainerM4oE.")
        modalities = expert_modalities(plans_manager.plans)
        return cls.network_class(num_input_channels, num_experts=len(modalities),
                                 spatial_dims=len(configuration_manager.patch_size), embed_dim=cls.embed_dim,
                                 num_heads=cls.num_heads, mask_ratio=cls.mask_ratio,
                                 mask_window=cls.mask_window, decoder_depth=cls.decoder_depth,
                                 norm_pix_loss=cls.norm_pix_loss)

    def _build_loss(self):
        return MaskedReconstructionLoss()  # not nnU-Net's Dice+CE: the labels do not take part

    def configure_optimizers(self):
        from timm.optim import param_groups_weight_decay

        groups = param_groups_weight_decay(self.network, self.weight_decay)  # 1-d tensors and biases: no decay
        optimizer = torch.optim.AdamW(groups, lr=self.initial_lr, betas=self.betas, eps=self.adam_eps)
        warmup = int(round(self.warmup_fraction * self.num_epochs))
        return optimizer, WarmupCosineLRScheduler(optimizer, self.initial_lr, self.num_epochs, warmup)

    # -- steps ---------------------------------------------------------------------------------------------
    def _set_modality(self, batch: dict) -> None:
        # nnU-Net's steps call network(data): each sample's modality (None for a plain dataset) as a keyword
        if self._modality is None:
            self._modality = ModalityKeyword(self.network)
        self._modality.set(self.cases.modality(batch.get("keys")))

    def train_step(self, batch: dict) -> dict:
        self._set_modality(batch)
        return super().train_step(batch)

    def on_validation_epoch_start(self):
        super().on_validation_epoch_start()
        # the same masks every epoch, so the validation losses of different epochs compare
        self._val_generator = torch.Generator(device=self.device).manual_seed(VALIDATION_SEED + self.local_rank)

    def validation_step(self, batch: dict) -> dict:
        self._set_modality(batch)
        data = batch["data"].to(self.device, non_blocking=True)
        with torch.no_grad(), (autocast(self.device.type, enabled=True) if self.device.type == "cuda"
                               else contextlib.nullcontext()):
            loss = self.network(data, generator=self._val_generator).loss
        return {"loss": loss.detach().cpu().numpy()}

    def on_validation_epoch_end(self, val_outputs):
        loss = float(np.mean([o["loss"] for o in val_outputs]))
        if self.is_ddp:
            losses = [None] * dist.get_world_size()
            dist.all_gather_object(losses, loss)
            loss = float(np.mean(losses))
        self.logger.log("val_losses", loss, self.current_epoch)
        # nnU-Net's logger and progress plot expect these every epoch: no Dice here
        self.logger.log("mean_fg_dice", float("nan"), self.current_epoch)
        self.logger.log("dice_per_class_or_region", [], self.current_epoch)

    # -- outputs -----------------------------------------------------------------------------------------------
    def save_checkpoint(self, filename: str) -> None:
        super().save_checkpoint(filename)
        if self.local_rank == 0 and not self.disable_checkpointing:
            from nnunet_moe.pretrained.m4oe_mae_weights import save_m4oe_mae_weights

            save_m4oe_mae_weights(unwrap_network(self.network), self.weights_path,
                                  expert_modalities(self.plans_manager.plans),
                                  trainer=type(self).__name__, epoch=int(self.current_epoch + 1))
            if os.path.basename(filename) == "checkpoint_final.pth":
                self.print_to_log_file(
                    f"MAE-pretrained encoder and experts: {self.weights_path}\nStage 2: {MAE_WEIGHTS_ENV}="
                    f"{self.weights_path} nnUNetv2_train {self.plans_manager.dataset_name} "
                    f"{self.configuration_name} {self.fold} -tr nnUNetTrainerM4oE", also_print_to_console=True)

    def perform_actual_validation(self, save_probabilities: bool = False):
        self.print_to_log_file(
            f"{type(self).__name__}: no final validation: stage-1 MAE pretraining reconstructs images and does not "
            f"segment, so nnU-Net's segmentation export is skipped. The pretrained encoder is {self.weights_path}.",
            also_print_to_console=True)


class nnUNetTrainerM4oEPretrainSmall(nnUNetTrainerM4oEPretrain):
    """CPU-sized (embed 24, heads 1/2/4/8): tests and demos only; its weights fit nnUNetTrainerM4oESmall, not
    nnUNetTrainerM4oE (embed 96), and the loader says so."""

    paper = "M4oE stage 1 (Swin-MAE), embed 24: CPU-sized, tests and demos only (Jiang et al.; Xu et al.)"
    embed_dim, num_heads = 24, (1, 2, 4, 8)
