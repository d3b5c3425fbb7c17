"""The M4oE MAE weights file: stage 1 writes it, stage 2 loads it into an ``M4oESwinUnet``.

Reference: Jiang et al., "M4oE", MICCAI 2024, "Two-phase Training Strategy": "we load the pre-trained encoder
and expert parameters and incorporate the gating network". Stage 1 is ``nnUNetTrainerM4oEPretrain``
(:mod:`nnunet_moe.networks.m4oe_mae`); stage 2 ``nnUNetTrainerM4oE`` with
``NNUNET_MOE_M4OE_MAE_WEIGHTS=<that run's output folder>/m4oe_mae_encoder.pth``.

File (``torch.save`` of plain containers, so ``torch.load(weights_only=True)`` reads it)::

    {"format": FORMAT, "format_version": 1,
     "modalities": ["CT", "MR"],        # expert i = modalities[i]; [] = one modality, dense MLPs
     "num_experts": 2,                  # 0 for dense MLPs (as M4oESwinUnet.num_experts)
     "architecture": {in_channels, spatial_dims, embed_dim, depths, num_heads, window_size, patch_size,
                      mlp_ratio, qkv_bias},
     "state_dict": {"encoder.<name>": tensor},   # M4oESwinUnet names: patch embedding, blocks, experts, merges
     "trainer": "...", "epoch": n}

Loading rules: the format marker must be there (a VMamba, SAM, Swin-ViT or nnU-Net checkpoint is named as
such, with what to do); experts, input channels, spatial dims and every encoder tensor's shape must match
the target network, else a ``ValueError`` saying what differs. Copied: every encoder tensor of the file.
Left at their initialisation and reported ``missing``: the gate of each M4oE layer (stage 1 has none) and
the whole segmentation decoder. The file is read with :func:`~nnunet_moe.pretrained.checkpoint_io.read_checkpoint`
(``weights_only=True`` unless ``NNUNET_MOE_TRUST_CHECKPOINTS=1``).
"""
from __future__ import annotations

import os

import torch
from torch import nn

from nnunet_moe.networks.m4oe import M4oESwinUnet
from nnunet_moe.pretrained.checkpoint_io import numpy_scalar_globals, read_checkpoint
from nnunet_moe.pretrained.load_report import LoadReport

__all__ = ["FORMAT", "FORMAT_VERSION", "WEIGHTS_NAME", "save_m4oe_mae_weights", "read_m4oe_mae_file",
           "load_m4oe_mae_weights"]

FORMAT = "nnunet_moe.m4oe_mae_encoder"
FORMAT_VERSION = 1
WEIGHTS_NAME = "m4oe_mae_encoder.pth"
WEIGHTS_ENV = "NNUNET_MOE_M4OE_MAE_WEIGHTS"  # the variable nnUNetTrainerM4oE reads the file from
_WHAT_TO_DO = (f"Point NNUNET_MOE_M4OE_MAE_WEIGHTS at the {WEIGHTS_NAME} that nnUNetTrainerM4oEPretrain writes into "
               f"its output folder ($nnUNet_results/<dataset>/nnUNetTrainerM4oEPretrain__<plans>__2d/fold_<f>/), or "
               f"unset it to fine-tune from scratch.")


def save_m4oe_mae_weights(model, path: str, modalities, **extra) -> str:
    """Write ``model``'s (an :class:`~nnunet_moe.networks.m4oe_mae.M4oEMAE`) encoder and experts to ``path``.
    Written to a temporary file first and renamed, so an interrupted save never leaves a half file behind."""
    modalities = [str(m) for m in modalities]
    if model.num_experts and len(modalities) != model.num_experts:
        raise ValueError(f"the MAE model has {model.num_experts} experts but {len(modalities)} modalities were given "
                         f"({modalities}); pass one modality name per expert, in expert order")
    payload = {"format": FORMAT, "format_version": FORMAT_VERSION, "modalities": modalities,
               "num_experts": int(model.num_experts), "architecture": dict(model.architecture),
               "state_dict": model.encoder_state_dict(), **extra}
    tmp = f"{path}.tmp"
    torch.save(payload, tmp)
    os.replace(tmp, path)
    return path


def _describe(obj) -> str:
    """What a file without our marker is, for the error message."""
    if not isinstance(obj, dict):
        return f"a {type(obj).__name__}"
    if "network_weights" in obj and "trainer_name" in obj:
        name = obj["trainer_name"]
        hint = (f" (the pretraining run's own checkpoint: use {WEIGHTS_NAME} in the same folder)"
                if "M4oEPretrain" in str(name) else "")
        return f"an nnU-Net training checkpoint of {name}{hint}"
    state = obj
    for key in ("state_dict", "model", "model_state_dict", "network_weights"):
        if isinstance(state.get(key), dict):
            state = state[key]
            break
    keys = [str(k) for k in state]
    if any(k.startswith("image_encoder.") for k in keys):
        return "a SAM checkpoint (image_encoder.*)"
    if any(k.startswith("layers.") and ".blocks." in k for k in keys):
        return "a VMamba checkpoint (layers.*.blocks.*)"
    if any("swinViT." in k or k.startswith("module.layers1.") for k in keys):
        return "a Swin UNETR / Swin-ViT checkpoint (swinViT.*)"
    if any(k.startswith("encoder.stages.") for k in keys):
        return "a bare state dict of an M4oE network (no MAE metadata: modalities, architecture)"
    return f"a file with keys {keys[:5]}"


def read_m4oe_mae_file(path: str, trust_checkpoint: bool | None = None) -> dict:
    """The weights file's contents, checked; a ``ValueError`` naming what the file is otherwise."""
    # numpy scalars allowed: an nnU-Net checkpoint given by mistake is then read and named, not refused as unsafe
    obj = read_checkpoint(path, trust_checkpoint, allowed_globals=numpy_scalar_globals())
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise ValueError(f"{path!r} is {_describe(obj)}, not an M4oE MAE weights file (format marker {FORMAT!r}). "
                         + _WHAT_TO_DO)
    if obj.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path!r}: M4oE MAE weights format_version {obj.get('format_version')!r}; this nnunet-moe "
                         f"reads version {FORMAT_VERSION}. Pretrain again with this version.")
    state, arch = obj.get("state_dict"), obj.get("architecture")
    if not (isinstance(state, dict) and state and all(isinstance(v, torch.Tensor) for v in state.values())
            and isinstance(arch, dict) and isinstance(obj.get("modalities"), list)
            and isinstance(obj.get("num_experts"), int)):
        raise ValueError(f"{path!r} has the M4oE MAE marker but its state_dict, architecture, modalities or "
                         f"num_experts entry is missing or malformed (a damaged or hand-edited file). {_WHAT_TO_DO}")
    return obj


def _experts(n: int, modalities) -> str:
    if not n:
        return "no experts (dense MLPs: one modality)"
    return f"{n} experts" + (f" (modalities {', '.join(modalities)})" if modalities else "")


def load_m4oe_mae_weights(network: nn.Module, path: str, modalities=None,
                          trust_checkpoint: bool | None = None) -> LoadReport:
    """Copy the MAE-pretrained encoder and experts of ``path`` into ``network`` (an ``M4oESwinUnet``).

    ``modalities``: the target's expert order (e.g. the merged dataset's ``["CT", "MR"]``); given, it must equal
    the file's. Returns a :class:`~nnunet_moe.pretrained.load_report.LoadReport` (gate and decoder: missing).
    """
    if not isinstance(network, M4oESwinUnet):
        raise TypeError(f"M4oE MAE weights load into an M4oESwinUnet, got {type(network).__name__}")
    obj = read_m4oe_mae_file(path, trust_checkpoint)
    arch, file_modalities, n = obj["architecture"], obj["modalities"], obj["num_experts"]
    pretrained = f"{path!r} was pretrained with"
    if n != network.num_experts:
        raise ValueError(f"{pretrained} {_experts(n, file_modalities)}, but this network has "
                         f"{_experts(network.num_experts, modalities)}: one expert per modality. Pretrain on the same "
                         f"merged dataset (the same modalities) as the fine-tuning run, or unset the variable.")
    if modalities is not None and n and list(modalities) != list(file_modalities):
        raise ValueError(f"{pretrained} the experts {file_modalities} (in this order), but this network's experts "
                         f"are {list(modalities)}: expert i must be the same modality in both stages. Pretrain on "
                         f"the dataset you fine-tune on.")
    for name in ("in_channels", "spatial_dims", "patch_size"):
        if name in arch and arch[name] != getattr(network, name):
            raise ValueError(f"{pretrained} {name}={arch[name]}, this network has {name}="
                             f"{getattr(network, name)}. Pretrain with the fine-tuning dataset and configuration.")
    target = network.state_dict()
    state = obj["state_dict"]
    differ = [f"{k} {tuple(v.shape)} in the file, "
              + (f"{tuple(target[k].shape)} here" if k in target else "absent here")
              for k, v in state.items() if k not in target or target[k].shape != v.shape]
    # the gates are new in stage 2: every other encoder tensor must come from the file
    absent = [k for k in target if k.startswith("encoder.") and k not in state
              and ".mlp.gate." not in k and not k.endswith(".mlp.modality_bias")]
    if differ or absent:
        shown = (differ + [f"{k} absent from the file" for k in absent])[:4]
        raise ValueError(f"{pretrained} another encoder architecture ({arch}): {len(differ) + len(absent)} "
                         f"tensors do not match this network, e.g. {'; '.join(shown)}. Pretrain and fine-tune with "
                         f"the same architecture settings.")
    result = network.load_state_dict(state, strict=False)
    assert not result.unexpected_keys  # every key was checked against the network above
    return LoadReport(checkpoint=str(path), layout="M4oE MAE encoder + experts", loaded=sorted(state),
                      missing=sorted(result.missing_keys))
