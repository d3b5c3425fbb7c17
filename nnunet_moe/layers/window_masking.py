"""Swin-MAE window masking: whole windows of patch tokens replaced by one learned mask token.

Reference: Xu et al., "Swin MAE: Masked autoencoders for small datasets", Comput. Biol. Med. 161, 107037
(2023), the masking of M4oE's expert pretraining (Jiang et al., MICCAI 2024, "Two-phase Training Strategy").
Written from the paper (its code is under a non-commercial licence).

- Masking unit: a window of ``window x window`` patch tokens (4 x 4 after a patch-4 embedding, i.e. 16 x 16
  pixels), not single tokens: neighbouring tokens of a medical image are too alike for single-token masking
  to be a hard enough task on small datasets.
- Ratio: of the ``n`` windows of each sample, exactly ``n - int(n * (1 - mask_ratio))`` are masked (MAE's
  rounding: the number kept is rounded down), chosen uniformly at random per sample.
- Masked tokens are *replaced* by a learned mask token (one ``(dim,)`` parameter), not dropped as in MAE:
  a Swin encoder needs the full regular token grid for its windows, shifts and patch merging.

Shapes: ``tokens`` ``(B, *S, dim)`` channels-last (what ``SwinUnetEncoder.embed`` returns), every ``S_i`` a
multiple of ``window``. :meth:`WindowMasking.sample` -> ``mask`` ``(B, *S)`` bool, True = masked;
:meth:`WindowMasking.forward` -> ``(masked tokens (B, *S, dim), mask (B, *S))``.
Randomness: ``generator`` (a ``torch.Generator`` on the tokens' device) makes the masks reproducible.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn

__all__ = ["WindowMasking"]


class WindowMasking(nn.Module):
    """Mask ``mask_ratio`` of each sample's ``window``-token windows with a learned token (module docstring).

    Args:
        dim: token width.
        mask_ratio: fraction of windows masked per sample, in [0, 1) (Swin-MAE: 0.75).
        window: masking window in tokens per axis (Swin-MAE: 4).
    """

    def __init__(self, dim: int, mask_ratio: float = 0.75, window: int = 4) -> None:
        super().__init__()
        if not 0.0 <= float(mask_ratio) < 1.0:
            raise ValueError(f"mask_ratio must be in [0, 1) (a fraction of the windows; Swin-MAE uses 0.75), "
                             f"got {mask_ratio!r}")
        if not isinstance(window, int) or window < 1:
            raise ValueError(f"window must be a positive integer (tokens per axis; Swin-MAE uses 4), got {window!r}")
        self.dim, self.mask_ratio, self.window = dim, float(mask_ratio), window
        self.mask_token = nn.Parameter(torch.zeros(dim))
        nn.init.normal_(self.mask_token, std=0.02)  # MAE's initialisation of its mask token

    def extra_repr(self) -> str:
        return f"dim={self.dim}, mask_ratio={self.mask_ratio}, window={self.window}"

    def num_masked(self, num_windows: int) -> int:
        """Windows masked per sample out of ``num_windows``."""
        return num_windows - int(num_windows * (1.0 - self.mask_ratio))

    def sample(self, batch: int, grid: Sequence[int], device=None, generator: torch.Generator | None = None):
        """A ``(batch, *grid)`` bool mask made of whole ``window``-token windows, True = masked."""
        grid = tuple(int(g) for g in grid)
        if any(g < self.window or g % self.window for g in grid):
            raise ValueError(f"the token grid {grid} must be a multiple of the {self.window}-token masking window on "
                             f"every axis; choose an input size that is a multiple of patch_size * {self.window} "
                             f"(the networks' own input divisor already is one for the default settings)")
        windows = tuple(g // self.window for g in grid)
        n = math.prod(windows)
        # a random permutation per sample: its first num_masked windows are masked
        noise = torch.rand(batch, n, device=device, generator=generator)
        ranks = noise.argsort(dim=1).argsort(dim=1)
        mask = (ranks < self.num_masked(n)).reshape(batch, *windows)
        for axis in range(len(grid)):  # each window -> window^d tokens
            mask = mask.repeat_interleave(self.window, dim=axis + 1)
        return mask

    def forward(self, tokens: torch.Tensor, generator: torch.Generator | None = None):
        if tokens.dim() < 3 or tokens.shape[-1] != self.dim:
            raise ValueError(f"WindowMasking(dim={self.dim}) expects channels-last tokens (B, *S, {self.dim}), "
                             f"got shape {tuple(tokens.shape)}")
        mask = self.sample(tokens.shape[0], tokens.shape[1:-1], tokens.device, generator)
        # torch.where keeps the graph to both inputs: the mask token gets the gradient of every masked position
        masked = torch.where(mask.unsqueeze(-1), self.mask_token.to(tokens.dtype), tokens)
        return masked, mask
