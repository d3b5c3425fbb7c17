"""M4oE layer: one expert MLP per imaging modality and a gate that mixes their outputs.

Reference: Jiang et al., "M4oE: A Foundation Model for Medical Multimodal Image Segmentation with
Mixture of Experts", MICCAI 2024, Sec. 2, Eq. 1-3. The layer replaces the MLP of every Swin block:
``z = M4oE(LN(z~)) + z~``. Expert ``e``: ``W_o,e GELU(W_h,e x + b_h,e) + b_o,e`` with hidden width
``mlp_ratio * d`` (4d), all ``E`` experts run on every token (dense, no top-k, no auxiliary loss).

Gates (``gate``):

- ``"experts"`` (paper, Eq. 2-3): ``g = softmax_e(W_g x + b_g)`` with ``W_g``: Linear(d, E);
  ``y = sum_e g_e expert_e(x)``. Weights per token, sum 1 over experts. ``d*E + E`` parameters.
- ``"channels"`` (the authors' released code, ``MoEFFN_Gating``): ``w = softmax_c(W x + b)`` with
  Linear(d, d), a softmax over the *channels*; ``y = w * sum_e expert_e(x)``. It never weights one expert
  against another and ignores the modality. ``d*d + d`` parameters.
- ``"modality"`` (ours, conditioned on the case's modality): ``g = softmax_e(W_g x + b_g + B[m])`` with a
  learned ``(E, E)`` logit bias ``B`` (``modality_bias``) per modality ``m``. It is the paper's gate with the
  one-hot modality concatenated to its input (``Linear(d + E, E)`` on ``[x, onehot(m)]`` has exactly these
  parameters). ``B`` starts at zero, so the gate starts as the paper's and learns how much to favour each
  expert per modality. ``d*E + E + E*E`` parameters.
- ``"onehot"``: ``g = onehot(m)``: every token of a sample goes through its modality's expert only
  (no gate parameters). This is the expert-pretraining route (each modality's tokens through its own expert)
  and the authors' ``MoEFFN_dataset``. All experts are still evaluated and multiplied by 0 or 1, so the
  result equals the chosen expert exactly and every expert tensor takes part in the graph (DDP without
  ``find_unused_parameters``).

One expert per modality: the modality index ``m`` of a sample is an expert index in ``0 .. E-1``.

Shapes: ``x`` ``(B, N, d)`` or ``(B, *spatial, d)`` (channels last, as MONAI's Swin block calls its MLP);
``modality`` ``(B,)`` integer tensor, required by ``"modality"`` and ``"onehot"``, ignored by the others.
Output: the shape of ``x``. :meth:`M4oE.gate_weights` returns ``(B, N, E)`` (``(B, N, d)`` for ``"channels"``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from nnunet_moe.layers.soft_moe import StackedExpertMLPs

__all__ = ["M4oE", "GATES", "check_modality"]

GATES = ("experts", "channels", "modality", "onehot")
_NEEDS_MODALITY = ("modality", "onehot")


def check_modality(modality, batch_size: int, num_experts: int, gate: str) -> None:
    """Raise ``ValueError`` unless ``modality`` is a ``(batch_size,)`` integer tensor of expert indices."""
    if modality is None:
        raise ValueError(
            f"gate={gate!r} needs the modality of every sample: call the network as network(x, modality) with "
            f"a ({batch_size},) integer tensor of modality indices 0..{num_experts - 1}, or use gate='experts'"
        )
    is_tensor = isinstance(modality, torch.Tensor)
    integer = is_tensor and not (modality.dtype.is_floating_point or modality.dtype.is_complex
                                 or modality.dtype == torch.bool)
    if not integer or tuple(modality.shape) != (batch_size,):
        got = f"a {modality.dtype} tensor of shape {tuple(modality.shape)}" if is_tensor else type(modality).__name__
        raise ValueError(f"modality must be an integer tensor of shape ({batch_size},) (one index per sample), "
                         f"got {got}")
    if not torch.compiler.is_compiling():
        bad = modality[(modality < 0) | (modality >= num_experts)]
        if bad.numel():
            raise ValueError(f"modality indices {sorted(set(bad.tolist()))} are out of range: this layer has "
                             f"{num_experts} experts, one per modality, so indices must be in 0..{num_experts - 1}")


class M4oE(nn.Module):
    """Medical multimodal mixture of experts replacing a Swin block's MLP (Jiang et al., MICCAI 2024).

    Args:
        dim: token width ``d``.
        num_experts: ``E`` >= 1, one per modality.
        gate: one of :data:`GATES` (module docstring).
        mlp_ratio: expert hidden width ``int(d * mlp_ratio)`` (4, Swin's MLP).
        dropout: dropout after the expert activation.

    Parameters: ``experts`` (:class:`~nnunet_moe.layers.soft_moe.StackedExpertMLPs`, ``nn.Linear`` layouts
    per expert), ``gate`` (``nn.Linear``; absent for ``"onehot"``), ``modality_bias`` (``"modality"`` only).
    """

    def __init__(self, dim: int, num_experts: int, gate: str = "experts", mlp_ratio: float = 4.0,
                 dropout: float = 0.0, device=None, dtype=None) -> None:
        super().__init__()
        if not isinstance(dim, int) or dim < 1:
            raise ValueError(f"dim must be a positive integer, got {dim!r}")
        if not isinstance(num_experts, int) or num_experts < 1:
            raise ValueError(f"num_experts must be an integer >= 1 (one expert per modality), got {num_experts!r}")
        if gate not in GATES:
            raise ValueError(f"gate must be one of {', '.join(GATES)}, got {gate!r}")
        hidden = int(dim * mlp_ratio)
        if hidden < 1:
            raise ValueError(f"mlp_ratio={mlp_ratio!r} gives an expert hidden width of {hidden} for dim={dim}; "
                             "need >= 1")
        factory = {"device": device, "dtype": dtype}
        self.dim, self.num_experts, self.gate_type = dim, num_experts, gate
        self.experts = StackedExpertMLPs(num_experts, dim, hidden, dropout, **factory)
        if gate != "onehot":
            self.gate = nn.Linear(dim, dim if gate == "channels" else num_experts, **factory)
        if gate == "modality":
            self.modality_bias = nn.Parameter(torch.zeros(num_experts, num_experts, **factory))

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_experts={self.num_experts}, gate={self.gate_type!r}"

    @property
    def needs_modality(self) -> bool:
        return self.gate_type in _NEEDS_MODALITY

    def _tokens(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() < 3 or x.shape[-1] != self.dim:
            raise ValueError(f"M4oE(dim={self.dim}) expects (B, N, {self.dim}) or (B, *spatial, {self.dim}) "
                             f"channels-last input, got shape {tuple(x.shape)}")
        return x.reshape(x.shape[0], -1, self.dim)

    def _weights(self, tokens: torch.Tensor, modality) -> torch.Tensor:
        b, n, _ = tokens.shape
        if self.needs_modality:
            check_modality(modality, b, self.num_experts, self.gate_type)
            modality = modality.to(tokens.device, torch.long)
        if self.gate_type == "onehot":
            return F.one_hot(modality, self.num_experts).to(tokens.dtype)[:, None, :].expand(b, n, -1)
        logits = self.gate(tokens)
        if self.gate_type == "modality":
            logits = logits + self.modality_bias[modality][:, None, :]
        return torch.softmax(logits, dim=-1)

    def gate_weights(self, x: torch.Tensor, modality=None) -> torch.Tensor:
        """The gate's weights per token: ``(B, N, E)``, or ``(B, N, d)`` channel weights for ``"channels"``."""
        return self._weights(self._tokens(x), modality)

    def forward(self, x: torch.Tensor, modality=None) -> torch.Tensor:
        tokens = self._tokens(x)
        weights = self._weights(tokens, modality)
        b, n, d = tokens.shape
        outputs = self.experts(tokens.unsqueeze(1).expand(b, self.num_experts, n, d))  # (B, E, N, d)
        if self.gate_type == "channels":
            mixed = weights * outputs.sum(dim=1)
        else:
            mixed = torch.einsum("bne,bend->bnd", weights, outputs)
        return mixed.reshape(x.shape)
