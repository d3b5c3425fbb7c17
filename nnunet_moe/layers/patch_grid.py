"""Patch-grid geometry for NMSW-Net: where the candidate patches of a volume lie.

Reference
---------
Jeon, Yang, Fu, Feng, "No More Sliding Window: Efficient 3D Medical Image Segmentation with
Differentiable Top-k Patch Sampling" (NMSW-Net), Sec. III-A: the full-resolution scan is covered by
``N = N_h * N_w * N_d`` overlapping candidate patches sampled at a regular interval (overlap 0.5).

The candidate positions are exactly nnU-Net's sliding-window tiles, so that selecting *every* cell
reproduces nnU-Net's sliding-window geometry:

- positions per axis come from ``nnunetv2.inference.sliding_window_prediction.
  compute_steps_for_sliding_window(image_size, patch_size, step_size)`` (step 0.5 = overlap 0.5;
  nnU-Net spreads the tiles evenly so the last one ends on the border);
- cells are numbered in C order over ``grid_shape`` (first spatial axis slowest), the same order in
  which ``nnUNetPredictor._internal_get_sliding_window_slicers`` lists its tiles, so
  ``grid.cell_slices(i)`` equals nnU-Net's ``slicers[i][1:]``;
- a volume smaller than the patch along some axis is first padded the way nnU-Net's
  ``predict_sliding_window_return_logits`` does it: ``acvl_utils`` ``pad_nd_image`` with constant 0,
  content centred (the odd extra voxel goes "above"). :func:`pad_to_patch_size` does this and
  returns the slicer that removes the padding again. :class:`PatchGrid` itself refuses a volume
  smaller than the patch (clear ``ValueError``), because nnU-Net's step rule silently produces
  negative positions there.

Shapes
------
``image_size`` / ``patch_size``: tuples with one entry per spatial axis (2 or 3 axes).
``PatchGrid.starts``: ``(G, ndim)`` int64 array of patch origins, ``G = prod(grid_shape)``.
:func:`box_sums`: ``volume (B, C, *spatial)`` and boxes ``(G, ndim, 2)`` -> ``(B, C, G)``.
"""
from __future__ import annotations

import itertools
from typing import List, Sequence, Tuple

import numpy as np
import torch
from acvl_utils.cropping_and_padding.padding import pad_nd_image
from nnunetv2.inference.sliding_window_prediction import compute_steps_for_sliding_window

__all__ = ["PatchGrid", "pad_to_patch_size", "padded_shape", "box_sums"]

SpatialSlices = Tuple[slice, ...]


def _as_int_tuple(values: Sequence[int], name: str) -> Tuple[int, ...]:
    try:
        result = tuple(int(v) for v in values)
    except TypeError as error:
        raise ValueError(f"{name} must be a sequence of ints, got {values!r}") from error
    if any(int(v) != v for v in values):
        raise ValueError(f"{name} must contain integers, got {values!r}")
    return result


def padded_shape(image_size: Sequence[int], patch_size: Sequence[int]) -> Tuple[int, ...]:
    """Spatial shape after :func:`pad_to_patch_size`: ``max(image, patch)`` per axis."""
    image_size = _as_int_tuple(image_size, "image_size")
    patch_size = _as_int_tuple(patch_size, "patch_size")
    if len(image_size) != len(patch_size):
        raise ValueError(f"image_size {image_size} and patch_size {patch_size} must have the same number of axes")
    return tuple(max(i, p) for i, p in zip(image_size, patch_size))


def pad_to_patch_size(volume: torch.Tensor, patch_size: Sequence[int], value: float = 0.0
                      ) -> Tuple[torch.Tensor, SpatialSlices]:
    """Pad the trailing ``len(patch_size)`` axes of ``volume`` to at least ``patch_size``.

    Same call as nnU-Net's ``predict_sliding_window_return_logits`` (``pad_nd_image(..., 'constant',
    {'value': 0}, return_slicer=True)``): content centred, differentiable (``F.pad``), no copy when
    nothing needs padding. Returns ``(padded, spatial_slicer)`` where
    ``padded[(..., *spatial_slicer)]`` is the original volume again.
    """
    patch_size = _as_int_tuple(patch_size, "patch_size")
    if volume.ndim < len(patch_size):
        raise ValueError(f"volume with shape {tuple(volume.shape)} has fewer axes than patch_size {patch_size}")
    padded, slicer = pad_nd_image(volume, patch_size, "constant", {"value": value}, True, None)
    return padded, tuple(slice(int(s.start), int(s.stop)) for s in slicer[volume.ndim - len(patch_size):])


class PatchGrid:
    """Candidate patch positions over a volume (nnU-Net sliding-window rule).

    Parameters
    ----------
    image_size: spatial shape of the (already padded) volume; every axis must be >= the patch.
    patch_size: spatial patch shape.
    step_size: tile step as a fraction of the patch (nnU-Net's ``tile_step_size``), in (0, 1];
        0.5 means 50 % overlap, as in the paper and nnU-Net's default.
    """

    def __init__(self, image_size: Sequence[int], patch_size: Sequence[int], step_size: float = 0.5) -> None:
        self.image_size = _as_int_tuple(image_size, "image_size")
        self.patch_size = _as_int_tuple(patch_size, "patch_size")
        if len(self.image_size) != len(self.patch_size):
            raise ValueError(f"image_size {self.image_size} and patch_size {self.patch_size} must have the same "
                             f"number of spatial axes")
        if any(p <= 0 for p in self.patch_size):
            raise ValueError(f"patch_size entries must be positive, got {self.patch_size}")
        if not 0 < float(step_size) <= 1:
            raise ValueError(f"step_size must lie in (0, 1], got {step_size}")
        too_small = [(axis, i, p) for axis, (i, p) in enumerate(zip(self.image_size, self.patch_size)) if i < p]
        if too_small:
            raise ValueError(f"image_size {self.image_size} is smaller than patch_size {self.patch_size} along "
                             f"(axis, image, patch) {too_small}; pad the volume first with pad_to_patch_size() "
                             f"(nnU-Net's pad_nd_image rule)")
        self.step_size = float(step_size)
        self.steps: List[List[int]] = [list(map(int, s)) for s in compute_steps_for_sliding_window(
            self.image_size, self.patch_size, self.step_size)]
        self.grid_shape: Tuple[int, ...] = tuple(len(s) for s in self.steps)
        self.num_cells: int = int(np.prod(self.grid_shape))
        # C order over the grid (first axis slowest) = nnU-Net's nested loops over sx, sy, sz.
        self.starts = np.array(list(itertools.product(*self.steps)), dtype=np.int64).reshape(self.num_cells,
                                                                                               len(self.steps))

    @property
    def ndim(self) -> int:
        return len(self.patch_size)

    def __len__(self) -> int:
        return self.num_cells

    def __repr__(self) -> str:
        return (f"PatchGrid(image_size={self.image_size}, patch_size={self.patch_size}, "
                f"step_size={self.step_size}, grid_shape={self.grid_shape})")

    def _check_index(self, index: int) -> int:
        index = int(index)
        if not 0 <= index < self.num_cells:
            raise IndexError(f"cell index {index} out of range for a grid of {self.num_cells} cells")
        return index

    def cell_slices(self, index: int) -> SpatialSlices:
        """Spatial slices of cell ``index`` (C-order flat index)."""
        start = self.starts[self._check_index(index)]
        return tuple(slice(int(s), int(s) + p) for s, p in zip(start, self.patch_size))

    def all_slices(self) -> List[SpatialSlices]:
        """Slices of every cell, in nnU-Net's sliding-window order."""
        return [self.cell_slices(i) for i in range(self.num_cells)]

    def cell_boxes(self, offset: Sequence[int], source_shape: Sequence[int], target_shape: Sequence[int]
                   ) -> np.ndarray:
        """Footprint of every cell on another grid (e.g. the low-resolution global volume).

        A cell spans ``[start, start + patch)`` in this grid's (padded) coordinates. ``offset`` is the
        padding before the content (so content coordinates are ``x - offset``), ``source_shape`` the
        unpadded content shape and ``target_shape`` the shape the content was resized to. The box is
        clipped to the content, scaled by ``target / source``, widened to whole voxels (floor/ceil)
        and kept at least one voxel wide. Returns ``(G, ndim, 2)`` int64 ``[lo, hi)`` bounds.
        """
        offset = np.asarray(_as_int_tuple(offset, "offset"), dtype=np.float64)
        source = np.asarray(_as_int_tuple(source_shape, "source_shape"), dtype=np.float64)
        target = np.asarray(_as_int_tuple(target_shape, "target_shape"), dtype=np.int64)
        if not (len(offset) == len(source) == len(target) == self.ndim):
            raise ValueError(f"offset {tuple(offset)}, source_shape {tuple(source)} and target_shape "
                             f"{tuple(target)} must each have {self.ndim} entries")
        if np.any(source <= 0) or np.any(target <= 0):
            raise ValueError(f"source_shape {tuple(source)} and target_shape {tuple(target)} must be positive")
        lo = np.clip(self.starts - offset, 0, source)
        hi = np.clip(self.starts + np.asarray(self.patch_size) - offset, 0, source)
        scale = target / source
        lo_t = np.floor(lo * scale + 1e-9).astype(np.int64)
        hi_t = np.ceil(hi * scale - 1e-9).astype(np.int64)
        lo_t = np.clip(lo_t, 0, target - 1)
        hi_t = np.clip(np.maximum(hi_t, lo_t + 1), 1, target)
        return np.stack([lo_t, hi_t], axis=-1)


def box_sums(volume: torch.Tensor, boxes: np.ndarray) -> torch.Tensor:
    """Sum of ``volume (B, C, *spatial)`` over each box ``(G, ndim, 2)`` -> ``(B, C, G)``.

    Uses a summed-area table (inclusive cumulative sums with a leading zero plane) so all ``G``
    boxes cost one cumsum per axis plus ``2**ndim`` gathers; computed in float64 so that sums over
    large volumes stay exact enough (counts of integer masks are exact) and cast back. Differentiable.
    """
    boxes = np.asarray(boxes, dtype=np.int64)
    ndim = volume.ndim - 2
    if boxes.ndim != 3 or boxes.shape[1:] != (ndim, 2):
        raise ValueError(f"boxes must have shape (G, {ndim}, 2) for a volume of shape {tuple(volume.shape)}, "
                         f"got {boxes.shape}")
    spatial = volume.shape[2:]
    if np.any(boxes[..., 0] < 0) or np.any(boxes[..., 1] > np.asarray(spatial)) or \
            np.any(boxes[..., 1] < boxes[..., 0]):
        raise ValueError(f"boxes must satisfy 0 <= lo <= hi <= {tuple(spatial)}")
    table = volume.to(torch.float64)
    for axis in range(ndim):
        table = torch.cumsum(table, dim=2 + axis)
    table = torch.nn.functional.pad(table, [1, 0] * ndim)  # leading zero plane on every spatial axis
    b, c = table.shape[:2]
    table_shape = table.shape[2:]
    flat = table.reshape(b, c, -1)
    strides = np.cumprod((1,) + tuple(table_shape[::-1]))[:-1][::-1]
    result = None
    for corner in itertools.product((0, 1), repeat=ndim):
        coords = boxes[:, np.arange(ndim), np.asarray(corner)]  # (G, ndim): lo or hi per axis
        flat_index = torch.as_tensor((coords * strides).sum(-1), device=volume.device)
        sign = (-1) ** (ndim - sum(corner))
        term = flat.index_select(2, flat_index) * sign
        result = term if result is None else result + term
    return result.to(volume.dtype)
