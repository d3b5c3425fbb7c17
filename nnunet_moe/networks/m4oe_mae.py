"""M4oE stage 1: a masked autoencoder whose encoder is M4oE's, each modality's tokens through its own expert.

References
----------
- Jiang et al., "M4oE", MICCAI 2024, "Two-phase Training Strategy": the experts are pretrained per modality
  with an MAE "without the gating network"; stage 2 loads the encoder and experts and adds the gate.
- Xu et al., "Swin MAE: Masked autoencoders for small datasets", Comput. Biol. Med. 161 (2023): window
  masking (:mod:`nnunet_moe.layers.window_masking`), masked tokens replaced by a learned token, a decoder
  without skips, MSE on the masked patches only. Written from the paper (its code is non-commercial).
- He et al., "Masked autoencoders are scalable vision learners", CVPR 2022: the pixel-patch target and the
  optional per-patch normalisation of the target (``norm_pix_loss``).

Architecture::

    encoder: M4oE's SwinUnetEncoder (PatchEmbed, Swin stages with patch merging, LayerNorm), every block
             MLP an M4oE layer with gate "onehot": a sample's tokens go through its modality's expert only
             (no gate in stage 1); with 0 or 1 modality the MLPs are dense (plain Swin-Unet encoder)
    masking: after the patch embedding, mask_ratio (0.75) of the 4x4-token windows -> learned mask token
    decoder: no skips (the skips would hand the unmasked tokens' features around the bottleneck):
             per level Swin-Unet's patch expanding x2 (Linear(2C, 4C), pixel shuffle to C, LayerNorm) and
             decoder_depth dense Swin blocks,
             LayerNorm(C_0), Linear(C_0, p^d * in_channels): one pixel patch per token
    loss:    MSE between predicted and true pixel patches, averaged over the masked patches only

The encoder is built by :class:`~nnunet_moe.networks.m4oe.M4oESwinUnet` itself (its decoder is thrown away)
so that its modules, parameter names, stochastic-depth rates and initialisation are exactly the fine-tuning
network's: :meth:`M4oEMAE.encoder_state_dict` maps key for key onto an ``M4oESwinUnet``.

``norm_pix_loss`` (default False): if True, each target patch is normalised by its own pixel mean and
standard deviation (MAE's variant, which sharpens reconstructions of natural images). Off by default:
nnU-Net's preprocessed images are already normalised per image (MR z-score) or dataset-wide (CT), and
normalising each 4x4 patch again would discard the absolute intensities that tell CT tissues apart.

Forward: ``model(images, modality=None, generator=None)`` -> :class:`MAEOutput` ``(loss, pred, mask)``:
``images`` ``(B, in_channels, *S)``, every ``S_i`` a multiple of :meth:`M4oEMAE.input_divisor`;
``modality`` ``(B,)`` expert indices (required with >= 2 experts); ``pred`` ``(B, *S/p, p^d * C)`` pixel
patches (channel last within a patch, see :func:`patchify`); ``mask`` ``(B, *S/p)`` bool, True = masked.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Sequence

import torch
from torch import nn

from nnunet_moe.layers.m4oe import check_modality
from nnunet_moe.layers.window_masking import WindowMasking
from nnunet_moe.networks.m4oe import M4oESwinUnet, SwinStage
from nnunet_moe.networks.swin_umamba import PatchExpand, check_spatial_shape, vmamba_init_

__all__ = ["M4oEMAE", "MAEOutput", "MAEDecoder", "patchify", "masked_patch_mse"]


class MAEOutput(NamedTuple):
    loss: torch.Tensor
    pred: torch.Tensor
    mask: torch.Tensor


def patchify(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """``(B, C, *S)`` -> ``(B, *S/p, p^d * C)``: each token's pixel patch, flattened patch-axes first, channel last."""
    b, c, spatial = images.shape[0], images.shape[1], images.shape[2:]
    d, p = len(spatial), patch_size
    grid = [s // p for s in spatial]
    x = images.reshape(b, c, *[v for g in grid for v in (g, p)])
    # (B, C, g0, p, g1, p, ...) -> (B, g0, g1, ..., p, p, ..., C)
    order = [0] + [2 + 2 * i for i in range(d)] + [3 + 2 * i for i in range(d)] + [1]
    return x.permute(*order).reshape(b, *grid, p ** d * c)


def masked_patch_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor,
                     norm_pix_loss: bool = False) -> torch.Tensor:
    """Mean over the masked patches of each patch's pixel MSE. ``pred``/``target`` ``(B, *G, P)``, ``mask``
    ``(B, *G)``; unmasked patches contribute nothing. In float32 (autocast would otherwise square in fp16)."""
    pred, target = pred.float(), target.float()
    if norm_pix_loss:
        mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
        target = (target - mean) / (var + 1e-6).sqrt()
    per_patch = (pred - target).pow(2).mean(-1)
    weight = mask.to(per_patch.dtype)
    return (per_patch * weight).sum() / weight.sum().clamp_min(1.0)


class MAEDecoder(nn.Module):
    """The light reconstruction decoder: patch expanding and dense Swin blocks per level, no skips.

    ``(B, *S/(p*2^(n-1)), dims[-1])`` bottleneck -> ``(B, *S/p, p^d * in_channels)`` pixel patches.
    ``deep_supervision`` is nnU-Net's switch (``set_deep_supervision_enabled`` sets it); the MAE has one output.
    """

    deep_supervision = False

    def __init__(self, dims: Sequence[int], num_heads: Sequence[int], window_size: int, spatial_dims: int,
                 patch_size: int, in_channels: int, depth: int, mlp_ratio: float, qkv_bias: bool) -> None:
        super().__init__()
        levels = range(len(dims) - 2, -1, -1)  # deepest first
        self.ups = nn.ModuleList(PatchExpand(dims[lv + 1], dims[lv], 2, spatial_dims) for lv in levels)
        self.stages = nn.ModuleList(
            SwinStage(dims[lv], depth, num_heads[lv], (window_size,) * spatial_dims, [0.0] * depth, num_experts=0,
                      gate="experts", mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, drop=0.0, attn_drop=0.0,
                      expert_dropout=0.0)
            for lv in levels)
        self.norm = nn.LayerNorm(dims[0])
        self.pred = nn.Linear(dims[0], patch_size ** spatial_dims * in_channels)

    def forward(self, bottleneck: torch.Tensor) -> torch.Tensor:
        x = bottleneck
        for up, stage in zip(self.ups, self.stages):
            x = stage(up(x))
        return self.pred(self.norm(x))


class M4oEMAE(nn.Module):
    """Masked autoencoder on M4oE's encoder (module docstring).

    Args:
        in_channels: image channels.
        num_experts: one per modality (expert ``i`` = the ``i``-th modality of the merged dataset); 0 or 1:
            dense MLPs.
        spatial_dims, embed_dim, depths, num_heads, window_size, patch_size, mlp_ratio, qkv_bias: the encoder's,
            as :class:`~nnunet_moe.networks.m4oe.M4oESwinUnet` (defaults: Swin-Unet's); stage 2 must use the same.
        drop_path_rate: stochastic depth in the encoder (0: MAE pretrains without it).
        mask_ratio, mask_window: Swin-MAE's 0.75 and 4 (tokens).
        decoder_depth: dense Swin blocks per decoder level (1: a light decoder; it is discarded after stage 1).
        norm_pix_loss: per-patch normalised targets (module docstring; default off).
    """

    def __init__(self, in_channels: int, num_experts: int = 0, spatial_dims: int = 2, embed_dim: int = 96,
                 depths: Sequence[int] = (2, 2, 2, 2), num_heads: Sequence[int] = (3, 6, 12, 24),
                 window_size: int = 7, patch_size: int = 4, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 drop_path_rate: float = 0.0, mask_ratio: float = 0.75, mask_window: int = 4,
                 decoder_depth: int = 1, norm_pix_loss: bool = False) -> None:
        super().__init__()
        n = len(depths)
        # The fine-tuning network builds (and initialises) the encoder; only its encoder is kept.
        donor = M4oESwinUnet(in_channels, 1, num_experts=num_experts, gate="onehot", spatial_dims=spatial_dims,
                             embed_dim=embed_dim, depths=depths, decoder_depths=(1,) * (n - 1), num_heads=num_heads,
                             window_size=window_size, patch_size=patch_size, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias,
                             drop_path_rate=drop_path_rate)
        self.encoder = donor.encoder
        self.num_experts, self.in_channels, self.spatial_dims = donor.num_experts, in_channels, spatial_dims
        self.patch_size, self.num_stages, self.norm_pix_loss = patch_size, n, bool(norm_pix_loss)
        dims = [embed_dim * 2 ** i for i in range(n)]
        self.masking = WindowMasking(dims[0], mask_ratio, mask_window)
        self.decoder = MAEDecoder(dims, num_heads, window_size, spatial_dims, patch_size, in_channels,
                                  decoder_depth, mlp_ratio, qkv_bias)
        self.decoder.apply(vmamba_init_)  # Swin's rule (Linear trunc-normal 0.02, LayerNorm 1/0), as the encoder
        # what stage 2 must match; saved in the weights file
        self.architecture = dict(in_channels=in_channels, spatial_dims=spatial_dims, embed_dim=embed_dim,
                                 depths=list(depths), num_heads=list(num_heads), window_size=window_size,
                                 patch_size=patch_size, mlp_ratio=float(mlp_ratio), qkv_bias=bool(qkv_bias))

    @classmethod
    def input_divisor(cls, patch_size: int = 4, num_stages: int = 4, mask_window: int = 4) -> int:
        """Spatial sizes must be multiples of this: the encoder's divisor (32) and whole masking windows (16)."""
        return math.lcm(M4oESwinUnet.input_divisor(patch_size, num_stages), patch_size * mask_window)

    @classmethod
    def deep_supervision_factors(cls, *args, **kwargs) -> tuple[int, ...]:
        return (1,)  # one output; nnU-Net's deep-supervision scales are unused (the loss is the MAE's)

    def encoder_state_dict(self) -> dict[str, torch.Tensor]:
        """Encoder and expert tensors under the names of an ``M4oESwinUnet`` (``encoder.*``), on the CPU."""
        return {f"encoder.{k}": v.detach().cpu().clone() for k, v in self.encoder.state_dict().items()}

    def validate_input(self, images: torch.Tensor, modality) -> None:
        name = type(self).__name__
        if images.dim() != self.spatial_dims + 2 or images.shape[1] != self.in_channels:
            raise ValueError(f"{name}(in_channels={self.in_channels}, spatial_dims={self.spatial_dims}) expects "
                             f"images (B, {self.in_channels}, {'D, H, W' if self.spatial_dims == 3 else 'H, W'}), "
                             f"got shape {tuple(images.shape)}")
        divisor = self.input_divisor(self.patch_size, self.num_stages, self.masking.window)
        check_spatial_shape(images.shape[2:], divisor, f"{name} (patch {self.patch_size}, "
                            f"{self.num_stages - 1} merges, {self.masking.window}-token masking windows)")
        if self.num_experts:
            if modality is None:
                raise ValueError(f"{name} has {self.num_experts} experts, one per modality: pass each sample's "
                                 f"modality as model(images, modality) with a ({images.shape[0]},) integer tensor "
                                 f"of expert indices 0..{self.num_experts - 1}")
            check_modality(modality, images.shape[0], self.num_experts, "onehot")

    def forward(self, images: torch.Tensor, modality=None, generator: torch.Generator | None = None) -> MAEOutput:
        self.validate_input(images, modality)
        tokens, mask = self.masking(self.encoder.embed(images), generator)
        bottleneck, _ = self.encoder.encode_tokens(tokens, modality if self.num_experts else None)
        pred = self.decoder(bottleneck)
        loss = masked_patch_mse(pred, patchify(images, self.patch_size), mask, self.norm_pix_loss)
        return MAEOutput(loss, pred, mask)
