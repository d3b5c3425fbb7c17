"""VSS (visual state space) block: ``x + DropPath(SS2D(LayerNorm(x)))``, channels-last, 2D or 3D.

References
----------
- Liu et al., "VMamba: Visual State Space Model", arXiv:2401.10166 (VSS block, Tiny configuration).
- Liu et al., "Swin-UMamba", MICCAI 2024, Sec. 2.1 and Fig. 1 (the block used in encoder and the
  dagger variant's decoder).

Shapes: input and output ``(B, H, W, C)`` (``spatial_dims=2``) or ``(B, D, H, W, C)`` (``spatial_dims=3``).
Submodule names ``ln_1``, ``self_attention``, ``drop_path`` match the VMamba-Tiny checkpoint.
"""
from __future__ import annotations

from functools import partial

import torch
from timm.layers import DropPath
from torch import nn

from nnunet_moe.layers.ss2d import SelectiveScanND

__all__ = ["VSSBlock"]


class VSSBlock(nn.Module):
    """Pre-norm residual block around the selective-scan mixer (no MLP, as in VMamba-Tiny v0)."""

    def __init__(self, hidden_dim: int, drop_path: float = 0.0, spatial_dims: int = 2, d_state: int = 16,
                 attn_drop_rate: float = 0.0, norm_layer=partial(nn.LayerNorm, eps=1e-6), **ss_kwargs) -> None:
        super().__init__()
        self.spatial_dims = spatial_dims
        self.hidden_dim = hidden_dim
        self.ln_1 = norm_layer(hidden_dim)
        self.self_attention = SelectiveScanND(hidden_dim, spatial_dims=spatial_dims, d_state=d_state,
                                              dropout=attn_drop_rate, **ss_kwargs)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != self.spatial_dims + 2 or x.shape[-1] != self.hidden_dim:
            raise ValueError(f"VSSBlock expects channels-last input (B, *spatial[{self.spatial_dims}], "
                             f"C={self.hidden_dim}), got {tuple(x.shape)}")
        return x + self.drop_path(self.self_attention(self.ln_1(x)))
