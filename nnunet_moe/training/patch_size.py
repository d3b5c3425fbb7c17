"""The patch-size rule for networks whose input must be divisible by a fixed factor.

Swin and VSS encoders downsample by ``patch_size * 2**merges`` (32 for the defaults) and
fail on any other size. nnU-Net plans patch sizes for CNNs (e.g. 40x56x40 for the
hippocampus demo). Our trainers replace the plans' patch size by ``valid_patch_size``:
each axis rounded to the *nearest* multiple of the divisor (halves round up), at least one
divisor. Rounding to the nearest keeps the number of voxels per patch, and so memory and
time, close to what nnU-Net planned; nnU-Net pads images smaller than the patch. The
adjusted value is written into the plans the trainer saves with the model (``plans.json``
in the results folder), so ``nnUNetv2_predict`` uses the same valid patch size.
"""
from __future__ import annotations

from typing import Sequence


def valid_patch_size(patch_size: Sequence[int], divisor: int | Sequence[int]) -> list:
    """Each axis rounded to the nearest multiple of ``divisor`` (>= divisor).

    >>> valid_patch_size([40, 56, 40], 32)
    [32, 64, 32]
    >>> valid_patch_size([48, 100], 32)
    [64, 96]
    """
    divisors = [int(divisor)] * len(patch_size) if isinstance(divisor, int) else [int(d) for d in divisor]
    if len(divisors) != len(patch_size) or any(d < 1 for d in divisors):
        raise ValueError(f"divisor {divisor} does not fit patch size {list(patch_size)}")
    if any(int(p) < 1 for p in patch_size):
        raise ValueError(f"patch size {list(patch_size)} has a non-positive axis")
    return [max(d, int(d * ((int(p) + d / 2) // d))) for p, d in zip(patch_size, divisors)]
