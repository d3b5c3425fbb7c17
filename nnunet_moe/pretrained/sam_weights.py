"""Load the official SAM ViT-B checkpoint (``sam_vit_b_01ec64.pth``) into MoE-SAM at input size S.

Point at the file with ``NNUNET_MOE_SAM_WEIGHTS=/path/sam_vit_b_01ec64.pth`` (nothing is downloaded
at run time). Layout: segment-anything's ``Sam`` state dict, keys ``image_encoder.*``,
``prompt_encoder.*``, ``mask_decoder.*`` (a bare dict or wrapped as ``{"model": ...}`` etc., read by
:func:`nnunet_moe.pretrained.checkpoint_io.read_state_dict` with ``weights_only`` loading). MoE-SAM
keeps SAM's key names, so every SAM tensor has a counterpart; what differs:

- ``image_encoder.pos_embed`` ``(1, 64, 64, 768)`` (1024²) -> ``(1, S/16, S/16, 768)``: bicubic
  resize with antialiasing;
- the global-attention blocks' (2, 5, 8, 11) ``rel_pos_h`` / ``rel_pos_w`` ``(127, 64)`` ->
  ``(2*S/16 - 1, 64)``: linear resize along the offsets (what SAM's ``get_rel_pos`` does on the fly);
  the windowed blocks' tables (window 14) fit at every S;
- mask tokens: MoE-SAM has one per class (``C``), SAM 4 (token 0 its single-mask output, 1-3 its
  multimask outputs). Tokens and hypernetwork MLPs ``0 .. min(C, 4) - 1`` are loaded in order (so the
  background class starts from SAM's single-mask token); with ``C > 4`` the others keep their
  initialisation, with ``C < 4`` SAM's extra ones are dropped. The IoU head's last layer (one output
  per token) is skipped when ``C != 4``: it is frozen and unused.

Refused with a clear error: a SAM checkpoint of another size (ViT-L: embed dim 1024, 24 blocks;
ViT-H: 1280, 32 blocks), a checkpoint of another model (no SAM keys), and a MoE-SAM network whose
encoder is not ViT-B. Adapters, MoE block and prompt generator are reported as missing (they start
from their initialisation).
"""
from __future__ import annotations

import os
import re

import torch
import torch.nn.functional as F

from nnunet_moe.pretrained.checkpoint_io import read_state_dict
from nnunet_moe.pretrained.load_report import LoadReport, sort_checkpoint

__all__ = ["load_sam_weights", "sam_encoder_size", "SAM_SIZES"]

SAM_SIZES = {(768, 12): "ViT-B", (1024, 24): "ViT-L", (1280, 32): "ViT-H"}
_PREFIXES = ("image_encoder.", "prompt_encoder.", "mask_decoder.")
_PATCH_KEY = "image_encoder.patch_embed.proj.weight"
_MASK_TOKEN_PARTS = re.compile(r"^mask_decoder\.output_hypernetworks_mlps\.(\d+)\.")


def sam_encoder_size(state: dict, source: str = "checkpoint") -> tuple[int, int]:
    """``(embed_dim, depth)`` of a SAM state dict's image encoder; ValueError if it is not a SAM checkpoint."""
    if _PATCH_KEY not in state or not any(k.startswith("mask_decoder.") for k in state):
        sample = list(state)[:5]
        raise ValueError(
            f"{source} is not a Segment Anything checkpoint: expected keys {', '.join(p + '*' for p in _PREFIXES)} "
            f"(e.g. {_PATCH_KEY}) as in sam_vit_b_01ec64.pth; its first keys are {sample}")
    depth = len({int(m.group(1)) for k in state if (m := re.match(r"image_encoder\.blocks\.(\d+)\.", k))})
    return int(state[_PATCH_KEY].shape[0]), depth


def _resize_pos_embed(pos: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    grid = pos.permute(0, 3, 1, 2).float()
    resized = F.interpolate(grid, size=size, mode="bicubic", align_corners=False, antialias=True)
    return resized.permute(0, 2, 3, 1).to(pos.dtype)


def _resize_rel_pos(table: torch.Tensor, length: int) -> torch.Tensor:
    resized = F.interpolate(table.t().unsqueeze(0).float(), size=length, mode="linear", align_corners=False)
    return resized.squeeze(0).t().to(table.dtype)


def load_sam_weights(model: torch.nn.Module, checkpoint_path: str | os.PathLike) -> LoadReport:
    """Copy a SAM ViT-B checkpoint into ``model`` (a :class:`~nnunet_moe.networks.moe_sam.MoESAM`), resized to
    its input size; returns what was loaded, adapted, skipped, dropped and left at initialisation."""
    path = os.fspath(checkpoint_path)
    if getattr(model, "encoder_name", "vit_b") != "vit_b":
        raise ValueError(f"SAM checkpoints are ViT-B weights; this MoE-SAM network has the {model.encoder_name!r} "
                         "encoder (use a trainer with the ViT-B encoder, e.g. nnUNetTrainerMoESAM)")
    state = read_state_dict(path)
    dim, depth = sam_encoder_size(state, repr(path))
    size = SAM_SIZES.get((dim, depth), f"an unknown size (embed dim {dim}, {depth} blocks)")
    if size != "ViT-B":
        raise ValueError(
            f"{path!r} is a SAM {size} checkpoint (image encoder embed dim {dim}, {depth} blocks); MoE-SAM is built on "
            "SAM ViT-B (embed dim 768, 12 blocks): use sam_vit_b_01ec64.pth")

    target = model.state_dict()
    report = LoadReport(checkpoint=path, layout="SAM ViT-B")
    num_tokens = model.mask_decoder.num_mask_tokens
    report.unexpected = [k for k in state if not k.startswith(_PREFIXES)]

    def drop(key):  # mask tokens of classes beyond this network's
        m = _MASK_TOKEN_PARTS.match(key)
        return key not in target and m is not None and int(m.group(1)) >= num_tokens

    def adapt(key, value, wanted):
        want = wanted.shape
        if key == "image_encoder.pos_embed":
            return (_resize_pos_embed(value, tuple(want[1:3])),
                    f"position grid {tuple(value.shape[1:3])} -> {tuple(want[1:3])} (bicubic)")
        if key.endswith((".attn.rel_pos_h", ".attn.rel_pos_w")) and value.shape[1:] == want[1:]:
            return _resize_rel_pos(value, want[0]), f"relative positions {value.shape[0]} -> {want[0]} (linear)"
        if key == "mask_decoder.mask_tokens.weight" and value.shape[1:] == want[1:]:
            rows = min(value.shape[0], want[0])
            tokens = wanted.clone()
            tokens[:rows] = value[:rows]
            return tokens, f"mask tokens 0..{rows - 1} of the checkpoint's {value.shape[0]} for {want[0]} classes"
        if key.startswith("mask_decoder.iou_prediction_head."):
            return None, f"IoU head output for {value.shape[0]} tokens, {want[0]} here (frozen, unused)"
        return None

    new = sort_checkpoint({k: v for k, v in state.items() if k.startswith(_PREFIXES)}, target, report, drop, adapt)
    model.load_state_dict(new, strict=False)
    report.loaded = list(new)
    report.missing = [k for k in target if k not in new and k not in report.skipped]
    return report
