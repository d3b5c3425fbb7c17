"""M4oE: Swin-Unet whose every Swin block MLP, encoder and decoder, is an M4oE layer (one expert per modality).

References
----------
- Jiang et al., "M4oE: A Foundation Model for Medical Multimodal Image Segmentation with Mixture of
  Experts", MICCAI 2024 (Sec. 2, Eq. 1-3; Fig. 2): the MLP of every Swin Transformer block replaced by
  :class:`~nnunet_moe.layers.m4oe.M4oE`.
- Cao et al., "Swin-Unet: Unet-like Pure Transformer for Medical Image Segmentation", ECCV-W 2022: the
  backbone (``SwinTransformerSys``), which the authors' code copies.

Architecture (2D defaults: embed 96, patch 4, window 7, heads 3/6/12/24; ``C_i = 96 * 2**i``)::

    encoder: MONAI PatchEmbed (Conv k4 s4 + LayerNorm)                         -> 96 @ 1/4
             stage i (MONAI SwinTransformerBlocks, depth 2, even blocks W-MSA, odd SW-MSA), then for
             i < 3 MONAI PatchMergingV2 (LayerNorm(4C) + Linear(4C, 2C, no bias)) -> 192 @ 1/8, 384 @ 1/16,
             768 @ 1/32; LayerNorm(768) on the bottleneck
             skips (as Swin-Unet): the *input* of stages 0, 1, 2 (patch embedding, merged outputs)
    decoder: per level 384 @ 1/16, 192 @ 1/8, 96 @ 1/4: patch expanding x2 (Linear(2C, 4*C, no bias),
             pixel shuffle, LayerNorm(C)), concat skip, Linear(2C, C), Swin blocks (depth 2);
             LayerNorm(96), final patch expanding x4 (Linear(96, 16*96, no bias) + LayerNorm(96)),
             Conv 1x1 96 -> classes without bias
    deep supervision (optional, ``decoder.heads``): 1x1 conv heads (MONAI ``UnetOutBlock``) on the
             decoder levels 1/4, 1/8, 1/16

Every block's MLP (8 encoder + 6 decoder blocks = 14) is an M4oE layer with ``num_experts`` experts; with
``num_experts`` 0 or 1 each stays MONAI's dense ``MLPBlock`` and the network is the plain Swin-Unet.

Decoder depths: the authors' config lists ``DECODER_DEPTHS: [2, 2, 2, 1]``, but their (and Swin-Unet's)
``SwinTransformerSys`` never reads ``depths_decoder``: decoder level ``i`` gets ``depths[i]`` blocks, so the
model they train has 2/2/2 decoder blocks at 384/192/96 (the bottleneck's decoder step is a patch
expanding only). ``decoder_depths`` defaults to that (2, 2, 2), deepest level first; it also reproduces
their parameter arithmetic (14 MLPs). Decoder stochastic-depth rates copy the encoder stage at the same
level, as in their code.

Parameter counts (instantiated, deep supervision off; see tests/test_m4oe_network.py): 3 input channels,
33 outputs (the authors' three bias-free heads 14 + 3 + 16 from 96 channels are one 96 -> 33 head here):
plain 27,171,204 and 3 experts with the channel gate 60,432,132, both the authors' figures; all but the
MLPs 11,519,748, 14 dense MLPs 15,651,456, channel gates 1,958,016 exactly as their arithmetic. With 9
classes (Synapse, Swin-Unet's setting) plain 27,168,900. 1 input channel, 14 classes: plain 27,166,308,
2 experts with the paper's gate 42,826,240. The paper's 27.31 M matches none of these (REFERENCE_NOTES).

Input size: every spatial size must be a multiple of ``patch_size * 2**(stages - 1)`` = 32
(:meth:`M4oESwinUnet.input_divisor`); not of the window: MONAI's Swin block pads each stage to whole
windows (Swin's own rule for sizes that are not multiples of the window) and shrinks the window to the
feature size where that is smaller (no shift then), as Swin-Unet does. At 224^2 (56/28/14/7 tokens) no
padding happens, and the modules and their order are Swin-Unet's (by construction; not run against the
authors' code, which this project does not ship). One MONAI difference: for a shrunk window
MONAI reads the first ``n x n`` entries of the window's relative-position index (a fixed, learnable
re-parametrisation, not Swin's table for the smaller window).

3D (``spatial_dims=3``): the same composition (MONAI's blocks, masks and merging support 3D; the patch
expanding shuffles three axes), window 7^3, patch 4^3; not in the paper.

Forward: ``network(x, modality=None)``: ``x`` ``(B, in_channels, *spatial)``; ``modality`` ``(B,)``
integer expert indices, passed to every M4oE layer (required by the gates ``"modality"`` and
``"onehot"``, ignored otherwise). Output: logits ``(B, num_classes, *spatial)``, or with
``decoder.deep_supervision`` the list ``[full, 1/4, 1/8, 1/16]`` (:meth:`deep_supervision_factors`), the
switch nnU-Net's ``set_deep_supervision_enabled`` sets. For masked-image pretraining the encoder runs alone:
``network.encoder(x, modality)`` returns the bottleneck and the skips; ``encoder.embed(x)`` and
``encoder.encode_tokens(tokens, modality)`` are its two halves, so masked patch tokens can be replaced in
between. With ``gate="onehot"`` every sample's tokens go through its modality's expert only.

Initialisation ``init="swin"`` (default): Swin-Unet's and the authors' ``_init_weights`` (every
``nn.Linear`` and every expert truncated normal std 0.02 with zero bias, LayerNorms 1/0; convolutions keep
PyTorch's default); ``"pytorch"`` keeps PyTorch's defaults.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from monai.networks.blocks import PatchEmbed, UnetOutBlock
from monai.networks.layers import Conv
from monai.networks.nets.swin_unetr import PatchMergingV2, SwinTransformerBlock, compute_mask, get_window_size
from torch import nn

from nnunet_moe.layers.m4oe import GATES, M4oE
from nnunet_moe.networks.deep_supervision import DeepSupervisionSwitch
from nnunet_moe.networks.swin_umamba import PatchExpand, check_spatial_shape, vmamba_init_

__all__ = ["M4oESwinUnet", "SwinStage", "SwinUnetEncoder", "SwinUnetDecoder", "INIT_SCHEMES"]

INIT_SCHEMES = ("swin", "pytorch")


class SwinStage(nn.Module):
    """``depth`` MONAI ``SwinTransformerBlock``\\ s (odd ones shifted by half a window), MLPs as M4oE layers.

    MONAI's block calls its MLP without the modality, so the stage runs the block's two halves itself (same
    computation as ``SwinTransformerBlock.forward``) and hands ``modality`` to the M4oE layer.
    Channels-last ``(B, *S, dim)`` in and out.
    """

    def __init__(self, dim: int, depth: int, num_heads: int, window_size: Sequence[int], drop_path: Sequence[float],
                 num_experts: int, gate: str, mlp_ratio: float, qkv_bias: bool, drop: float, attn_drop: float,
                 expert_dropout: float) -> None:
        super().__init__()
        self.window_size = tuple(window_size)
        self.shift_size = tuple(w // 2 for w in self.window_size)
        no_shift = tuple(0 for _ in self.window_size)
        self.blocks = nn.ModuleList(
            SwinTransformerBlock(dim, num_heads, self.window_size, self.shift_size if i % 2 else no_shift,
                                 mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, drop=drop, attn_drop=attn_drop,
                                 drop_path=drop_path[i])
            for i in range(depth))
        if num_experts > 1:
            for block in self.blocks:
                block.mlp = M4oE(dim, num_experts, gate, mlp_ratio, expert_dropout)

    def forward(self, x: torch.Tensor, modality=None) -> torch.Tensor:
        spatial = x.shape[1:-1]
        window, shift = get_window_size(spatial, self.window_size, self.shift_size)
        padded = [math.ceil(s / w) * w for s, w in zip(spatial, window)]
        mask = compute_mask(padded, window, shift, x.device) if any(shift) else None
        for block in self.blocks:
            x = x + block.drop_path(block.forward_part1(x, mask))
            h = block.norm2(x)
            h = block.mlp(h, modality) if isinstance(block.mlp, M4oE) else block.mlp(h)
            x = x + block.drop_path(h)
        return x


class SwinUnetEncoder(nn.Module):
    """Patch embedding, Swin stages with patch merging between them, LayerNorm on the bottleneck.

    ``forward(x, modality)`` -> ``(bottleneck, skips)``: bottleneck ``(B, *S/(p*2^(n-1)), dims[-1])``, skips the
    inputs of stages ``0 .. n-2`` ``(B, *S/(p*2^i), dims[i])``, all channels-last.
    """

    def __init__(self, in_channels: int, dims: Sequence[int], depths: Sequence[int], num_heads: Sequence[int],
                 patch_size: int, spatial_dims: int, drop_rate: float, rates: Sequence[Sequence[float]],
                 **stage_kwargs) -> None:
        super().__init__()
        self.patch_embed = PatchEmbed(patch_size, in_channels, dims[0], nn.LayerNorm, spatial_dims)
        self.pos_drop = nn.Dropout(drop_rate)
        self.stages = nn.ModuleList(SwinStage(dims[i], depths[i], num_heads[i], drop_path=rates[i], **stage_kwargs)
                                    for i in range(len(dims)))
        self.downsample = nn.ModuleList(PatchMergingV2(dims[i], spatial_dims=spatial_dims)
                                        for i in range(len(dims) - 1))
        self.norm = nn.LayerNorm(dims[-1])

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Patch tokens ``(B, *S/p, dims[0])``, channels-last (masked-image pretraining replaces some here)."""
        return self.pos_drop(self.patch_embed(x).movedim(1, -1))

    def forward(self, x: torch.Tensor, modality=None):
        return self.encode_tokens(self.embed(x), modality)

    def encode_tokens(self, x: torch.Tensor, modality=None):
        """The stages on patch tokens from :meth:`embed`: ``(bottleneck, skips)``."""
        skips = []
        for i, stage in enumerate(self.stages):
            if i < len(self.downsample):
                skips.append(x)
                x = self.downsample[i](stage(x, modality))
            else:
                x = stage(x, modality)
        return self.norm(x), skips


class SwinUnetDecoder(DeepSupervisionSwitch, nn.Module):
    """Swin-Unet's patch-expanding decoder and its heads; ``deep_supervision`` switches the list output.

    Built with ``deep_supervision=False`` it has no extra heads (Swin-Unet's parameters) and the switch
    cannot be turned on. With it on, the network returns ``[full, 1/4, 1/8, 1/16]`` logits.
    """

    network_name = "M4oESwinUnet"

    def __init__(self, num_classes: int, dims: Sequence[int], decoder_depths: Sequence[int],
                 num_heads: Sequence[int], patch_size: int, spatial_dims: int, rates: Sequence[Sequence[float]],
                 deep_supervision: bool, **stage_kwargs) -> None:
        super().__init__()
        levels = range(len(dims) - 2, -1, -1)  # deepest decoder level first
        self.ups = nn.ModuleList(PatchExpand(dims[lv + 1], dims[lv], 2, spatial_dims) for lv in levels)
        self.fuse = nn.ModuleList(nn.Linear(2 * dims[lv], dims[lv]) for lv in levels)
        self.stages = nn.ModuleList(SwinStage(dims[lv], depth, num_heads[lv], drop_path=rates[j], **stage_kwargs)
                                    for j, (lv, depth) in enumerate(zip(levels, decoder_depths)))
        self.norm = nn.LayerNorm(dims[0])
        self.final_expand = PatchExpand(dims[0], dims[0], patch_size, spatial_dims)
        self.head = Conv[Conv.CONV, spatial_dims](dims[0], num_classes, kernel_size=1, bias=False)
        self.heads = nn.ModuleList(UnetOutBlock(spatial_dims, dims[lv], num_classes) for lv in range(len(dims) - 1)) \
            if deep_supervision else None
        self.deep_supervision = deep_supervision

    def forward(self, bottleneck: torch.Tensor, skips: Sequence[torch.Tensor], modality=None):
        x, decoded = bottleneck, [None] * len(skips)
        for up, fuse, stage, level in zip(self.ups, self.fuse, self.stages, range(len(skips) - 1, -1, -1)):
            x = stage(fuse(torch.cat([up(x), skips[level]], dim=-1)), modality)
            decoded[level] = x
        full = self.head(self.final_expand(self.norm(x)).movedim(-1, 1))
        if not self._deep_supervision:
            return full
        return [full] + [head(d.movedim(-1, 1)) for head, d in zip(self.heads, decoded)]


class M4oESwinUnet(nn.Module):
    """M4oE on Swin-Unet (module docstring).

    Args:
        in_channels, num_classes: image channels and output classes (nnU-Net's plans).
        num_experts: experts per M4oE layer, one per modality; 0 or 1: dense MLPs (plain Swin-Unet).
        gate: ``"experts"`` (paper), ``"channels"`` (authors' code), ``"modality"``, ``"onehot"``
            (:mod:`nnunet_moe.layers.m4oe`).
        spatial_dims: 2 (paper) or 3.
        embed_dim, depths, num_heads, window_size, patch_size, mlp_ratio, qkv_bias: Swin-Unet's 96, (2, 2, 2, 2),
            (3, 6, 12, 24), 7, 4, 4, True.
        decoder_depths: Swin blocks per decoder level, deepest first (2, 2, 2: what the authors' code builds).
        drop_rate, attn_drop_rate, drop_path_rate: dropout, attention dropout, stochastic depth (linear over the
            encoder blocks; 0.2 as the authors' and Swin-Unet's configs).
        expert_dropout_rate: dropout inside the experts (default ``drop_rate``).
        deep_supervision: build the extra heads and return one output per decoder level.
        init: ``"swin"`` or ``"pytorch"`` (module docstring).
    """

    def __init__(self, in_channels: int, num_classes: int, num_experts: int = 2, gate: str = "experts",
                 spatial_dims: int = 2, embed_dim: int = 96, depths: Sequence[int] = (2, 2, 2, 2),
                 decoder_depths: Sequence[int] = (2, 2, 2), num_heads: Sequence[int] = (3, 6, 12, 24),
                 window_size: int = 7, patch_size: int = 4, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 drop_rate: float = 0.0, attn_drop_rate: float = 0.0, drop_path_rate: float = 0.2,
                 expert_dropout_rate: float | None = None, deep_supervision: bool = False, init: str = "swin") -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims!r}")
        n = len(depths)
        if n < 2 or len(num_heads) != n or len(decoder_depths) != n - 1:
            raise ValueError(f"need depths and num_heads with one entry per stage (>= 2 stages) and decoder_depths "
                             f"with one fewer, got depths={tuple(depths)}, num_heads={tuple(num_heads)}, "
                             f"decoder_depths={tuple(decoder_depths)}")
        if any(int(d) < 1 for d in (*depths, *decoder_depths)):
            raise ValueError(f"every stage needs at least one block, got depths={tuple(depths)}, "
                             f"decoder_depths={tuple(decoder_depths)}")
        if not isinstance(num_experts, int) or num_experts < 0:
            raise ValueError(f"num_experts must be an integer >= 0 (0 or 1 = dense MLPs), got {num_experts!r}")
        if gate not in GATES:
            raise ValueError(f"gate must be one of {', '.join(GATES)}, got {gate!r}")
        if init not in INIT_SCHEMES:
            raise ValueError(f"init must be one of {', '.join(INIT_SCHEMES)}, got {init!r}")
        self.input_divisor(patch_size, n)  # validates patch_size
        dims = [embed_dim * 2**i for i in range(n)]
        if any(d % h for d, h in zip(dims, num_heads)):
            raise ValueError(f"stage widths {dims} must be divisible by num_heads {tuple(num_heads)}")
        self.in_channels, self.num_classes, self.spatial_dims = in_channels, num_classes, spatial_dims
        self.patch_size, self.num_stages = patch_size, n
        self.num_experts = num_experts if num_experts > 1 else 0
        self.gate = gate if self.num_experts else None

        total = sum(depths)  # stochastic depth linear over the encoder; each decoder level copies its encoder stage
        flat = [drop_path_rate * i / max(1, total - 1) for i in range(total)]
        enc_rates = [flat[sum(depths[:i]):sum(depths[:i + 1])] for i in range(n)]
        dec_rates = [[enc_rates[lv][min(b, depths[lv] - 1)] for b in range(depth)]
                     for lv, depth in zip(range(n - 2, -1, -1), decoder_depths)]
        stage_kwargs = dict(window_size=(window_size,) * spatial_dims, num_experts=self.num_experts, gate=gate,
                            mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, drop=drop_rate, attn_drop=attn_drop_rate,
                            expert_dropout=drop_rate if expert_dropout_rate is None else expert_dropout_rate)
        self.encoder = SwinUnetEncoder(in_channels, dims, depths, num_heads, patch_size, spatial_dims, drop_rate,
                                       enc_rates, **stage_kwargs)
        self.decoder = SwinUnetDecoder(num_classes, dims, decoder_depths, num_heads, patch_size, spatial_dims,
                                       dec_rates, bool(deep_supervision), **stage_kwargs)
        self.init = init
        if init == "swin":
            self.apply(vmamba_init_)  # the same rule as Swin-Unet's _init_weights (Linear, LayerNorm)
            for layer in self.moe_layers().values():
                layer.experts.trunc_normal_init_()

    # -- facts of the architecture (the trainers read them from the class) ---------------------------
    @classmethod
    def input_divisor(cls, patch_size: int = 4, num_stages: int = 4) -> int:
        """Every spatial size must be a multiple of this: patch ``patch_size`` x one 2x merge per later stage
        (4 x 2**3 = 32). Not the window: MONAI's blocks pad each stage to whole windows."""
        if not isinstance(patch_size, int) or patch_size < 1:
            raise ValueError(f"patch_size must be a positive integer, got {patch_size!r}")
        return patch_size * 2 ** (num_stages - 1)

    @classmethod
    def deep_supervision_factors(cls, patch_size: int = 4, num_stages: int = 4) -> tuple[int, ...]:
        """Downsampling factor of each deep-supervision output, highest resolution first: 1, 4, 8, 16."""
        return (1,) + tuple(patch_size * 2**level for level in range(num_stages - 1))

    def moe_layers(self) -> dict[str, M4oE]:
        """Qualified name -> M4oE layer, encoder blocks first."""
        return {name: m for name, m in self.named_modules() if isinstance(m, M4oE)}

    # -- forward ---------------------------------------------------------------------------------------
    def validate_input(self, x: torch.Tensor) -> None:
        """Raise ``ValueError`` unless ``x`` is ``(B, in_channels, *spatial)`` with valid spatial sizes."""
        name = type(self).__name__
        if x.dim() != self.spatial_dims + 2:
            raise ValueError(f"{name}(spatial_dims={self.spatial_dims}) expects a {self.spatial_dims + 2}D input "
                             f"(B, C, {'D, H, W' if self.spatial_dims == 3 else 'H, W'}), got shape {tuple(x.shape)}")
        if x.shape[1] != self.in_channels:
            raise ValueError(f"{name}(in_channels={self.in_channels}) got an input with {x.shape[1]} channels "
                             f"(shape {tuple(x.shape)})")
        check_spatial_shape(x.shape[2:], self.input_divisor(self.patch_size, self.num_stages),
                            f"{name} (patch {self.patch_size} x 2^{self.num_stages - 1} patch merges)")

    def forward(self, x: torch.Tensor, modality=None):
        if not torch.compiler.is_compiling():
            self.validate_input(x)
        bottleneck, skips = self.encoder(x, modality)
        return self.decoder(bottleneck, skips, modality)
