"""Expert-choice Mixture-of-Experts: every expert picks its own items (the router never drops an expert).

References
----------
- Zhou, Lei, Liu et al., "Mixture-of-Experts with Expert Choice Routing", NeurIPS 2022:
  each of ``E`` experts takes the ``k = capacity * N / E`` items with the highest router score.
- Li, Wu, Gu et al., "MoE-SAM", eqs. (2)-(6): noisy router
  ``H(X) = X W_g + R_noise``, per expert ``I = TopK(H, k)``, weights ``S_I = softmax(H[I])`` over
  the chosen items, experts ``ReLU(X_I W_1) W_2``, an item's output is the sum over the experts
  that chose it (items no expert chose get zeros).
- Shazeer et al., "Outrageously Large Neural Networks", ICLR 2017: the noise term
  ``randn * softplus(X W_noise)`` (used while training only).

Shapes
------
Input ``x``: ``(G, N, d)``: ``G`` independent routing groups of ``N`` items each (MoE-SAM per
position: ``G = B * H * W`` groups of the ``N = 12`` layer features; the authors' code per image:
``G = B``, ``N = 12 * H * W`` tokens). Output ``(G, N, d)``. Each expert processes ``k`` items per
group, ``k = round(capacity * N / E)`` clamped to ``[1, N]``; with ``E = 4`` and capacity 2 that is
the paper's "top half" (6 of 12 layers).

``gating``: ``"selected"`` (the paper's eq. 4, softmax over each expert's chosen scores) or
``"experts"`` (Zhou et al.: softmax over the experts for each item, the chosen probabilities as
weights; with thousands of items per group, a softmax over an expert's chosen items would make
every weight ~1/k, so token routing uses this one).

Parameters: router ``d*E + E``, noise projection ``d*E + E`` (``noisy=True``), experts
``E * (2*d*h + h + d)`` (:class:`~nnunet_moe.layers.soft_moe.StackedExpertMLPs` with ReLU).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from nnunet_moe.layers.soft_moe import StackedExpertMLPs

__all__ = ["ExpertChoiceMoE", "GATINGS"]

GATINGS = ("selected", "experts")


class ExpertChoiceMoE(nn.Module):
    def __init__(self, dim: int, num_experts: int = 4, hidden_dim: int = 3072, capacity: float = 2.0,
                 noisy: bool = True, gating: str = "selected"):
        super().__init__()
        if not isinstance(num_experts, int) or num_experts < 1:
            raise ValueError(f"num_experts must be an integer >= 1, got {num_experts!r}")
        if not capacity > 0:
            raise ValueError(f"capacity must be > 0 (items per expert = capacity * N / experts), got {capacity!r}")
        if gating not in GATINGS:
            raise ValueError(f"gating must be one of {GATINGS}, got {gating!r}")
        self.num_experts = num_experts
        self.capacity = capacity
        self.gating = gating
        self.router = nn.Linear(dim, num_experts)
        self.noise = nn.Linear(dim, num_experts) if noisy else None
        self.experts = StackedExpertMLPs(num_experts, dim, hidden_dim, activation=F.relu)

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, capacity={self.capacity}, gating={self.gating!r}"

    def items_per_expert(self, n: int) -> int:
        return min(n, max(1, round(self.capacity * n / self.num_experts)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 3:
            raise ValueError(f"ExpertChoiceMoE expects (groups, items, dim) input, got shape {tuple(x.shape)}")
        g, n, d = x.shape
        e, k = self.num_experts, self.items_per_expert(n)
        logits = self.router(x)  # (G, N, E)
        if self.training and self.noise is not None:
            logits = logits + torch.randn_like(logits) * F.softplus(self.noise(x))
        scores = logits.softmax(dim=-1) if self.gating == "experts" else logits
        chosen, index = scores.transpose(1, 2).topk(k, dim=-1)  # (G, E, k) over the N items
        weights = chosen if self.gating == "experts" else chosen.softmax(dim=-1)
        # Flat row indices into x viewed as (G*N, d): index_select's backward is an index_add, no (G, E, N, d) copy.
        rows = (index + torch.arange(g, device=x.device).view(g, 1, 1) * n).reshape(-1)
        picked = x.reshape(g * n, d).index_select(0, rows).view(g, e, k, d)
        out = self.experts(picked) * weights.unsqueeze(-1)
        return x.new_zeros(g * n, d).index_add(0, rows, out.reshape(-1, d).to(x.dtype)).view(g, n, d)
