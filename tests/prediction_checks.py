"""Checks on predicted segmentations written by the stock ``nnUNetv2_predict`` (end-to-end tests)."""
from __future__ import annotations

import os


def predicted_labels(pred_dir: str, cases: list) -> dict:
    """Case -> the set of label values in its predicted segmentation."""
    import numpy as np
    import SimpleITK as sitk

    # GetArrayFromImage (a copy): a view of a temporary image would read freed memory
    return {case: set(np.unique(sitk.GetArrayFromImage(sitk.ReadImage(os.path.join(pred_dir, f"{case}.nii.gz"))))
                      .tolist()) for case in cases}


def assert_predictions_not_constant(pred_dir: str, cases: list, per_case: bool = False) -> dict:
    """The predictions are not one constant label: more than one value across ``cases`` (``per_case``: in every
    case). A broken export or a network stuck on one class writes constant maps that pass the geometry checks."""
    labels = predicted_labels(pred_dir, cases)
    union = set().union(*labels.values())
    assert len(union) > 1, f"every prediction in {pred_dir} is the constant label {sorted(union)}"
    if per_case:
        constant = {case: sorted(values) for case, values in labels.items() if len(values) < 2}
        assert not constant, f"constant predictions (case: labels): {constant}"
    return labels
