"""Differentiable (Gumbel) top-K selection of grid cells with a straight-through estimator.

Reference
---------
Jeon, Yang, Fu, Feng, "No More Sliding Window" (NMSW-Net), Sec. III-B-1 "Differentiable Top-K", a
modified reparameterisable subset sampling (Kool et al. 2019, "Stochastic beams and where to find
them: the Gumbel-top-k trick"; Jang et al. / Maddison et al. 2017, Gumbel-softmax).

How the K selections are formed
-------------------------------
Given objectness logits ``s`` over ``G`` cells (log-probabilities up to a constant):

1. perturb once: ``u = s + g`` with ``g ~ Gumbel(0, 1)`` i.i.d. per cell (training; no noise in
   deterministic evaluation). The hard indices are ``topk(u, K)`` in descending order -- by the
   Gumbel-top-k trick this is an exact sample of K cells *without replacement* from ``softmax(s)``
   and equals picking ``argmax`` K times while removing each chosen cell.
2. soft selection ``k`` (relaxed one-hot, Eq. 3-4 of the paper): ``softmax(u / tau)`` over the cells
   *not yet chosen* by steps ``1..k-1`` (their entries are set to ``-inf`` before the softmax, i.e.
   their probability ``pi`` is zeroed). So successive soft selections are an iterative masked
   softmax; all K are computed at once with a ``(K, G)`` "already chosen" mask.
3. straight-through: ``selection = hard + (soft - soft.detach())``. The forward value is exactly the
   one-hot ``hard`` (``x - x == 0`` in floating point), the backward pass is that of ``soft`` -- the
   same estimator as ``hard - soft.detach() + soft`` without its rounding. With
   ``straight_through="scaled"`` the paper's variant ``hard * soft`` is used instead (forward value
   = the soft probability of the chosen cell, which scales the cropped patch intensity).
4. ``R`` extra random cells (the paper's "3 top-k + 1 random patch" during training) are drawn
   uniformly among the cells not chosen in 1; they are constant one-hots (no gradient: they are
   not a function of ``s``).

Edge cases (documented choice): ``K > G`` is clamped to ``G`` with a ``UserWarning`` (small volumes
have few cells and inference asks for e.g. K=30); the random extras are clamped to ``G - K``
silently after that. ``K <= 0``, ``R < 0`` and ``tau <= 0`` raise ``ValueError``.

Shapes
------
``logits``: ``(B, G)``. Output :class:`TopKSelection`: ``selection`` and ``soft`` ``(B, K + R, G)``,
``indices`` ``(B, K + R)`` (top cells first, best first, then the random ones), ``is_random``
``(K + R,)`` bool.
"""
from __future__ import annotations

import warnings
from typing import NamedTuple, Optional

import torch
from torch import nn

__all__ = ["TopKSelection", "gumbel_topk", "GumbelTopK", "STRAIGHT_THROUGH_MODES"]

STRAIGHT_THROUGH_MODES = ("standard", "scaled")


class TopKSelection(NamedTuple):
    selection: torch.Tensor  # (B, K+R, G): one-hot forward values, straight-through gradients
    indices: torch.Tensor  # (B, K+R) int64 cell indices
    soft: torch.Tensor  # (B, K+R, G) relaxed selections (random rows: the constant one-hot)
    is_random: torch.Tensor  # (K+R,) bool, True for the uniformly drawn extra cells


def _sample_gumbel(shape, device, dtype, generator: Optional[torch.Generator]) -> torch.Tensor:
    # g = -log(-log(u)), u ~ U(0, 1); clamp keeps both logs finite.
    tiny = torch.finfo(dtype).tiny
    u = torch.rand(shape, device=device, dtype=dtype, generator=generator).clamp_(tiny, 1.0 - 1e-7)
    return -torch.log(-torch.log(u))


def _check_counts(k: int, k_random: int, num_cells: int):
    if int(k) != k or k <= 0:
        raise ValueError(f"k must be a positive integer (number of cells to select), got {k!r}")
    if int(k_random) != k_random or k_random < 0:
        raise ValueError(f"k_random must be a non-negative integer, got {k_random!r}")
    if num_cells <= 0:
        raise ValueError(f"logits must score at least one cell, got G={num_cells}")
    k, k_random = int(k), int(k_random)
    if k > num_cells:
        warnings.warn(f"k={k} exceeds the number of grid cells G={num_cells}; selecting all {num_cells} cells",
                      UserWarning, stacklevel=3)
        k = num_cells
    k_random = min(k_random, num_cells - k)
    return k, k_random


def gumbel_topk(logits: torch.Tensor, k: int, tau: float = 2.0 / 3.0, k_random: int = 0,
                add_noise: bool = True, straight_through: str = "standard",
                generator: Optional[torch.Generator] = None) -> TopKSelection:
    """Select ``k`` top cells (+ ``k_random`` uniform extras) from ``logits (B, G)``; see module doc.

    ``add_noise=False`` gives the deterministic top-k (indices identical to ``torch.topk``).
    """
    if logits.ndim != 2:
        raise ValueError(f"logits must have shape (B, G), got {tuple(logits.shape)}")
    if not float(tau) > 0:
        raise ValueError(f"tau (Gumbel-softmax temperature) must be > 0, got {tau!r}")
    if straight_through not in STRAIGHT_THROUGH_MODES:
        raise ValueError(f"straight_through must be one of {STRAIGHT_THROUGH_MODES}, got {straight_through!r}")
    batch, num_cells = logits.shape
    k, k_random = _check_counts(k, k_random, num_cells)

    perturbed = logits
    if add_noise:
        perturbed = logits + _sample_gumbel(logits.shape, logits.device, logits.dtype, generator)
    top_indices = torch.topk(perturbed.detach(), k, dim=-1).indices  # (B, K), best first
    hard_top = torch.nn.functional.one_hot(top_indices, num_cells).to(logits.dtype)  # (B, K, G)

    # Row k of "already chosen" = union of the one-hots of rows < k (exclusive cumulative sum).
    chosen_before = (torch.cumsum(hard_top, dim=1) - hard_top).bool()
    scaled = (perturbed / tau).unsqueeze(1).expand(batch, k, num_cells)
    soft_top = torch.softmax(scaled.masked_fill(chosen_before, float("-inf")), dim=-1)

    if straight_through == "standard":
        selection_top = hard_top + (soft_top - soft_top.detach())
    else:  # paper's bias-reduced variant: one-hot scaled by its soft value
        selection_top = hard_top * soft_top

    is_random = torch.zeros(k + k_random, dtype=torch.bool, device=logits.device)
    if k_random == 0:
        return TopKSelection(selection_top, top_indices, soft_top, is_random)

    # Uniform draw among cells not chosen above: top-k_random of i.i.d. uniform keys.
    keys = torch.rand(batch, num_cells, device=logits.device, generator=generator)
    keys = keys.masked_fill(hard_top.sum(1).bool(), -1.0)
    random_indices = torch.topk(keys, k_random, dim=-1).indices
    hard_random = torch.nn.functional.one_hot(random_indices, num_cells).to(logits.dtype)
    is_random[k:] = True
    return TopKSelection(torch.cat([selection_top, hard_random], dim=1),
                         torch.cat([top_indices, random_indices], dim=1),
                         torch.cat([soft_top, hard_random], dim=1),
                         is_random)


class GumbelTopK(nn.Module):
    """Module form of :func:`gumbel_topk` whose behaviour follows ``self.training``.

    Parameters
    ----------
    k: top cells per sample in training (paper: 3).
    k_random: extra uniformly drawn cells in training (paper: 1); never added in eval.
    tau: Gumbel-softmax temperature (paper: not given; authors' code: 2/3, fixed).
    k_eval: top cells in eval (default: ``k``); can be overridden per call.
    noise_at_eval: add Gumbel noise in eval as the authors' code does (default False: deterministic
        ``torch.topk``).
    straight_through: ``"standard"`` (forward exactly one-hot) or ``"scaled"`` (paper's ``hard*soft``).
    """

    def __init__(self, k: int = 3, k_random: int = 1, tau: float = 2.0 / 3.0, k_eval: Optional[int] = None,
                 noise_at_eval: bool = False, straight_through: str = "standard") -> None:
        super().__init__()
        _check_counts(k, k_random, max(int(k), 1) + max(int(k_random), 0))  # validates the values only
        if k_eval is not None:
            _check_counts(k_eval, 0, max(int(k_eval), 1))
        if not float(tau) > 0:
            raise ValueError(f"tau (Gumbel-softmax temperature) must be > 0, got {tau!r}")
        if straight_through not in STRAIGHT_THROUGH_MODES:
            raise ValueError(f"straight_through must be one of {STRAIGHT_THROUGH_MODES}, got {straight_through!r}")
        self.k, self.k_random, self.tau = int(k), int(k_random), float(tau)
        self.k_eval = int(k_eval) if k_eval is not None else int(k)
        self.noise_at_eval = bool(noise_at_eval)
        self.straight_through = straight_through

    def extra_repr(self) -> str:
        return (f"k={self.k}, k_random={self.k_random}, tau={self.tau:.4g}, k_eval={self.k_eval}, "
                f"noise_at_eval={self.noise_at_eval}, straight_through={self.straight_through!r}")

    def forward(self, logits: torch.Tensor, k: Optional[int] = None, k_random: Optional[int] = None,
                generator: Optional[torch.Generator] = None) -> TopKSelection:
        if self.training:
            k = self.k if k is None else k
            k_random = self.k_random if k_random is None else k_random
            add_noise = True
        else:
            k = self.k_eval if k is None else k
            k_random = 0 if k_random is None else k_random
            add_noise = self.noise_at_eval
        return gumbel_topk(logits, k, self.tau, k_random, add_noise, self.straight_through, generator)
