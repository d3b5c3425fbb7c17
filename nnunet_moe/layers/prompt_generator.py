"""Lightweight prompt embedding generator (LPEG): a sparse prompt computed from the image embedding.

Reference: Li, Wu, Gu et al., "MoE-SAM", section 2 and Fig. 1(b): global
average pooling of the (enhanced) image embedding and a two-layer bottleneck produce the prompt
embedding that replaces a user's points or boxes (self-prompting).

Layout: ``LayerNorm(C) - GELU - global average pool - Linear(C, C/16) - ReLU - Linear(C/16, C)``.

Shapes: image embedding ``(B, C, H, W)`` (SAM: ``C = 256``) -> prompt tokens ``(B, 1, C)``, the
layout of SAM's ``sparse_prompt_embeddings``. Parameters at ``C = 256``, reduction 16: 8,976
(LayerNorm 512, 4,112 + 4,352 in the two linear layers).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["PromptEmbeddingGenerator"]


class PromptEmbeddingGenerator(nn.Module):
    def __init__(self, dim: int = 256, reduction: int = 16):
        super().__init__()
        hidden = dim // reduction
        if hidden < 1:
            raise ValueError(f"prompt generator bottleneck {dim} // {reduction} = {hidden}; need >= 1")
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, embedding: torch.Tensor) -> torch.Tensor:
        if embedding.dim() != 4:
            raise ValueError(f"PromptEmbeddingGenerator expects (B, C, H, W), got shape {tuple(embedding.shape)}")
        pooled = F.gelu(self.norm(embedding.permute(0, 2, 3, 1))).mean(dim=(1, 2))
        return self.fc2(F.relu(self.fc1(pooled))).unsqueeze(1)
