"""Per-case segmentation metrics (Dice, HD95, NSD) for the ``nnunet-moe benchmark`` command.

The three metrics are the ones the five papers report (Dice in all five,
HD95 in NMSW-Net and MoE-SAM, NSD in NMSW-Net and Swin-UMamba). The numbers come from
MONAI's implementations (``monai.metrics.compute_dice``, ``compute_hausdorff_distance``,
``compute_surface_dice``); this module only builds the binary masks, crops them, passes the
voxel spacing and settles the empty cases, which MONAI leaves as NaN.

Inputs: integer label maps ``prediction`` and ``reference`` of the same shape, ``(H, W)`` or
``(D, H, W)`` (no channel axis), and the voxel spacing in millimetres in the same axis order
as the array (nnU-Net's readers return ``properties["spacing"]`` in that order). A label is an
``int`` or, as in nnU-Net's region-based training, a tuple of ints whose union forms one region.

Definitions (per label, on the binary masks P = prediction, R = reference):

* Dice = 2|P∩R| / (|P| + |R|).
* HD95: MONAI's symmetric percentile Hausdorff distance. Surface voxels are the mask voxels
  with a face neighbour outside the mask (binary erosion, voxels outside the image count as
  background). For every surface voxel of P the Euclidean distance in mm to the nearest
  surface voxel of R is taken, and vice versa; HD95 = max(q95(P→R), q95(R→P)) where q95 is
  ``torch.quantile(..., 0.95)`` (linear interpolation). It is not the 95th percentile of the
  pooled distances.
* NSD (normalised surface Dice, Nikolov et al. 2021) at tolerance τ mm: the fraction of
  surface voxels of P and R (counted together) whose distance to the other surface is ≤ τ.
  Surface size is the number of surface voxels (MONAI's ``use_subvoxels=False``).

Empty masks. MONAI returns, natively: both empty -> Dice NaN (1.0 with ``ignore_empty=False``),
HD NaN, NSD NaN; exactly one empty -> Dice 0.0 (NaN with ``ignore_empty=True`` when the
reference is empty), HD NaN (its distances are inf), NSD 0.0. This module does not pass empty
masks to MONAI and sets the values itself:

* both empty (``both_empty="perfect"``, the default): Dice 1.0, HD95 0.0, NSD 1.0 -- the model
  correctly predicted that the structure is absent. ``both_empty="nan"`` gives NaN for all
  three instead, which is what nnU-Net's own ``summary.json`` does for Dice (those cases then
  drop out of nan-aware means).
* exactly one empty: Dice 0.0, NSD 0.0, HD95 = the image diagonal in mm,
  ``sqrt(sum(((n_i - 1) * s_i) ** 2))`` for shape ``n`` and spacing ``s``: the largest distance
  two voxel centres of the image can have, so no real HD95 can exceed it. A finite worst case
  (rather than NaN) keeps the HD95 means of different models over the same set of cases.

2D images must be passed as 2D arrays: an axis of length 1 has no neighbours, so every
voxel of a ``(1, H, W)`` mask would be a surface voxel. ``case_metrics_from_files`` drops
nnU-Net's dummy axis of 2D images (shape ``(1, 1, H, W)``, spacing ``(999 * s, sy, sx)``).
"""
from __future__ import annotations

import math
import os
import warnings
from collections.abc import Sequence
from typing import Union

import numpy as np
import torch
from monai.metrics import compute_dice, compute_hausdorff_distance, compute_surface_dice
from nnunetv2.evaluation.evaluate_predictions import region_or_label_to_mask

LabelOrRegion = Union[int, tuple]
METRIC_NAMES = ("dice", "hd95", "nsd")
BOTH_EMPTY_CONVENTIONS = ("perfect", "nan")


def image_diagonal_mm(shape: Sequence[int], spacing: Sequence[float]) -> float:
    """Largest distance between two voxel centres of an image of ``shape`` and ``spacing`` (mm)."""
    return float(math.sqrt(sum(((n - 1) * s) ** 2 for n, s in zip(shape, spacing))))


def _check_label_map(name: str, array: np.ndarray) -> np.ndarray:
    array = np.asarray(array)
    if array.dtype == bool or np.issubdtype(array.dtype, np.integer):
        return array
    if np.issubdtype(array.dtype, np.floating):
        # nnU-Net's readers return label maps as float32; accept them when the values are whole numbers
        if not np.all(np.isfinite(array)) or not np.all(array == np.round(array)):
            raise ValueError(f"{name} must be an integer label map; got dtype {array.dtype} with non-integer values")
        return array.astype(np.int64)
    raise ValueError(f"{name} must be an integer label map; got dtype {array.dtype}")


def _check_inputs(prediction, reference, labels, spacing, nsd_tolerance_mm, both_empty):
    prediction = _check_label_map("prediction", prediction)
    reference = _check_label_map("reference", reference)
    if prediction.shape != reference.shape:
        raise ValueError(
            f"prediction and reference must have the same shape; got prediction {prediction.shape} "
            f"and reference {reference.shape}"
        )
    if prediction.ndim not in (2, 3):
        raise ValueError(
            f"label maps must be 2D (H, W) or 3D (D, H, W) without a channel axis; got shape {prediction.shape}"
        )
    spacing = tuple(float(s) for s in spacing)
    if len(spacing) != prediction.ndim:
        raise ValueError(
            f"spacing {spacing} has {len(spacing)} entries but the label maps are {prediction.ndim}D "
            f"(shape {prediction.shape}); give one spacing per array axis, in array order"
        )
    if not all(math.isfinite(s) and s > 0 for s in spacing):
        raise ValueError(f"spacing must be finite and > 0 on every axis; got {spacing}")
    labels = list(labels)
    if len(labels) == 0:
        raise ValueError("labels must name at least one label or region; got an empty list")
    for label in labels:
        ok = isinstance(label, (int, np.integer)) or (
            isinstance(label, tuple) and len(label) > 0 and all(isinstance(i, (int, np.integer)) for i in label)
        )
        if not ok or isinstance(label, bool):
            raise ValueError(f"each label must be an int or a non-empty tuple of ints (a region); got {label!r}")
    if len(set(labels)) != len(labels):
        raise ValueError(f"labels must be unique; got {labels}")
    if isinstance(nsd_tolerance_mm, (int, float, np.floating, np.integer)):
        tolerances = [float(nsd_tolerance_mm)] * len(labels)
    else:
        tolerances = [float(t) for t in nsd_tolerance_mm]
        if len(tolerances) != len(labels):
            raise ValueError(
                f"nsd_tolerance_mm has {len(tolerances)} entries but there are {len(labels)} labels {labels}; "
                "give one tolerance per label or a single number"
            )
    if not all(math.isfinite(t) and t >= 0 for t in tolerances):
        raise ValueError(f"nsd_tolerance_mm must be finite and >= 0; got {tolerances}")
    if both_empty not in BOTH_EMPTY_CONVENTIONS:
        raise ValueError(f"both_empty must be one of {BOTH_EMPTY_CONVENTIONS}; got {both_empty!r}")
    return prediction, reference, labels, spacing, tolerances


def _crop_to_union(pred_mask: np.ndarray, ref_mask: np.ndarray):
    """Crop both masks to the bounding box of their union plus one voxel of margin.

    MONAI crops the same way inside ``get_mask_edges``; doing it here first keeps the one-hot
    float copies that MONAI makes small. Edges do not change: voxels outside the image count
    as background for the erosion, as the margin voxels do.
    """
    union = pred_mask | ref_mask
    box = []
    for axis, size in enumerate(union.shape):
        # projecting onto each axis is cheaper than listing every foreground voxel
        occupied = np.flatnonzero(union.any(axis=tuple(a for a in range(union.ndim) if a != axis)))
        box.append(slice(max(int(occupied[0]) - 1, 0), min(int(occupied[-1]) + 2, size)))
    return pred_mask[tuple(box)], ref_mask[tuple(box)]


def _one_hot(mask: np.ndarray) -> torch.Tensor:
    """(spatial...) bool -> (1, 2, spatial...) float one-hot with background in channel 0."""
    foreground = torch.from_numpy(np.ascontiguousarray(mask))
    return torch.stack([~foreground, foreground])[None].float()


def case_metrics(
    prediction: np.ndarray,
    reference: np.ndarray,
    labels: list,
    spacing: tuple,
    nsd_tolerance_mm: float | list = 1.0,
    both_empty: str = "perfect",
    metrics: tuple = METRIC_NAMES,
) -> dict:
    """Dice, HD95 (mm) and NSD of one case, per label.

    Args:
        prediction: integer label map, shape (H, W) or (D, H, W).
        reference: integer label map of the same shape.
        labels: labels to score; an int, or a tuple of ints scored as one region (nnU-Net regions).
        spacing: voxel spacing in mm, one entry per array axis, in array order.
        nsd_tolerance_mm: NSD tolerance in mm, one number for all labels or one per label.
        both_empty: "perfect" (Dice 1, HD95 0, NSD 1) or "nan" for labels absent from both maps.
        metrics: the subset of ``METRIC_NAMES`` to compute (e.g. ``("dice",)``: the surface
            distances are the expensive part on large volumes).

    Returns:
        ``{label: {"dice": float, "hd95": float, "nsd": float}}`` (the requested metrics) in the order
        of ``labels``.
        See the module docstring for the definitions and the empty-mask conventions.

    Raises:
        ValueError: shapes differ, spacing length differs from the number of axes, bad labels,
        tolerances or dtype.
    """
    prediction, reference, labels, spacing, tolerances = _check_inputs(
        prediction, reference, labels, spacing, nsd_tolerance_mm, both_empty
    )
    unknown = [m for m in metrics if m not in METRIC_NAMES]
    if unknown or not metrics:
        raise ValueError(f"metrics must be a non-empty subset of {METRIC_NAMES}; got {tuple(metrics)}")
    diagonal = image_diagonal_mm(prediction.shape, spacing)
    results = {}
    for label, tolerance in zip(labels, tolerances):
        pred_mask = region_or_label_to_mask(prediction, label)
        ref_mask = region_or_label_to_mask(reference, label)
        pred_empty, ref_empty = not pred_mask.any(), not ref_mask.any()
        if pred_empty and ref_empty:
            value = (1.0, 0.0, 1.0) if both_empty == "perfect" else (math.nan,) * 3
            results[label] = {m: v for m, v in zip(METRIC_NAMES, value) if m in metrics}
            continue
        if pred_empty or ref_empty:
            results[label] = {m: v for m, v in zip(METRIC_NAMES, (0.0, diagonal, 0.0)) if m in metrics}
            continue
        pred_crop, ref_crop = _crop_to_union(pred_mask, ref_mask)
        y_pred, y = _one_hot(pred_crop), _one_hot(ref_crop)
        with warnings.catch_warnings():
            # MONAI 1.5/1.6 passes its own deprecated get_mask_edges argument internally; the
            # warning is MONAI's, not the caller's, and would repeat for every label of every case
            warnings.filterwarnings("ignore", message=".*always_return_as_numpy.*", category=FutureWarning)
            values = {}
            if "dice" in metrics:
                values["dice"] = compute_dice(y_pred, y, include_background=False)
            if "hd95" in metrics:
                values["hd95"] = compute_hausdorff_distance(y_pred, y, include_background=False, percentile=95,
                                                            spacing=spacing)
            if "nsd" in metrics:
                values["nsd"] = compute_surface_dice(
                    y_pred, y, class_thresholds=[tolerance], include_background=False, spacing=spacing
                )
        results[label] = {m: float(values[m].item()) for m in METRIC_NAMES if m in values}
    return results


def case_metrics_from_files(
    reference_file: str,
    prediction_file: str,
    labels: list,
    reader=None,
    nsd_tolerance_mm: float | list = 1.0,
    both_empty: str = "perfect",
) -> dict:
    """``case_metrics`` on two segmentation files read with nnU-Net's reader.

    ``reader`` is an nnU-Net ``BaseReaderWriter`` instance; by default it is chosen from the
    file ending (``determine_reader_writer_from_file_ending``). The spacing is the reference's
    ``properties["spacing"]``. nnU-Net reads a 2D image as (1, 1, H, W) with a dummy spacing on
    the first axis; that axis is dropped so the case is scored in 2D.
    """
    if reader is None:
        from nnunetv2.imageio.reader_writer_registry import determine_reader_writer_from_file_ending

        name = os.path.basename(reference_file)
        ending = "." + name.split(".", 1)[1] if "." in name else ""
        reader = determine_reader_writer_from_file_ending(ending, reference_file, verbose=False)()
    reference, properties = reader.read_seg(reference_file)
    prediction, _ = reader.read_seg(prediction_file)
    reference, prediction = reference[0], prediction[0]  # drop nnU-Net's channel axis
    spacing = tuple(properties["spacing"])
    if reference.ndim == 3 and reference.shape[0] == 1 and prediction.shape[:1] == (1,):
        reference, prediction, spacing = reference[0], prediction[0], spacing[1:]
    return case_metrics(prediction, reference, labels, spacing, nsd_tolerance_mm, both_empty)


def aggregate(per_case: list) -> dict:
    """Mean of each metric per label over cases, nan-aware, plus a foreground mean.

    Args:
        per_case: a list of ``case_metrics`` results, all with the same labels.

    Returns:
        ``{"n_cases": int,
           "per_label": {label: {"dice": mean, "hd95": mean, "nsd": mean}},
           "nan_cases": {label: {"dice": k, "hd95": k, "nsd": k}},
           "foreground_mean": {"dice": ..., "hd95": ..., "nsd": ...}}``

        A per-label mean ignores NaN cases (``nan_cases`` says how many there were) and is NaN
        when every case is NaN. ``foreground_mean`` is the mean of the per-label means over all
        labels except 0 (as in nnU-Net's summary.json), again ignoring NaN label means.
    """
    if len(per_case) == 0:
        raise ValueError("aggregate needs at least one case; got an empty list")
    labels = list(per_case[0].keys())
    for index, case in enumerate(per_case):
        if set(case.keys()) != set(labels):
            raise ValueError(
                f"case {index} has labels {sorted(map(str, case.keys()))} but case 0 has "
                f"{sorted(map(str, labels))}; every case must be scored on the same labels"
            )
    per_label, nan_cases = {}, {}
    for label in labels:
        per_label[label], nan_cases[label] = {}, {}
        for metric in METRIC_NAMES:
            values = np.array([float(case[label][metric]) for case in per_case], dtype=float)
            finite = values[~np.isnan(values)]
            per_label[label][metric] = float(finite.mean()) if finite.size else math.nan
            nan_cases[label][metric] = int(np.isnan(values).sum())
    foreground = [label for label in labels if label != 0]
    foreground_mean = {}
    for metric in METRIC_NAMES:
        means = np.array([per_label[label][metric] for label in foreground], dtype=float)
        means = means[~np.isnan(means)]
        foreground_mean[metric] = float(means.mean()) if means.size else math.nan
    return {"n_cases": len(per_case), "per_label": per_label, "nan_cases": nan_cases, "foreground_mean": foreground_mean}
