"""``nnUNetTrainerNMSW``: NMSW-Net ("No More Sliding Window") inside nnU-Net (3d_fullres).

Paper: Jeon, Yang, Fu, Feng, "No More Sliding Window: Efficient 3D Medical Image Segmentation with
Differentiable Top-k Patch Sampling". Network: :class:`nnunet_moe.networks.nmsw.NMSWNet`.

What changes against nnU-Net's default trainer (everything else -- preprocessing, splits,
augmentation, checkpoints, final validation, export, evaluation -- is nnU-Net's):

- network: NMSW-Net whose global and local networks are both the plans' CNN
  (``build_default_nmsw_from_plans``, deep supervision off); the local patch is the plans' patch
  size, the global input is the whole volume resized (trilinear, inside ``forward``) to
  ``global_input_size`` (default: the full size below divided by ``global_downsampling = 3``, the
  paper's factor, rounded up to the global network's input divisor -- the CNN's total stride; e.g.
  hippocampus 40x56x40 -> 16x24x16). Training picks ``k_train=3`` Gumbel top-K
  cells + ``k_random=1`` uniform cell per volume (paper: 3 + 1, the same number of patches as the
  baseline's batch of 4); validation/inference use the deterministic top-``K``.
- NMSW options, class attributes passed to :class:`~nnunet_moe.networks.nmsw.NMSWNet`:
  ``objectness_from = "auto"`` (objectness from the global network's penultimate features, as in the
  paper, where they are reachable -- the plans' U-Nets --, else from its logits; ``"features"`` /
  ``"logits"`` force one), ``straight_through = "standard"`` (selected crop x exactly 1.0 forward;
  ``"scaled"``: the paper's ``hard * soft``), ``detach_global_in_aggregation = False`` (True: the authors'
  code, the aggregation blends detached global logits). The paper's and the authors' choices have not
  been compared on trained models yet (unmeasured): the defaults are the paper's where it says, ours else.
- backbones (any network one of our trainers builds): ``local_backbone`` / ``global_backbone`` name a
  trainer of :mod:`nnunet_moe.training.catalog` (None: the plans' CNN) whose classmethod
  ``build_network_architecture(plans_manager, configuration_manager, n_in, n_out,
  enable_deep_supervision=False)`` makes the local / global network. The local backbone's patch-size rule
  holds for the NMSW patch: :meth:`prepare_plans` is that trainer's (``nnUNetMoETrainerBase.prepare_plans``:
  the plans' patch rounded to its network's ``input_divisor()``, saved with the model), and the global
  input size must be divisible by the global backbone's ``input_divisor()`` (the automatic size is rounded
  up to it; an explicit ``global_input_size`` that is not is a ``ValueError`` naming value and rule). The
  backbone's pretrained weights (its ``initialize``) are not loaded. Shipped: ``nnUNetTrainerNMSWSwinSMT``
  (local: ``nnUNetTrainerSwinSMTSmall``'s Swin SMT, global: the plans' CNN). For one-off networks, override
  the classmethods :meth:`nnUNetTrainerNMSW.build_local_network` / ``build_global_network``.
- schedule (paper): ``num_epochs = 300`` epochs of ``num_iterations_per_epoch = 300`` iterations (class
  attributes ``paper_num_epochs`` / ``paper_iterations_per_epoch``, set on the instance after nnU-Net's
  ``__init__`` and before a short-schedule name's ``_<E>epochs_<I>iters``, which overrides them) with
  ``warmup_fraction = 0.2`` (peak learning rate at 20 % of the epochs, the authors' code).
- data: NMSW needs the whole volume, not a patch. nnU-Net's own ``get_dataloaders`` runs with its
  sample size (``configuration_manager.patch_size``, for that call only) set to a fixed *full size*:
  each sample is the whole preprocessed case, padded (data 0, segmentation -1 -> background,
  centred, like nnU-Net pads any case smaller than its patch) or -- for cases larger than the full
  size -- a random (foreground-oversampled) full-size crop. nnU-Net's complete spatial and intensity
  augmentation then runs on that full-size volume (rotation, dummy 2D and mirroring follow nnU-Net's
  rules for the plans' patch; the initial, larger crop for rotation/scaling is derived from the full
  size as nnU-Net derives it from the patch). Full size (``full_size`` class attribute, else
  automatic): per axis the plans' median image size rounded up to ``patch + n * patch * (1 -
  overlap)``, i.e. a size covered exactly by the patch grid, and never smaller than the patch.
  Batches hold ``volumes_per_batch = 1`` volume (paper). This keeps one code path for the data
  (nnU-Net's) and puts all NMSW-specific resizing/cropping in the model, which also does it at
  inference time.
- loss (paper Eq. 7, :class:`NMSWLoss`, called by nnU-Net's own ``train_step`` / ``validation_step``
  as ``loss(NMSWOutput, target)``): Dice+CE with weights Dice 0.8 / CE 0.2 (nnU-Net's
  ``DC_and_CE_loss``, ``weight_dice``/``weight_ce``; ``DC_and_BCE_loss`` for region-based label sets)
  on the aggregated full-size output, on the global low-resolution output (against the
  nearest-neighbour downsampled target) and on the local patch outputs (against the same crops of
  the target; mean over patches), minus ``ENTROPY_WEIGHT`` (1e-4, paper) times the entropy of the
  selection distribution.
- outputs and nnU-Net's deep-supervision convention: with deep supervision on, nnU-Net's
  ``validation_step`` takes element 0 of the output and of the target. Element 0 of an
  ``NMSWOutput`` is the aggregated full-size logits, so ``enable_deep_supervision = True`` with a
  single target scale (``_get_deep_supervision_scales() == [[1, 1, 1]]``: the target list holds only
  the full-size target) lets nnU-Net's ``train_step`` and ``validation_step`` (its online Dice) run
  unchanged. The CNNs inside have no deep supervision; ``set_deep_supervision_enabled`` is a no-op.
- optimiser: AdamW lr 3e-4, weight decay 1e-5, 20 % linear warm-up then cosine (paper and authors' code),
  nnU-Net's gradient clipping (norm 12) and AMP on CUDA kept.
- inference: :class:`~nnunet_moe.inference.nmsw_predictor.NMSWPredictor` (global pass + top-K local
  patches, K = ``k_infer`` = 5 unless ``NNUNET_MOE_NMSW_K`` says otherwise, no sliding window). In
  ``nnUNetv2_predict``, ``build_network_architecture`` makes the predictor that is loading the
  checkpoint an NMSWPredictor (after checking that the weights fit); the final validation runs
  nnU-Net's ``perform_actual_validation`` with NMSWPredictor in place of ``nnUNetPredictor`` for that
  call. No process-wide patch (that module explains the mechanism and why).

Deviations: the global input is one fixed size (from the plans' median volume), so a volume much
larger or smaller than the median is downsampled by more or less than 3x. A volume that fits in one
patch (e.g. the hippocampus demo: 36x50x36 vs patch 40x56x40) has a 1-cell grid, so NMSW degenerates
to "global + one local pass" there -- correct, but the efficiency gain needs volumes several patches
large (``nnunet-moe benchmark --untrained nnUNetTrainerNMSW --modes nmsw sliding_window`` measures it).
"""
from __future__ import annotations

import contextlib
import copy
import math
from typing import Optional, Sequence, Tuple

import torch
from nnunetv2.training.data_augmentation.compute_initial_patch_size import get_patch_size
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager
from torch import nn

from nnunet_moe.inference.nmsw_predictor import (DEFAULT_K, adopt_loading_predictor, register_nmsw_trainer,
                                                 validation_predictors)
from nnunet_moe.networks.nmsw import ENTROPY_WEIGHT, NMSWNet, NMSWOutput, selection_entropy
from nnunet_moe.networks.nmsw_plans import build_default_nmsw_from_plans, downsampled_size, stride_divisor
from nnunet_moe.networks.unwrap import unwrap_network
from nnunet_moe.training.base import nnUNetMoETrainerBase


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


class NMSWLoss(nn.Module):
    """Paper Eq. 7 on an :class:`NMSWOutput`: ``L(high) + L(low) + mean_k L(patch_k) - lambda * H(p(z|x_low))``.

    ``term`` is one Dice+CE loss. ``target`` is the full-size segmentation ``(B, C', *S)`` matching
    ``output.logits`` (label map or region one-hot), or nnU-Net's deep-supervision list whose element 0
    it is; the low-resolution and patch targets come from the network's own ``resize_to_global`` and
    ``crop_patches`` (kept as bound methods: the network is not a submodule of the loss).
    """

    def __init__(self, term: nn.Module, network: NMSWNet, entropy_weight: float = ENTROPY_WEIGHT):
        super().__init__()
        self.term = term
        self.resize_to_global, self.crop_patches = network.resize_to_global, network.crop_patches
        self.entropy_weight = float(entropy_weight)

    def terms(self, output: NMSWOutput, target) -> Tuple[torch.Tensor, dict]:
        """The total and its parts (detached floats: high, low, local, entropy)."""
        if isinstance(target, (list, tuple)):
            target = target[0]
        high = self.term(output.logits, target)
        low = self.term(output.global_logits_low, self.resize_to_global(target, is_label=True))
        patch_target = self.crop_patches(target, output.cell_indices)  # (B, K, C', *patch)
        # flattened: every patch is one sample, so (per-sample Dice, voxel-mean CE) = mean over patches
        local = self.term(output.local_logits.flatten(0, 1), patch_target.flatten(0, 1))
        entropy = selection_entropy(output.objectness.float())
        total = high + low + local - self.entropy_weight * entropy
        parts = {"high": float(high.detach()), "low": float(low.detach()), "local": float(local.detach()),
                 "entropy": float(entropy.detach())}
        return total, parts

    def forward(self, output: NMSWOutput, target) -> torch.Tensor:
        return self.terms(output, target)[0]


class nnUNetTrainerNMSW(nnUNetMoETrainerBase):
    paper = "No More Sliding Window: differentiable top-K patch sampling (Jeon et al.)"
    supported_configurations = ("3d_fullres",)
    initial_lr = 3e-4
    weight_decay = 1e-5
    warmup_fraction = 0.2  # paper / authors' code: peak learning rate at 20 % of the epochs
    paper_num_epochs = 300  # paper: 300 epochs x 300 iterations (nnU-Net: 1000 x 250); see __init__
    paper_iterations_per_epoch = 300

    # NMSW settings: the paper's, where the authors' code differs the paper wins
    k_train = 3
    k_random = 1
    k_infer = DEFAULT_K  # predict time: NMSWPredictor(nmsw_k=...) / NNUNET_MOE_NMSW_K override it
    tau = 2.0 / 3.0
    overlap = 0.5
    full_size: Optional[Tuple[int, ...]] = None  # None: from the plans' median image size
    global_downsampling = 3.0  # paper (WORD): the global net sees the whole volume at 1/3 resolution
    global_input_size: Optional[Tuple[int, ...]] = None  # None: full size / global_downsampling (see below)
    volumes_per_batch = 1
    dice_weight = 0.8
    ce_weight = 0.2
    entropy_weight = ENTROPY_WEIGHT
    enable_deep_supervision = True  # nnU-Net's output[0] / target[0] convention, one scale (module docstring)
    objectness_from = "auto"  # "features" (paper) where reachable, else "logits"; see NMSWNet
    straight_through = "standard"  # or "scaled" (paper: hard * soft)
    detach_global_in_aggregation = False  # True: authors' code
    local_backbone: Optional[str] = None  # one of our trainers (catalog) whose network is the local net; None: CNN
    global_backbone: Optional[str] = None  # the same for the global net

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        register_nmsw_trainer(cls.__name__)  # the predictor recognises NMSW results folders by name

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        # nnU-Net records the constructor's arguments by name: the signature must be exactly nnU-Net's
        super().__init__(plans, configuration, fold, dataset_json, device)
        # nnU-Net's __init__ sets 1000 x 250; a short-schedule subclass sets its own after this
        self.num_epochs = int(self.paper_num_epochs)
        self.num_iterations_per_epoch = int(self.paper_iterations_per_epoch)

    # ------------------------------------------------------------------ backbones
    @classmethod
    def backbone_trainer(cls, role: str):
        """The trainer class named by ``local_backbone`` / ``global_backbone`` (``role`` "local" / "global"),
        or None for the plans' CNN; ``ValueError`` for a name that is not one of our non-NMSW 3d_fullres trainers."""
        if role not in ("local", "global"):
            raise ValueError(f"role must be 'local' or 'global', got {role!r}")
        name = getattr(cls, f"{role}_backbone")
        if name is None:
            return None
        from nnunet_moe.training.catalog import our_trainer_class, trainer_names

        backbone = our_trainer_class(name)
        rule = (f"{cls.__name__}.{role}_backbone names one of our trainers whose build_network_architecture makes the "
                f"{role} network")
        if backbone is None:
            raise ValueError(f"{cls.__name__}.{role}_backbone={name!r} is not one of our trainers ({rule}; known: "
                             f"{', '.join(n for n in trainer_names() if 'NMSW' not in n)})")
        if issubclass(backbone, nnUNetTrainerNMSW):
            raise ValueError(f"{cls.__name__}.{role}_backbone={name!r} is an NMSW trainer; {rule}, not an NMSW-Net")
        if "3d_fullres" not in backbone.supported_configurations:
            raise ValueError(f"{cls.__name__}.{role}_backbone={name!r} supports {backbone.supported_configurations}, "
                             f"not 3d_fullres, which NMSW runs")
        return backbone

    @classmethod
    def backbone_divisor(cls, role: str, ndim: int, configuration_manager=None) -> Optional[Tuple[int, ...]]:
        """Per axis, what every input size of the ``role`` network must be a multiple of: the backbone's
        ``network_class.input_divisor()``, for the plans' CNN its total stride; None if unknown."""
        backbone = cls.backbone_trainer(role)
        if backbone is None:
            if configuration_manager is None:
                return None
            return stride_divisor(configuration_manager.network_arch_init_kwargs, ndim)
        network_class = getattr(backbone, "network_class", None)
        if network_class is None or not hasattr(network_class, "input_divisor"):
            return None
        divisor = network_class.input_divisor()
        divisor = (int(divisor),) * ndim if isinstance(divisor, int) else tuple(int(d) for d in divisor)
        if len(divisor) != ndim:
            raise ValueError(f"{backbone.__name__}: input divisor {divisor} does not have {ndim} axes")
        return divisor

    @classmethod
    def prepare_plans(cls, plans: dict, configuration: str):
        """The local backbone's patch-size rule (its ``prepare_plans``) for the NMSW patch; none for the CNN."""
        backbone = cls.backbone_trainer("local")
        if backbone is None:
            return super().prepare_plans(plans, configuration)
        try:
            plans, note = backbone.prepare_plans(plans, configuration)
        except ValueError as error:
            raise ValueError(f"{cls.__name__} (local_backbone {backbone.__name__}): {error}") from None
        return plans, (f"{cls.__name__} (local network of {backbone.__name__}): {note}" if note else "")

    @classmethod
    def _backbone_network(cls, role: str, plans_manager, configuration_manager, num_input_channels: int,
                          num_output_channels: int) -> Optional[torch.nn.Module]:
        backbone = cls.backbone_trainer(role)
        if backbone is None:
            return None
        return backbone.build_network_architecture(plans_manager, configuration_manager, num_input_channels,
                                                   num_output_channels, enable_deep_supervision=False)

    # ------------------------------------------------------------------ network
    @classmethod
    def build_local_network(cls, plans_manager, configuration_manager, num_input_channels: int,
                            num_output_channels: int) -> Optional[torch.nn.Module]:
        """Hook: the local (patch) network; default: ``local_backbone``'s network, None (the plans' CNN) when
        unset. It must map ``(N, C_in, *patch) -> (N, C, *patch)`` (a list/tuple output uses element 0)."""
        return cls._backbone_network("local", plans_manager, configuration_manager, num_input_channels,
                                     num_output_channels)

    @classmethod
    def build_global_network(cls, plans_manager, configuration_manager, num_input_channels: int,
                             num_output_channels: int) -> Optional[torch.nn.Module]:
        """Hook: the global network; default: ``global_backbone``'s network, None (the plans' CNN) when unset.
        It must map ``(N, C_in, *global_input_size) -> (N, C, *global_input_size)``."""
        return cls._backbone_network("global", plans_manager, configuration_manager, num_input_channels,
                                     num_output_channels)

    @classmethod
    def build_network_architecture(cls, plans_manager, configuration_manager, num_input_channels: int,
                                   num_output_channels: int, enable_deep_supervision: bool = True) -> NMSWNet:
        # enable_deep_supervision is ignored: NMSW-Net has no deep supervision. The predictor calls this
        # without dataset.json, so a minimal one with the right channel/class counts stands in for it
        # (region-based sets switch background masking off at run time, see initialize / the predictor).
        dataset_json = {"channel_names": {str(i): f"channel_{i}" for i in range(int(num_input_channels))},
                        "labels": {"background": 0, **{f"class_{i}": i for i in range(1, int(num_output_channels))}}}
        global_input_size = cls.nmsw_global_input_size(configuration_manager)
        cls._check_local_patch(configuration_manager)
        global_net = cls.build_global_network(plans_manager, configuration_manager, num_input_channels,
                                              num_output_channels)
        local_net = cls.build_local_network(plans_manager, configuration_manager, num_input_channels,
                                            num_output_channels)
        network = build_default_nmsw_from_plans(
            plans_manager, configuration_manager, dataset_json, global_input_size=global_input_size,
            k_train=cls.k_train, k_random=cls.k_random, k_infer=cls.k_infer, tau=cls.tau, overlap=cls.overlap,
            global_net=global_net, local_net=local_net, objectness_from=cls.objectness_from,
            straight_through=cls.straight_through, detach_global_in_aggregation=cls.detach_global_in_aggregation)
        if network.in_channels != num_input_channels or network.num_classes != num_output_channels:
            raise ValueError(f"{cls.__name__}: NMSW network built with {network.in_channels} input channels and "
                             f"{network.num_classes} outputs, expected {num_input_channels} and {num_output_channels} "
                             f"(cascaded configurations are not supported)")
        for net in (network.global_net, network.local_net):
            _freeze_unused_heads(net)
        adopt_loading_predictor(network, cls.__name__)  # nnUNetv2_predict: NMSW instead of the sliding window
        return network

    def initialize(self):
        super().initialize()
        if self.label_manager.has_regions:  # sigmoid outputs: no background channel to mask cells with
            unwrap_network(self.network).mask_background = False

    def set_deep_supervision_enabled(self, enabled: bool):
        """No-op: the plans' CNNs inside NMSW-Net keep their deep supervision off (nnU-Net calls this
        around training and validation; its own version would look for ``network.decoder``)."""

    def _get_deep_supervision_scales(self):
        """One scale, full resolution: nnU-Net's target list holds only the target of ``NMSWOutput[0]``."""
        return [[1.0] * len(self.configuration_manager.patch_size)]

    def _set_batch_size_and_oversample(self):
        super()._set_batch_size_and_oversample()
        self.batch_size = int(self.volumes_per_batch)

    @classmethod
    def nmsw_global_input_size(cls, configuration_manager) -> Tuple[int, ...]:
        """Global-network input: ``global_input_size`` if set, else the full size divided by
        ``global_downsampling`` and rounded up to the global network's input divisor (``downsampled_size``;
        the CNN's total stride or ``global_backbone``'s ``input_divisor()``). A set size that the divisor does
        not divide is a ``ValueError``."""
        patch = tuple(int(p) for p in configuration_manager.patch_size)
        divisor = cls.backbone_divisor("global", len(patch), configuration_manager)
        if cls.global_input_size is None:
            return downsampled_size(cls.full_size_from(configuration_manager), cls.global_downsampling, divisor)
        size = tuple(int(s) for s in cls.global_input_size)
        if len(size) != len(patch) or any(s < 1 for s in size):
            raise ValueError(f"{cls.__name__}.global_input_size {size} must have {len(patch)} positive axes")
        if divisor is not None and any(s % d for s, d in zip(size, divisor)):
            owner = cls.global_backbone or "the plans' CNN (total stride)"
            raise ValueError(f"{cls.__name__}.global_input_size {size} is not valid for the global network of "
                             f"{owner}: every axis must be a multiple of its input divisor {divisor}")
        return size

    @classmethod
    def _check_local_patch(cls, configuration_manager) -> None:
        """The NMSW patch must meet ``local_backbone``'s input divisor (its ``prepare_plans`` makes it so)."""
        if cls.local_backbone is None:
            return
        patch = tuple(int(p) for p in configuration_manager.patch_size)
        divisor = cls.backbone_divisor("local", len(patch))
        if divisor is not None and any(p % d for p, d in zip(patch, divisor)):
            raise ValueError(f"{cls.__name__}: patch size {list(patch)} is not valid for the local network of "
                             f"{cls.local_backbone}: every axis must be a multiple of its input divisor {divisor} "
                             f"({cls.__name__}.prepare_plans rounds the plans' patch to it; these plans were not "
                             f"prepared by it)")

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
        return self.full_size_from(self._plans_configuration(), self.full_size)

    @contextlib.contextmanager
    def _sample_size(self, size: Sequence[int]):
        """nnU-Net's data pipeline reads its sample size from ``configuration_manager.patch_size``: for the
        block, that is ``size`` (the plans and the network keep the real patch)."""
        plans_configuration = self.configuration_manager
        configuration = copy.deepcopy(plans_configuration.configuration)
        configuration["patch_size"] = [int(s) for s in size]
        self.configuration_manager = ConfigurationManager(configuration)
        try:
            yield
        finally:
            self.configuration_manager = plans_configuration

    def _plans_configuration(self):
        return self.plans_manager.get_configuration(self.configuration_name)

    def configure_rotation_dummyDA_mirroring_and_inital_patch_size(self):
        plans_configuration = self._plans_configuration()
        with self._sample_size(plans_configuration.patch_size):  # rotation, dummy 2D, mirroring: the plans' patch
            rotation, dummy_2d, _, mirror_axes = super().configure_rotation_dummyDA_mirroring_and_inital_patch_size()
        full = self.nmsw_full_size()
        # nnU-Net's rule for the larger pre-rotation crop, applied to the full size instead of the patch
        initial = get_patch_size(full, rotation, rotation, rotation, (0.85, 1.25))
        if dummy_2d:
            initial[0] = full[0]
        return rotation, dummy_2d, initial, mirror_axes

    def get_dataloaders(self):
        full = self.nmsw_full_size()
        self.print_to_log_file(f"NMSW: whole-volume samples of size {list(full)} (patch "
                               f"{self.configuration_manager.patch_size}, batch {self.batch_size} volume(s))")
        with self._sample_size(full):
            return super().get_dataloaders()

    # ------------------------------------------------------------------ loss
    def _build_loss(self):
        """:class:`NMSWLoss` around nnU-Net's own Dice+CE term, reweighted (Dice 0.8, CE 0.2)."""
        term = super()._build_loss()
        term = getattr(term, "loss", term)  # NMSWLoss takes the one full-size target itself: no scale wrapper
        term.weight_dice, term.weight_ce = self.dice_weight, self.ce_weight
        return NMSWLoss(term, unwrap_network(self.network), self.entropy_weight)

    # ------------------------------------------------------------------ final validation
    def perform_actual_validation(self, save_probabilities: bool = False):
        """nnU-Net's, with :class:`~nnunet_moe.inference.nmsw_predictor.NMSWPredictor` as its predictor."""
        from nnunetv2.training.nnUNetTrainer import nnUNetTrainer as nnunet_trainer_module

        with validation_predictors(nnunet_trainer_module):
            super().perform_actual_validation(save_probabilities)


def _freeze_unused_heads(net: nn.Module) -> None:
    """With deep supervision off, the lower-resolution output heads never get a gradient, which DDP (no
    ``find_unused_parameters``) waits for: freeze them (same training, same state dict). Known layouts:
    dynamic-network-architectures' ``decoder.seg_layers[:-1]`` and our Swin networks' ``decoder.heads``."""
    decoder = getattr(net, "decoder", None)
    if getattr(decoder, "deep_supervision", True) is not False:
        return
    seg_layers = getattr(decoder, "seg_layers", None)
    if isinstance(seg_layers, nn.ModuleList):
        for head in list(seg_layers)[:-1]:
            head.requires_grad_(False)
    heads = getattr(decoder, "heads", None)
    if isinstance(heads, nn.ModuleList):
        heads.requires_grad_(False)


register_nmsw_trainer(nnUNetTrainerNMSW.__name__)


class nnUNetTrainerNMSWSwinSMT(nnUNetTrainerNMSW):
    """NMSW-Net with a Swin SMT local network (``nnUNetTrainerSwinSMTSmall``'s: feature size 24, 8 experts;
    the NMSW patch is the plans' patch rounded to Swin's divisor 32, e.g. 40x56x40 -> 32x64x32) and the
    plans' CNN as the global network (objectness from its features). Class attributes only."""

    paper = "NMSW (Jeon et al.) with a Swin SMT local network (CPU-sized: feature size 24, 8 experts)"
    local_backbone = "nnUNetTrainerSwinSMTSmall"


# One variant per NMSW option where the paper, the authors' code and ours differ, so that each can be trained with
# the stock nnUNetv2_train and compared on the same data (``nmsw_trained --variants``). Class attributes only.
class nnUNetTrainerNMSWLogitsObjectness(nnUNetTrainerNMSW):
    """Objectness from a head on the global network's softmax (ours before the paper's penultimate features)."""

    paper = "NMSW (Jeon et al.), objectness from the global logits instead of its features (option comparison)"
    objectness_from = "logits"


class nnUNetTrainerNMSWScaledST(nnUNetTrainerNMSW):
    """The paper's straight-through estimator: the selected patch scaled by its soft weight (``hard * soft``)."""

    paper = "NMSW (Jeon et al.), straight-through scaled by the soft selection weight, as the paper (option comparison)"
    straight_through = "scaled"


class nnUNetTrainerNMSWDetachGlobal(nnUNetTrainerNMSW):
    """The authors' code: the aggregation blends detached global logits (no gradient to the global net from it)."""

    paper = "NMSW (Jeon et al.), detached global logits in the aggregation, as the authors' code (option comparison)"
    detach_global_in_aggregation = True
