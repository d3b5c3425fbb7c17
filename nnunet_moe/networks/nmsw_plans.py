"""NMSW-Net from nnU-Net plans: by default both networks are the plans' CNN, sizes a CNN of those plans accepts.

``build_default_nmsw_from_plans`` makes the global and the local network with nnU-Net's
``get_network_from_plans(..., deep_supervision=False)`` unless given (``global_net`` / ``local_net``: any
other network, e.g. one of our trainers' backbones); ``global_input_size`` defaults to the plans'
patch size (the whole volume is resized to the patch the architecture was planned for). With the
plans' CNN as the global network, NMSW's objectness reads its penultimate features (``objectness_from``
"auto", see :mod:`nnunet_moe.networks.nmsw`).
``stride_divisor`` and ``downsampled_size`` turn the paper's "whole volume downsampled x3" into a size
that CNN accepts.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import numpy as np
from torch import nn

from nnunet_moe.networks.nmsw import NMSWNet


def stride_divisor(arch_kwargs: dict, ndim: int) -> Optional[Tuple[int, ...]]:
    """Total downsampling per axis of an nnU-Net CNN (product of its ``strides``); None if not given."""
    strides = arch_kwargs.get("strides")
    if strides is None:
        return None
    total = np.ones(ndim, dtype=np.int64)
    for s in strides:
        s = [s] * ndim if isinstance(s, int) else list(s)
        total *= np.asarray(s, dtype=np.int64)
    return tuple(int(t) for t in total)


def downsampled_size(size: Sequence[int], factor: float, divisor: Optional[Sequence[int]] = None) -> Tuple[int, ...]:
    """``size / factor`` per axis, rounded up to a multiple of ``divisor`` (a network's total stride) and
    at least ``divisor``: the paper's "whole volume downsampled x3" as a size a U-Net accepts.
    E.g. ``(320, 320, 320)``, factor 3, divisor 32 -> ``(128, 128, 128)``."""
    if not float(factor) > 0:
        raise ValueError(f"downsampling factor must be > 0, got {factor!r}")
    divisor = tuple(int(d) for d in divisor) if divisor is not None else (1,) * len(size)
    if len(divisor) != len(size):
        raise ValueError(f"divisor {divisor} and size {tuple(size)} need the same number of axes")
    return tuple(int(d * max(1, math.ceil(float(n) / float(factor) / d))) for n, d in zip(size, divisor))


def build_default_nmsw_from_plans(plans_manager, configuration_manager, dataset_json: dict,
                                  global_input_size: Optional[Sequence[int]] = None, k_train: int = 3,
                                  k_random: int = 1, k_infer: int = 5, tau: float = 2.0 / 3.0, overlap: float = 0.5,
                                  global_net: Optional[nn.Module] = None, local_net: Optional[nn.Module] = None,
                                  **nmsw_kwargs) -> NMSWNet:
    """NMSW-Net whose global and local nets are the plans' architecture (deep supervision off).

    ``plans_manager``: ``nnunetv2`` ``PlansManager``; ``configuration_manager``: its
    ``ConfigurationManager`` (e.g. ``plans_manager.get_configuration('3d_fullres')``). Both nets come
    from ``get_network_from_plans(arch_class_name, arch_kwargs, arch_kwargs_req_import, input_channels,
    output_channels, allow_init=True, deep_supervision=False)``; the patch is the plans' patch size and
    ``global_input_size`` defaults to it (it must be divisible by the architecture's total stride when the
    global net is the plans' CNN). ``global_net`` / ``local_net``: use these networks instead of the plans' CNN
    (the caller checks their input-size rules). Other keyword arguments go to :class:`NMSWNet`
    (``objectness_from``, ``straight_through``, ``detach_global_in_aggregation``, ...).
    Region-based label sets get ``mask_background=False`` unless given.
    """
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels

    label_manager = plans_manager.get_label_manager(dataset_json)
    in_channels = determine_num_input_channels(plans_manager, configuration_manager, dataset_json)
    num_classes = label_manager.num_segmentation_heads
    patch_size = tuple(int(p) for p in configuration_manager.patch_size)
    global_input_size = patch_size if global_input_size is None else tuple(int(s) for s in global_input_size)
    arch_kwargs = configuration_manager.network_arch_init_kwargs
    divisor = stride_divisor(arch_kwargs, len(patch_size))
    if global_net is None and divisor is not None and len(global_input_size) == len(divisor) and \
            any(s % d for s, d in zip(global_input_size, divisor)):
        raise ValueError(f"global_input_size {global_input_size} must be divisible by the architecture's total "
                         f"stride {divisor} per axis")
    if label_manager.has_regions:
        nmsw_kwargs.setdefault("mask_background", False)

    def make_net() -> nn.Module:
        return get_network_from_plans(configuration_manager.network_arch_class_name, arch_kwargs,
                                      configuration_manager.network_arch_init_kwargs_req_import,
                                      in_channels, num_classes, allow_init=True, deep_supervision=False)

    global_net = make_net() if global_net is None else global_net
    local_net = make_net() if local_net is None else local_net
    return NMSWNet(global_net, local_net, num_classes=num_classes, in_channels=in_channels,
                   patch_size=patch_size, global_input_size=global_input_size, k_train=k_train,
                   k_random=k_random, k_infer=k_infer, tau=tau, overlap=overlap, **nmsw_kwargs)
