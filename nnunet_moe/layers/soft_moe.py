"""Soft Mixture-of-Experts layer with fused (attention-kernel) dispatch and combine.

References
----------
- Puigcerver, Riquelme, Mustafa, Houlsby, "From Sparse to Soft Mixtures of Experts",
  ICLR 2024 (arXiv:2308.00951): learned slot parameters ``Phi`` (``slots="learned"``).
- Płotka, Chrabaszcz, Biecek, "Swin SMT: Global Sequential Modeling for Enhancing 3D Medical
  Image Segmentation", MICCAI 2024: Soft MoE replacing the MLP of Swin blocks; the authors' code
  derives the slots from the input itself (``slots="dynamic"``).

Shapes
------
Input ``x``: ``(B, N, d)`` tokens, or ``(B, *spatial, d)`` (the spatial positions are flattened
into ``N`` tokens, so routing is global over all of them). Output: same shape as the input.

With ``E`` experts and ``S`` slots per expert (``S = ceil(N / E)`` for dynamic slots, fixed for
learned slots) the routing logits are ``logits[b, n, e, s] = <key_n, slot_{e,s}>``:

- dispatch weights ``D = softmax over tokens n`` -> slot inputs ``X~[e, s] = sum_n D[n, e, s] v_n``;
- each expert ``e`` (Linear(d, r*d) - GELU - Dropout - Linear(r*d, d)) maps its ``S`` slots;
- combine weights ``C = softmax over all slots (e, s)`` -> ``y_n = sum_{e,s} C[n, e, s] Y[e, s]``.

Both softmax-weighted sums are attention operations with unit scale (dispatch: slots are queries
over tokens; combine: tokens are queries over slots, values = expert outputs), so they run through
``torch.nn.functional.scaled_dot_product_attention``. Where a fused kernel exists (CPU flash
attention for float32, CUDA flash / memory-efficient kernels) the ``N x (E*S)`` logits are never
materialised, which is what makes global routing over a whole Swin stage affordable
(``N = E*S ~ 32k`` tokens would need 4 GiB per logits tensor otherwise).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["SoftMoE", "StackedExpertMLPs", "L2RMSNorm", "SLOT_SCHEMES"]

SLOT_SCHEMES = ("dynamic", "learned")


class L2RMSNorm(nn.Module):
    """RMS-style normalisation used by the dynamic-slot scheme: ``l2_normalise(x) * sqrt(d) * gamma``.

    ``x``: ``(..., d)`` -> ``(..., d)``; ``gamma``: ``(d,)`` initialised to ones.
    """

    def __init__(self, dim: int, device=None, dtype=None) -> None:
        super().__init__()
        self.scale = math.sqrt(dim)
        self.gamma = nn.Parameter(torch.ones(dim, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x, dim=-1) * self.scale * self.gamma


class StackedExpertMLPs(nn.Module):
    """``E`` independent two-layer MLPs (Linear(d, h) - activation - Dropout - Linear(h, d)) with stacked weights.

    Weights use ``nn.Linear``'s layout per expert (``fc1_weight[e]`` is expert ``e``'s
    ``linear1.weight`` of shape ``(h, d)``), so a dense MLP can be copied into every expert directly.
    The experts run as two batched matrix products (``torch.baddbmm`` over the expert axis) rather than
    a Python loop of ``E`` small matmuls: one kernel launch per layer, same memory, and all experts
    always receive a gradient (Soft MoE gives every slot a weighted input).

    ``activation``: GELU by default (Swin); MoE-SAM's experts use ReLU.

    Input/output: ``(B, E, S, d)``.
    """

    def __init__(self, num_experts: int, dim: int, hidden_dim: int, dropout: float = 0.0, device=None, dtype=None,
                 activation=F.gelu):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.num_experts = num_experts
        self.dim = dim
        self.hidden_dim = hidden_dim
        self.fc1_weight = nn.Parameter(torch.empty(num_experts, hidden_dim, dim, **factory))
        self.fc1_bias = nn.Parameter(torch.empty(num_experts, hidden_dim, **factory))
        self.fc2_weight = nn.Parameter(torch.empty(num_experts, dim, hidden_dim, **factory))
        self.fc2_bias = nn.Parameter(torch.empty(num_experts, dim, **factory))
        self.dropout = nn.Dropout(dropout)
        self.activation = activation
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Same distribution as nn.Linear's default init, drawn independently for each expert.
        bound1 = 1.0 / math.sqrt(self.dim)
        bound2 = 1.0 / math.sqrt(self.hidden_dim)
        nn.init.uniform_(self.fc1_weight, -bound1, bound1)
        nn.init.uniform_(self.fc1_bias, -bound1, bound1)
        nn.init.uniform_(self.fc2_weight, -bound2, bound2)
        nn.init.uniform_(self.fc2_bias, -bound2, bound2)

    @torch.no_grad()
    def trunc_normal_init_(self, std: float = 0.02) -> None:
        """Swin's / timm's ``_init_weights`` as for ``nn.Linear`` experts: weights truncated normal, biases 0."""
        nn.init.trunc_normal_(self.fc1_weight, std=std)
        nn.init.trunc_normal_(self.fc2_weight, std=std)
        nn.init.zeros_(self.fc1_bias)
        nn.init.zeros_(self.fc2_bias)

    def forward(self, slots: torch.Tensor) -> torch.Tensor:
        b, e, s, d = slots.shape
        x = slots.transpose(0, 1).reshape(e, b * s, d)
        hidden = torch.baddbmm(self.fc1_bias.unsqueeze(1), x, self.fc1_weight.transpose(1, 2))
        hidden = self.dropout(self.activation(hidden))
        out = torch.baddbmm(self.fc2_bias.unsqueeze(1), hidden, self.fc2_weight.transpose(1, 2))
        return out.view(e, b, s, d).transpose(0, 1)

    @torch.no_grad()
    def copy_from_dense(
        self, linear1_weight: torch.Tensor, linear1_bias: torch.Tensor, linear2_weight: torch.Tensor, linear2_bias: torch.Tensor
    ) -> None:
        """Upcycling: initialise every expert as a copy of one dense MLP (``nn.Linear`` layouts)."""
        expected = {
            "linear1.weight": (linear1_weight, self.fc1_weight.shape[1:]),
            "linear1.bias": (linear1_bias, self.fc1_bias.shape[1:]),
            "linear2.weight": (linear2_weight, self.fc2_weight.shape[1:]),
            "linear2.bias": (linear2_bias, self.fc2_bias.shape[1:]),
        }
        for name, (tensor, shape) in expected.items():
            if tuple(tensor.shape) != tuple(shape):
                raise ValueError(
                    f"dense MLP {name} has shape {tuple(tensor.shape)}, each expert expects {tuple(shape)}"
                )
        for target, source in (
            (self.fc1_weight, linear1_weight),
            (self.fc1_bias, linear1_bias),
            (self.fc2_weight, linear2_weight),
            (self.fc2_bias, linear2_bias),
        ):
            target.copy_(source.to(dtype=target.dtype, device=target.device).unsqueeze(0).expand_as(target))


def _attend(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """softmax(query @ key^T) @ value over the key axis, unit scale, one head. ``(B, L, d)`` tensors."""
    out = F.scaled_dot_product_attention(query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1), scale=1.0)
    return out.squeeze(1)


class SoftMoE(nn.Module):
    """Soft Mixture-of-Experts replacing a transformer MLP (Puigcerver et al. 2024; Swin SMT, Płotka et al. 2024).

    Args:
        dim: token width ``d``.
        num_experts: number of experts ``E`` (>= 1).
        slots: ``"dynamic"`` (Swin SMT authors' scheme, the default) or ``"learned"`` (original Soft MoE).

            - ``"dynamic"``: tokens are normalised by :class:`L2RMSNorm` (``gamma`` in ``token_norm``);
              the normalised tokens are zero-padded to a multiple of ``E``, consecutive groups of ``E``
              tokens averaged (``S = ceil(N / E)`` group means), projected by a bias-free
              ``Linear(d, E*d)`` (``slot_proj``) into ``E`` slot embeddings per group and normalised
              again (``slot_norm``). Logits = normalised tokens . slot embeddings; the normalised
              tokens are what is dispatched. Padding only feeds the group means, it never receives
              dispatch weight. (The bias-free projection followed by a normalisation makes the slot
              embeddings independent of whether the last group is divided by ``E`` or by its number
              of real tokens.) Parameters: ``E*d^2 + 2d`` plus the experts.
            - ``"learned"``: slot parameters ``Phi`` of shape ``(d, E*S)`` (``slot_embeddings``) with
              ``S = slots_per_expert``; as in the paper, logits use l2-normalised tokens and
              l2-normalised columns of ``Phi`` times a learned scalar ``scale`` (initialised to 1);
              the raw tokens are dispatched.
        slots_per_expert: ``S`` for learned slots (default 1). Must stay ``None`` for dynamic slots,
            where it follows from the token count.
        mlp_ratio: expert hidden width = ``int(d * mlp_ratio)`` (4 as in Swin).
        dropout: dropout after the expert activation.
        allow_more_slots_than_tokens: learned slots only. By default a forward pass with
            ``E*S > N`` raises, because then some slots can only repeat mixtures of fewer tokens.

    Shapes: ``(B, N, d)`` or ``(B, *spatial, d)`` in, same shape out.
    """

    def __init__(
        self,
        dim: int,
        num_experts: int,
        slots: str = "dynamic",
        slots_per_expert: int | None = None,
        mlp_ratio: float = 4.0,
        dropout: float = 0.0,
        allow_more_slots_than_tokens: bool = False,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        if not isinstance(dim, int) or dim < 1:
            raise ValueError(f"dim must be a positive integer, got {dim!r}")
        if not isinstance(num_experts, int) or num_experts < 1:
            raise ValueError(
                f"num_experts must be an integer >= 1, got {num_experts!r}; "
                "for no experts keep the dense MLP instead of a SoftMoE layer"
            )
        if slots not in SLOT_SCHEMES:
            raise ValueError(f"slots must be one of {SLOT_SCHEMES}, got {slots!r}")
        if slots == "dynamic":
            if slots_per_expert is not None:
                raise ValueError(
                    f"slots_per_expert={slots_per_expert!r} cannot be set with slots='dynamic': the number of slots "
                    "per expert is ceil(tokens / num_experts); use slots='learned' for a fixed number"
                )
        else:
            slots_per_expert = 1 if slots_per_expert is None else slots_per_expert
            if not isinstance(slots_per_expert, int) or slots_per_expert < 1:
                raise ValueError(f"slots_per_expert must be an integer >= 1, got {slots_per_expert!r}")
        hidden_dim = int(dim * mlp_ratio)
        if hidden_dim < 1:
            raise ValueError(f"mlp_ratio={mlp_ratio!r} gives an expert hidden width of {hidden_dim} for dim={dim}; need >= 1")
        if not 0.0 <= dropout <= 1.0:
            raise ValueError(f"dropout must be in [0, 1], got {dropout!r}")

        factory = {"device": device, "dtype": dtype}
        self.dim = dim
        self.num_experts = num_experts
        self.slots = slots
        self.slots_per_expert = slots_per_expert
        self.allow_more_slots_than_tokens = allow_more_slots_than_tokens
        if slots == "dynamic":
            self.token_norm = L2RMSNorm(dim, **factory)
            self.slot_proj = nn.Linear(dim, num_experts * dim, bias=False, **factory)
            self.slot_norm = L2RMSNorm(dim, **factory)
        else:
            # LeCun-normal init as in the paper's reference implementation.
            self.slot_embeddings = nn.Parameter(
                torch.randn(dim, num_experts * slots_per_expert, **factory) / math.sqrt(dim)
            )
            self.scale = nn.Parameter(torch.ones((), **factory))
        self.experts = StackedExpertMLPs(num_experts, dim, hidden_dim, dropout, **factory)

    def extra_repr(self) -> str:
        s = f"dim={self.dim}, num_experts={self.num_experts}, slots={self.slots!r}"
        if self.slots == "learned":
            s += f", slots_per_expert={self.slots_per_expert}"
        return s

    def num_slots(self, num_tokens: int) -> int:
        """Total number of slots ``E*S`` used for ``num_tokens`` tokens."""
        if self.slots == "dynamic":
            return self.num_experts * math.ceil(num_tokens / self.num_experts)
        return self.num_experts * self.slots_per_expert

    def routing(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Return ``(keys, values, slot_queries)`` for ``(B, N, d)`` tokens.

        ``keys``: ``(B, N, d)`` token side of the logits; ``values``: ``(B, N, d)`` what is dispatched;
        ``slot_queries``: ``(B, E*S, d)``, slot-major per expert (slot ``e*S + s`` belongs to expert ``e``).
        ``logits[b, n, e*S + s] = keys[b, n] . slot_queries[b, e*S + s]``.
        """
        b, n, d = tokens.shape
        e = self.num_experts
        if self.slots == "dynamic":
            normed = self.token_norm(tokens)
            groups = math.ceil(n / e)
            padded = F.pad(normed, (0, 0, 0, groups * e - n))
            group_means = padded.view(b, groups, e, d).mean(dim=2)
            slot_embeds = self.slot_proj(group_means).view(b, groups, e, d).transpose(1, 2)
            slot_queries = self.slot_norm(slot_embeds).reshape(b, e * groups, d)
            return normed, normed, slot_queries
        keys = F.normalize(tokens, dim=-1)
        phi = self.scale * F.normalize(self.slot_embeddings, dim=0)
        slot_queries = phi.t().unsqueeze(0).expand(b, -1, -1)
        return keys, tokens, slot_queries

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() < 3:
            raise ValueError(f"SoftMoE expects (B, N, d) or (B, *spatial, d) input, got shape {tuple(x.shape)}")
        if x.shape[-1] != self.dim:
            raise ValueError(f"SoftMoE(dim={self.dim}) got input with last dimension {x.shape[-1]} (shape {tuple(x.shape)})")
        shape = x.shape
        tokens = x.reshape(shape[0], -1, self.dim)
        b, n, d = tokens.shape
        if n == 0:
            raise ValueError(f"SoftMoE got an input without tokens (shape {tuple(shape)})")
        if self.slots == "learned" and not self.allow_more_slots_than_tokens and self.num_slots(n) > n:
            raise ValueError(
                f"SoftMoE with learned slots has {self.num_experts} experts x {self.slots_per_expert} slots = "
                f"{self.num_slots(n)} slots but the input has only {n} tokens; use fewer experts/slots, a larger "
                "input, slots='dynamic', or allow_more_slots_than_tokens=True"
            )
        keys, values, slot_queries = self.routing(tokens)
        # Dispatch: every slot is a softmax-over-tokens mixture of the token values.
        slot_inputs = _attend(slot_queries, keys, values)
        slot_outputs = self.experts(slot_inputs.reshape(b, self.num_experts, -1, d)).reshape(b, -1, d)
        # Combine: every token is a softmax-over-all-slots mixture of the expert outputs.
        out = _attend(keys, slot_queries, slot_outputs)
        return out.reshape(shape)

    @torch.no_grad()
    def upcycle_from_dense(self, mlp: nn.Module) -> None:
        """Copy a dense MLP with ``linear1``/``linear2`` (MONAI ``MLPBlock``) into every expert."""
        self.experts.copy_from_dense(mlp.linear1.weight, mlp.linear1.bias, mlp.linear2.weight, mlp.linear2.bias)
