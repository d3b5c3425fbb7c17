"""Swin SMT: MONAI's SwinUNETR with the MLP of the Swin blocks in chosen stages replaced by Soft MoE.

Reference: Płotka, Chrabaszcz, Biecek, "Swin SMT: Global Sequential Modeling for Enhancing 3D Medical
Image Segmentation", MICCAI 2024. Base network: Hatamizadeh et al., Swin UNETR (MONAI ``SwinUNETR``),
optionally He et al., SwinUNETR-V2 (``use_v2=True``).

The network *is* a MONAI ``SwinUNETR`` (subclass): MONAI builds every module, then the ``mlp`` of each
``SwinTransformerBlock`` in ``moe_stages`` is replaced by :class:`nnunet_moe.layers.soft_moe.SoftMoE`.
The Swin block calls its MLP on ``(B, *spatial, C)`` features, and SoftMoE flattens the spatial positions
into tokens, so routing is global over the whole feature map of that stage (as in the authors' model).
With ``num_experts=0`` the network has exactly MONAI's modules and state-dict keys.

Shapes: input ``(B, in_channels, *spatial)`` with ``spatial_dims`` = 2 or 3 spatial axes, each divisible by
``SwinSMT.input_divisor(patch_size)`` (32 by default). Output: logits ``(B, out_channels, *spatial)``, or with
deep supervision a list ``[full, 1/2, 1/4, 1/8, 1/16]`` of logits (``SwinSMT.deep_supervision_factors()``).

Deep supervision: ``network.decoder`` (:class:`DeepSupervisionHeads`; MONAI's own decoder is ``decoder1`` ..
``decoder5``) holds four extra 1x1(x1) convolution heads (MONAI ``UnetOutBlock``) that map the outputs of
MONAI's ``decoder2`` (1/2), ``decoder3`` (1/4), ``decoder4`` (1/8) and ``decoder5`` (1/16) to logits; the
full-resolution logits come from MONAI's ``out`` head on ``decoder1``. ``network.decoder.deep_supervision``
switches the list output, the attribute nnU-Net's ``set_deep_supervision_enabled`` sets; the heads are kept
when it is off, so checkpoints keep the same keys. A network built with ``deep_supervision=False`` has no
heads (MONAI's parameter count and keys) and silently ignores ``decoder.heads.*`` entries of a loaded state
dict (they are unused without deep supervision), so an nnU-Net checkpoint trained with deep supervision
loads into an inference network built without it. State dicts that name the heads ``deep_supervision_heads.*``
(their place before they moved under ``decoder``) load too.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from monai.networks.blocks import UnetOutBlock
from monai.networks.nets.swin_unetr import SwinUNETR
from torch import nn

from nnunet_moe.layers.soft_moe import SLOT_SCHEMES, SoftMoE
from nnunet_moe.networks.deep_supervision import DeepSupervisionSwitch

__all__ = [
    "SwinSMT",
    "DeepSupervisionHeads",
    "current_key",
    "swin_input_divisor",
    "validate_swin_input_shape",
    "smallest_valid_swin_shape",
    "swin_smt_parameter_count",
    "NUM_SWIN_STAGES",
]

# MONAI's SwinTransformer.forward is written for exactly four stages (layers1..layers4).
NUM_SWIN_STAGES = 4
_HEADS_PREFIX = "decoder.heads."
_OLD_HEADS_PREFIX = "deep_supervision_heads."  # the heads' keys before they moved under ``decoder``


def current_key(key: str) -> str:
    """A SwinSMT state-dict key in today's naming: ``deep_supervision_heads.*`` -> ``decoder.heads.*``."""
    return _HEADS_PREFIX + key[len(_OLD_HEADS_PREFIX):] if key.startswith(_OLD_HEADS_PREFIX) else key


def swin_input_divisor(patch_size: int = 2, num_stages: int = NUM_SWIN_STAGES) -> int:
    """Every spatial size must be a multiple of this: ``patch_size * 2**num_stages`` (32 by default).

    The patch embedding divides by ``patch_size``; each of the ``num_stages`` patch-merging steps halves the
    size, and the decoder doubles it back exactly, so sizes that are not multiples would not line up.
    (MONAI 1.6.1 checks ``patch_size**5``, which is the same number only for ``patch_size=2``.)
    """
    if not isinstance(patch_size, int) or patch_size < 1:
        raise ValueError(f"patch_size must be a positive integer, got {patch_size!r}")
    return patch_size * 2**num_stages


def validate_swin_input_shape(spatial_shape: Sequence[int], patch_size: int = 2, num_stages: int = NUM_SWIN_STAGES) -> None:
    """Raise ``ValueError`` naming the offending sizes and the rule if ``spatial_shape`` is not valid."""
    divisor = swin_input_divisor(patch_size, num_stages)
    shape = tuple(int(s) for s in spatial_shape)
    bad = [s for s in shape if s < 1 or s % divisor]
    if bad:
        raise ValueError(
            f"input spatial size {shape} is not valid for Swin SMT / SwinUNETR: every spatial size must be a "
            f"positive multiple of patch_size * 2**{num_stages} = {patch_size} * {2**num_stages} = {divisor} "
            f"(sizes {bad} are not). Nearest valid size at or above: "
            f"{smallest_valid_swin_shape(shape, patch_size, num_stages)}"
        )


def smallest_valid_swin_shape(spatial_shape: Sequence[int], patch_size: int = 2, num_stages: int = NUM_SWIN_STAGES) -> tuple[int, ...]:
    """Round every size up to the next multiple of the divisor, e.g. (40, 56, 40) -> (64, 64, 64)."""
    divisor = swin_input_divisor(patch_size, num_stages)
    return tuple(max(1, math.ceil(int(s) / divisor)) * divisor for s in spatial_shape)


class DeepSupervisionHeads(DeepSupervisionSwitch, nn.Module):
    """``SwinSMT.decoder``: the deep-supervision heads on MONAI's ``decoder2`` .. ``decoder5`` and their switch.

    Head ``i`` maps the ``feature_size * 2**i`` channels at 1/2**(i+1) resolution to logits. Built with
    ``enabled=False`` it has no heads (and no parameters) and ``deep_supervision`` cannot be switched on.
    With it on, SwinSMT returns ``[full, 1/2, 1/4, 1/8, 1/16]`` logits.
    """

    network_name = "SwinSMT"

    def __init__(self, spatial_dims: int, feature_size: int, out_channels: int, enabled: bool) -> None:
        super().__init__()
        self.heads = nn.ModuleList(
            UnetOutBlock(spatial_dims=spatial_dims, in_channels=feature_size * 2**i, out_channels=out_channels)
            for i in range(NUM_SWIN_STAGES)
        ) if enabled else None
        self.deep_supervision = enabled

    def forward(self, logits: torch.Tensor, features: Sequence[torch.Tensor]):
        """``logits`` alone, or with deep supervision ``[logits, *heads(features)]`` (features at 1/2 .. 1/16)."""
        if not self._deep_supervision:
            return logits
        return [logits] + [head(f) for head, f in zip(self.heads, features)]


class SwinSMT(SwinUNETR):
    """Swin Soft Mixture Transformer (Swin SMT) built on MONAI's SwinUNETR.

    Args:
        in_channels, out_channels: image channels and number of classes.
        feature_size: width of the first stage (48 in the paper; must be divisible by 12).
        depths, num_heads: per stage, four stages.
        window_size, patch_size: Swin window size and patch-embedding size.
        use_v2: MONAI's SwinUNETR-V2 (a residual conv block before every stage).
        num_experts: experts per Soft MoE layer; 0 keeps every dense MLP (plain SwinUNETR).
        moe_stages: zero-based stages whose blocks get Soft MoE (default the last three, as in the paper).
        slots: ``"dynamic"`` (authors' code, default) or ``"learned"`` (original Soft MoE), see
            :class:`~nnunet_moe.layers.soft_moe.SoftMoE`.
        slots_per_expert: learned slots only (default 1).
        mlp_ratio: hidden width ratio of the MLPs and experts.
        drop_rate, attn_drop_rate, dropout_path_rate: MONAI's dropout, attention dropout, drop path.
        expert_dropout_rate: dropout inside the experts (default: ``drop_rate``).
        spatial_dims: 2 or 3.
        deep_supervision: build the extra heads (``decoder``) and return one output per decoder scale.
        norm_name, use_checkpoint, **swin_unetr_kwargs: passed on to MONAI's ``SwinUNETR``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        feature_size: int = 48,
        depths: Sequence[int] = (2, 2, 2, 2),
        num_heads: Sequence[int] = (3, 6, 12, 24),
        window_size: int | Sequence[int] = 7,
        patch_size: int = 2,
        use_v2: bool = False,
        num_experts: int = 32,
        moe_stages: Sequence[int] = (1, 2, 3),
        slots: str = "dynamic",
        slots_per_expert: int | None = None,
        mlp_ratio: float = 4.0,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        dropout_path_rate: float = 0.0,
        expert_dropout_rate: float | None = None,
        spatial_dims: int = 3,
        deep_supervision: bool = False,
        norm_name: tuple | str = "instance",
        use_checkpoint: bool = False,
        **swin_unetr_kwargs,
    ) -> None:
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims!r}")
        if len(depths) != NUM_SWIN_STAGES or len(num_heads) != NUM_SWIN_STAGES:
            raise ValueError(
                f"depths and num_heads need exactly {NUM_SWIN_STAGES} entries (MONAI's Swin encoder has four stages), "
                f"got depths={tuple(depths)}, num_heads={tuple(num_heads)}"
            )
        if not isinstance(num_experts, int) or num_experts < 0:
            raise ValueError(f"num_experts must be an integer >= 0 (0 = dense MLPs), got {num_experts!r}")
        moe_stages = tuple(moe_stages)
        if any(not isinstance(s, int) or not 0 <= s < NUM_SWIN_STAGES for s in moe_stages) or len(set(moe_stages)) != len(moe_stages):
            raise ValueError(f"moe_stages must be distinct zero-based stage indices in 0..{NUM_SWIN_STAGES - 1}, got {moe_stages}")
        if slots not in SLOT_SCHEMES:
            raise ValueError(f"slots must be one of {SLOT_SCHEMES}, got {slots!r}")
        swin_input_divisor(patch_size)  # validates patch_size
        if "img_size" in swin_unetr_kwargs:
            raise ValueError("img_size is not an argument of MONAI >= 1.5 SwinUNETR; the input size is free (see swin_input_divisor)")

        super().__init__(
            in_channels=in_channels,
            out_channels=out_channels,
            patch_size=patch_size,
            depths=depths,
            num_heads=num_heads,
            window_size=window_size,
            mlp_ratio=mlp_ratio,
            feature_size=feature_size,
            norm_name=norm_name,
            drop_rate=drop_rate,
            attn_drop_rate=attn_drop_rate,
            dropout_path_rate=dropout_path_rate,
            use_checkpoint=use_checkpoint,
            spatial_dims=spatial_dims,
            use_v2=use_v2,
            **swin_unetr_kwargs,
        )
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.spatial_dims = spatial_dims
        self.norm_name = norm_name
        self.num_experts = num_experts
        self.moe_stages = moe_stages if num_experts > 0 else ()
        self.slots = slots

        expert_dropout = drop_rate if expert_dropout_rate is None else expert_dropout_rate
        for stage in self.moe_stages:
            dim = feature_size * 2**stage
            for block in self.swin_stage(stage).blocks:
                # Factory kwargs follow the replaced MLP so meta-device construction stays on meta.
                reference = block.mlp.linear1.weight
                block.mlp = SoftMoE(
                    dim,
                    num_experts,
                    slots=slots,
                    slots_per_expert=slots_per_expert,
                    mlp_ratio=mlp_ratio,
                    dropout=expert_dropout,
                    device=reference.device,
                    dtype=reference.dtype,
                )

        self.decoder = DeepSupervisionHeads(spatial_dims, feature_size, out_channels, bool(deep_supervision))
        self._register_load_state_dict_pre_hook(self._upgrade_state_dict)

    # -- facts of the architecture (the trainers read them from the class) ---------------------------
    @classmethod
    def input_divisor(cls, patch_size: int = 2) -> int:
        """Every spatial size must be a multiple of this (see :func:`swin_input_divisor`)."""
        return swin_input_divisor(patch_size)

    @classmethod
    def deep_supervision_factors(cls) -> tuple[int, ...]:
        """Downsampling factor of each deep-supervision output, highest resolution first: 1, 2, 4, 8, 16."""
        return tuple(2**i for i in range(NUM_SWIN_STAGES + 1))

    # -- structure -------------------------------------------------------------------------------------
    def swin_stage(self, stage: int):
        """MONAI's ``BasicLayer`` of zero-based ``stage`` (``swinViT.layers{stage+1}[0]``)."""
        return getattr(self.swinViT, f"layers{stage + 1}")[0]

    def moe_layers(self) -> dict[str, SoftMoE]:
        """Qualified name -> SoftMoE module, for every MoE block."""
        return {name: m for name, m in self.named_modules() if isinstance(m, SoftMoE)}

    # -- loading -------------------------------------------------------------------------------------
    def _upgrade_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Runs before the strict key check: older checkpoints and those trained with heads must load here.
        for key in [k for k in state_dict if k.startswith(prefix + _OLD_HEADS_PREFIX)]:
            state_dict[prefix + current_key(key[len(prefix):])] = state_dict.pop(key)
        if self.decoder.heads is None:  # unused without deep supervision
            for key in [k for k in state_dict if k.startswith(prefix + _HEADS_PREFIX)]:
                del state_dict[key]

    # -- input checks ----------------------------------------------------------------------------------
    def _check_input_size(self, spatial_shape):
        # Overrides MONAI's check (patch_size**5) with the exact rule; MONAI's forward would call this too.
        validate_swin_input_shape(spatial_shape, self.patch_size)

    def validate_input(self, x: torch.Tensor) -> None:
        """Raise ``ValueError`` if ``x`` is not ``(B, in_channels, *spatial)`` with valid spatial sizes."""
        if x.dim() != self.spatial_dims + 2:
            raise ValueError(
                f"SwinSMT(spatial_dims={self.spatial_dims}) expects a {self.spatial_dims + 2}D input "
                f"(B, C, {'D, H, W' if self.spatial_dims == 3 else 'H, W'}), got shape {tuple(x.shape)}"
            )
        if x.shape[1] != self.in_channels:
            raise ValueError(f"SwinSMT(in_channels={self.in_channels}) got an input with {x.shape[1]} channels")
        spatial = tuple(x.shape[2:])
        self._check_input_size(spatial)
        bottleneck = [s // swin_input_divisor(self.patch_size) for s in spatial]
        norm = self.norm_name[0] if isinstance(self.norm_name, tuple) else self.norm_name
        if math.prod(bottleneck) == 1 and str(norm).lower() == "instance":
            # MONAI's encoder10 instance-normalises the 1/(patch*16) bottleneck, which needs > 1 voxel.
            raise ValueError(
                f"input spatial size {spatial} leaves a single bottleneck voxel; instance normalisation needs more: "
                f"make at least one spatial size >= {2 * swin_input_divisor(self.patch_size)}"
            )

    # -- forward ---------------------------------------------------------------------------------------
    def forward(self, x_in: torch.Tensor):
        if not torch.jit.is_scripting() and not torch.jit.is_tracing():
            self.validate_input(x_in)
        # Same data flow as MONAI's SwinUNETR.forward; spelled out to reach the decoder outputs.
        hidden = self.swinViT(x_in, self.normalize)
        enc0 = self.encoder1(x_in)
        enc1 = self.encoder2(hidden[0])
        enc2 = self.encoder3(hidden[1])
        enc3 = self.encoder4(hidden[2])
        dec4 = self.encoder10(hidden[4])
        dec3 = self.decoder5(dec4, hidden[3])  # 1/16
        dec2 = self.decoder4(dec3, enc3)  # 1/8
        dec1 = self.decoder3(dec2, enc2)  # 1/4
        dec0 = self.decoder2(dec1, enc1)  # 1/2
        return self.decoder(self.out(self.decoder1(dec0, enc0)), (dec0, dec1, dec2, dec3))


def _meta_device_mode():
    """A torch-function mode that creates new tensors on the meta device, except ``torch.linspace``.

    MONAI's Swin encoder calls ``.item()`` on a ``torch.linspace`` (drop-path rates), which the plain
    ``with torch.device("meta")`` context cannot serve.
    """
    from torch.overrides import TorchFunctionMode
    from torch.utils._device import _device_constructors

    constructors = _device_constructors()

    class _MetaExceptLinspace(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = dict(kwargs or {})
            if func in constructors and func is not torch.linspace and kwargs.get("device") is None:
                kwargs["device"] = "meta"
            return func(*args, **kwargs)

    return _MetaExceptLinspace()


def swin_smt_parameter_count(**kwargs) -> int:
    """Number of parameters of ``SwinSMT(**kwargs)``, built on the meta device (no memory, no init cost)."""
    try:
        mode = _meta_device_mode()
    except ImportError:  # private torch helper moved: build for real
        return sum(p.numel() for p in SwinSMT(**kwargs).parameters())
    with mode:
        network = SwinSMT(**kwargs)
    return sum(p.numel() for p in network.parameters())
