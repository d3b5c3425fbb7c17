"""Partial labels: nnU-Net's Dice + CE for cases annotated for only some of the union classes (M4oE).

Reference: Jiang et al., "M4oE: A Foundation Model for Medical Multimodal Image Segmentation with Mixture
of Experts", MICCAI 2024, Sec. 2 ("Dynamic Selection for Linear Projection Head": each sample keeps only
the logits of the classes its dataset has).

A merged dataset (``nnunet-moe merge-datasets``) records, per case, the union labels its source annotates.
In every other class that case's background means "not annotated", not "absent"; nnU-Net's ``ignore``
label cannot say this (it masks whole voxels). :class:`PartialLabelDCandCELoss` takes a per-sample mask
``annotated`` ``(B, C)`` (background always True) and has two modes:

- ``"marginal"``: softmax over all C classes; each sample's unannotated classes' probabilities are summed
  into background, CE and Dice are computed on that merged distribution, and the Dice terms of the
  unannotated classes are left out for that sample. Moving probability between background and an
  unannotated class changes nothing, so the network is never taught that the class is background; it
  still learns that class from the sources that annotate it, and the one softmax serves them all.
- ``"select"`` (the paper's): only background and the annotated classes compete: the unannotated logits
  are masked out of the softmax (their gradient is exactly 0) and their Dice terms left out.

With every class annotated both are nnU-Net's ``DC_and_CE_loss`` with ``MemoryEfficientSoftDiceLoss``
(the trainer's: soft Dice, ``batch_dice`` from the plans, ``do_bg=False``, smooth 1e-5, CE weight and
Dice weight, ignore label, DDP gathering): its parameters are read from nnU-Net's loss object. nnU-Net's
``DeepSupervisionWrapper`` wraps it unchanged (the mask is the same at every scale).

Batch Dice with a mask: sample ``b`` contributes to class ``c``'s intersection/prediction/ground-truth
sums only if it annotates ``c``; a class no sample of the (DDP-gathered) batch annotates is left out of
the mean (it would add a constant 1 and dilute the others). Per-sample Dice: the mean over the
annotated (sample, class) pairs.

:class:`CaseAnnotations` turns ``batch['keys']`` (nnU-Net's case identifiers) into that mask and into
each sample's modality (expert) index, from the merge record in ``dataset.json``.
"""
from __future__ import annotations

import copy

import torch
from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
from nnunetv2.utilities.ddp_allgather import AllGatherGrad
from torch import nn

from nnunet_moe.datasets.metadata import MERGE_KEY, PLANS_KEY, case_record, merge_metadata, modality_order

__all__ = ["PARTIAL_LABEL_MODES", "PartialLabelDCandCELoss", "CaseAnnotations"]

PARTIAL_LABEL_MODES = ("marginal", "select")
class CaseAnnotations:
    """Per case: which union classes it annotates and which expert its modality is.

    ``dataset_json`` without a merge record: one modality, every case annotated for every class
    (``merged`` False; :meth:`annotated` and :meth:`modality` then need no keys).
    """

    def __init__(self, dataset_json: dict, where: str = "dataset.json"):
        self.merged = MERGE_KEY in dataset_json
        labels = dataset_json["labels"]
        if any(isinstance(v, (list, tuple)) for v in labels.values()):
            if self.merged:
                raise ValueError(f"{where}: region-based labels ({labels}) cannot be partially annotated; a "
                                 f"merged dataset has plain integer labels. Merge the sources again.")
        self.label_values = {name: int(v) for name, v in labels.items()
                             if not isinstance(v, (list, tuple)) and name != "ignore"}
        self.num_classes = max(self.label_values.values()) + 1
        self.meta = merge_metadata(dataset_json, where) if self.merged else None
        self.modalities = modality_order(self.meta) if self.merged else ["(single)"]
        self._rows: dict[str, tuple[list[bool], int]] = {}

    @property
    def num_modalities(self) -> int:
        return len(self.modalities)

    def plans_with_experts(self, plans: dict) -> dict:
        """A copy of ``plans`` recording this dataset's experts (:func:`expert_modalities` reads them back)."""
        plans = copy.deepcopy(plans)
        plans[PLANS_KEY] = {"modalities": self.modalities if self.merged else []}
        return plans

    def _row(self, key: str):
        if key not in self._rows:
            record = case_record(self.meta, key)
            row = [False] * self.num_classes
            row[0] = True
            for name in record["labels"]:
                if name not in self.label_values:
                    raise ValueError(f"case {key!r} is recorded with label {name!r}, which dataset.json's 'labels' "
                                     f"({', '.join(self.label_values)}) do not have: the merge record is damaged; "
                                     f"merge the sources again with `nnunet-moe merge-datasets`.")
                row[self.label_values[name]] = True
            self._rows[key] = (row, self.modalities.index(record["modality"]))
        return self._rows[key]

    def _need_keys(self, keys):
        if keys is None:
            raise ValueError("a merged dataset's batch must carry nnU-Net's case identifiers (batch['keys']) so "
                             "that each sample's annotated labels and modality can be looked up.")

    def annotated(self, keys, batch_size: int | None = None) -> torch.Tensor | None:
        """``(B, C)`` bool mask of the classes each case annotates; None (all) for a plain dataset."""
        if not self.merged:
            return None
        self._need_keys(keys)
        return torch.tensor([self._row(str(k))[0] for k in keys], dtype=torch.bool)

    def modality(self, keys) -> torch.Tensor | None:
        """``(B,)`` expert index of each case's modality; None for a plain dataset."""
        if not self.merged:
            return None
        self._need_keys(keys)
        return torch.tensor([self._row(str(k))[1] for k in keys], dtype=torch.long)


class PartialLabelDCandCELoss(nn.Module):
    """nnU-Net's Dice + CE with each sample's unannotated classes carrying no signal (module docstring).

    Args:
        base: the ``DC_and_CE_loss`` nnU-Net's ``_build_loss`` made (weights, ignore label and the Dice's
            ``batch_dice``/``do_bg``/``smooth``/``ddp`` are taken from it).
        mode: ``"marginal"`` or ``"select"``.

    Set :attr:`annotated` (``(B, C)`` bool, or None = every class) before each forward; the trainer does.
    """

    def __init__(self, base: DC_and_CE_loss, mode: str = "marginal"):
        super().__init__()
        if mode not in PARTIAL_LABEL_MODES:
            raise ValueError(f"partial_label_mode must be one of {', '.join(PARTIAL_LABEL_MODES)}, got {mode!r}")
        if not isinstance(base, DC_and_CE_loss):
            raise TypeError(f"partial labels build on nnU-Net's DC_and_CE_loss (softmax labels), got "
                            f"{type(base).__name__}; region-based training is not supported with partial labels.")
        self.mode = mode
        self.weight_ce, self.weight_dice, self.ignore_label = base.weight_ce, base.weight_dice, base.ignore_label
        dc = getattr(base.dc, "_orig_mod", base.dc)  # nnU-Net may have torch.compile'd it
        self.batch_dice, self.do_bg, self.smooth = dc.batch_dice, dc.do_bg, dc.smooth
        self.ddp = getattr(dc, "ddp", False)
        self.annotated: torch.Tensor | None = None

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}, batch_dice={self.batch_dice}, do_bg={self.do_bg}"

    def _mask(self, net_output: torch.Tensor) -> torch.Tensor:
        b, c = net_output.shape[:2]
        if self.annotated is None:
            return torch.ones(b, c, dtype=torch.bool, device=net_output.device)
        if tuple(self.annotated.shape) != (b, c):
            raise ValueError(f"annotated mask of shape {tuple(self.annotated.shape)} for a network output of "
                             f"{b} samples x {c} classes; it must be ({b}, {c})")
        mask = self.annotated.to(net_output.device, torch.bool).clone()
        mask[:, 0] = True  # background is always a valid answer
        return mask

    def forward(self, net_output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        mask = self._mask(net_output)
        view = mask.view(mask.shape + (1,) * (net_output.ndim - 2))
        target = target.long()
        valid = None
        if self.ignore_label is not None:
            valid = target != self.ignore_label
            target = torch.where(valid, target, 0)
        # a voxel labelled with a class its sample does not annotate cannot come from a merged case; count it
        # as background rather than as an impossible target
        labelled = mask.gather(1, target.flatten(1)).view_as(target)
        target = torch.where(labelled, target, 0)

        if self.mode == "select":
            logits = net_output.masked_fill(~view, float("-inf"))
            log_probs, probs = torch.log_softmax(logits, 1), torch.softmax(logits, 1)
        else:
            log_p = torch.log_softmax(net_output, 1)
            merge_into_bg = ~view
            merge_into_bg[:, 0] = True
            log_bg = torch.logsumexp(log_p.masked_fill(~merge_into_bg, float("-inf")), 1, keepdim=True)
            log_probs = torch.cat([log_bg, log_p[:, 1:].masked_fill(~view[:, 1:], float("-inf"))], 1)
            probs = torch.softmax(net_output, 1)  # foreground columns: the merged distribution's (bg is not in Dice)
            if self.do_bg:
                probs = torch.cat([log_bg.exp(), probs[:, 1:]], 1)

        dc = self._dice(probs, target, mask, valid) if self.weight_dice != 0 else 0
        if self.weight_ce != 0 and (valid is None or valid.any()):
            ce_target = target[:, 0] if valid is None else torch.where(valid[:, 0], target[:, 0], -100)
            ce = nn.functional.nll_loss(log_probs, ce_target, ignore_index=-100)
        else:
            ce = 0
        return self.weight_ce * ce + self.weight_dice * dc

    def _dice(self, probs, target, mask, valid) -> torch.Tensor:
        """nnU-Net's ``MemoryEfficientSoftDiceLoss`` with per-sample class mask ``mask`` ``(B, C)``."""
        axes = tuple(range(2, probs.ndim))
        with torch.no_grad():
            onehot = torch.zeros(probs.shape, device=probs.device, dtype=torch.float32).scatter_(1, target, 1)
        if not self.do_bg:
            onehot, probs, mask = onehot[:, 1:], probs[:, 1:], mask[:, 1:]
        if valid is not None:
            onehot, probs = onehot * valid, probs * valid
        weight = mask.to(torch.float32)
        intersect = (probs * onehot).sum(axes, dtype=torch.float32) * weight
        sum_pred = probs.sum(axes, dtype=torch.float32) * weight
        sum_gt = onehot.sum(axes, dtype=torch.float32) * weight
        if self.batch_dice:
            if self.ddp:
                intersect, sum_pred, sum_gt, weight = (AllGatherGrad.apply(t).sum(0, dtype=torch.float32)
                                                       for t in (intersect, sum_pred, sum_gt, weight))
            intersect, sum_pred, sum_gt, weight = (t.sum(0, dtype=torch.float32)
                                                   for t in (intersect, sum_pred, sum_gt, weight))
            weight = (weight > 0).to(torch.float32)  # classes at least one sample annotates
        dc = (2 * intersect + self.smooth) / (sum_gt + sum_pred + float(self.smooth)).clamp_min(1e-8)
        return -(dc * weight).sum() / weight.sum().clamp_min(1)
