"""``nnUNetTrainerM4oE``: M4oE (Swin-Unet, one expert per modality) on a merged multi-dataset, 2D.

Paper: Jiang et al., "M4oE: A Foundation Model for Medical Multimodal Image Segmentation with Mixture of
Experts", MICCAI 2024. Network: :class:`nnunet_moe.networks.m4oe.M4oESwinUnet`; data: a dataset made by
``nnunet-moe merge-datasets`` (:mod:`nnunet_moe.datasets`), planned and preprocessed by nnU-Net.

What changes against nnU-Net's default trainer (everything else is nnU-Net's):

- configurations: ``2d`` only (the paper's model is 2D);
- network: Swin-Unet (embed 96, depths 2/2/2/2, heads 3/6/12/24, window 7, patch 4) whose 14 block MLPs
  are M4oE layers with one expert per modality of the merge record (expert ``i`` = modality
  ``modality_order(record)[i]``, CT before MR); the list of modalities is written into the plans
  (``datasets.metadata.PLANS_KEY``), which nnU-Net saves with the model, so the predictor rebuilds the same network. A plain
  (non-merged) dataset is one modality with every case annotated for every label: one expert, i.e.
  Swin-Unet's dense MLPs (logged);
- gate ``gate = "experts"`` (paper, Eq. 2: softmax over experts from the token itself): needs no modality,
  so the stock ``nnUNetv2_predict`` segments a new image without being told its source.
  ``nnUNetTrainerM4oEModalityGate`` (``"modality"``) conditions the gate on the case's modality, looked up
  from ``batch['keys']`` in training and from the case id in the final validation; the stock predictor
  cannot give it, so that model predicts only with a caller that passes ``modality``;
- loss: nnU-Net's Dice + CE and deep supervision (outputs at 1, 1/4, 1/8, 1/16) with partial labels
  (:mod:`nnunet_moe.training.partial_labels`): ``partial_label_mode = "marginal"`` (each sample's
  unannotated classes merged into background); ``nnUNetTrainerM4oESelect`` is the paper's selection of
  the annotated classes. Default "marginal": it keeps one softmax over all classes (what the stock
  predictor's argmax uses) and does not tell the annotated classes apart from the unannotated ones
  beyond that merge; the two were not compared on data yet (unmeasured);
- optimiser: AdamW (paper), weight decay 1e-4 (paper), lr 1e-4 (not given in the paper), 10 % warm-up
  then cosine; nnU-Net's batch size (the paper's is 36);
- final validation: nnU-Net's, then Dice per source dataset with each case scored only on its source's
  labels (:mod:`nnunet_moe.datasets.evaluation`) in ``validation/summary_per_source.json`` and the log.

``nnUNetTrainerM4oESmall``: embed 24 instead of 96, CPU-sized (tests, demos).

Stage 2 of the paper: ``NNUNET_MOE_M4OE_MAE_WEIGHTS=/path/to/checkpoint`` loads the MAE-pretrained
encoder and experts (``nnUNetTrainerM4oEPretrain``, :mod:`nnunet_moe.pretrained.m4oe_mae_weights`; load
report in the log) before fine-tuning; unset: from scratch. Ignored when resuming (``--c``).
"""
from __future__ import annotations

import json
import os

import torch
from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper

from nnunet_moe.datasets.evaluation import (SUMMARY_NAME, case_dice_from_nnunet_summary, format_per_source,
                                            per_source_dice)
from nnunet_moe.datasets.metadata import MERGE_KEY, expert_modalities
from nnunet_moe.networks.m4oe import M4oESwinUnet
from nnunet_moe.networks.modality_keyword import ModalityKeyword
from nnunet_moe.pretrained import m4oe_mae_weights
from nnunet_moe.pretrained.m4oe_mae_weights import WEIGHTS_ENV as MAE_WEIGHTS_ENV
from nnunet_moe.training.base import nnUNetMoETrainerBase
from nnunet_moe.training.partial_labels import CaseAnnotations, PartialLabelDCandCELoss



class nnUNetTrainerM4oE(nnUNetMoETrainerBase):
    paper = "M4oE: Swin-Unet with one expert per modality, gated, partial labels (Jiang et al., MICCAI 2024)"
    supported_configurations = ("2d",)
    network_class = M4oESwinUnet
    initial_lr = 1e-4
    weight_decay = 1e-4
    gate = "experts"
    partial_label_mode = "marginal"
    embed_dim, num_heads = 96, (3, 6, 12, 24)  # Swin-Unet's; stage widths 96, 192, 384, 768

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        self.cases = CaseAnnotations(dataset_json)
        plans = self.cases.plans_with_experts(plans)
        super().__init__(plans, configuration, fold, dataset_json, device)
        self._partial_loss = None
        self._modality = None  # networks.modality_keyword.ModalityKeyword, made with the network
        self.print_to_log_file(self._describe(), also_print_to_console=True)

    @property
    def needs_modality(self) -> bool:
        return self.gate in ("modality", "onehot") and self.cases.num_modalities > 1

    def _describe(self) -> str:
        name = type(self).__name__
        if not self.cases.merged:
            return (f"{name}: {self.plans_manager.dataset_name} is not a merged dataset (no '{MERGE_KEY}' in "
                    f"dataset.json): one modality, every case annotated for every label -> 1 expert, i.e. "
                    f"Swin-Unet's dense MLPs. Merge datasets of several modalities with `nnunet-moe "
                    f"merge-datasets` to train M4oE proper.")
        sources = ", ".join(f"{k} {s['dataset']} {s['modality']}" for k, s in self.cases.meta["sources"].items())
        if self.cases.num_modalities == 1:
            return (f"{name}: merged dataset of one modality ({self.cases.modalities[0]}; sources {sources}) -> 1 "
                    f"expert, i.e. Swin-Unet's dense MLPs; partial-label loss {self.partial_label_mode!r}")
        return (f"{name}: {self.cases.num_modalities} experts per M4oE layer, one per modality "
                f"({', '.join(self.cases.modalities)}; sources {sources}); gate {self.gate!r}; partial-label loss "
                f"{self.partial_label_mode!r}")

    @classmethod
    def build_network_architecture(cls, plans_manager, configuration_manager, num_input_channels: int,
                                   num_output_channels: int, enable_deep_supervision: bool = True) -> torch.nn.Module:
        modalities = expert_modalities(plans_manager.plans)
        # The deep-supervision heads always exist, so training and inference checkpoints have the same keys.
        net = cls.network_class(num_input_channels, num_output_channels, num_experts=len(modalities), gate=cls.gate,
                                embed_dim=cls.embed_dim, num_heads=cls.num_heads,
                                spatial_dims=len(configuration_manager.patch_size), deep_supervision=True)
        net.decoder.deep_supervision = enable_deep_supervision
        return net

    def initialize(self):
        super().initialize()
        self.load_mae_weights_from_env()

    def load_mae_weights_from_env(self):
        """Stage 2: ``$NNUNET_MOE_M4OE_MAE_WEIGHTS`` into the network (report in the log), or a log line saying
        the run starts from scratch; nothing when resuming (the weights come from nnU-Net's checkpoint)."""
        path = os.environ.get(MAE_WEIGHTS_ENV)
        if self._resuming:
            return None
        if path:
            modalities = self.cases.modalities if self.cases.merged else None  # the file's expert order must match
            return self.load_weights_from_env(
                MAE_WEIGHTS_ENV, path, lambda network, file: m4oe_mae_weights.load_m4oe_mae_weights(
                    network, file, modalities=modalities))
        self.print_to_log_file(f"{MAE_WEIGHTS_ENV} is not set: training from scratch (no MAE-pretrained "
                               f"experts; stage 1 is nnUNetTrainerM4oEPretrain).", also_print_to_console=True)

    def _set_modality(self, value) -> None:
        """The modality (expert indices) nnU-Net's ``network(data)`` calls get as a keyword; None: none."""
        if self._modality is None:
            self._modality = ModalityKeyword(self.network)
        self._modality.set(value)

    def _build_loss(self):
        loss = super()._build_loss()  # nnU-Net's DC_and_CE_loss, in its DeepSupervisionWrapper
        if self.label_manager.has_regions and not self.cases.merged:
            return loss  # nothing is partially annotated; regions have their own loss
        wrapped = isinstance(loss, DeepSupervisionWrapper)
        self._partial_loss = PartialLabelDCandCELoss(loss.loss if wrapped else loss, self.partial_label_mode)
        if wrapped:
            loss.loss = self._partial_loss
            return loss
        return self._partial_loss

    def _use_batch_cases(self, batch: dict) -> None:
        """The annotated classes (loss) and modalities (network) of the batch's cases, from ``batch['keys']``."""
        keys = batch.get("keys")
        if self._partial_loss is not None:
            self._partial_loss.annotated = self.cases.annotated(keys)
        self._set_modality(self.cases.modality(keys) if self.needs_modality else None)

    def train_step(self, batch: dict) -> dict:
        self._use_batch_cases(batch)
        return super().train_step(batch)

    def validation_step(self, batch: dict) -> dict:
        self._use_batch_cases(batch)
        return super().validation_step(batch)

    def perform_actual_validation(self, save_probabilities: bool = False):
        if self._partial_loss is not None:
            self._partial_loss.annotated = None
        original = self.dataset_class
        if self.needs_modality and original is not None:
            trainer = self

            class _CaseModality(original):  # nnU-Net loads each validation case right before predicting it
                def load_case(self, identifier):
                    trainer._set_modality(trainer.cases.modality([identifier]))
                    return super().load_case(identifier)

            self.dataset_class = _CaseModality
        try:
            super().perform_actual_validation(save_probabilities)
        finally:
            self.dataset_class = original
            self._set_modality(None)
        if self.local_rank == 0 and self.cases.merged:
            self.write_per_source_summary()

    def write_per_source_summary(self) -> dict:
        """Dice per source of the final validation, sorted from nnU-Net's ``validation/summary.json``:
        ``validation/summary_per_source.json`` and one log line each."""
        folder = os.path.join(self.output_folder, "validation")
        _, val_keys = self.do_split()
        with open(os.path.join(folder, "summary.json")) as f:
            case_dice = case_dice_from_nnunet_summary(json.load(f), self.dataset_json["file_ending"], set(val_keys))
        summary = per_source_dice(case_dice, self.dataset_json)
        with open(os.path.join(folder, SUMMARY_NAME), "w") as f:
            json.dump(summary, f, indent=2)
        for line in format_per_source(summary):
            self.print_to_log_file(line, also_print_to_console=True)
        return summary


class nnUNetTrainerM4oESelect(nnUNetTrainerM4oE):
    """The paper's partial labels: only background and each sample's annotated classes compete."""

    paper = "M4oE, partial labels by selecting each sample's annotated classes (paper) (Jiang et al., MICCAI 2024)"
    partial_label_mode = "select"


class nnUNetTrainerM4oEModalityGate(nnUNetTrainerM4oE):
    """Gate conditioned on the case's modality; the stock nnUNetv2_predict cannot pass it (module docstring)."""

    paper = "M4oE, gate conditioned on the case's modality (ours; stock predict cannot use it) (Jiang et al.)"
    gate = "modality"


class nnUNetTrainerM4oESmall(nnUNetTrainerM4oE):
    """Embed 24 instead of 96 (about 16x fewer parameters): a CPU-sized variant (tests, demos)."""

    paper = "M4oE, CPU-sized: embed 24 (stage widths 24-192) (tests and demos) (Jiang et al., MICCAI 2024)"
    embed_dim, num_heads = 24, (1, 2, 4, 8)  # as nnUNetTrainerM4oEPretrainSmall, whose weights it loads


class nnUNetTrainerM4oESelectSmall(nnUNetTrainerM4oESmall):
    """``nnUNetTrainerM4oESmall`` with the paper's selection of annotated classes (CPU-sized comparisons)."""

    paper = "M4oE, CPU-sized (embed 24), partial labels by selection (paper) (Jiang et al., MICCAI 2024)"
    partial_label_mode = "select"
