"""``nnUNetTrainerNMSW``: NMSW-Net ("No More Sliding Window") inside nnU-Net (3d_fullres).

Paper: Jeon, Yang, Fu, Feng, "No More Sliding Window: Efficient 3D Medical Image Segmentation with
Differentiable Top-k Patch Sampling". Network: :class:`nnunet_moe.networks.nmsw.NMSWNet`.

What changes against nnU-Net's default trainer (everything else -- preprocessing, splits,
augmentation, checkpoints, final validation, export, evaluation -- is nnU-Net's):

- network: NMSW-Net whose global and local networks are both the plans' CNN
  (``build_default_nmsw_from_plans``, deep supervision off); the local patch is the plans' patch
  size, the global input is the whole volume resized (trilinear, inside ``forward``) to
  ``global_input_size`` (default: the full size below divided by ``global_downsampling = 3``, the
  paper's factor, rounded up to the CNN's total stride; e.g. hippocampus 40x56x40 -> 16x24x16). Training picks ``k_train=3`` Gumbel top-K
  cells + ``k_random=1`` uniform cell per volume (paper: 3 + 1, the same number of patches as the
  baseline's batch of 4); validation/inference use the deterministic top-``K``. The local network
  can be swapped for another of our networks by overriding the classmethod
  :meth:`nnUNetTrainerNMSW.build_local_network` in a subclass.
- data: NMSW needs the whole volume, not a patch. nnU-Net's own ``nnUNetDataLoader`` is used with
  its "patch" set to a fixed *full size*: each sample is the whole preprocessed case, padded (data 0,
  segmentation -1 -> background, centred, like nnU-Net pads any case smaller than its patch) or --
  for cases larger than the full size -- a random (foreground-oversampled) full-size crop. nnU-Net's
  complete spatial and intensity augmentation then runs on that full-size volume (the initial,
  larger crop for rotation/scaling is derived from the full size as nnU-Net derives it from the
  patch). Full size (``full_size`` class attribute, else automatic): per axis the plans' median image
  size rounded up to ``patch + n * patch * (1 - overlap)``, i.e. a size covered exactly by the patch
  grid, and never smaller than the patch. Batches hold ``volumes_per_batch = 1`` volume (paper).
  This keeps one code path for the data (nnU-Net's) and puts all NMSW-specific resizing/cropping in
  the model, which also does it at inference time.
- loss (paper Eq. 7): Dice+CE with weights Dice 0.8 / CE 0.2 (nnU-Net's ``DC_and_CE_loss``,
  ``weight_dice``/``weight_ce``; ``DC_and_BCE_loss`` for region-based label sets) on the aggregated
  full-size output, on the global low-resolution output (against the nearest-neighbour downsampled
  target) and on the local patch outputs (against the same crops of the target; mean over patches),
  minus ``ENTROPY_WEIGHT`` (1e-4, paper) times the entropy of the selection distribution.
- deep supervision: none (``enable_deep_supervision = False``; ``set_deep_supervision_enabled``
  is a no-op, nnU-Net calls it around validation).
- optimiser: AdamW lr 3e-4, weight decay 1e-5, 10 % linear warm-up then cosine (paper), nnU-Net's
  gradient clipping (norm 12) and AMP on CUDA kept.
- inference: importing this module installs :mod:`nnunet_moe.inference.nmsw_predictor` (nnU-Net
  imports the trainer class named in the checkpoint before it builds the network, so this happens in
  ``nnUNetv2_predict`` and in the final validation): the predictor runs NMSW (global pass + top-K
  local patches, ``NNUNET_MOE_NMSW_K``, default 5) instead of the sliding window for NMSW networks.

Deviations: the global input is one fixed size (from the plans' median volume), so a volume much
larger or smaller than the median is downsampled by more or less than 3x. A volume that fits in one
patch (e.g. the hippocampus demo: 36x50x36 vs patch 40x56x40) has a 1-cell grid, so NMSW degenerates
to "global + one local pass" there -- correct, but the efficiency gain needs volumes several patches
large (``nnunet-moe benchmark --untrained nnUNetTrainerNMSW --modes nmsw sliding_window`` measures it).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import torch
from batchgenerators.dataloading.nondet_multi_threaded_augmenter import NonDetMultiThreadedAugmenter
from batchgenerators.dataloading.single_threaded_augmenter import SingleThreadedAugmenter
from nnunetv2.training.data_augmentation.compute_initial_patch_size import get_patch_size
from nnunetv2.training.dataloading.data_loader import nnUNetDataLoader
from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
from nnunetv2.training.loss.compound_losses import DC_and_BCE_loss, DC_and_CE_loss
from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss, get_tp_fp_fn_tn
from nnunetv2.utilities.default_n_proc_DA import get_allowed_n_proc_DA
from nnunetv2.utilities.helpers import dummy_context
from torch import autocast

from nnunet_moe.inference.nmsw_predictor import DEFAULT_K, install, register_nmsw_trainer
from nnunet_moe.networks.nmsw import ENTROPY_WEIGHT, NMSWNet, NMSWOutput, selection_entropy
from nnunet_moe.networks.nmsw_plans import build_default_nmsw_from_plans, downsampled_size, stride_divisor
from nnunet_moe.networks.unwrap import unwrap_network
from nnunet_moe.training.base import nnUNetMoETrainerBase

install()  # nnUNetv2_predict / final validation: NMSW networks never take the sliding window


def full_size_for(median_size: Sequence[float], patch_size: Sequence[int], overlap: float = 0.5) -> Tuple[int, ...]:
    """Per axis: ``median`` rounded up to ``patch + n * step`` (``step = round(patch * (1 - overlap))``),
    at least ``patch``; e.g. median 300, patch 128, overlap 0.5 -> 128 + 3 * 64 = 320."""
    if len(median_size) != len(patch_size):
        raise ValueError(f"median size {tuple(median_size)} and patch size {tuple(patch_size)} need the same number "
                         f"of axes")
    if not 0.0 <= overlap < 1.0:
        raise ValueError(f"overlap must lie in [0, 1), got {overlap!r}")
    full = []
    for m, p in zip(median_size, patch_size):
        step = max(1, int(round(p * (1.0 - overlap))))
        n = max(0, math.ceil((float(m) - p) / step))
        full.append(int(p + n * step))
    return tuple(full)


class nnUNetTrainerNMSW(nnUNetMoETrainerBase):
    paper = "No More Sliding Window: differentiable top-K patch sampling (Jeon et al.)"
    supported_configurations = ("3d_fullres",)
    initial_lr = 3e-4
    weight_decay = 1e-5
    warmup_fraction = 0.1

    # NMSW settings: the paper's, where the authors' code differs the paper wins
    k_train = 3
    k_random = 1
    k_infer = DEFAULT_K  # predict time: NNUNET_MOE_NMSW_K overrides it
    tau = 2.0 / 3.0
    overlap = 0.5
    full_size: Optional[Tuple[int, ...]] = None  # None: from the plans' median image size
    global_downsampling = 3.0  # paper (WORD): the global net sees the whole volume at 1/3 resolution
    global_input_size: Optional[Tuple[int, ...]] = None  # None: full size / global_downsampling (see below)
    volumes_per_batch = 1
    dice_weight = 0.8
    ce_weight = 0.2
    entropy_weight = ENTROPY_WEIGHT
    enable_deep_supervision = False  # NMSW-Net has a single (aggregated) full-size output

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        register_nmsw_trainer(cls.__name__)  # the predictor recognises NMSW results folders by name

    # ------------------------------------------------------------------ network
    @classmethod
    def build_local_network(cls, plans_manager, configuration_manager, num_input_channels: int,
                            num_output_channels: int) -> Optional[torch.nn.Module]:
        """Hook: the local (patch) network; None keeps the plans' CNN. It must map
        ``(N, C_in, *patch) -> (N, C, *patch)`` (a list/tuple output uses element 0)."""
        return None

    @classmethod
    def build_network_architecture(cls, plans_manager, configuration_manager, num_input_channels: int,
                                   num_output_channels: int, enable_deep_supervision: bool = True) -> NMSWNet:
        # enable_deep_supervision is ignored: NMSW-Net has no deep supervision. The predictor calls this
        # without dataset.json, so a minimal one with the right channel/class counts stands in for it
        # (region-based sets switch background masking off at run time, see initialize / the predictor).
        dataset_json = {"channel_names": {str(i): f"channel_{i}" for i in range(int(num_input_channels))},
                        "labels": {"background": 0, **{f"class_{i}": i for i in range(1, int(num_output_channels))}}}
        network = build_default_nmsw_from_plans(
            plans_manager, configuration_manager, dataset_json,
            global_input_size=cls.nmsw_global_input_size(configuration_manager),
            k_train=cls.k_train, k_random=cls.k_random, k_infer=cls.k_infer, tau=cls.tau, overlap=cls.overlap)
        if network.in_channels != num_input_channels or network.num_classes != num_output_channels:
            raise ValueError(f"{cls.__name__}: NMSW network built with {network.in_channels} input channels and "
                             f"{network.num_classes} outputs, expected {num_input_channels} and {num_output_channels} "
                             f"(cascaded configurations are not supported)")
        local = cls.build_local_network(plans_manager, configuration_manager, num_input_channels, num_output_channels)
        if local is not None:
            network.local_net = local
        for cnn in (network.global_net, network.local_net):
            decoder = getattr(cnn, "decoder", None)
            if getattr(decoder, "deep_supervision", True) is False and hasattr(decoder, "seg_layers"):
                # Without deep supervision the plans' CNN only uses its last head: the others never get a
                # gradient, which DDP (no find_unused_parameters) waits for. Same training, same state dict.
                for head in list(decoder.seg_layers)[:-1]:
                    head.requires_grad_(False)
        return network

    def initialize(self):
        super().initialize()
        if self.label_manager.has_regions:  # sigmoid outputs: no background channel to mask cells with
            unwrap_network(self.network).mask_background = False

    def set_deep_supervision_enabled(self, enabled: bool):
        """No-op: NMSW-Net has no deep supervision, and the plans' CNNs inside it must keep theirs off
        (nnU-Net calls this around validation; its own version would look for ``network.decoder``)."""

    def _set_batch_size_and_oversample(self):
        super()._set_batch_size_and_oversample()
        self.batch_size = int(self.volumes_per_batch)

    @classmethod
    def nmsw_global_input_size(cls, configuration_manager) -> Tuple[int, ...]:
        """Global-network input: ``global_input_size`` if set, else the full size divided by
        ``global_downsampling`` and rounded up to the CNN's total stride (``downsampled_size``)."""
        if cls.global_input_size is not None:
            return tuple(int(s) for s in cls.global_input_size)
        patch = tuple(int(p) for p in configuration_manager.patch_size)
        divisor = stride_divisor(configuration_manager.network_arch_init_kwargs, len(patch))
        return downsampled_size(cls.full_size_from(configuration_manager), cls.global_downsampling, divisor)

    # ------------------------------------------------------------------ data
    @classmethod
    def full_size_from(cls, configuration_manager, full_size: Optional[Sequence[int]] = None) -> Tuple[int, ...]:
        """Spatial size of every training/validation sample (see module docstring); ``full_size``
        (default: the class attribute) overrides the rule."""
        patch = tuple(int(p) for p in configuration_manager.patch_size)
        full_size = cls.full_size if full_size is None else full_size
        if full_size is None:
            return full_size_for(configuration_manager.median_image_size_in_voxels, patch, cls.overlap)
        full = tuple(int(s) for s in full_size)
        if len(full) != len(patch) or any(f < p for f, p in zip(full, patch)):
            raise ValueError(f"{cls.__name__}.full_size {full} must have {len(patch)} axes, each at least the "
                             f"patch size {patch}")
        return full

    def nmsw_full_size(self) -> Tuple[int, ...]:
        return self.full_size_from(self.configuration_manager, self.full_size)

    def configure_rotation_dummyDA_mirroring_and_inital_patch_size(self):
        rotation, dummy_2d, _, mirror_axes = super().configure_rotation_dummyDA_mirroring_and_inital_patch_size()
        full = self.nmsw_full_size()
        # nnU-Net's rule for the larger pre-rotation crop, applied to the full size instead of the patch
        initial = get_patch_size(full, rotation, rotation, rotation, (0.85, 1.25))
        if dummy_2d:
            initial[0] = full[0]
        return rotation, dummy_2d, initial, mirror_axes

    def get_dataloaders(self):
        if self.dataset_class is None:
            self.dataset_class = infer_dataset_class(self.preprocessed_dataset_folder)
        full = self.nmsw_full_size()
        rotation, dummy_2d, initial, mirror_axes = self.configure_rotation_dummyDA_mirroring_and_inital_patch_size()
        self.print_to_log_file(f"NMSW: whole-volume samples of size {list(full)} (patch "
                               f"{self.configuration_manager.patch_size}, batch {self.batch_size} volume(s))")
        regions = self.label_manager.foreground_regions if self.label_manager.has_regions else None
        tr_transforms = self.get_training_transforms(
            full, rotation, None, mirror_axes, dummy_2d, use_mask_for_norm=self.configuration_manager.use_mask_for_norm,
            is_cascaded=self.is_cascaded, foreground_labels=self.label_manager.foreground_labels, regions=regions,
            ignore_label=self.label_manager.ignore_label)
        val_transforms = self.get_validation_transforms(None, is_cascaded=self.is_cascaded,
                                                        foreground_labels=self.label_manager.foreground_labels,
                                                        regions=regions, ignore_label=self.label_manager.ignore_label)
        dataset_tr, dataset_val = self.get_tr_and_val_datasets()
        dl_tr = nnUNetDataLoader(dataset_tr, self.batch_size, initial, full, self.label_manager,
                                 oversample_foreground_percent=self.oversample_foreground_percent,
                                 transforms=tr_transforms, probabilistic_oversampling=self.probabilistic_oversampling)
        dl_val = nnUNetDataLoader(dataset_val, self.batch_size, full, full, self.label_manager,
                                  oversample_foreground_percent=self.oversample_foreground_percent,
                                  transforms=val_transforms, probabilistic_oversampling=self.probabilistic_oversampling)
        processes = get_allowed_n_proc_DA()
        if processes == 0:
            mt_train, mt_val = SingleThreadedAugmenter(dl_tr, None), SingleThreadedAugmenter(dl_val, None)
        else:
            pin = self.device.type == "cuda"
            mt_train = NonDetMultiThreadedAugmenter(dl_tr, None, processes, max(6, processes // 2), None, pin, 0.002)
            mt_val = NonDetMultiThreadedAugmenter(dl_val, None, max(1, processes // 2), max(3, processes // 4), None,
                                                  pin, 0.002)
        _ = next(mt_train)
        _ = next(mt_val)
        return mt_train, mt_val

    # ------------------------------------------------------------------ loss
    def _build_loss(self):
        """One Dice+CE term (Dice 0.8, CE 0.2); :meth:`nmsw_loss` applies it to the three outputs."""
        if self.label_manager.has_regions:
            return DC_and_BCE_loss({}, {"batch_dice": self.configuration_manager.batch_dice, "do_bg": True,
                                        "smooth": 1e-5, "ddp": self.is_ddp},
                                   weight_ce=self.ce_weight, weight_dice=self.dice_weight,
                                   use_ignore_label=self.label_manager.ignore_label is not None,
                                   dice_class=MemoryEfficientSoftDiceLoss)
        return DC_and_CE_loss({"batch_dice": self.configuration_manager.batch_dice, "smooth": 1e-5, "do_bg": False,
                               "ddp": self.is_ddp}, {}, weight_ce=self.ce_weight, weight_dice=self.dice_weight,
                              ignore_label=self.label_manager.ignore_label, dice_class=MemoryEfficientSoftDiceLoss)

    def nmsw_loss(self, output: NMSWOutput, target: torch.Tensor) -> Tuple[torch.Tensor, dict]:
        """Paper Eq. 7: ``L(high) + L(low) + mean_k L(patch_k) - lambda * H(p(z|x_low))``.

        ``target (B, C', *S)`` is the full-size segmentation (label map or region one-hot) matching
        ``output.logits``; the low-resolution and patch targets are derived from it with the model's
        own resizing and cropping. Returns the total and its parts (detached floats).
        """
        network = unwrap_network(self.network)
        high = self.loss(output.logits, target)
        low = self.loss(output.global_logits_low, network.resize_to_global(target, is_label=True))
        patch_target = network.crop_patches(target, output.cell_indices)  # (B, K, C', *patch)
        # flattened: every patch is one sample, so (per-sample Dice, voxel-mean CE) = mean over patches
        local = self.loss(output.local_logits.flatten(0, 1), patch_target.flatten(0, 1))
        entropy = selection_entropy(output.objectness.float())
        total = high + low + local - self.entropy_weight * entropy
        parts = {"high": float(high.detach()), "low": float(low.detach()), "local": float(local.detach()),
                 "entropy": float(entropy.detach())}
        return total, parts

    # ------------------------------------------------------------------ steps
    def _to_device(self, batch: dict):
        data = batch["data"].to(self.device, non_blocking=True)
        target = batch["target"]
        if isinstance(target, list):  # deep supervision is off: a single target is expected
            target = target[0]
        return data, target.to(self.device, non_blocking=True)

    def train_step(self, batch: dict) -> dict:
        data, target = self._to_device(batch)
        self.optimizer.zero_grad(set_to_none=True)
        with autocast(self.device.type, enabled=True) if self.device.type == "cuda" else dummy_context():
            output = self.network(data)
            loss, _ = self.nmsw_loss(output, target)
        if self.grad_scaler is not None:
            self.grad_scaler.scale(loss).backward()
            self.grad_scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.network.parameters(), 12)
            self.grad_scaler.step(self.optimizer)
            self.grad_scaler.update()
        else:
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.network.parameters(), 12)
            self.optimizer.step()
        return {"loss": loss.detach().cpu().numpy()}

    def validation_step(self, batch: dict) -> dict:
        """Eval-mode forward (deterministic top-K), the same loss, and nnU-Net's online Dice (tp/fp/fn)
        of the aggregated full-size output."""
        data, target = self._to_device(batch)
        with torch.no_grad():
            with autocast(self.device.type, enabled=True) if self.device.type == "cuda" else dummy_context():
                output = self.network(data)
                loss, _ = self.nmsw_loss(output, target)
        logits = output.logits
        axes = [0] + list(range(2, logits.ndim))
        if self.label_manager.has_regions:
            predicted = (torch.sigmoid(logits) > 0.5).long()
        else:
            predicted = torch.zeros(logits.shape, device=logits.device, dtype=torch.float16)
            predicted.scatter_(1, logits.argmax(1)[:, None], 1)
        mask = None
        if self.label_manager.has_ignore_label:
            if not self.label_manager.has_regions:
                mask = (target != self.label_manager.ignore_label).float()
                target = torch.where(target == self.label_manager.ignore_label, torch.zeros_like(target), target)
            else:
                mask = ~target[:, -1:] if target.dtype == torch.bool else 1 - target[:, -1:]
                target = target[:, :-1]
        tp, fp, fn, _ = get_tp_fp_fn_tn(predicted, target, axes=axes, mask=mask)
        tp, fp, fn = (t.detach().cpu().numpy() for t in (tp, fp, fn))
        if not self.label_manager.has_regions:  # background Dice is not tracked (nnU-Net's convention)
            tp, fp, fn = tp[1:], fp[1:], fn[1:]
        return {"loss": loss.detach().cpu().numpy(), "tp_hard": tp, "fp_hard": fp, "fn_hard": fn}


register_nmsw_trainer(nnUNetTrainerNMSW.__name__)
