"""MoE-driven feature enhancing block (MoE-FEB): fuse all ViT block outputs into an auxiliary embedding.

Reference: Li, Wu, Gu et al., "MoE-SAM", section 2 and Fig. 1(a): the
intermediate features of every encoder block are routed to experts (expert-choice routing, see
:mod:`nnunet_moe.layers.expert_choice`), passed through self-attention and a convolutional neck;
the result is added to SAM's image embedding.

Shapes
------
Input ``feats``: ``(B, L, H, W, d)``, the ``L`` block outputs of the ViT (SAM ViT-B: ``L = 12``,
``d = 768``, ``H = W = S / 16``). Output ``(B, out_dim, H, W)`` (``out_dim = 256``, SAM's
embedding width).

Steps: ``x + MoE(x)`` (``routing="layers"``, the paper: at every position, each expert takes the
top ``capacity / E`` of the ``L`` layer features; ``routing="tokens"``, the authors' code: each
expert takes ``capacity / E`` of all ``L*H*W`` tokens of the image) -> per layer, spatial
multi-head self-attention ``x + MHA(LN(x))`` (weights shared by the layers) -> mean over the
``L`` layers -> neck ``Conv1x1(d -> out) - LN2d - Conv3x3(out -> out) - LN2d`` (SAM's neck shape).

Choices beyond the paper's text: the residual around the MoE keeps the features no expert chose
(eq. 6 alone would zero them) and the pre-attention LayerNorm is there because SAM's block outputs
are an un-normalised residual stream. Parameters (d = 768, 4 experts of 3072, 8 heads, out 256):
MoE 18,889,728 experts + 3,076 router + 3,076 noise; LayerNorm 1,536; attention 2,362,368; neck
787,456; total 22,047,240.
"""
from __future__ import annotations

import torch
from segment_anything.modeling.common import LayerNorm2d
from torch import nn

from nnunet_moe.layers.expert_choice import ExpertChoiceMoE

__all__ = ["MoEFeatureEnhancement", "ROUTINGS"]

ROUTINGS = ("layers", "tokens")


class MoEFeatureEnhancement(nn.Module):
    def __init__(self, dim: int = 768, out_dim: int = 256, num_experts: int = 4, hidden_dim: int = 3072,
                 capacity: float = 2.0, num_heads: int = 8, routing: str = "layers", noisy: bool = True):
        super().__init__()
        if routing not in ROUTINGS:
            raise ValueError(f"routing must be one of {ROUTINGS} (paper: 'layers'), got {routing!r}")
        self.routing = routing
        self.moe = ExpertChoiceMoE(dim, num_experts, hidden_dim, capacity, noisy=noisy,
                                   gating="selected" if routing == "layers" else "experts")
        self.norm = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, num_heads, batch_first=True)
        self.neck = nn.Sequential(
            nn.Conv2d(dim, out_dim, kernel_size=1, bias=False), LayerNorm2d(out_dim),
            nn.Conv2d(out_dim, out_dim, kernel_size=3, padding=1, bias=False), LayerNorm2d(out_dim))

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        if feats.dim() != 5:
            raise ValueError(f"MoEFeatureEnhancement expects (B, layers, H, W, dim) features, got {tuple(feats.shape)}")
        b, n_layers, h, w, d = feats.shape
        if self.routing == "layers":
            x = feats.permute(0, 2, 3, 1, 4).reshape(b * h * w, n_layers, d)
            x = x + self.moe(x)
            x = x.view(b, h * w, n_layers, d).transpose(1, 2)
        else:
            x = feats.reshape(b, n_layers * h * w, d)
            x = (x + self.moe(x)).view(b, n_layers, h * w, d)
        x = x.reshape(b * n_layers, h * w, d)
        y = self.norm(x)
        x = x + self.attn(y, y, y, need_weights=False)[0]
        x = x.view(b, n_layers, h, w, d).mean(dim=1)
        return self.neck(x.permute(0, 3, 1, 2))
