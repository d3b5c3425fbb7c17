"""Load SwinUNETR weights (self-supervised Swin encoder or full network) into SwinUNETR / Swin SMT.

Accepted checkpoint layouts
---------------------------
(a) MONAI's self-supervised Swin encoder (``model_swinvit.pt`` of MONAI's research SwinUNETR pretraining,
    Tang et al., CVPR 2022): ``{"state_dict": {"module.patch_embed.proj.weight": ...,
    "module.layers1.0.blocks.0.mlp.fc1.weight": ..., "module.layers1.0.downsample.reduction.weight": ...}}``.
    Keys map to ``swinViT.<key without "module.">`` with the MLP's ``fc1``/``fc2`` renamed to MONAI's
    ``linear1``/``linear2`` (the mapping MONAI's ``SwinUNETR.load_from`` performs by hand).
(b) A full SwinUNETR / Swin SMT state dict, bare or wrapped in ``{"state_dict": ...}``, ``{"network_weights": ...}``
    (nnU-Net checkpoints) or ``{"model": ...}``; ``module.`` (DDP) and ``_orig_mod.`` (torch.compile) prefixes
    are removed; Swin SMT's deep-supervision heads load under their older name ``deep_supervision_heads.*`` too.

Blocks whose MLP is a Soft MoE are *upcycled*: every expert starts as a copy of the checkpoint's dense MLP
of that block (``mlp.linear1`` -> ``experts.fc1_*``, ``mlp.linear2`` -> ``experts.fc2_*``); the router
parameters (slot projection and norms, or learned slots) keep their initialisation and are listed as missing.
"""
from __future__ import annotations

import os

import torch
from torch import nn

from nnunet_moe.networks.swin_smt import current_key
from nnunet_moe.networks.unwrap import unwrap_network
from nnunet_moe.pretrained.checkpoint_io import read_state_dict
from nnunet_moe.pretrained.load_report import LoadReport

__all__ = ["load_swin_unetr_weights"]

_STRIP_PREFIXES = ("module.", "_orig_mod.")
# Per-expert stacked tensor <- dense MLP tensor of the same block.
_UPCYCLE_MAP = {
    "experts.fc1_weight": "linear1.weight",
    "experts.fc1_bias": "linear1.bias",
    "experts.fc2_weight": "linear2.weight",
    "experts.fc2_bias": "linear2.bias",
}


def _normalise_key(key: str) -> str:
    changed = True
    while changed:
        changed = False
        for prefix in _STRIP_PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix):]
                changed = True
    # The self-supervised checkpoint names the MLP layers fc1/fc2, MONAI's MLPBlock linear1/linear2.
    return current_key(key).replace(".mlp.fc1.", ".mlp.linear1.").replace(".mlp.fc2.", ".mlp.linear2.")


def load_swin_unetr_weights(
    network: nn.Module,
    checkpoint_path: str | os.PathLike,
    *,
    skip_mismatched: bool = False,
    trust_checkpoint: bool | None = None,
    verbose: bool = True,
) -> LoadReport:
    """Load a SwinUNETR checkpoint (self-supervised encoder or full network) into ``network``.

    Args:
        network: a MONAI ``SwinUNETR`` or :class:`nnunet_moe.networks.swin_smt.SwinSMT` (possibly wrapped by
            ``torch.compile`` or DDP).
        checkpoint_path: ``.pt``/``.pth`` file, see the module docstring for the layouts.
        skip_mismatched: skip tensors whose shape differs (e.g. another number of classes or input channels)
            and list them in the report, instead of raising.
        trust_checkpoint: allow ``torch.load(weights_only=False)`` for files holding arbitrary Python objects
            (only for files you trust: unpickling can run code); None: as ``$NNUNET_MOE_TRUST_CHECKPOINTS``.
        verbose: print the report summary.

    Returns:
        :class:`~nnunet_moe.pretrained.load_report.LoadReport` (loaded, upcycled, skipped, missing, unexpected keys).

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: not a readable checkpoint, not a state dict, no key in common with the network, or a
            shape mismatch (naming the first mismatching key and both shapes) unless ``skip_mismatched``.
    """
    path = os.fspath(checkpoint_path)
    network = unwrap_network(network)
    if not hasattr(network, "swinViT"):
        raise ValueError(f"{type(network).__name__} is not a SwinUNETR / SwinSMT network (it has no swinViT encoder)")
    source = read_state_dict(path, trust_checkpoint=trust_checkpoint)
    target = network.state_dict()

    # Self-supervised encoder checkpoints name keys relative to the Swin encoder (no "swinViT." prefix).
    encoder_only = not any(_normalise_key(k).startswith("swinViT.") for k in source)
    layout = "self-supervised Swin encoder" if encoder_only else "full network"
    normalised: dict[str, torch.Tensor] = {}
    original_name: dict[str, str] = {}
    for key, value in source.items():
        new_key = ("swinViT." if encoder_only else "") + _normalise_key(key)
        normalised[new_key] = value
        original_name[new_key] = key

    report = LoadReport(checkpoint=path, layout=layout)
    new_state = dict(target)
    used: set[str] = set()

    def check_shape(src_key: str, tgt_key: str, src_shape, tgt_shape) -> bool:
        if tuple(src_shape) == tuple(tgt_shape):
            return True
        if skip_mismatched:
            report.skipped[tgt_key] = f"shape {tuple(src_shape)} in checkpoint, {tuple(tgt_shape)} in network"
            return False
        raise ValueError(
            f"checkpoint {path!r} does not fit this network: checkpoint tensor {src_key!r} has shape "
            f"{tuple(src_shape)} but the network's {tgt_key!r} has shape {tuple(tgt_shape)} (a different "
            "architecture, feature size, channel or class count?); pass skip_mismatched=True to load the rest"
        )

    for key, tensor in target.items():
        if key in normalised:
            used.add(key)
            if check_shape(key, key, normalised[key].shape, tensor.shape):
                new_state[key] = normalised[key].to(dtype=tensor.dtype)
                report.loaded.append(key)
            continue
        upcycle_source = next(
            (key[: -len(moe)] + dense for moe, dense in _UPCYCLE_MAP.items() if key.endswith(".mlp." + moe)), None
        )
        if upcycle_source is not None and upcycle_source in normalised:
            used.add(upcycle_source)
            dense = normalised[upcycle_source]
            if check_shape(upcycle_source, key, (tensor.shape[0],) + tuple(dense.shape), tensor.shape):
                new_state[key] = dense.to(dtype=tensor.dtype).unsqueeze(0).expand_as(tensor).clone()
                report.upcycled.append(key)
            continue
        report.missing.append(key)
    report.unexpected = [original_name[k] for k in normalised if k not in used]

    if not report.loaded and not report.upcycled and not report.skipped:
        example = list(source)[:3]
        raise ValueError(
            f"checkpoint {path!r} has no tensor in common with {type(network).__name__} ({len(source)} tensors, e.g. "
            f"{example}); expected SwinUNETR keys such as 'module.patch_embed.proj.weight' (self-supervised "
            "encoder) or 'swinViT.patch_embed.proj.weight' (full network) - is it another architecture?"
        )
    network.load_state_dict(new_state, strict=True)
    if verbose:
        print(report.summary())
    return report
