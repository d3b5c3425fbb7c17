"""Partial-label Dice + CE (``nnunet_moe.training.partial_labels``): hand-computed values, no "push towards
background" for unannotated classes, and exactly nnU-Net's loss when every class is annotated."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss

from nnunet_moe.datasets.metadata import MERGE_KEY
from nnunet_moe.training.partial_labels import CaseAnnotations, PartialLabelDCandCELoss

SMOOTH = 1e-5


def nnunet_loss(batch_dice=True, ignore_label=None, weight_ce=1.0, weight_dice=1.0):
    """The loss nnU-Net's ``nnUNetTrainer._build_loss`` makes for softmax labels."""
    return DC_and_CE_loss({"batch_dice": batch_dice, "smooth": SMOOTH, "do_bg": False, "ddp": False}, {},
                          weight_ce=weight_ce, weight_dice=weight_dice, ignore_label=ignore_label,
                          dice_class=MemoryEfficientSoftDiceLoss)


# One sample, classes (background, A, U), four voxels; U is not annotated for this sample.
# Probabilities per voxel (bg, A, U) and the reference label (0 = background, 1 = A):
PROBS = [(0.5, 0.2, 0.3), (0.2, 0.6, 0.2), (0.1, 0.1, 0.8), (0.25, 0.5, 0.25)]
TARGET = [0, 1, 0, 1]
ANNOTATED = torch.tensor([[True, True, False]])


def tiny(probs=PROBS):
    logits = torch.tensor(probs).log().T.reshape(1, 3, 4, 1).clone().requires_grad_(True)  # softmax(log p) = p
    return logits, torch.tensor(TARGET, dtype=torch.float32).reshape(1, 1, 4, 1)


def value_and_grad(loss, logits, target):
    value = loss(logits, target)
    (grad,) = torch.autograd.grad(value, logits)
    return value.item(), grad[0, :, :, 0].T  # grad per voxel: (4, 3)


@pytest.mark.parametrize("batch_dice", [True, False])
def test_marginal_by_hand(batch_dice):
    loss = PartialLabelDCandCELoss(nnunet_loss(batch_dice), "marginal")
    loss.annotated = ANNOTATED
    logits, target = tiny()
    # merged background = p_bg + p_U: voxel 1: 0.8, voxel 3: 0.9; A keeps 0.6 and 0.5 on its voxels
    ce = -(math.log(0.8) + math.log(0.6) + math.log(0.9) + math.log(0.5)) / 4
    # soft Dice of A only (U left out): intersection 0.6 + 0.5, predicted 0.2 + 0.6 + 0.1 + 0.5, reference 2
    dice_a = (2 * 1.1 + SMOOTH) / (2 + 1.4 + SMOOTH)
    assert loss(logits, target).item() == pytest.approx(ce - dice_a, abs=1e-6)  # -0.2639406
    # nnU-Net's own loss on the same tensors teaches "U is background" on voxel 3 and scores U's Dice
    assert nnunet_loss(batch_dice)(logits, target).item() > ce - dice_a + 0.3


@pytest.mark.parametrize("batch_dice", [True, False])
def test_select_by_hand(batch_dice):
    loss = PartialLabelDCandCELoss(nnunet_loss(batch_dice), "select")
    loss.annotated = ANNOTATED
    logits, target = tiny()
    # softmax over (bg, A) only: (5/7, 2/7), (1/4, 3/4), (1/2, 1/2), (1/3, 2/3)
    ce = -(math.log(5 / 7) + math.log(3 / 4) + math.log(1 / 2) + math.log(2 / 3)) / 4
    intersection, predicted = 3 / 4 + 2 / 3, 2 / 7 + 3 / 4 + 1 / 2 + 2 / 3
    dice_a = (2 * intersection + SMOOTH) / (2 + predicted + SMOOTH)
    assert loss(logits, target).item() == pytest.approx(ce - dice_a, abs=1e-6)  # -0.2435301


def test_marginal_does_not_push_unannotated_class_towards_background():
    loss = PartialLabelDCandCELoss(nnunet_loss(), "marginal")
    loss.annotated = ANNOTATED
    logits, target = tiny()
    value, grad = value_and_grad(loss, logits, target)
    # moving probability between background and U (voxel 3, labelled background) changes nothing
    moved = [PROBS[0], PROBS[1], (0.8, 0.1, 0.1), PROBS[3]]
    moved_logits, _ = tiny(moved)
    assert loss(moved_logits, target).item() == pytest.approx(value, abs=1e-7)
    # the gradient treats U exactly like background: dL/dz_U / p_U == dL/dz_bg / p_bg at every voxel
    p = torch.tensor(PROBS)
    torch.testing.assert_close(grad[:, 2] / p[:, 2], grad[:, 0] / p[:, 0], rtol=1e-5, atol=1e-7)
    # nnU-Net's loss pushes U down on its background voxels (what the partial loss must not do)
    plain_value, plain_grad = value_and_grad(nnunet_loss(), logits, target)
    assert nnunet_loss()(moved_logits, target).item() < plain_value - 0.1
    assert plain_grad[2, 2] / p[2, 2] > plain_grad[2, 0] / p[2, 0] + 0.1


def test_select_gives_unannotated_logits_no_gradient():
    loss = PartialLabelDCandCELoss(nnunet_loss(), "select")
    loss.annotated = ANNOTATED
    logits, target = tiny()
    value, grad = value_and_grad(loss, logits, target)
    assert torch.equal(grad[:, 2], torch.zeros(4)) and grad[:, :2].abs().min() > 0
    changed = logits.detach().clone()
    changed[0, 2] += torch.tensor([5.0, -3.0, 10.0, 1.0])[:, None]
    assert loss(changed, target).item() == value


def reference_loss(logits, target, annotated, mode, batch_dice):
    """The partial-label loss written out voxel by voxel (NumPy, no shared code)."""
    x, y, ann = logits.detach().double().numpy(), target[:, 0].long().numpy(), annotated.numpy().copy()
    ann[:, 0] = True
    b, c = x.shape[:2]
    x, y = x.reshape(b, c, -1), y.reshape(b, -1)
    p = np.exp(x - x.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    if mode == "select":
        p = np.where(ann[:, :, None], p, 0)
        p /= p.sum(1, keepdims=True)
    q = np.where(ann[:, :, None], p, 0)
    q[:, 0] = p[:, 0] + (p * ~ann[:, :, None])[:, 1:].sum(1) if mode == "marginal" else p[:, 0]
    ce = -np.mean([np.log(q[i, y[i, v], v]) for i in range(b) for v in range(y.shape[1])])
    terms = {}
    for k in range(1, c):
        for i in range(b):
            if ann[i, k]:
                key = k if batch_dice else (i, k)
                tp, pred, gt = terms.get(key, (0.0, 0.0, 0.0))
                terms[key] = (tp + (q[i, k] * (y[i] == k)).sum(), pred + q[i, k].sum(), gt + (y[i] == k).sum())
    dice = np.mean([(2 * tp + SMOOTH) / (gt + pred + SMOOTH) for tp, pred, gt in terms.values()])
    return ce - dice


@pytest.mark.parametrize("mode", ["marginal", "select"])
@pytest.mark.parametrize("batch_dice", [True, False])
def test_batch_of_differently_annotated_samples(mode, batch_dice):
    torch.manual_seed(0)
    logits = torch.randn(3, 4, 5, 6)
    annotated = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 0], [1, 0, 1, 0]], dtype=torch.bool)  # class 3: nobody
    target = torch.randint(0, 4, (3, 1, 5, 6))
    target = torch.where(annotated.gather(1, target.flatten(1)).view_as(target), target, 0).float()
    loss = PartialLabelDCandCELoss(nnunet_loss(batch_dice), mode)
    loss.annotated = annotated
    assert loss(logits, target).item() == pytest.approx(reference_loss(logits, target, annotated, mode, batch_dice),
                                                        abs=1e-5)


@pytest.mark.parametrize("mode", ["marginal", "select"])
@pytest.mark.parametrize("batch_dice,ignore_label,weights", [(True, None, (1, 1)), (False, None, (1, 1)),
                                                             (True, 4, (1, 1)), (False, None, (0.4, 0.7))])
def test_every_class_annotated_is_nnunets_loss_exactly(mode, batch_dice, ignore_label, weights):
    torch.manual_seed(1)
    logits = torch.randn(2, 4, 6, 7, requires_grad=True)
    target = torch.randint(0, 5 if ignore_label else 4, (2, 1, 6, 7)).float()
    base = nnunet_loss(batch_dice, ignore_label, *weights)
    ours = PartialLabelDCandCELoss(base, mode)
    for annotated in (None, torch.ones(2, 4, dtype=torch.bool)):
        ours.annotated = annotated
        expected, value = base(logits, target), ours(logits, target)
        assert value.item() == expected.item()
        torch.testing.assert_close(torch.autograd.grad(value, logits)[0], torch.autograd.grad(expected, logits)[0],
                                   rtol=1e-5, atol=1e-8)


def test_wrong_mask_and_mode_are_clear_errors():
    with pytest.raises(ValueError, match="partial_label_mode must be one of marginal, select, got 'both'"):
        PartialLabelDCandCELoss(nnunet_loss(), "both")
    loss = PartialLabelDCandCELoss(nnunet_loss(), "marginal")
    loss.annotated = torch.ones(2, 3, dtype=torch.bool)
    logits, target = tiny()
    with pytest.raises(ValueError, match=r"annotated mask of shape \(2, 3\) for a network output of 1 samples x 3"):
        loss(logits, target)
    for mode in ("marginal", "select"):  # background is always a valid answer
        loss = PartialLabelDCandCELoss(nnunet_loss(), mode)
        loss.annotated = torch.tensor([[False, True, False]])
        no_background = loss(logits, target).item()
        loss.annotated = ANNOTATED
        assert no_background == loss(logits, target).item()


def test_case_annotations_from_the_merge_record():
    dj = {"labels": {"background": 0, "liver": 1, "spleen": 2, "pancreas": 3},
          MERGE_KEY: {"format_version": 1,
                      "sources": {"d502": {"dataset": "Dataset502_A", "modality": "MR"},
                                  "d501": {"dataset": "Dataset501_B", "modality": "CT"}},
                      "cases": {"d502_x": {"source": "d502", "modality": "MR", "labels": ["liver", "spleen"]},
                                "d501_y": {"source": "d501", "modality": "CT", "labels": ["pancreas", "liver"]}}}}
    cases = CaseAnnotations(dj)
    assert cases.modalities == ["CT", "MR"]  # fixed expert order, not the sources' order
    assert cases.annotated(["d502_x", "d501_y"]).tolist() == [[True, True, True, False], [True, True, False, True]]
    assert cases.modality(["d502_x", "d501_y", "d502_x"]).tolist() == [1, 0, 1]
    with pytest.raises(ValueError, match="Case 'd503_z' is not in this merged dataset"):
        cases.annotated(["d503_z"])
    with pytest.raises(ValueError, match=r"batch\['keys'\]"):
        cases.modality(None)
    plain = CaseAnnotations({"labels": {"background": 0, "a": 1}})
    assert not plain.merged and plain.annotated(None) is None and plain.modality(None) is None
