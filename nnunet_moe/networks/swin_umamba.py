"""Swin-UMamba and Swin-UMamba-dagger (2D and 3D): VMamba-Tiny encoder with a UNETR-style or VSS decoder.

References
----------
- Liu, Yang, Zhou et al., "Swin-UMamba: Mamba-based UNet with ImageNet-based pretraining",
  MICCAI 2024 (Sec. 2.2-2.4, Fig. 1).
- Liu et al., "VMamba: Visual State Space Model", arXiv:2401.10166 (VMamba-Tiny encoder).
- Hatamizadeh et al., "UNETR", WACV 2022 (MONAI's ``UnetrBasicBlock`` / ``UnetrUpBlock``).
- Cao et al., "Swin-Unet", ECCV-W 2022 (patch expanding, x4 final expansion).

Shapes
------
Input ``(B, C_in, H, W)`` or ``(B, C_in, D, H, W)``; every spatial size must be divisible by 32
(:func:`check_spatial_shape`). Output: logits ``(B, num_classes, *spatial)``, or with deep supervision a
list of logits, highest resolution first.

:class:`SwinUMamba` (total down-sampling 32 = stem 2 x patch 2 x 2^3 patch merges)::

    stem  Conv(k7, s2, p3) + InstanceNorm(affine)            -> 48 @ 1/2
    VSS encoder: patch embed (k2 from 48 ch) + LayerNorm, stages dims 96/192/384/768, depths 2/2/9/2,
                 PatchMerging between stages, no final norm       -> 96 @ 1/4, 192 @ 1/8, 384 @ 1/16, 768 @ 1/32
    skips (UnetrBasicBlock, res): input 1->48 @1, stem 48->96 @1/2, stage0 96->192 @1/4,
                                  stage1 192->384 @1/8, stage2 384->768 @1/16
    decoder (UnetrUpBlock, res, bottleneck = stage3 768 @1/32): 768->768 @1/16, 768->384 @1/8,
             384->192 @1/4, 192->96 @1/2, 96->48 @1; then UnetrBasicBlock 48->48 @1
    heads (1x1 conv): 48 @1, 96 @1/2, 192 @1/4, 384 @1/8

This structure was inferred from the authors' parameter counts (2D, 1 input channel, 14 classes,
deep supervision): 59,889,368 in total, 22,136,736 in the VSS encoder (stem not included), which
it reproduces exactly; the stem's InstanceNorm must be affine (96 parameters) for the total to match.

:class:`SwinUMambaD` (dagger; total down-sampling 32 = patch 4 x 2^3 merges)::

    VSS encoder: patch embed (k4 from the input) + LayerNorm, same stages  -> skips 96/192/384, bottleneck 768
    per decoder stage (384 @1/16, 192 @1/8, 96 @1/4): PatchExpand x2 (Linear d->2d, LayerNorm d/2),
        concat skip, Linear(2c, c), 2 VSS blocks
    final PatchExpand x4 (Linear 96->16*96, LayerNorm 96) -> 96 @1
    heads (1x1 conv): 96 @1, 96 @1/4, 192 @1/8, 384 @1/16

which reproduces the authors' 27,497,720 parameters (encoder 22,119,840) exactly.

Naming: ``network.encoder`` is the VSS encoder whose keys (``patch_embed.*``, ``layers.{i}.blocks.{j}.*``,
``layers.{i}.downsample.{reduction,norm}.*``) are the VMamba-Tiny checkpoint's.
``network.decoder.deep_supervision`` toggles the list output, as nnU-Net's
``set_deep_supervision_enabled`` expects. The classmethods ``input_divisor`` and
``deep_supervision_factors`` state the input-size rule and the output scales for a number of stages.

Initialisation (``init``): ``"pytorch"`` (the default for now) keeps every module's PyTorch default;
``"authors"`` follows the authors' code: the VSS encoder as VMamba's ``VSSM._init_weights`` (every
``nn.Linear`` truncated normal std 0.02 with zero bias, every ``LayerNorm`` weight 1 and bias 0; the
selective-scan parameters keep their Mamba initialisation), and for Swin-UMamba-dagger additionally
nnU-Net's ``InitWeights_He(1e-2)`` on every convolution of the network (Kaiming normal, a = 0.01, zero
bias), applied after the encoder initialisation as in ``get_swin_umamba_d_from_plans``. ``init=None``
reads ``NNUNET_MOE_SWIN_UMAMBA_INIT`` (unset: ``"pytorch"``), so trainers can be compared on both without
code changes. Pretrained weights are loaded after construction and replace the encoder either way.
"""
from __future__ import annotations

import os
from typing import Sequence

import torch
from monai.networks.blocks import UnetOutBlock, UnetrBasicBlock, UnetrUpBlock
from monai.networks.layers.utils import get_act_layer
from monai.networks.nets.swin_unetr import PatchMergingV2
from torch import nn

from nnunet_moe.layers.vss_block import VSSBlock

__all__ = [
    "SwinUMamba", "SwinUMambaD", "VSSEncoder", "VSSStage", "PatchEmbed", "PatchExpand",
    "check_spatial_shape", "VMAMBA_TINY_DIMS", "VMAMBA_TINY_DEPTHS", "INIT_SCHEMES", "INIT_ENV",
]

VMAMBA_TINY_DIMS = (96, 192, 384, 768)
VMAMBA_TINY_DEPTHS = (2, 2, 9, 2)
INIT_SCHEMES = ("pytorch", "authors")
INIT_ENV = "NNUNET_MOE_SWIN_UMAMBA_INIT"
_CONVS = (nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d, nn.ConvTranspose3d)


def resolve_init(init: str | None) -> str:
    """``init``, or ``$NNUNET_MOE_SWIN_UMAMBA_INIT`` (default ``"pytorch"``) when None; checked against INIT_SCHEMES."""
    value = (os.environ.get(INIT_ENV, "").strip() or "pytorch") if init is None else init
    if value not in INIT_SCHEMES:
        source = f"{INIT_ENV}={value!r}" if init is None else f"init={value!r}"
        raise ValueError(f"{source}: the Swin-UMamba initialisation must be one of {', '.join(INIT_SCHEMES)}")
    return value


def vmamba_init_(module: nn.Module) -> None:
    """VMamba's ``_init_weights`` for one module (use with ``encoder.apply``)."""
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def he_conv_init_(module: nn.Module) -> None:
    """nnU-Net's ``InitWeights_He(1e-2)`` for one module (use with ``network.apply``)."""
    if isinstance(module, _CONVS):
        nn.init.kaiming_normal_(module.weight, a=1e-2)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


def check_spatial_shape(spatial_shape: Sequence[int], divisor: int, model_name: str = "network") -> None:
    """Raise ``ValueError`` unless every spatial size is a positive multiple of ``divisor``."""
    bad = [int(s) for s in spatial_shape if int(s) <= 0 or int(s) % divisor]
    if bad:
        suggestion = tuple(max(divisor, round(int(s) / divisor) * divisor) for s in spatial_shape)
        raise ValueError(
            f"{model_name}: spatial shape {tuple(int(s) for s in spatial_shape)} is not supported; every spatial "
            f"size must be divisible by {divisor} (the total down-sampling of the network), e.g. {suggestion}"
        )


def _check_input(x: torch.Tensor, spatial_dims: int, divisor: int, model_name: str) -> None:
    """(B, C, *spatial) with every spatial size divisible by ``divisor``, else a clear error."""
    if x.dim() != spatial_dims + 2:
        raise ValueError(f"{model_name}(spatial_dims={spatial_dims}) expects (B, C, *spatial), got {tuple(x.shape)}")
    check_spatial_shape(x.shape[2:], divisor, model_name)


def _validate_common(spatial_dims: int, dims: Sequence[int], depths: Sequence[int]) -> None:
    if spatial_dims not in (2, 3):
        raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
    if len(dims) != len(depths) or len(dims) < 2:
        raise ValueError(f"dims and depths need the same length >= 2, got dims={tuple(dims)}, depths={tuple(depths)}")
    if any(dims[i + 1] != 2 * dims[i] for i in range(len(dims) - 1)):
        raise ValueError(f"dims must double from stage to stage (patch merging maps C -> 2C), got {tuple(dims)}")
    if any(d < 1 for d in depths):
        raise ValueError(f"every stage needs at least one block, got depths={tuple(depths)}")


class PatchEmbed(nn.Module):
    """Non-overlapping patch embedding ``Conv(k=p, s=p)`` + LayerNorm: ``(B, C, *S)`` -> ``(B, *S/p, dim)``."""

    def __init__(self, in_channels: int, dim: int, patch_size: int, spatial_dims: int = 2) -> None:
        super().__init__()
        conv = nn.Conv2d if spatial_dims == 2 else nn.Conv3d
        self.proj = conv(in_channels, dim, kernel_size=patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(x).movedim(1, -1))


class PatchExpand(nn.Module):
    """Swin-Unet patch expanding, channels-last: ``Linear(dim, s^n * out)`` then pixel-shuffle and LayerNorm.

    ``(B, *S, dim)`` -> ``(B, *(S * scale), out_channels)``; ``scale=2, out=dim/2`` is the 2x expansion,
    ``scale=4, out=dim`` the final 4x expansion.
    """

    def __init__(self, dim: int, out_channels: int, scale: int = 2, spatial_dims: int = 2) -> None:
        super().__init__()
        self.scale, self.spatial_dims, self.out_channels = scale, spatial_dims, out_channels
        self.expand = nn.Linear(dim, scale ** spatial_dims * out_channels, bias=False)
        self.norm = nn.LayerNorm(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.expand(x)
        batch, spatial, n, s = x.shape[0], x.shape[1:-1], self.spatial_dims, self.scale
        x = x.reshape(batch, *spatial, *([s] * n), self.out_channels)
        # interleave (S_0, s, S_1, s, ...) -> (S_0 * s, S_1 * s, ...)
        order = [0] + [p for i in range(n) for p in (1 + i, 1 + n + i)] + [1 + 2 * n]
        x = x.permute(*order).reshape(batch, *(size * s for size in spatial), self.out_channels)
        return self.norm(x)


class VSSStage(nn.Module):
    """VSS blocks followed by an optional PatchMerging (MONAI ``PatchMergingV2``: ``norm`` + ``reduction``).

    Returns ``(stage_output, downsampled)``; both channels-last.
    """

    def __init__(self, dim: int, depth: int, drop_path: Sequence[float], spatial_dims: int, downsample: bool,
                 **block_kwargs) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(VSSBlock(dim, drop_path=drop_path[j], spatial_dims=spatial_dims, **block_kwargs)
                                    for j in range(depth))
        self.downsample = PatchMergingV2(dim, spatial_dims=spatial_dims) if downsample else None

    def forward(self, x: torch.Tensor):
        for block in self.blocks:
            x = block(x)
        return x, (self.downsample(x) if self.downsample is not None else x)


class VSSEncoder(nn.Module):
    """VMamba-Tiny encoder without classifier and final norm: patch embedding + stages with merging.

    ``(B, C_in, *S)`` -> list of stage outputs, channels-last, ``(B, *S/(p*2^i), dims[i])``.
    """

    def __init__(self, in_channels: int, patch_size: int, dims: Sequence[int] = VMAMBA_TINY_DIMS,
                 depths: Sequence[int] = VMAMBA_TINY_DEPTHS, drop_path_rate: float = 0.2, spatial_dims: int = 2,
                 **block_kwargs) -> None:
        super().__init__()
        _validate_common(spatial_dims, dims, depths)
        self.spatial_dims, self.dims, self.depths = spatial_dims, tuple(dims), tuple(depths)
        self.patch_embed = PatchEmbed(in_channels, dims[0], patch_size, spatial_dims)
        rates = torch.linspace(0, drop_path_rate, sum(depths)).tolist()  # stochastic depth grows with depth
        starts = [sum(depths[:i]) for i in range(len(depths))]
        self.layers = nn.ModuleList(
            VSSStage(dims[i], depths[i], rates[starts[i]:starts[i] + depths[i]], spatial_dims,
                     downsample=i < len(dims) - 1, **block_kwargs)
            for i in range(len(dims))
        )

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.patch_embed(x)
        outputs = []
        for layer in self.layers:
            out, x = layer(x)
            outputs.append(out)
        return outputs


class _UNETRDecoder(nn.Module):
    """Skip blocks, up blocks, the final full-resolution block and the heads of :class:`SwinUMamba`."""

    def __init__(self, spatial_dims: int, in_channels: int, num_classes: int, stem_channels: int,
                 dims: Sequence[int], norm_name, res_block: bool, deep_supervision: bool) -> None:
        super().__init__()
        self.deep_supervision = deep_supervision
        widths = [stem_channels, *dims]                        # skip width per level: 1, 1/2, 1/4, ...
        sources = [in_channels, stem_channels, *dims[:-1]]     # what each skip block receives
        basic = dict(spatial_dims=spatial_dims, kernel_size=3, stride=1, norm_name=norm_name, res_block=res_block)
        self.skips = nn.ModuleList(UnetrBasicBlock(in_channels=s, out_channels=w, **basic)
                                   for s, w in zip(sources, widths))
        ups, previous = [], dims[-1]
        for level in range(len(widths) - 1, -1, -1):           # coarse (1/16) to fine (1)
            ups.append(UnetrUpBlock(spatial_dims, previous, widths[level], kernel_size=3, upsample_kernel_size=2,
                                    norm_name=norm_name, res_block=res_block))
            previous = widths[level]
        self.ups = nn.ModuleList(ups)
        self.final = UnetrBasicBlock(in_channels=widths[0], out_channels=widths[0], **basic)
        # heads at every level but the coarsest decoder level: 1, 1/2, 1/4, 1/8 for four stages
        self.heads = nn.ModuleList(UnetOutBlock(spatial_dims, widths[level], num_classes)
                                   for level in range(len(widths) - 1))

    def forward(self, x, stem, stage_outputs):
        sources = [x, stem, *stage_outputs[:-1]]
        skips = [block(s) for block, s in zip(self.skips, sources)]
        d = stage_outputs[-1]
        decoded = [None] * len(skips)
        for up, level in zip(self.ups, range(len(skips) - 1, -1, -1)):
            d = up(d, skips[level])
            decoded[level] = d
        decoded[0] = self.final(decoded[0])
        if not self.deep_supervision:
            return self.heads[0](decoded[0])
        return [head(decoded[level]) for level, head in enumerate(self.heads)]


class SwinUMamba(nn.Module):
    """Swin-UMamba: conv stem + VMamba-Tiny encoder + UNETR-style residual decoder (see module docstring).

    Args:
        in_channels, num_classes: input channels and output classes.
        spatial_dims: 2 (paper) or 3 (SS3D with six scan directions, 3D convolutions).
        stem_channels, dims, depths: widths 48 / 96..768 and VSS depths 2/2/9/2 (VMamba-Tiny).
        drop_path_rate: stochastic depth, linear over the encoder blocks (0.2).
        deep_supervision: forward returns a list of logits (1, 1/2, 1/4, 1/8), else one tensor.
        stem_act: optional activation after the stem norm (MONAI name, e.g. ``"leakyrelu"``); default None,
            the paper's stem being a down-sampling convolution with instance norm only.
        scan_backend: selective-scan backend (None: ``NNUNET_MOE_SELECTIVE_SCAN`` / auto).
        init: ``"pytorch"`` or ``"authors"`` (VMamba's encoder initialisation; module docstring); None: from
            ``NNUNET_MOE_SWIN_UMAMBA_INIT``.
    """

    def __init__(self, in_channels: int, num_classes: int, spatial_dims: int = 2, stem_channels: int = 48,
                 dims: Sequence[int] = VMAMBA_TINY_DIMS, depths: Sequence[int] = VMAMBA_TINY_DEPTHS,
                 drop_path_rate: float = 0.2, d_state: int = 16, deep_supervision: bool = True,
                 norm_name="instance", res_block: bool = True, stem_act=None, scan_backend: str | None = None,
                 init: str | None = None) -> None:
        super().__init__()
        _validate_common(spatial_dims, dims, depths)
        self.spatial_dims = spatial_dims
        self.total_downsampling = self.input_divisor(len(dims))
        conv = nn.Conv2d if spatial_dims == 2 else nn.Conv3d
        norm = nn.InstanceNorm2d if spatial_dims == 2 else nn.InstanceNorm3d
        stem = [conv(in_channels, stem_channels, kernel_size=7, stride=2, padding=3), norm(stem_channels, affine=True)]
        if stem_act is not None:
            stem.append(get_act_layer(stem_act))
        self.stem = nn.Sequential(*stem)
        self.encoder = VSSEncoder(stem_channels, 2, dims, depths, drop_path_rate, spatial_dims, d_state=d_state,
                                  scan_backend=scan_backend)
        self.decoder = _UNETRDecoder(spatial_dims, in_channels, num_classes, stem_channels, dims, norm_name,
                                     res_block, deep_supervision)
        self.init = resolve_init(init)
        if self.init == "authors":  # the authors' SwinUMamba initialises only its VSSM encoder
            self.encoder.apply(vmamba_init_)
        # dynamic_network_architectures-style keys for weight transfer
        self.key_to_encoder, self.key_to_stem, self.keys_to_in_proj = "encoder", "stem", ("stem.0", "decoder.skips.0")

    @classmethod
    def input_divisor(cls, num_stages: int = len(VMAMBA_TINY_DIMS)) -> int:
        """Every spatial size must be a multiple of this: stem stride 2 x patch 2 x one 2x merge per later stage."""
        return 2 * 2 * 2 ** (num_stages - 1)

    @classmethod
    def deep_supervision_factors(cls, num_stages: int = len(VMAMBA_TINY_DIMS)) -> tuple[int, ...]:
        """Downsampling factor of each deep-supervision output, highest resolution first: 1, 2, 4, 8."""
        return tuple(2 ** level for level in range(num_stages))

    def forward(self, x: torch.Tensor):
        _check_input(x, self.spatial_dims, self.total_downsampling, type(self).__name__)
        stem = self.stem(x)
        stages = [s.movedim(-1, 1) for s in self.encoder(stem)]
        return self.decoder(x, stem, stages)


class _VSSDecoder(nn.Module):
    """Patch-expanding VSS decoder and heads of :class:`SwinUMambaD`."""

    def __init__(self, spatial_dims: int, num_classes: int, dims: Sequence[int], decoder_depths: Sequence[int],
                 drop_path_rate: float, deep_supervision: bool, **block_kwargs) -> None:
        super().__init__()
        self.deep_supervision = deep_supervision
        n = len(dims)
        if len(decoder_depths) != n - 1:
            raise ValueError(f"decoder_depths needs {n - 1} entries (one per decoder stage), got {tuple(decoder_depths)}")
        rates = torch.linspace(drop_path_rate, 0, max(1, sum(decoder_depths))).tolist()  # deep -> shallow
        self.ups, self.fuse, self.stages = nn.ModuleList(), nn.ModuleList(), nn.ModuleList()
        start = 0
        for j, level in enumerate(range(n - 2, -1, -1)):      # decoder stage j works at encoder level `level`
            width = dims[level]
            self.ups.append(PatchExpand(dims[level + 1], width, 2, spatial_dims))
            self.fuse.append(nn.Linear(2 * width, width))
            self.stages.append(nn.Sequential(*(VSSBlock(width, drop_path=rates[start + b], spatial_dims=spatial_dims,
                                                        **block_kwargs) for b in range(decoder_depths[j]))))
            start += decoder_depths[j]
        self.final_expand = PatchExpand(dims[0], dims[0], 4, spatial_dims)
        # heads: full resolution, then each decoder stage from fine to coarse (1/4, 1/8, 1/16)
        self.heads = nn.ModuleList([UnetOutBlock(spatial_dims, dims[0], num_classes)] +
                                   [UnetOutBlock(spatial_dims, dims[level], num_classes) for level in range(n - 1)])

    def forward(self, stage_outputs):
        d = stage_outputs[-1]
        decoded = [None] * (len(stage_outputs) - 1)
        for up, fuse, stage, level in zip(self.ups, self.fuse, self.stages, range(len(stage_outputs) - 2, -1, -1)):
            d = stage(fuse(torch.cat([up(d), stage_outputs[level]], -1)))
            decoded[level] = d
        full = self.final_expand(decoded[0])
        if not self.deep_supervision:
            return self.heads[0](full.movedim(-1, 1))
        return [head(m.movedim(-1, 1)) for head, m in zip(self.heads, [full, *decoded])]


class SwinUMambaD(nn.Module):
    """Swin-UMamba-dagger: VMamba-Tiny encoder (patch 4) + patch-expanding VSS decoder (see module docstring).

    Args mirror :class:`SwinUMamba`; ``decoder_depths`` (2, 2, 2) VSS blocks per decoder stage,
    ``decoder_drop_path_rate`` linear from the deepest decoder block (0.2) to the shallowest (0); deep
    supervision returns logits at 1, 1/4, 1/8, 1/16. ``init="authors"`` adds nnU-Net's He initialisation of
    every convolution to the encoder's VMamba initialisation (module docstring).
    """

    def __init__(self, in_channels: int, num_classes: int, spatial_dims: int = 2,
                 dims: Sequence[int] = VMAMBA_TINY_DIMS, depths: Sequence[int] = VMAMBA_TINY_DEPTHS,
                 decoder_depths: Sequence[int] = (2, 2, 2), drop_path_rate: float = 0.2,
                 decoder_drop_path_rate: float = 0.2, d_state: int = 16, deep_supervision: bool = True,
                 scan_backend: str | None = None, init: str | None = None) -> None:
        super().__init__()
        _validate_common(spatial_dims, dims, depths)
        self.spatial_dims = spatial_dims
        self.total_downsampling = self.input_divisor(len(dims))
        self.encoder = VSSEncoder(in_channels, 4, dims, depths, drop_path_rate, spatial_dims, d_state=d_state,
                                  scan_backend=scan_backend)
        self.decoder = _VSSDecoder(spatial_dims, num_classes, dims, decoder_depths, decoder_drop_path_rate,
                                   deep_supervision, d_state=d_state, scan_backend=scan_backend)
        self.init = resolve_init(init)
        if self.init == "authors":  # as get_swin_umamba_d_from_plans: VSSM encoder init, then He on all convs
            self.encoder.apply(vmamba_init_)
            self.apply(he_conv_init_)
        self.key_to_encoder, self.key_to_stem = "encoder", "encoder.patch_embed"
        self.keys_to_in_proj = ("encoder.patch_embed.proj",)

    @classmethod
    def input_divisor(cls, num_stages: int = len(VMAMBA_TINY_DIMS)) -> int:
        """Every spatial size must be a multiple of this: patch 4 x one 2x merge per later stage."""
        return 4 * 2 ** (num_stages - 1)

    @classmethod
    def deep_supervision_factors(cls, num_stages: int = len(VMAMBA_TINY_DIMS)) -> tuple[int, ...]:
        """Downsampling factor of each deep-supervision output, highest resolution first: 1, 4, 8, 16."""
        return (1,) + tuple(4 * 2 ** level for level in range(num_stages - 1))

    def forward(self, x: torch.Tensor):
        _check_input(x, self.spatial_dims, self.total_downsampling, type(self).__name__)
        return self.decoder(self.encoder(x))
