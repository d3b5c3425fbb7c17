"""Load ImageNet-pretrained VMamba-Tiny weights into the VSS encoder of Swin-UMamba / Swin-UMamba-dagger.

References
----------
- Liu et al., "Swin-UMamba", MICCAI 2024, Sec. 2.2 / 3.2: the encoder is initialised from VMamba-Tiny
  and frozen (except the patch embedding) for the first 10 epochs. Only what was loaded is frozen
  (:func:`loaded_encoder_parameters`): in 3D the scan projections, dt, A, D, the 3D depthwise convolutions
  and the patch mergings have other shapes, stay at their initialisation and must train.
- Liu et al., "VMamba", arXiv:2401.10166 (the checkpoint: a dict whose ``"model"`` entry holds
  ``patch_embed.*``, ``layers.{i}.blocks.{j}.{ln_1, self_attention.*}``,
  ``layers.{i}.downsample.{reduction, norm}``, and the classifier ``head.*`` / final ``norm.*``).

Rules
-----
- ``head.*`` and ``norm.*`` (classifier, final norm) are dropped: the segmentation encoder has neither.
- Keys are matched by name (our encoder uses VMamba's names); a ``module.`` prefix (DDP) and an
  ``encoder.`` / ``vssm_encoder.`` / ``backbone.`` prefix are stripped.
- Patch embedding with another number of input channels but the same kernel (dagger: 4x4 from the
  input; checkpoint: 4x4 from RGB) is adapted with timm's ``adapt_input_conv``: for 1 channel the RGB
  kernels are summed (a grey image replicated to RGB gives the same response), otherwise the RGB
  kernels are repeated cyclically and scaled by ``3 / in_channels``. With another kernel size
  (Swin-UMamba: 2x2 from the 48-channel stem) ``patch_embed.proj.{weight,bias}`` are skipped and
  reported; ``patch_embed.norm`` is still loaded.
- Any other shape mismatch (e.g. 3D networks: six scan directions and ``conv3d``) is skipped and
  reported, never silently reshaped.
"""
from __future__ import annotations

from pathlib import Path

import torch
from timm.models import adapt_input_conv
from torch import nn

from nnunet_moe.networks.swin_umamba import VSSEncoder
from nnunet_moe.pretrained.checkpoint_io import read_state_dict
from nnunet_moe.pretrained.load_report import LoadReport, sort_checkpoint

__all__ = ["load_vmamba_encoder_weights", "loaded_encoder_parameters", "read_vmamba_state_dict", "DROPPED_PREFIXES"]

DROPPED_PREFIXES = ("head.", "norm.")
_STRIPPED_PREFIXES = ("module.", "encoder.", "vssm_encoder.", "backbone.")


def _find_encoder(encoder_or_network: nn.Module) -> VSSEncoder:
    if isinstance(encoder_or_network, VSSEncoder):
        return encoder_or_network
    encoder = getattr(encoder_or_network, "encoder", None)
    if isinstance(encoder, VSSEncoder):
        return encoder
    raise TypeError(f"expected a VSSEncoder or a network with a VSSEncoder at `.encoder` (SwinUMamba, SwinUMambaD), "
                    f"got {type(encoder_or_network).__name__}")


def read_vmamba_state_dict(checkpoint_path, trust_checkpoint: bool | None = None) -> dict[str, torch.Tensor]:
    """Read a checkpoint file and return its state dict with prefixes stripped; clear errors for bad files.

    ``trust_checkpoint=True`` permits arbitrary pickled objects (training checkpoints that also store a config
    object); only use it for files you trust. None (default): trusted only if ``$NNUNET_MOE_TRUST_CHECKPOINTS``
    is ``1`` (how a user of ``nnUNetv2_train`` says so).
    """
    path = Path(checkpoint_path)
    state = read_state_dict(path, trust_checkpoint=trust_checkpoint)
    cleaned = {}
    for key, value in state.items():
        for prefix in _STRIPPED_PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix):]
        cleaned[key] = value
    if not any(k.startswith("layers.") and ".blocks." in k for k in cleaned):
        raise ValueError(f"{path} has no VMamba encoder keys (layers.{{i}}.blocks.{{j}}.*): it is a checkpoint of "
                         f"another model. First keys: {list(cleaned)[:6]}")
    return cleaned


def load_vmamba_encoder_weights(encoder_or_network: nn.Module, checkpoint_path,
                                trust_checkpoint: bool | None = None) -> LoadReport:
    """Copy the VMamba-Tiny weights of ``checkpoint_path`` into the VSS encoder; return a
    :class:`~nnunet_moe.pretrained.load_report.LoadReport` (encoder-relative key names)."""
    encoder = _find_encoder(encoder_or_network)
    checkpoint = read_vmamba_state_dict(checkpoint_path, trust_checkpoint=trust_checkpoint)
    target = encoder.state_dict()
    report = LoadReport(checkpoint=str(checkpoint_path), layout="VMamba encoder")

    def adapt(key, value, wanted):
        want = wanted.shape
        if key == "patch_embed.proj.weight" and value.dim() == len(want) and value.shape[0] == want[0] \
                and value.shape[2:] == want[2:]:
            return (adapt_input_conv(want[1], value.float()).to(value.dtype),
                    f"input channels {value.shape[1]} -> {want[1]} "
                    f"({'sum over RGB' if want[1] == 1 else 'repeat RGB, scale 3/C'})")
        return None, f"shape {tuple(value.shape)} in checkpoint, {tuple(want)} in encoder"

    new_state = sort_checkpoint(checkpoint, target, report, drop=lambda key: key.startswith(DROPPED_PREFIXES),
                                adapt=adapt)
    if "patch_embed.proj.weight" in report.skipped and "patch_embed.proj.bias" in new_state:
        # the bias belongs to the kernel that was not loaded
        del new_state["patch_embed.proj.bias"]
        report.skipped["patch_embed.proj.bias"] = "its patch_embed.proj.weight was skipped"
    result = encoder.load_state_dict(new_state, strict=False)
    assert not result.unexpected_keys  # every key was checked against the encoder above
    report.loaded = sorted(new_state)
    report.missing = sorted(result.missing_keys)
    return report


def loaded_encoder_parameters(encoder_or_network: nn.Module, report: LoadReport) -> dict[str, nn.Parameter]:
    """The encoder parameters (encoder-relative name -> parameter) that ``report`` says were loaded from the
    checkpoint, less the patch embedding's, which the paper trains from the start: what the pretrained
    trainers freeze for their first epochs. Buffers are not parameters and never frozen."""
    loaded = set(report.loaded)
    return {name: p for name, p in _find_encoder(encoder_or_network).named_parameters()
            if name in loaded and not name.startswith("patch_embed.")}
