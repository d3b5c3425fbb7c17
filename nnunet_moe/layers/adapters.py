"""Bottleneck adapters attached to a ViT block without touching the block's code or its keys.

References
----------
- Li, Wu, Gu et al., "MoE-SAM: Enhancing SAM for Medical Image Segmentation with
  Mixture-of-Experts", eq. (1): ``Adapter(X) = X + s(X W_down) W_up`` after
  the attention of every encoder block, and a parallel adapter on the MLP scaled by ``s``.
- Wu et al., "Medical SAM Adapter" (MSA): the same pair of adapters (attention adapter with a
  skip, MLP adapter in parallel scaled by 0.5, bottleneck ratio 0.25).
- Chen et al., "AdaptFormer", NeurIPS 2022: the parallel, scaled MLP adapter; its up projection
  starts at zero, so the adapted block equals the pretrained block at initialisation.

Shapes
------
:class:`Adapter`: ``(..., d)`` -> ``(..., d)`` (token-wise; works on SAM's windowed
``(B*windows, w, w, d)`` and on ``(B, H, W, d)`` tokens alike). Parameters per adapter:
``d*b + b + b*d + d`` with ``b = int(d * ratio)``; ViT-B, ratio 0.25: 295,872.

:func:`attach_block_adapters` registers two adapters on a SAM ``Block`` as ``block.attn_adapter``
and ``block.mlp_adapter`` and two forward hooks:

- on ``block.attn``: ``attn(x) -> attn_adapter(attn(x))`` (the adapter with its skip sits on the
  attention branch, before the block's residual addition);
- on ``block.mlp``: ``mlp(z) -> mlp(z) + scale * mlp_adapter(z)`` (``z = norm2(x)``; no skip).

SAM's own keys (``blocks.i.attn.qkv.weight`` ...) stay unchanged, the adapters add
``blocks.i.attn_adapter.*`` and ``blocks.i.mlp_adapter.*``.
"""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["Adapter", "attach_block_adapters"]


class Adapter(nn.Module):
    """``x -> [x +] up(act(down(x)))``: bottleneck ``int(dim * ratio)``, GELU, optional skip.

    ``up`` is zero-initialised (AdaptFormer), so a freshly attached adapter leaves a pretrained
    network's output unchanged; its first gradient step moves ``up``, the next ones ``down`` too.
    """

    def __init__(self, dim: int, ratio: float = 0.25, skip: bool = True):
        super().__init__()
        hidden = int(dim * ratio)
        if hidden < 1:
            raise ValueError(f"adapter bottleneck int({dim} * {ratio}) = {hidden}; need >= 1")
        self.skip = skip
        self.down = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.up = nn.Linear(hidden, dim)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        delta = self.up(self.act(self.down(x)))
        return x + delta if self.skip else delta


class _AttnHook:
    """Forward hook of ``block.attn``: its output through the attention adapter (picklable, unlike a lambda)."""

    def __init__(self, block: nn.Module):
        self.block = block

    def __call__(self, module, args, output):
        return self.block.attn_adapter(output)


class _MLPHook:
    """Forward hook of ``block.mlp``: adds the scaled parallel adapter of the MLP's input."""

    def __init__(self, block: nn.Module, scale: float):
        self.block = block
        self.scale = scale

    def __call__(self, module, args, output):
        return output + self.scale * self.block.mlp_adapter(args[0])


def attach_block_adapters(block: nn.Module, dim: int, ratio: float = 0.25, mlp_scale: float = 0.5) -> None:
    """Give a ViT block (``.attn`` and ``.mlp`` submodules, e.g. segment_anything's ``Block``) MoE-SAM's adapters."""
    if hasattr(block, "attn_adapter"):
        raise ValueError("this block already has adapters attached")
    block.attn_adapter = Adapter(dim, ratio, skip=True)
    block.mlp_adapter = Adapter(dim, ratio, skip=False)
    block.attn.register_forward_hook(_AttnHook(block))
    block.mlp.register_forward_hook(_MLPHook(block, mlp_scale))
