"""Aggregation of coarse global logits with Gaussian-weighted local patch logits (NMSW-Net).

Reference
---------
Jeon, Yang, Fu, Feng, "No More Sliding Window" (NMSW-Net), Sec. III-B-2 "Aggregation", Eq. 6 and
Fig. 3(b): patch predictions are weighted by a discretised Gaussian (sigma = 0.125 of the patch
size) and blended with the upscaled global prediction by a learnable per-class weight.

What is computed
----------------
For every sample, with Gaussian patch weights ``g`` (``nnunetv2``'s ``compute_gaussian``, sigma
scale 1/8 -- the very function nnU-Net's sliding window uses)::

    local_sum   = sum_k  g * local_k      (placed at the patch's slices)
    weight_sum  = sum_k  g
    local_avg   = local_sum / weight_sum          where weight_sum > 0 ("covered")
    out         = w * global + (1 - w) * local_avg   where covered
    out         = global                          elsewhere (every voxel is written)

``w = sigmoid(alpha_c)`` is a learnable weight per class on the *global* logits (``alpha``
initialised from ``init_global_weight``, default 0.5). In the paper's notation ``sigma(c_w)`` is the
weight of the *local* prediction, i.e. ``sigma(c_w) = 1 - w``; :attr:`PatchAggregation.local_weight`
returns it for comparison with the paper's Fig. 7. The paper writes Eq. 6 as a sequential overwrite
per patch; the normalised form above is order independent and, with ``blend="local"`` (``w = 0``
exactly: pure local average where covered), over a full grid of patches it is exactly nnU-Net's
sliding-window average -- the property the tests check against ``nnUNetPredictor``.

``blend`` modes: ``"learned"`` (default, per-class ``alpha``), ``"local"`` (``w = 0``),
``"global"`` (``w = 1``, ignores the patches; for ablations).

Precision: accumulation runs in ``accumulation_dtype`` (float32 default). nnU-Net's predictor
accumulates in float16 with a Gaussian scaled to a maximum of 10 (``gaussian_value_scaling``);
passing ``accumulation_dtype=torch.float16`` reproduces its arithmetic bit for bit.

Shapes
------
``global_logits``: ``(B, C, *spatial)`` (already upsampled to full size); ``local_logits``:
``(B, K, C, *patch)``; ``patch_slices``: ``B`` sequences of ``K`` tuples of spatial slices (each of
patch size). Output: ``(B, C, *spatial)``.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import torch
from nnunetv2.inference.sliding_window_prediction import compute_gaussian
from torch import nn

__all__ = ["PatchAggregation", "BLEND_MODES", "gaussian_patch_weights"]

BLEND_MODES = ("learned", "local", "global")


def gaussian_patch_weights(patch_size: Sequence[int], sigma_scale: float = 1.0 / 8, value_scaling: float = 10.0,
                           dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """nnU-Net's Gaussian importance map (``compute_gaussian``) as a fresh CPU tensor of ``patch_size``.

    ``compute_gaussian`` is ``lru_cache``d and returns a shared tensor, hence the clone.
    """
    return compute_gaussian(tuple(int(p) for p in patch_size), sigma_scale=sigma_scale,
                            value_scaling_factor=value_scaling, dtype=dtype, device=torch.device("cpu")).clone()


class PatchAggregation(nn.Module):
    """Fuse global logits and local patch logits into full-size logits (see module docstring).

    Parameters
    ----------
    num_classes: number of output channels ``C``.
    patch_size: spatial patch shape.
    blend: ``"learned"`` | ``"local"`` | ``"global"``.
    init_global_weight: initial ``w = sigmoid(alpha)`` for ``blend="learned"``, in (0, 1).
    sigma_scale: Gaussian sigma as a fraction of the patch size (paper and nnU-Net: 0.125).
    value_scaling: maximum of the Gaussian (nnU-Net: 10; cancels out in the division).
    accumulation_dtype: dtype of the accumulators (float32; float16 = nnU-Net's predictor).
    """

    def __init__(self, num_classes: int, patch_size: Sequence[int], blend: str = "learned",
                 init_global_weight: float = 0.5, sigma_scale: float = 1.0 / 8, value_scaling: float = 10.0,
                 accumulation_dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        if int(num_classes) != num_classes or num_classes <= 0:
            raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
        if blend not in BLEND_MODES:
            raise ValueError(f"blend must be one of {BLEND_MODES}, got {blend!r}")
        if not 0.0 < float(init_global_weight) < 1.0:
            raise ValueError(f"init_global_weight must lie strictly between 0 and 1, got {init_global_weight!r}")
        if not float(sigma_scale) > 0:
            raise ValueError(f"sigma_scale must be > 0, got {sigma_scale!r}")
        if accumulation_dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
            raise ValueError(f"accumulation_dtype must be a floating dtype, got {accumulation_dtype!r}")
        self.num_classes = int(num_classes)
        self.patch_size: Tuple[int, ...] = tuple(int(p) for p in patch_size)
        if any(p <= 0 for p in self.patch_size):
            raise ValueError(f"patch_size entries must be positive, got {self.patch_size}")
        self.blend = blend
        self.accumulation_dtype = accumulation_dtype
        # Built directly in the accumulation dtype (as nnU-Net does) so float16 matches it exactly.
        self.register_buffer("gaussian", gaussian_patch_weights(self.patch_size, sigma_scale, value_scaling,
                                                                accumulation_dtype), persistent=False)
        logit = math.log(init_global_weight / (1.0 - init_global_weight))
        self.alpha = nn.Parameter(torch.full((self.num_classes,), logit)) if blend == "learned" else None

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, patch_size={self.patch_size}, blend={self.blend!r}"

    @property
    def global_weight(self) -> torch.Tensor:
        """``w`` per class: weight of the global logits where patches cover the volume."""
        if self.blend == "learned":
            return torch.sigmoid(self.alpha)
        value = 0.0 if self.blend == "local" else 1.0
        return torch.full((self.num_classes,), value)

    @property
    def local_weight(self) -> torch.Tensor:
        """``1 - w`` per class: the paper's ``sigma(c_w)`` (weight of the patch predictions)."""
        return 1.0 - self.global_weight

    def accumulate(self, local_logits: torch.Tensor, patch_slices: Sequence[Sequence[Tuple[slice, ...]]],
                   spatial_shape: Sequence[int],
                   sums: Optional[Tuple[torch.Tensor, torch.Tensor]] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """Gaussian-weighted sums: ``(local_sum (B, C, *spatial), weight_sum (B, 1, *spatial))``.

        ``sums``: accumulators from an earlier call to add into (inference streams the patches in
        chunks so that only a few local outputs are alive at a time); new zeros when ``None``.
        """
        if local_logits.ndim != 3 + len(self.patch_size):
            raise ValueError(f"local_logits must have shape (B, K, C, *{self.patch_size}), got "
                             f"{tuple(local_logits.shape)}")
        batch, num_patches, channels = local_logits.shape[:3]
        if tuple(local_logits.shape[3:]) != self.patch_size or channels != self.num_classes:
            raise ValueError(f"local_logits must have shape (B, K, {self.num_classes}, *{self.patch_size}), got "
                             f"{tuple(local_logits.shape)}")
        if len(patch_slices) != batch or any(len(s) != num_patches for s in patch_slices):
            raise ValueError(f"patch_slices must hold {batch} sequences of {num_patches} slice tuples, got lengths "
                             f"{[len(s) for s in patch_slices]}")
        spatial_shape = tuple(int(s) for s in spatial_shape)
        device = local_logits.device
        if sums is None:
            local_sum = torch.zeros((batch, channels, *spatial_shape), dtype=self.accumulation_dtype, device=device)
            weight_sum = torch.zeros((batch, 1, *spatial_shape), dtype=self.accumulation_dtype, device=device)
        else:
            local_sum, weight_sum = sums
            if tuple(local_sum.shape) != (batch, channels, *spatial_shape) or \
                    tuple(weight_sum.shape) != (batch, 1, *spatial_shape):
                raise ValueError(f"accumulators of shape {tuple(local_sum.shape)} / {tuple(weight_sum.shape)} do not "
                                 f"match (B={batch}, C={channels}, *{spatial_shape})")
        gaussian = self.gaussian.to(device)
        for b in range(batch):
            for k, slices in enumerate(patch_slices[b]):
                slices = tuple(slices)
                self._check_slices(slices, spatial_shape)
                # In-place adds into the accumulators (same arithmetic as nnU-Net's predictor: the
                # product is formed in the logits' dtype and rounded once into the accumulator).
                local_sum[(b, slice(None), *slices)] += local_logits[b, k] * gaussian
                weight_sum[(b, slice(None), *slices)] += gaussian
        return local_sum, weight_sum

    def _check_slices(self, slices: Tuple[slice, ...], spatial_shape: Tuple[int, ...]) -> None:
        if len(slices) != len(self.patch_size):
            raise ValueError(f"patch slices {slices} must have {len(self.patch_size)} spatial entries")
        for s, p, n in zip(slices, self.patch_size, spatial_shape):
            if s.start is None or s.stop is None or s.stop - s.start != p or s.start < 0 or s.stop > n or \
                    s.step not in (None, 1):
                raise ValueError(f"patch slices {slices} must be explicit, unit-step, of size {self.patch_size} "
                                 f"and inside the volume {spatial_shape}")

    def forward(self, global_logits: torch.Tensor, local_logits: torch.Tensor,
                patch_slices: Sequence[Sequence[Tuple[slice, ...]]]) -> torch.Tensor:
        if global_logits.ndim != 2 + len(self.patch_size) or global_logits.shape[1] != self.num_classes:
            raise ValueError(f"global_logits must have shape (B, {self.num_classes}, *spatial) with "
                             f"{len(self.patch_size)} spatial axes, got {tuple(global_logits.shape)}")
        if local_logits.shape[0] != global_logits.shape[0]:
            raise ValueError(f"batch sizes differ: global_logits {tuple(global_logits.shape)}, local_logits "
                             f"{tuple(local_logits.shape)}")
        if self.blend == "global" or local_logits.shape[1] == 0:
            return global_logits
        return self.blend_sums(global_logits, *self.accumulate(local_logits, patch_slices, global_logits.shape[2:]))

    def blend_sums(self, global_logits: torch.Tensor, local_sum: torch.Tensor, weight_sum: torch.Tensor,
                   in_place: bool = False) -> torch.Tensor:
        """Blend ``global_logits (B, C, *spatial)`` with accumulated patch sums (see :meth:`accumulate`).

        ``in_place`` (inference without gradients): the result is written into ``global_logits`` and
        ``local_sum`` serves as scratch, so no full-size temporaries are allocated; returns ``global_logits``.
        """
        if self.blend == "global":
            return global_logits
        if in_place and torch.is_grad_enabled() and any(
                t is not None and t.requires_grad for t in (global_logits, local_sum, self.alpha)):
            raise RuntimeError("blend_sums(in_place=True) is for inference: call it under torch.no_grad()")
        covered = weight_sum > 0
        # Dividing by 1 where nothing is covered keeps values and gradients finite there.
        divisor = torch.where(covered, weight_sum, torch.ones_like(weight_sum))
        scratch = in_place and local_sum.dtype == global_logits.dtype
        local_avg = local_sum.div_(divisor) if scratch else torch.div(local_sum, divisor).to(global_logits.dtype)
        if self.blend == "local":
            blended = local_avg
        else:
            blended = torch.lerp(global_logits, local_avg, self._local_weight_view(global_logits),
                                 out=local_avg if scratch else None)
        return torch.where(covered, blended, global_logits, out=global_logits if in_place else None)

    def _local_weight_view(self, like: torch.Tensor) -> torch.Tensor:
        """``1 - w`` shaped ``(1, C, 1, ...)`` for broadcasting (``lerp(global, local, 1 - w)`` is
        ``w * global + (1 - w) * local`` in one pass)."""
        w = torch.sigmoid(self.alpha).to(like.dtype).view(1, -1, *([1] * len(self.patch_size)))
        return 1.0 - w
